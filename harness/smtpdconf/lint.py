"""What can be known about an smtpd.conf without running it.

Each finding says what smtpd itself will say about the same problem, if
anything, and when: at `smtpd -n` ("check"), only in the log when mail is
relayed ("delivery"), or never ("silent").  The silent and delivery-time ones
are the reason this exists: `smtpd -n` says "configuration OK" for them and
the mail then sits in the queue, or leaves without AUTH, or with the wrong
sender.  Rules follow smtpd's own reading order (declarations must come
before use), so line numbers agree with `smtpd -n`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal as TypingLiteral

from harness.smtpdconf.expect import relay_urls
from harness.smtpdconf.parse import (
    Action,
    Condition,
    Config,
    ConfigSyntaxError,
    Listen,
    Literal,
    Match,
    Operand,
    RawStatement,
    Table,
    TableRef,
    parse_config,
)
from harness.smtpdconf.relayurl import RelayUrl, RelayUrlError, parse_relay_url

Severity = TypingLiteral["error", "warning"]
Stage = TypingLiteral["check", "delivery", "silent"]


@dataclass(frozen=True)
class Finding:
    """One problem. `smtpd_says` is smtpd's exact text for it (log or `-n`), if any."""

    rule: str
    line: int
    severity: Severity
    message: str
    hint: str
    smtpd_says: str | None = None
    stage: Stage = "silent"


# The names OpenBSD's default smtpd.conf gives its two actions changed between
# releases (6.4: "local"/"relay"; 6.6+: "local_mail"/"outbound").  They are
# free labels, not smtpd keywords, but configs copied from different
# releases mix them up.  (The seed article claims "relay becomes unbound";
# the default config says "outbound".)
_DEFAULT_NAMES: dict[str, str] = {
    "local": "local_mail",
    "relay": "outbound",
    "local_mail": "local",
    "outbound": "relay",
}

_PRE_64_REPLACEMENTS: dict[str, str] = {
    "accept": 'declare `action "NAME" ...` and route with `match from ... for ... action "NAME"`',
    "reject": "use `match from ... for ... reject`",
    "expire": "use `queue ttl DELAY` (or `ttl` on an action)",
    "max-message-size": "use `smtp max-message-size SIZE`",
    "max-mta-deferred": "use `mta max-deferred N`",
    "bounce-warn": "use `bounce warn-interval DELAYS`",
    "ciphers": "use `smtp ciphers STRING`",
    "limit": "use `smtp limit ...`, `mta limit ...` or `scheduler limit ...`",
    "subaddressing-delimiter": "use `smtp sub-addr-delim C`",
    "certificate": "use `cert` (`pki NAME cert FILE`, `ca NAME cert FILE`)",
    "mask-source": "use `mask-src`",
}


def lint(config: Config) -> list[Finding]:
    """All findings, ordered by line."""
    findings: list[Finding] = []
    findings.extend(_references(config))
    findings.extend(_relays(config))
    findings.extend(_match_order(config))
    findings.extend(_unused_tables(config))
    findings.extend(_old_and_unknown(config))
    findings.extend(_listens(config))
    if not config.matches:
        findings.append(
            Finding(
                "no-rules",
                1,
                "error",
                "no `match` rule: smtpd refuses to start",
                'add e.g. `match from local for local action "local_mail"`',
                "warn: no rules, nothing to do",
                "check",
            )
        )
    return sorted(findings, key=lambda f: (f.line, f.rule))


def line_ending_findings(text: str) -> list[Finding]:
    """A file saved with Windows line endings: smtpd reads each CR as a stray character, a bare
    `syntax error` on the first line that has one outside a comment, which says nothing of why."""
    line = next(
        (
            n
            for n, words in enumerate(text.split("\n"), 1)
            if "\r" in words and "#" not in words[: words.index("\r")]
        ),
        None,
    )
    if line is None:
        return []
    return [
        Finding(
            "crlf",
            line,
            "error",
            "the file has Windows (CRLF) line endings: smtpd reads each CR as a stray character",
            "convert it to Unix line endings: `sed -i 's/\\r$//' FILE` (or `dos2unix FILE`)",
            "syntax error",
            "check",
        )
    ]


def lint_text(text: str, path: str = "smtpd.conf") -> list[Finding]:
    """Parse and lint; a grammar error becomes a single `syntax` finding (after why, where the
    file's line endings are the cause)."""
    try:
        config = parse_config(text, path)
    except ConfigSyntaxError as exc:
        return [
            *line_ending_findings(text),
            Finding(
                "syntax",
                exc.line,
                "error",
                exc.message,
                "smtpd stops reading the rule at this point; see smtpd.conf(5)",
                str(exc),
                "check",
            ),
        ]
    return lint(config)


# --------------------------------------------------------------------------
# Declarations before use: undefined tables and actions, refused actions.


def _operands(action: Action) -> Iterator[tuple[str, Operand]]:
    for option in action.options:
        if isinstance(option.value, TableRef | Literal):
            yield option.name, option.value


def _refs(operands: Iterable[Operand | None]) -> list[TableRef]:
    return [op for op in operands if isinstance(op, TableRef)]


def _statement_refs(statement: object) -> list[TableRef]:
    if isinstance(statement, Action):
        return _refs(op for _, op in _operands(statement))
    if isinstance(statement, Match):
        return _refs(c.operand for c in statement.conditions)
    if isinstance(statement, Listen):
        return list(statement.table_refs)
    return []


def _line_of(config: Config, kind: type[Table] | type[Action], name: str) -> int | None:
    for statement in config.statements:
        if isinstance(statement, kind) and statement.name == name:
            return statement.line
    return None


def _references(config: Config) -> list[Finding]:
    """Walk in file order, as smtpd does, tracking what is declared so far."""
    findings: list[Finding] = []
    tables: set[str] = set()
    actions: dict[str, int] = {}
    refused: dict[str, str] = {}
    for statement in config.statements:
        missing = [
            _undefined_table(config, ref, tables)
            for ref in _statement_refs(statement)
            if ref.name not in tables
        ]
        findings.extend(missing)
        if isinstance(statement, Table):
            tables.add(statement.name)
        elif isinstance(statement, Action):
            findings.extend(_declare_action(statement, actions, refused, missing))
        elif _refers_to_undeclared(statement, actions, missing):
            assert isinstance(statement, Match)
            findings.append(_undefined_action(config, statement, actions, refused))
    return findings


def _refers_to_undeclared(statement: object, actions: dict[str, int], missing: list[Finding]) -> bool:
    """A match whose own tables failed is dropped before its action is looked up."""
    if not isinstance(statement, Match) or statement.action is None or missing:
        return False
    return statement.action not in actions


def _undefined_table(config: Config, ref: TableRef, declared: set[str]) -> Finding:
    later = _line_of(config, Table, ref.name)
    if later is not None:
        hint = f"`table {ref.name}` is declared at line {later}; move it above this line"
    else:
        hint = f"declare it first: `table {ref.name} file:/etc/mail/{ref.name}`"
        hint += _did_you_mean(ref.name, declared)
    return Finding(
        "undefined-table",
        ref.line,
        "error",
        f"table <{ref.name}> is not declared before use",
        hint,
        f"no such table: {ref.name}",
        "check",
    )


def _declare_action(
    action: Action, actions: dict[str, int], refused: dict[str, str], missing: list[Finding]
) -> list[Finding]:
    """smtpd drops an action whose options fail; later matches then see no such dispatcher."""
    if action.name in actions:
        return [
            Finding(
                "duplicate-action",
                action.line,
                "error",
                f'action "{action.name}" is already declared at line {actions[action.name]}',
                "give each action its own name",
                f"dispatcher already declared with that name: {action.name}",
                "check",
            )
        ]
    findings: list[Finding] = []
    auth = action.option("auth")
    if auth is not None and not _has_host_before(action):
        message = "auth may not be specified without host on a dispatcher"
        findings.append(
            Finding(
                "auth-before-host",
                auth.line,
                "error",
                f'action "{action.name}": `auth` comes before `host`; smtpd refuses the action',
                "write `host URL` before `auth <table>`",
                message,
                "check",
            )
        )
    if findings or missing:
        reason = (findings or missing)[0].smtpd_says or "error"
        refused[action.name] = f"line {action.line}: {reason}"
    else:
        actions[action.name] = action.line
    return findings


def _has_host_before(action: Action) -> bool:
    for option in action.options:
        if option.name == "auth":
            return False
        if option.name in ("host", "domain"):
            return True
    return False


def _undefined_action(
    config: Config, match: Match, actions: dict[str, int], refused: dict[str, str]
) -> Finding:
    name = match.action or ""
    later = _line_of(config, Action, name)
    if name in refused:
        hint = f'action "{name}" was refused by smtpd ({refused[name]}); fix that first'
    elif later is not None and later > match.line:
        hint = f'action "{name}" is declared at line {later}; move it above this match'
    else:
        hint = f'declare `action "{name}" ...` or fix the name' + _did_you_mean(name, actions)
        if name in _DEFAULT_NAMES:
            hint += (
                ". Action names are free labels, but OpenBSD's default smtpd.conf renamed "
                f'"{_DEFAULT_NAMES[name]}" <-> "{name}" between releases, so snippets copied '
                "from different releases disagree"
            )
    return Finding(
        "undefined-action",
        match.action_line,
        "error",
        f'match refers to action "{name}", which is not declared before it',
        hint,
        f"no such dispatcher: {name}",
        "check",
    )


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --------------------------------------------------------------------------
# Relay actions: URL, label vs auth table, mail-from.


def _relays(config: Config) -> list[Finding]:
    findings: list[Finding] = []
    for action in config.relay_actions:
        host = action.option("host") or action.option("domain")
        line = host.line if host else action.line
        parsed: list[RelayUrl] = []
        for url in relay_urls(config, action) or []:
            try:
                parsed.append(parse_relay_url(url))
            except RelayUrlError as exc:
                findings.append(_bad_url(action, line, exc))
        findings.extend(_auth_findings(action, line, parsed))
        findings.extend(_mail_from(action))
        findings.extend(_tls_vs_plain(action, line, parsed))
    return findings


def _bad_url(action: Action, line: int, exc: RelayUrlError) -> Finding:
    hint = (
        "smtp+tls://LABEL@HOST:587 (STARTTLS) or smtps://LABEL@HOST (port 465); "
        "a label needs one of these two; lmtp:// needs a port"
    )
    return Finding(
        "bad-relay-url",
        line,
        "error",
        f'action "{action.name}": relay URL {exc.url} will not parse ({exc.reason}); '
        "`smtpd -n` accepts it and the mail stays queued",
        hint,
        f"warn: Failed to parse smarthost {exc.url}",
        "delivery",
    )


def _auth_findings(action: Action, line: int, urls: list[RelayUrl]) -> list[Finding]:
    findings: list[Finding] = []
    auth = action.option("auth")
    for url in urls:
        if url.label is not None and auth is None:
            findings.append(
                Finding(
                    "label-without-auth",
                    line,
                    "error",
                    f'action "{action.name}": {url.text} has the label "{url.label}" but the '
                    "action has no `auth <table>`; every message stays queued",
                    f"add `auth <secrets>` with a line `{url.label} user:password` in it",
                    f'warn: No auth table on action "{action.name}" for relay {url.text}',
                    "delivery",
                )
            )
    if auth is not None and urls and all(url.label is None for url in urls):
        findings.append(
            Finding(
                "auth-without-label",
                auth.line,
                "warning",
                f'action "{action.name}": `auth` is set but the relay URL has no label, so '
                "smtpd relays WITHOUT authenticating, and says nothing",
                "put the table's key in the URL: `host smtp+tls://LABEL@HOST:587`",
            )
        )
    return findings


def _mail_from(action: Action) -> list[Finding]:
    option = action.option("mail-from")
    value = action.mail_from
    if option is None or value is None or "@" in value:
        return []
    return [
        Finding(
            "mail-from-no-at",
            option.line,
            "warning",
            f'action "{action.name}": mail-from "{value}" has no "@"; smtpd takes it as the '
            f"local part, so root@HOST is sent as {value}@HOST",
            f'write mail-from "@{value}" to replace only the domain',
        )
    ]


def _tls_vs_plain(action: Action, line: int, urls: list[RelayUrl]) -> list[Finding]:
    if not action.tls_required:
        return []
    return [
        Finding(
            "tls-required-plain-url",
            line,
            "error",
            f'action "{action.name}" requires TLS but {url.text} is plain',
            "drop `tls` or use smtp+tls:// / smtps://",
            f'warn: TLS required for action "{action.name}"',
            "delivery",
        )
        for url in urls
        if url.tls_mode == "none"
    ]


# --------------------------------------------------------------------------
# Match order: first match wins.


def _covers_condition(first: Condition, later: Condition) -> bool:
    if first.key() == later.key():
        return True
    if first.negated:
        return False
    if first.qualifier == "any":
        return True  # <anyhost> / <anydestination> contain everything
    # A socket submission is "local" (<localhost> holds "local").
    return first.kind == "from" and first.qualifier == "local" and later.qualifier == "socket"


def covers(first: Match, later: Match) -> bool:
    """True when every message `later` would take is already taken by `first`."""
    if not _covers_condition(first.source, later.source):
        return False
    if not _covers_condition(first.destination, later.destination):
        return False
    later_keys = {c.key() for c in later.extra_conditions}
    return all(c.key() in later_keys for c in first.extra_conditions)


def _is_local_destination(condition: Condition) -> bool:
    return condition.qualifier == "local" and not condition.negated


def _match_order(config: Config) -> list[Finding]:
    findings: list[Finding] = []
    matches = config.matches
    for j, later in enumerate(matches):
        first = next((m for m in matches[:j] if covers(m, later)), None)
        if first is None:
            continue
        target = config.actions.get(first.action or "")
        if (
            target is not None
            and target.is_relay
            and _is_local_destination(later.destination)
            and not _is_local_destination(first.destination)
        ):
            findings.append(_local_relayed(first, later))
        else:
            findings.append(_unreachable(first, later))
    return findings


def _describe(match: Match) -> str:
    return f'"{match.action}"' if match.action else "reject"


def _local_relayed(first: Match, later: Match) -> Finding:
    return Finding(
        "local-mail-relayed",
        first.line,
        "error",
        f"the match at line {first.line} sends mail for local users to the relay "
        f"{_describe(first)}: the `for local` match at line {later.line} never fires",
        f"move the match at line {later.line} above line {first.line}",
    )


def _unreachable(first: Match, later: Match) -> Finding:
    return Finding(
        "unreachable-match",
        later.line,
        "warning",
        f"this match never fires: the match at line {first.line} ({_describe(first)}) "
        "already takes everything it would",
        "put the more specific match first; smtpd uses the first match that fits",
    )


# --------------------------------------------------------------------------
# Tables, old grammar, listeners.


def _unused_tables(config: Config) -> list[Finding]:
    used = {ref.name for statement in config.statements for ref in _statement_refs(statement)}
    return [
        Finding(
            "unused-table",
            table.line,
            "warning",
            f"table {table.name} is declared but never used",
            f"remove it, or refer to it as <{table.name}>" + _did_you_mean(table.name, used),
        )
        for table in config.tables.values()
        if table.name not in used
    ]


def _old_and_unknown(config: Config) -> list[Finding]:
    findings = [_raw_finding(raw) for raw in config.raw if raw.kind != "other"]
    for listen in config.listens:
        findings.extend(_listen_option(listen, word) for word in listen.unknown_options)
    return findings


def _listen_option(listen: Listen, word: str) -> Finding:
    if word in _PRE_64_REPLACEMENTS:
        return _pre64(listen.line, f"listen option `{word}`", word)
    return Finding(
        "unknown-statement",
        listen.line,
        "error",
        f"`{word}` is not a listen option",
        "see LISTEN in smtpd.conf(5)",
        "syntax error",
        "check",
    )


def _raw_finding(raw: RawStatement) -> Finding:
    if raw.kind == "pre-6.4":
        word = next((w for w in (raw.keyword, *raw.words) if w in _PRE_64_REPLACEMENTS), "")
        return _pre64(raw.line, f"`{raw.keyword} ...`", word)
    return Finding(
        "unknown-statement",
        raw.line,
        "error",
        f"`{raw.keyword}` starts no smtpd.conf statement",
        "see smtpd.conf(5) for OpenSMTPD 6.4+",
        "syntax error",
        "check",
    )


def _pre64(line: int, what: str, word: str) -> Finding:
    replacement = _PRE_64_REPLACEMENTS.get(word, "see smtpd.conf(5) for the 6.4+ grammar")
    return Finding(
        "pre-6.4-syntax",
        line,
        "error",
        f"{what} is the pre-6.4 smtpd.conf syntax; OpenSMTPD 6.4 replaced it"
        + (" with `action` + `match ... action`" if word in ("accept", "reject") else ""),
        replacement,
        "syntax error",
        "check",
    )


def _listens(config: Config) -> list[Finding]:
    return [
        Finding(
            "listen-lo0",
            listen.line,
            "warning",
            "`listen on lo0` names OpenBSD's loopback; on Linux it is `lo`, and smtpd "
            "exits at startup unless this host has an interface called lo0",
            "use `listen on localhost` (works on both) or `listen on lo`",
            "smtpd: invalid virtual ip or interface: lo0",
            "check",
        )
        for listen in config.listens
        if listen.interface == "lo0"
    ]
