"""Lint rules: each has a broken config and a corrected twin, and the real `smtpd -n`
is run on both to pin what smtpd itself says (or that it says nothing)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from smtpd_helpers import ARTICLE, needs_smtpd, smtpd_check

from harness.smtpdconf import (
    Config,
    Finding,
    expectations,
    line_ending_findings,
    lint,
    lint_text,
    parse_config,
    parse_file,
    rewrite_sender,
)

OK = ["configuration OK"]


def model(text: str) -> Config:
    """Parse a test config; @DIR@ (where smtpd -n gets temp files) becomes /etc/mail."""
    return parse_config(text.replace("@DIR@", "/etc/mail"), "smtpd.conf")


def rules(findings: list[Finding]) -> set[str]:
    return {f.rule for f in findings}


HEAD = "table aliases file:@DIR@/aliases\ntable secrets file:@DIR@/secrets\nlisten on 127.0.0.1\n"
LOCAL = 'action "local_mail" mbox alias <aliases>\n'
RELAY = (
    'action "outbound" relay host smtp+tls://perso@smtp.example.org:587 auth <secrets> '
    'mail-from "@example.org"\n'
)
MATCHES = 'match from local for local action "local_mail"\nmatch from local for any action "outbound"\n'
CLEAN = HEAD + LOCAL + RELAY + MATCHES


@dataclass(frozen=True)
class Case:
    rule: str
    broken: str
    fixed: str
    line: int
    smtpd_broken: list[str]  # smtpd -n's whole output on the broken config


CASES = [
    Case(
        "undefined-action",
        HEAD + LOCAL + RELAY.replace('"outbound"', '"unbound"') + MATCHES,
        CLEAN,
        7,
        ["smtpd.conf:7: no such dispatcher: outbound"],
    ),
    Case(
        "undefined-table",
        HEAD.replace("table aliases file:@DIR@/aliases\n", "") + LOCAL + RELAY + MATCHES,
        CLEAN,
        3,
        ["smtpd.conf:3: no such table: aliases", "smtpd.conf:5: no such dispatcher: local_mail"],
    ),
    Case(
        "undefined-table",  # declared, but after its use: smtpd reads top to bottom
        HEAD.replace("table aliases file:@DIR@/aliases\n", "")
        + LOCAL
        + "table aliases file:@DIR@/aliases\n"
        + RELAY
        + MATCHES,
        CLEAN,
        3,
        ["smtpd.conf:3: no such table: aliases", "smtpd.conf:6: no such dispatcher: local_mail"],
    ),
    Case(
        "auth-before-host",
        HEAD
        + LOCAL
        + 'action "outbound" relay auth <secrets> host smtp+tls://perso@smtp.example.org:587\n'
        + MATCHES,
        HEAD
        + LOCAL
        + 'action "outbound" relay host smtp+tls://perso@smtp.example.org:587 auth <secrets>\n'
        + MATCHES,
        5,
        [
            "smtpd.conf:5: auth may not be specified without host on a dispatcher",
            "smtpd.conf:7: no such dispatcher: outbound",
        ],
    ),
    Case(
        "duplicate-action",
        HEAD + LOCAL + RELAY + 'action "outbound" relay\n' + MATCHES,
        CLEAN,
        6,
        ["smtpd.conf:6: dispatcher already declared with that name: outbound"],
    ),
    Case(
        "bad-relay-url",
        CLEAN.replace("smtp+tls://perso@", "smtp://perso@"),
        CLEAN,
        5,
        OK,
    ),
    Case(
        "bad-relay-url",
        CLEAN.replace("smtp+tls://perso@smtp.example.org:587", '"smtps://perso@smtp.example.org:0"'),
        CLEAN,
        5,
        OK,
    ),
    Case(
        "label-without-auth",
        CLEAN.replace(" auth <secrets>", "").replace("table secrets file:@DIR@/secrets\n", ""),
        CLEAN,
        4,
        OK,
    ),
    Case(
        "auth-without-label",
        CLEAN.replace("perso@", ""),
        CLEAN,
        5,
        OK,
    ),
    Case(
        "mail-from-no-at",
        CLEAN.replace('"@example.org"', '"example.org"'),
        CLEAN,
        5,
        OK,
    ),
    Case(
        "tls-required-plain-url",
        CLEAN.replace(
            "smtp+tls://perso@smtp.example.org:587 auth <secrets>", "smtp+notls://smtp.example.org tls"
        ).replace("table secrets file:@DIR@/secrets\n", ""),
        CLEAN.replace(" auth <secrets>", " auth <secrets> tls"),
        4,
        OK,
    ),
    Case(
        "unreachable-match",
        CLEAN + 'match from local for domain "example.org" action "local_mail"\n',
        HEAD + LOCAL + RELAY + 'match from local for domain "example.org" action "local_mail"\n' + MATCHES,
        8,
        OK,
    ),
    Case(
        "local-mail-relayed",
        HEAD + LOCAL + RELAY + "".join(reversed(MATCHES.splitlines(keepends=True))),
        CLEAN,
        6,
        OK,
    ),
    Case(
        "unused-table",
        "table spare file:@DIR@/aliases\n" + CLEAN,
        CLEAN,
        1,
        OK,
    ),
    Case(
        "pre-6.4-syntax",
        HEAD + "accept from local for any relay via smtp+tls://perso@smtp.example.org:587 "
        "auth <secrets>\n" + "accept for local alias <aliases> deliver to mbox\n",
        CLEAN,
        4,
        ["smtpd.conf:4: syntax error", "warn: no rules, nothing to do"],
    ),
    Case(
        "unknown-statement",
        CLEAN + "relayhost smtp.example.org\n",
        CLEAN,
        8,
        ["smtpd.conf:8: syntax error"],
    ),
    Case(
        "pre-6.4-syntax",
        CLEAN.replace("listen on 127.0.0.1", "listen on 127.0.0.1 mask-source"),
        CLEAN.replace("listen on 127.0.0.1", "listen on 127.0.0.1 mask-src"),
        3,
        ["smtpd.conf:3: syntax error"],
    ),
    Case(
        "unknown-statement",
        CLEAN.replace("listen on 127.0.0.1", "listen on 127.0.0.1 starttls"),
        CLEAN,
        3,
        ["smtpd.conf:3: syntax error"],
    ),
    Case(
        "no-rules",
        HEAD + LOCAL + RELAY,
        CLEAN,
        1,
        ["warn: no rules, nothing to do"],
    ),
]
# smtpd suppresses its own messages after the first error for a few tokens and
# prints "no rules" whenever every match was refused; compare the lines we name.
CASE_IDS = [f"{c.rule}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rule_fires_on_broken_config_at_line(case: Case) -> None:
    findings = lint(model(case.broken))
    hits = [f for f in findings if f.rule == case.rule]
    assert hits, findings
    assert hits[0].line == case.line
    assert hits[0].message and hits[0].hint


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_corrected_twin_is_clean(case: Case) -> None:
    assert lint(model(case.fixed)) == []


@needs_smtpd
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_what_smtpd_itself_says(tmp_path: Path, case: Case) -> None:
    rc, output = smtpd_check(tmp_path, case.broken)
    for expected in case.smtpd_broken:
        assert expected in output
    assert rc == (0 if case.smtpd_broken == OK else 1)
    finding = next(f for f in lint(model(case.broken)) if f.rule == case.rule)
    if finding.stage == "check":
        assert finding.smtpd_says is not None
        assert any(line.endswith(finding.smtpd_says) for line in output), output
        numbered = [line for line in output if line.startswith("smtpd.conf:")]
        if numbered:
            assert numbered[0].startswith(f"smtpd.conf:{finding.line}: ")
    else:
        assert output == OK  # smtpd -n does not see it: that is why the rule exists
    fixed_rc, fixed_output = smtpd_check(tmp_path, case.fixed)
    assert (fixed_rc, fixed_output) == (0, OK)


def test_every_rule_has_a_case() -> None:
    assert {c.rule for c in CASES} >= {
        "undefined-action",
        "undefined-table",
        "auth-before-host",
        "duplicate-action",
        "bad-relay-url",
        "label-without-auth",
        "auth-without-label",
        "mail-from-no-at",
        "tls-required-plain-url",
        "unreachable-match",
        "local-mail-relayed",
        "unused-table",
        "pre-6.4-syntax",
        "unknown-statement",
        "no-rules",
    }


# -- the runtime texts smtpd logs for delivery-time problems -----------------


def test_delivery_time_messages_use_smtpds_words() -> None:
    by_rule: dict[str, Finding] = {}
    for case in CASES:
        for finding in lint(model(case.broken)):
            if finding.stage == "delivery":
                by_rule.setdefault(finding.rule, finding)
    assert by_rule["bad-relay-url"].smtpd_says == (
        "warn: Failed to parse smarthost smtp://perso@smtp.example.org:587"
    )
    assert by_rule["label-without-auth"].smtpd_says == (
        'warn: No auth table on action "outbound" for relay smtp+tls://perso@smtp.example.org:587'
    )
    assert by_rule["tls-required-plain-url"].smtpd_says == 'warn: TLS required for action "outbound"'


def test_unreachable_is_not_reported_for_distinct_conditions() -> None:
    text = CLEAN + 'match from any for domain "example.org" action "local_mail"\n'
    assert lint(model(text)) == []


def test_from_socket_is_covered_by_from_local() -> None:
    text = CLEAN + 'match from socket for any action "outbound"\n'
    assert rules(lint(model(text))) == {"unreachable-match"}


def test_extra_conditions_make_a_match_narrower() -> None:
    text = HEAD + LOCAL + RELAY + ('match from any auth for any action "outbound"\n' + MATCHES)
    assert lint(model(text)) == []


def test_lint_text_turns_syntax_errors_into_a_finding() -> None:
    (finding,) = lint_text("action relay relay\n", "x.conf")
    assert (finding.rule, finding.line, finding.smtpd_says) == ("syntax", 1, "x.conf:1: syntax error")


def test_crlf_line_endings_are_named_at_the_line_smtpd_blames() -> None:
    """smtpd's own word for a Windows-saved file is a bare `syntax error`, on the first line
    whose CR is not inside a comment (a CR in a comment is read as comment)."""
    text = "# saved on Windows\r\ntable aliases file:/etc/aliases\r\n"
    crlf, syntax = lint_text(text, "x.conf")
    assert (crlf.rule, crlf.line, syntax.rule, syntax.line) == ("crlf", 2, "syntax", 2)
    assert "dos2unix" in crlf.hint
    assert not line_ending_findings("# only a comment\r\ntable aliases file:/etc/aliases\n")


def test_listen_lo0_is_a_warning() -> None:
    findings = lint(model(CLEAN.replace("listen on 127.0.0.1", "listen on lo0")))
    assert [(f.rule, f.line, f.severity) for f in findings] == [("listen-lo0", 3, "warning")]


@needs_smtpd
@pytest.mark.skipif(os.path.exists("/sys/class/net/lo0"), reason="this host has an lo0")
def test_listen_lo0_is_fatal_for_smtpd_on_linux(tmp_path: Path) -> None:
    rc, output = smtpd_check(tmp_path, CLEAN.replace("listen on 127.0.0.1", "listen on lo0"))
    assert (rc, output) == (1, ["smtpd: invalid virtual ip or interface: lo0"])
    (finding,) = lint(model(CLEAN.replace("listen on 127.0.0.1", "listen on lo0")))
    assert finding.smtpd_says == output[0]


# -- the article ---------------------------------------------------------------


def article_for_smtpd(directory: Path) -> str:
    """The article verbatim, with its table files pointed at temp files."""
    text = ARTICLE.read_text()
    for name in ("aliases", "secrets"):
        text = text.replace(f"/etc/mail/{name}", f"{directory}/{name}")
    return text


def test_article_fixture_is_the_articles_config() -> None:
    lines = ARTICLE.read_text().splitlines()
    assert lines[0] == "#\t$OpenBSD: smtpd.conf,v 1.14 2019/11/26 20:14:38 gilles Exp $"
    assert lines[17].startswith('action "unbound" relay host smtp+tls://identifiant@server')
    assert lines[26] == 'match from local for any action "outbound"'


def test_linter_finds_the_articles_dangling_action() -> None:
    findings = lint(parse_file(ARTICLE))
    assert [(f.rule, f.line) for f in findings] == [("listen-lo0", 15), ("undefined-action", 27)]
    undefined = findings[1]
    assert undefined.smtpd_says == "no such dispatcher: outbound"
    assert 'did you mean "unbound"' in undefined.hint


@needs_smtpd
def test_smtpd_on_the_article(tmp_path: Path) -> None:
    text = article_for_smtpd(tmp_path)
    if not os.path.exists("/sys/class/net/lo0"):
        # Verbatim, smtpd stops at `listen on lo0` before it reaches the matches.
        assert smtpd_check(tmp_path, text) == (1, ["smtpd: invalid virtual ip or interface: lo0"])
    # Same line count, loopback renamed: now smtpd reaches the real bug.
    rc, output = smtpd_check(tmp_path, text.replace("listen on lo0", "listen on lo"))
    assert rc == 1
    assert output[0] == "smtpd.conf:27: no such dispatcher: outbound"
    finding = next(f for f in lint(parse_file(ARTICLE)) if f.rule == "undefined-action")
    assert output[0] == f"smtpd.conf:{finding.line}: {finding.smtpd_says}"


@needs_smtpd
def test_article_fixed_is_accepted_and_lints_clean(tmp_path: Path) -> None:
    text = article_for_smtpd(tmp_path).replace("listen on lo0", "listen on lo")
    fixed = text.replace('action "outbound"', 'action "unbound"')
    assert smtpd_check(tmp_path, fixed) == (0, OK)
    assert lint(model(fixed)) == []


def test_article_expectations() -> None:
    fixed = ARTICLE.read_text().replace('action "outbound"', 'action "unbound"')
    (route,) = expectations(parse_config(fixed))
    assert (route.action, route.via, route.url) == ("unbound", "smarthost", "smtp+tls://identifiant@server")
    assert (route.connect_host, route.port, route.tls_mode) == ("server", 25, "starttls-required")
    assert route.verify_certificate and route.auth
    assert (route.label, route.auth_table, route.failure) == ("identifiant", "secrets", None)
    assert route.sender_for("root@sh1.example.net") == "root@your-domain.tld"


# -- expectations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "sender", "expected"),
    [
        ("@example.org", "root@host.local", "root@example.org"),
        ("example.org", "root@host.local", "example.org@host.local"),
        ("bob@example.org", "root@host.local", "bob@example.org"),
        ("bob@", "root@host.local", "bob@host.local"),
        ("@example.org", "", ""),  # bounces keep the null sender
        (None, "root@host.local", "root@host.local"),
    ],
)
def test_rewrite_sender(mail_from: str | None, sender: str, expected: str) -> None:
    assert rewrite_sender(mail_from, sender) == expected


def test_expectations_cover_modes_and_failures() -> None:
    text = (
        'table secrets file:/x\ntable relays { "smtps://s@b.example.org" }\n'
        'action "a" relay host smtp://a.example.org tls\n'
        'action "b" relay host <relays> auth <secrets> tls no-verify\n'
        'action "c" relay\n'
        'action "d" relay host smtp+tls://l@d.example.org\n'
        'action "e" relay host "foo://e"\n'
        'action "f" relay host <elsewhere>\n'
        'table routes { example.org = "smtps://g.example.org" }\n'
        'action "g" relay domain <routes>\n'
        "table elsewhere file:/y\n"
    )
    routes = {r.action: r for r in expectations(parse_config(text))}
    assert (routes["a"].tls_mode, routes["a"].verify_certificate) == ("starttls-required", True)
    assert (routes["b"].tls_mode, routes["b"].port, routes["b"].auth) == ("implicit", 465, True)
    assert not routes["b"].verify_certificate
    assert (routes["c"].via, routes["c"].tls_mode, routes["c"].auth) == ("mx", "starttls-optional", False)
    assert routes["d"].failure == ('warn: No auth table on action "d" for relay smtp+tls://l@d.example.org')
    assert not routes["d"].auth
    assert routes["e"].failure == "warn: Failed to parse smarthost foo://e"
    assert routes["f"].via == "table" and routes["f"].url is None
    assert (routes["g"].url, routes["g"].port) == ("smtps://g.example.org", 465)


def test_findings_are_sorted_by_line() -> None:
    broken = CASES[0].broken + "table spare file:/x\n"
    lines = [f.line for f in lint(model(broken))]
    assert lines == sorted(lines)
    assert all(re.fullmatch(r"[a-z0-9.-]+", f.rule) for f in lint(model(broken)))
