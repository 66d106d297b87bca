"""What a config's tables are for, and what an aliases(5) table says: known from the config alone.

Check, scenarios and accept all need the same answers (which table holds credentials and for
which labels, which tables are alias tables, who the local users are, where a `db:` table's text
source lives); this is the one place they are given.
"""

from __future__ import annotations

import re

from harness.smtpdconf.expect import relay_urls
from harness.smtpdconf.parse import Config, Literal
from harness.smtpdconf.relayurl import RelayUrlError, parse_relay_url

# A name useradd accepts and smtpd delivers to: what a local user in an aliases table looks like.
LOCAL_USER = re.compile(r"[a-z_][a-z0-9_-]*")
MAX_ALIAS_DEPTH = 8


def auth_tables(config: Config) -> dict[str, set[str]]:
    """auth table name → labels the relay URLs ask it for (`host URL`, or each URL of a `host
    <table>` or `domain <table>` the config holds)."""
    out: dict[str, set[str]] = {}
    for action in config.relay_actions:
        auth = action.auth
        if auth is None or isinstance(auth, Literal):
            continue
        labels = out.setdefault(auth.name, set())
        for text in relay_urls(config, action) or ():
            try:
                url = parse_relay_url(text)
            except RelayUrlError:
                continue
            if url.label:
                labels.add(url.label)
    return out


def alias_tables(config: Config) -> set[str]:
    """Tables some action expands aliases with (`alias <t>`)."""
    names = set()
    for action in config.actions.values():
        alias = action.operand("alias")
        if alias is not None and not isinstance(alias, Literal):
            names.add(alias.name)
    return names


def alias_files(config: Config) -> set[str]:
    """The alias tables whose content is an aliases file (file:, db:). An `ldap:` or `sqlite:`
    one is given as its backend's config file (`url ldap://...`), which holds no aliases."""
    return {
        name
        for name in alias_tables(config)
        if (table := config.tables.get(name)) is not None and table.backend in ("file", "db")
    }


def db_source(db_path: str) -> str:
    """Where the text a `db:` table is built from lives: makemap's convention, FILE for FILE.db.

    A db path without `.db` has no conventional source; the harness keeps its text beside it.
    """
    return db_path[:-3] if db_path.endswith(".db") else db_path + ".txt"


def parse_aliases(content: bytes) -> dict[str, list[str]]:
    """aliases(5): `key: value, value`; continuation lines start with white space."""
    aliases: dict[str, list[str]] = {}
    key = None
    for raw in content.decode("utf-8", "replace").splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t" and key is not None:
            aliases[key].extend(v.strip() for v in raw.split(",") if v.strip())
            continue
        name, sep, values = raw.partition(":")
        if not sep:
            continue
        key = name.strip()
        aliases[key] = [v.strip() for v in values.split(",") if v.strip()]
    return aliases


def expand(aliases: dict[str, list[str]], key: str) -> list[str]:
    """Where mail to `key` ends, each target once: values that are keys themselves are followed.

    Each key is followed once: a key listed many times at many levels would otherwise multiply
    (ten keys each naming the next ten times: 10^8 targets), and a loop would never end.
    """
    out: dict[str, None] = {}
    seen = {key}
    stack = [(key, iter(aliases.get(key, [])), 0)]
    while stack:
        owner, values, depth = stack[-1]
        value = next(values, None)
        if value is None:
            stack.pop()
        elif value in aliases and value != owner:  # `alice: alice` is alice's own mailbox
            if value not in seen and depth < MAX_ALIAS_DEPTH:
                seen.add(value)
                stack.append((value, iter(aliases[value]), depth + 1))
        else:
            out[value] = None
    return list(out)


# An aliases key: a local part (RFC 5322 dot-atom), or an address or `@domain` in a virtual table.
_LOCAL_PART = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
ALIAS_KEY = re.compile(rf"(?:{_LOCAL_PART})?(?:@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)?")
NOT_A_USER = ("|", "/", ":include:", '"|', '"/')  # programs, files and includes


def alias_problem(content: bytes) -> tuple[int, str] | None:
    """The first aliases(5) line a test host cannot have: (line, what is wrong), or None.

    A key must be an address mail can be sent to; a value without @ that is not a program, file
    or include is a local user the test host must create, so it must be a user name.
    """
    key = None
    for number, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t":
            values = raw
        else:
            name, sep, values = raw.partition(":")
            if not sep:
                continue
            key = name.strip()
            if not key:
                return number, "an aliases line must start with the key mail is sent to (`key: value`)"
            if not ALIAS_KEY.fullmatch(key):
                return number, f"aliases key {key!r} is not a valid address or local user name"
        for value in (v.strip() for v in values.split(",")):
            if not value or "@" in value or value.startswith(NOT_A_USER) or value == "root":
                continue
            if not is_local_user(value) or len(value) > 32:
                return number, f"alias {key!r}: {value!r} is neither an address nor a local user name"
    return None


def is_local_user(value: str) -> bool:
    """A mailbox on this host, not an address, program, file or include (root always exists)."""
    return value != "root" and LOCAL_USER.fullmatch(value) is not None


def local_users(aliases: dict[str, list[str]]) -> set[str]:
    """The local users an aliases table delivers to: they must exist on the host."""
    # Every value that is no other key is where some key's mail ends: one pass over the values
    # (expanding each of 100k keys would walk the same lists again and again).
    return {
        v
        for key, values in aliases.items()
        for v in values
        if (v not in aliases or v == key) and is_local_user(v)
    }
