"""smtpd's tables as it reads and searches them at run time (table.c, table_static.c, table_db.c).

A `file:` table is read by smtpd's static backend line by line (`key value`, split at the first
blank or colon; no continuation lines), a `db:` table is whatever `makemap` built from its source
(fparseln: `#` comments and `\\` continuations), an inline `{ ... }` is static too. Lookups lower
the key and compare per service: domains with `*` wildcards, addresses by parts, networks by
mask, regexes with POSIX ERE (here: Python's re, which agrees on the patterns smtpd.conf uses).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import Enum

SUBADDRESS_DELIMITER = "+"


class Service(Enum):
    """table_service: what a lookup asks for, which decides how keys are compared."""

    ALIAS = "ALIAS"
    DOMAIN = "DOMAIN"
    CREDENTIALS = "CREDENTIALS"
    NETADDR = "NETADDR"
    MAILADDR = "MAILADDR"
    STRING = "STRING"
    REGEX = "REGEX"


class TableLoadError(Exception):
    """A table file smtpd (or makemap) cannot read; the message is the tool's own line."""


@dataclass
class Table:
    """One table: its entries in smtpd's key order (a splay tree: sorted), and its type.

    The type is parse.y's: a static table is a list or a map (hash) by its content, a db is
    dynamic (either), and a table whose file could not be loaded is neither.
    """

    name: str
    backend: str  # static, file, db
    entries: dict[str, str | None] = field(default_factory=dict)
    kind: str = "hash"  # list, hash, dynamic, none

    def usable_as(self, kind: str) -> bool:
        """table_check_type(): T_DYNAMIC|T_LIST or T_DYNAMIC|T_HASH, as the use requires."""
        return self.kind in (kind, "dynamic")

    def match(self, service: Service, key: str) -> bool:
        return self.lookup(service, key) is not None

    def lookup(self, service: Service, key: str) -> str | None:
        """The value for `key` (or "" for a list entry), None when nothing matches."""
        lkey = key.lower()
        compare = _COMPARE.get(service)
        if compare is None or (self.backend == "db" and service not in _DB_MATCHED):
            value = self.entries.get(lkey, _MISSING)
            return None if value is _MISSING else (value or "")
        for k in sorted(self.entries):
            if compare(lkey, k):
                return self.entries[k] or ""
        return None


_MISSING = "\0missing"


def hostname_match(hostname: str, pattern: str) -> bool:
    """util.c hostname_match(): `*` skips to the next character equal to the pattern's next."""
    h, p = hostname.lower(), pattern.lower()
    i = j = 0
    while j < len(p) and i < len(h):
        if p[j] == "*":
            while j < len(p) and p[j] == "*":
                j += 1
            nxt = p[j] if j < len(p) else ""
            while i < len(h) and h[i] != nxt:
                i += 1
            continue
        if p[j] != h[i]:
            return False
        i += 1
        j += 1
    return i == len(h) and j == len(p)


@dataclass(frozen=True)
class MailAddr:
    user: str
    domain: str

    @classmethod
    def parse(cls, text: str) -> MailAddr:
        """to.c text_to_mailaddr(): split at the last '@'; no '@' is a user only."""
        user, at, domain = text.rpartition("@")
        if not at:
            return cls(text, "")
        return cls(user, domain)

    def __str__(self) -> str:
        return f"{self.user}@{self.domain}"


def mailaddr_match(addr: MailAddr, pattern: MailAddr) -> bool:
    """util.c mailaddr_match(): empty parts of the table's address match anything."""
    if not pattern.user and not pattern.domain:
        return True
    if pattern.domain and not hostname_match(addr.domain, pattern.domain):
        return False
    if pattern.user:
        user = addr.user
        if SUBADDRESS_DELIMITER not in pattern.user:
            user = user.split(SUBADDRESS_DELIMITER, 1)[0]
        if user.lower() != pattern.user.lower():
            return False
    return True


def _mailaddr_compare(key: str, entry: str) -> bool:
    return mailaddr_match(MailAddr.parse(key), MailAddr.parse(entry))


def _netaddr_compare(key: str, entry: str) -> bool:
    """table_netaddr_match(): equal text, or the key's address inside the entry's network."""
    if key == entry:
        return True
    try:
        address = ipaddress.ip_address(key.strip("[]"))
        network = ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return False
    return address.version == network.version and address in network


def _regex_compare(key: str, pattern: str) -> bool:
    flags = 0
    if pattern.startswith("(?i)"):
        pattern, flags = pattern[4:], re.IGNORECASE
    try:
        return re.search(pattern, key, flags) is not None
    except re.error:
        return False  # regcomp() failing is no match


_COMPARE = {
    Service.DOMAIN: hostname_match,
    Service.NETADDR: _netaddr_compare,
    Service.MAILADDR: _mailaddr_compare,
    Service.REGEX: _regex_compare,
}
_DB_MATCHED = frozenset(_COMPARE)


def load_static(name: str, content: bytes, path: str) -> Table:
    """table_static_priv_load(): the list/hash decision is made by the first entry line."""
    table = Table(name, "file")
    decided: bool | None = None  # None: not yet; True: list; False: hash
    for lineno, raw in enumerate(content.decode("utf-8", "surrogateescape").split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if decided is None and line[1:].strip() == "@list":
                decided = True
            continue
        if decided is None:
            decided = not any(c in line for c in " \t:")
        if decided:
            table.entries.setdefault(line.lower(), None)
            continue
        key, value = _split_entry(line)
        if value is None:
            raise TableLoadError(f"{path}: invalid map entry line {lineno}")
        table.entries[key.lower()] = value
    table.kind = "list" if decided else "hash"
    return table


def _split_entry(line: str) -> tuple[str, str | None]:
    """strsep(" \\t:") then skip blanks and a ':' followed by a blank, as table_static.c does."""
    m = re.search(r"[ \t:]", line)
    if m is None:
        return line, None
    key, rest = line[: m.start()], line[m.end() :]
    i = 0
    while i < len(rest) and (rest[i] in " \t\r\v\f" or (rest[i] == ":" and rest[i + 1 : i + 2].isspace())):
        i += 1
    value = rest[i:]
    return key, value or None


def load_makemap(name: str, content: bytes, source: str, aliases: bool) -> Table:
    """makemap's parse_map(): the db that `makemap [-t aliases] -o DB SOURCE` writes."""
    table = Table(name, "db", kind="dynamic")
    for lineno, line in _fparseln(content.decode("utf-8", "surrogateescape")):
        keyp = line.lstrip()
        if not keyp:
            continue
        m = re.search(r"[ \t:]", keyp)
        if m is None or m.start() == 0:
            raise TableLoadError(f"makemap: {source}:{lineno}: invalid entry")
        key, value = keyp[: m.start()].lower(), keyp[m.end() :].lstrip(": \t\r\v\f")
        if not value or (aliases and not all(_is_expandnode(v.strip()) for v in value.split(","))):
            raise TableLoadError(f"makemap: {source}:{lineno}: invalid entry")
        if key in table.entries:
            raise TableLoadError(f"makemap: {source}:{lineno}: duplicate entry for {keyp[: m.start()]}")
        table.entries[key] = value
    return table


def _fparseln(text: str) -> list[tuple[int, str]]:
    """fparseln(3) with FPARSELN_UNESCCOMM: `#` starts a comment, `\\` joins the next line."""
    out: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not pending:
            start = lineno
        line = raw
        hash_at = next((i for i, c in enumerate(line) if c == "#" and (i == 0 or line[i - 1] != "\\")), -1)
        if hash_at >= 0:
            line = line[:hash_at]
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        out.append((start, (pending + line).replace("\\#", "#")))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _is_expandnode(value: str) -> bool:
    """What makemap -t aliases accepts as one alias value (to.c text_to_expandnode)."""
    return expandnode_kind(value) is not None


def expandnode_kind(value: str) -> str | None:
    """to.c text_to_expandnode(): error, include, filter, filename, address or username."""
    lowered = value.lower()
    if lowered.startswith((":error:", "error:")):
        return "error"
    for prefix in (":include:", "include:"):
        if lowered.startswith(prefix):
            return "include" if value[len(prefix) :].startswith("/") else None
    if value.startswith("|") or value.startswith('"|'):
        return "filter"
    if value.startswith("/"):
        return "filename"
    if _is_address(value):
        return "address"
    if value and all(c.isascii() and (c.isalnum() or c in "_.-+") for c in value):
        return "username"
    return None


def _is_address(value: str) -> bool:
    at = value.find("@")
    if len(value) < 3 or at <= 0 or at == len(value) - 1:
        return False
    user, domain = value[:at], value[at + 1 :]
    ok_user = all(c.isascii() and (c.isalnum() or c in "!#$%*/?|^{}`~&'+-=_.") for c in user)
    return ok_user and all(c.isascii() and (c.isalnum() or c in "-.") for c in domain)


def split_alias_values(line: str) -> list[str] | None:
    """expand.c expand_line_split(): commas outside quotes, backslash escapes; None on error."""
    out: list[str] = []
    buf: list[str] = []
    esc = dq = sq = False
    for c in line:
        if esc:
            buf.append(c)
            esc = False
            continue
        if c == "\\":
            esc = True
            continue
        if c == "," and not dq and not sq:
            out.append("".join(buf))
            buf = []
            continue
        buf.append(c)
        if c == '"' and not sq:
            dq = not dq
        if c == "'" and not dq:
            sq = not sq
    if esc or dq or sq:
        return None
    out.append("".join(buf))
    return [v.strip() for v in out if v.strip()]


def credentials(value: str, label: str) -> tuple[str, str] | None:
    """table_parse_lookup(K_CREDENTIALS): `user:password` (without ':' the label is the user)."""
    if len(value) < 3:
        return None
    user, colon, password = value.partition(":")
    if not colon:
        return label, value
    if not user or not password:
        return None
    return user, password
