"""What a config's tables are for, and what an aliases(5) table says: known from the config alone.

Check, scenarios and accept all need the same answers (which table holds credentials and for
which labels, which tables are alias tables, who the local users are, where a `db:` table's text
source lives); this is the one place they are given.
"""

from __future__ import annotations

import re

from harness.smtpdconf.parse import Config, Literal
from harness.smtpdconf.relayurl import RelayUrlError, parse_relay_url

# A name useradd accepts and smtpd delivers to: what a local user in an aliases table looks like.
LOCAL_USER = re.compile(r"[a-z_][a-z0-9_-]*")
MAX_ALIAS_DEPTH = 8


def auth_tables(config: Config) -> dict[str, set[str]]:
    """auth table name → labels the relay URLs ask it for."""
    out: dict[str, set[str]] = {}
    for action in config.relay_actions:
        auth = action.auth
        if auth is None or isinstance(auth, Literal):
            continue
        labels = out.setdefault(auth.name, set())
        host = action.host
        if isinstance(host, Literal):
            for text in host.values:
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


def expand(aliases: dict[str, list[str]], key: str, depth: int = 0) -> list[str]:
    """Where mail to `key` ends: values that are keys themselves are followed (bounded)."""
    if depth > MAX_ALIAS_DEPTH:
        return []
    out: list[str] = []
    for value in aliases.get(key, []):
        if value in aliases and value != key:
            out.extend(expand(aliases, value, depth + 1))
        else:
            out.append(value)
    return out


def is_local_user(value: str) -> bool:
    """A mailbox on this host, not an address, program, file or include (root always exists)."""
    return value != "root" and LOCAL_USER.fullmatch(value) is not None


def local_users(aliases: dict[str, list[str]]) -> set[str]:
    """The local users an aliases table delivers to: they must exist on the host."""
    return {value for key in aliases for value in expand(aliases, key) if is_local_user(value)}
