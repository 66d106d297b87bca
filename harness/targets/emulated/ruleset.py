"""ruleset.c: the first `match` that fits an envelope, as smtpd 6.8 evaluates it.

A condition answers 1 (fits), 0 (does not) or -1 (cannot tell: smtpd answers the RCPT with a
temporary failure). Negation inverts 1 and 0 only. Mail expanded from an alias (internal) is
`from local` for every `from` that has a table, and never `from socket`.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.targets.emulated.config import Rule
from harness.targets.emulated.tables import MailAddr, Service, Table


class RuleTempFail(Exception):
    """A condition could not be evaluated (EAGAIN): 451 at RCPT."""


@dataclass(frozen=True)
class Subject:
    """What the ruleset looks at in an envelope."""

    source: str  # "local" (the socket) or the client's address
    sender: MailAddr
    dest: MailAddr
    internal: bool = False
    authenticated: bool = False  # local submissions are (enqueue's session), as SMTP AUTH would be
    username: str = ""


def _result(r: int, flag: int) -> int:
    if r == -1:
        return -1
    return int(not r) if flag < 0 else r


def _lookup(tables: dict[str, Table], name: str | None, regex: bool, service: Service, key: str) -> int:
    table = tables.get(name or "")
    if table is None:
        return -1
    return int(table.match(Service.REGEX if regex else service, key))


def _from(rule: Rule, s: Subject, tables: dict[str, Table]) -> int:
    if not rule.flag_from:
        return 1
    if s.internal:
        if rule.table_from is None:
            return 0
        key = "local"
    else:
        key = s.source
        if rule.from_socket:
            if key == "local":
                return _result(1, rule.flag_from)
            return 1 if rule.flag_from < 0 else 0
    return _result(_lookup(tables, rule.table_from, rule.from_regex, Service.NETADDR, key), rule.flag_from)


def _for(rule: Rule, s: Subject, tables: dict[str, Table]) -> int:
    r = _lookup(tables, rule.table_for, rule.for_regex, Service.DOMAIN, s.dest.domain)
    return _result(r, rule.flag_for)


def _address(flag: int, table: str | None, regex: bool, addr: MailAddr, tables: dict[str, Table]) -> int:
    if not flag:
        return 1
    return _result(_lookup(tables, table, regex, Service.MAILADDR, str(addr)), flag)


def _auth(rule: Rule, s: Subject, tables: dict[str, Table]) -> int:
    if not rule.flag_auth:
        return 1
    if not s.authenticated:
        r = 0
    elif rule.table_auth is not None:
        service = Service.MAILADDR if "@" in s.username else Service.STRING
        r = _lookup(tables, rule.table_auth, rule.auth_regex, service, s.username)
    else:
        r = 1
    return _result(r, rule.flag_auth)


def _tls(rule: Rule) -> int:
    """`match tls`: 6.8 cannot tell yet ("not until TLS flag is added to envelope")."""
    return -1 if rule.flag_tls else 1


def match(rules: list[Rule], s: Subject, tables: dict[str, Table]) -> Rule | None:
    """The matching rule, None when none does; RuleTempFail when one could not be evaluated."""
    for rule in rules:
        results = (
            _from(rule, s, tables),
            _for(rule, s, tables),
            _auth(rule, s, tables),
            _tls(rule),
            _address(rule.flag_mail_from, rule.table_mail_from, rule.mail_from_regex, s.sender, tables),
            _address(rule.flag_rcpt_to, rule.table_rcpt_to, rule.rcpt_to_regex, s.dest, tables),
        )
        for r in results:
            if r == -1:
                raise RuleTempFail()
            if r == 0:
                break
        else:
            return rule
    return None
