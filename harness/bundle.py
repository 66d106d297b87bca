"""Config + table contents → what a target installs: the one bundle builder.

`check` gives tables from `--table` files (and synthesizes a secrets table), a scenario from its
TOML, `accept` from the files it read on a host; all three go through `build_bundle`, so a table
lands at the path the config names with the owner and mode a real host would give it, a `db:`
table is built by makemap from its text (or copied as built), and every local user an alias
table delivers to exists.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from harness.errors import HarnessError
from harness.pki import TestPki
from harness.smtpdconf import (
    EXTRAS_BACKENDS,
    Config,
    alias_files,
    auth_tables,
    db_source,
    local_users,
    parse_aliases,
)
from harness.targets.base import SMTPD_CONF, Bundle, BundleFile
from harness.upstream import Credential, Profile

# What an admin gives a secrets table (smtpd must read it, no one else); other tables are public.
SECRET_MODE = (0o640, "root", "_smtpd")
PUBLIC_MODE = (0o644, "root", "root")


class BundleError(HarnessError):
    """Table content for a table the config does not declare (names the table and the declared ones)."""

    def __init__(self, name: str, declared: Iterable[str]) -> None:
        self.name = name
        names = ", ".join(sorted(declared)) or "none"
        super().__init__(
            f"table {name!r}: the config declares no file: or db: table by this name (declared: {names})"
        )


@dataclass(frozen=True)
class TableInput:
    """A declared table's content as given.

    `meta` is (mode, owner, group) of the file smtpd opens, None for what a real host would
    have (see SECRET_MODE); `built` is a `db:` table's database as a host built it (copied as
    is, with `source_meta` for its text source, if `content` is that text); `built_from` is
    the older text a `db:` table was built from before `content` was written (a stale db).
    """

    content: bytes
    meta: tuple[int, str, str] | None = None
    built: bytes | None = None
    source_meta: tuple[int, str, str] | None = None
    built_from: bytes | None = None


def declared_tables(config: Config) -> dict[str, str]:
    """Tables the harness can install, name → the path smtpd opens: file: and db: tables, and
    the config file of a backend that runs as a program (sqlite:/etc/mail/sqlite.conf)."""
    return {
        t.name: t.config
        for t in config.tables.values()
        if (t.backend in ("file", "db") or t.backend in EXTRAS_BACKENDS) and t.config is not None
    }


def build_bundle(
    config_text: str | None,
    config: Config | None,
    tables: Mapping[str, TableInput],
    *,
    config_path: str = SMTPD_CONF,
    secret_tables: Iterable[str] = (),
    extra_files: Iterable[BundleFile] = (),
    extra_users: Iterable[str] = (),
) -> Bundle:
    """The bundle for `config` (parsed from `config_text`; None: installed as it is on the host)."""
    declared = declared_tables(config) if config is not None else {}
    secret_names = set(secret_tables) | (set(auth_tables(config)) if config is not None else set())
    if config is not None:  # a backend's config file holds its database's credentials
        secret_names |= {t.name for t in config.tables.values() if t.backend in EXTRAS_BACKENDS}
    alias_names = alias_files(config) if config is not None else set()
    files: list[BundleFile] = []
    users = {u for u in extra_users if u != "root"}
    for name, given in tables.items():
        path = declared.get(name)
        if path is None or config is None:
            raise BundleError(name, declared)
        secret = name in secret_names
        mode, owner, group = given.meta or (SECRET_MODE if secret else PUBLIC_MODE)
        table = config.tables[name]
        aliases = name in alias_names
        if table.backend == "db" and given.built is not None:
            if given.content:
                smode, sowner, sgroup = given.source_meta or (mode, owner, group)
                files.append(BundleFile(db_source(path), given.content, smode, sowner, sgroup, secret))
            files.append(BundleFile(path, given.built, mode, owner, group, secret))
        elif table.backend == "db":
            source = db_source(path)
            built_from = given.built_from if given.built_from is not None else given.content
            files.append(BundleFile(source, built_from, mode, owner, group, secret, path, aliases))
            if (
                given.built_from is not None
            ):  # the admin's edit after makemap: the text changes, the db does not
                files.append(BundleFile(source, given.content, mode, owner, group, secret))
        else:
            files.append(BundleFile(path, given.content, mode, owner, group, secret))
        if aliases:
            for text in (given.content, given.built_from or b""):
                users.update(local_users(parse_aliases(text)))
    files.extend(extra_files)
    return Bundle(config_text, tuple(files), tuple(sorted(users)), config_path)


def host_file_mode(path: str) -> tuple[int, str, str]:
    """Mode and owner a real host gives a file it is handed: private keys only for root
    (smtpd refuses a group- or world-readable key), everything else readable by all."""
    name = path.rsplit("/", 1)[-1]
    if name.endswith((".key", ".pem.key")) or "/private/" in path or name.startswith("key"):
        return 0o600, "root", "root"
    return 0o644, "root", "root"


def tls_files(config: Config, pki: TestPki, given: Iterable[str]) -> tuple[list[BundleFile], list[str]]:
    """The certificates and keys `pki` and `ca` lines name and the user did not give (--file):
    a certificate for the pki's name from the harness's test CA, and that CA for a `ca` line, so
    smtpd loads them as it would on the real host (and a relay `ca NAME` trusts the fake provider)."""
    have = set(given)
    files: list[BundleFile] = []
    notes: list[str] = []
    for entry in config.pkis.values():
        wanted = [p for p in (entry.cert, entry.key) if p is not None and p not in have]
        if not wanted:
            continue
        name = entry.name if entry.name != "*" else "localhost"
        leaf = pki.server_cert(name)
        if entry.cert is not None and entry.cert in wanted:
            files.append(BundleFile(entry.cert, leaf.chain_pem, *host_file_mode(entry.cert)))
        if entry.key is not None and entry.key in wanted:
            files.append(BundleFile(entry.key, leaf.key_pem, 0o600, "root", "root"))
        notes.append(
            f"pki {entry.name}: {' and '.join(wanted)} not given (--file PATH=LOCAL), "
            f"issued for {name} by the harness's test CA"
        )
    for ca in config.cas.values():
        if ca.cert is not None and ca.cert not in have:
            files.append(BundleFile(ca.cert, pki.ca_pem, 0o644, "root", "root"))
            notes.append(
                f"ca {ca.name}: {ca.cert} not given (--file PATH=LOCAL), installed the harness's test CA"
            )
    return files, notes


def synthesize_secrets(labels: Iterable[str], profile: Profile) -> tuple[bytes, Profile, list[Credential]]:
    """A secrets table for `labels` with generated credentials, and the profile that accepts them.

    Real credentials stay out of CI: the check then proves the wiring (label, table, TLS, AUTH),
    not the password, and says so.
    """
    domain = profile.sender_domains[0] if profile.sender_domains else "example.org"
    ordered = sorted(labels)
    creds = [Credential(f"relay-harness-{label}@{domain}", secrets.token_urlsafe(12)) for label in ordered]
    text = "".join(f"{label} {c.user}:{c.password}\n" for label, c in zip(ordered, creds, strict=True))
    return text.encode(), dataclasses.replace(profile, credentials=profile.credentials + tuple(creds)), creds
