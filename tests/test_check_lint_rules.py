"""Every lint rule through the real `relay-harness check` on a lab host, beside its corrected twin.

Lint findings are evidence; the verdict is the real smtpd's. So each rule is shown twice: the
finding appears in the report of a config that has the problem, with the verdict (and exit code)
that running it in OpenSMTPD 6.8 gives, and the corrected config (`good.conf`) has no finding
at all and exits 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main

pytestmark = pytest.mark.lab

DATA = Path(__file__).parent / "data" / "check"
GOOD = (DATA / "good.conf").read_text()
RELAY = (
    'action "outbound" relay host smtp+tls://perso@smtp.example.net:587'
    ' auth <secrets> mail-from "@example.org"'
)
assert RELAY in GOOD


def variant(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


# rule id → (config showing it, exit code, verdict, text the report must quote)
CASES: dict[str, tuple[str, int, str, str]] = {
    "undefined-action": (
        variant('action "outbound" relay', 'action "unbound" relay'),
        1,
        "refused",
        "no such dispatcher: outbound",
    ),
    "undefined-table": (
        variant("table secrets file:/etc/mail/secrets\n", ""),
        1,
        "refused",
        "no such table: secrets",
    ),
    "auth-before-host": (
        variant(
            RELAY,
            RELAY.replace(
                "relay host smtp+tls://perso@smtp.example.net:587 auth <secrets>",
                "relay auth <secrets> host smtp+tls://perso@smtp.example.net:587",
            ),
        ),
        1,
        "refused",
        "auth may not be specified without host on a dispatcher",
    ),
    "duplicate-action": (
        variant(RELAY, RELAY + '\naction "outbound" relay host smtp://smtp.example.net'),
        1,
        "refused",
        "dispatcher already declared with that name: outbound",
    ),
    "pre-6.4-syntax": (
        variant(
            'match from local for any action "outbound"',
            "accept from local for any relay via smtp+tls://perso@smtp.example.net:587",
        ),
        1,
        "refused",
        "syntax error",
    ),
    "unknown-statement": (GOOD + "frobnicate yes\n", 1, "refused", "syntax error"),
    "no-rules": (
        variant(
            'match from local for local action "local_mail"\nmatch from local for any action "outbound"\n', ""
        ),
        1,
        "refused",
        "no rules, nothing to do",
    ),
    "bad-relay-url": (
        variant("smtp+tls://perso@", "smtp://perso@"),
        1,
        "fail",
        "Failed to parse smarthost smtp://perso@smtp.example.net:587",
    ),
    "label-without-auth": (variant(" auth <secrets>", ""), 1, "fail", "No auth table on action"),
    "auth-without-label": (
        variant("smtp+tls://perso@", "smtp+tls://"),
        1,
        "fail",
        "530 5.7.0 Authentication required",
    ),
    "mail-from-no-at": (
        variant('mail-from "@example.org"', 'mail-from "example.org"'),
        1,
        "fail",
        "Sender address rejected: Domain not found",
    ),
    "tls-required-plain-url": (
        variant(
            "smtp+tls://perso@smtp.example.net:587 auth <secrets>", "smtp+notls://smtp.example.net:587 tls"
        ),
        1,
        "fail",
        "TLS required",
    ),
    "unreachable-match": (GOOD + 'match from local for any action "outbound"\n', 0, "pass", ""),
    "unused-table": (
        variant("table aliases", "table extra file:/etc/mail/extra\ntable aliases"),
        0,
        "pass",
        "table extra: never used by the config",
    ),
    "listen-lo0": (variant("listen on socket", "listen on socket\nlisten on lo0"), 0, "pass", ""),
}


def run_check(
    tmp_path: Path, name: str, text: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any], str]:
    config = tmp_path / f"{name}.conf"
    config.write_text(text)
    report = tmp_path / f"{name}.json"
    rc = main(
        [
            "check",
            str(config),
            "--upstream",
            str(DATA / "provider.toml"),
            "--table",
            f"aliases={DATA / 'aliases'}",
            "--table",
            f"secrets={DATA / 'secrets'}",
            "--report-json",
            str(report),
        ]
    )
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, json.loads(report.read_text()), out.out


@pytest.mark.parametrize("rule", sorted(CASES))
def test_lint_rule_is_shown_with_the_real_verdict(
    rule: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, rc_wanted, verdict, quoted = CASES[rule]
    rc, report, out = run_check(tmp_path, rule, text, capsys)
    assert [f["rule"] for f in report["lint"] if f["rule"] == rule] == [rule], out
    assert (rc, report["verdict"]) == (rc_wanted, verdict), out
    assert quoted in out, out


def test_the_corrected_config_has_no_finding_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, report, out = run_check(tmp_path, "good", GOOD, capsys)
    assert (rc, report["verdict"], report["lint"]) == (0, "pass", []), out
