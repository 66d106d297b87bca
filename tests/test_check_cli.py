"""`relay-harness check` as CI runs it: the real command, the real smtpd on lab test hosts.

Each failure OPENSMTPD-FACTS.md documents has a config (and provider profile) in
tests/data/check/ that shows it, and a corrected twin one edit away that passes; the tests pin
the exit code, the probe verdict and smtpd's own words in the text, JSON and JUnit reports.

The checks run as real `relay-harness check` processes, several at once: each spends most of its
~3.5 s waiting on SSH and smtpd, so running them side by side (one lab test host each) keeps the
module at about a fifth of the serial time. They all start when the first test that needs one
asks, and each test waits only for its own. Usage errors (exit 2) need no smtpd: most of them
run in-process through `harness.cli.main`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lab_footprint import hosts_of, own_lab_leftovers

from harness.cli import main
from harness.probes import PROBE_TIMEOUT
from harness.targets.lab import LabError, check_environment

pytestmark = pytest.mark.lab

DATA = Path(__file__).parent / "data" / "check"
ARTICLE = Path(__file__).parent / "data" / "article-smtpd.conf"
USER = "perso@example.org"
RIGHT_PASSWORD = "Right-Pass-4f7c"  # provider.toml's account, and the `secrets` table's
WRONG_PASSWORD = "Wrong-Pass-9d2e"  # secrets-wrong-password
PARALLEL = 4
RUN_TIMEOUT = 120.0
HOST = r"host\d+\.relay-harness\.test"  # the lab test host's name, as smtpd writes root@HOST
UNEXPANDED = "smtpd relayed mail for a local user without expanding the alias"


@dataclass(frozen=True)
class Check:
    """One `relay-harness check` command line; file names are relative to tests/data/check."""

    config: str
    profile: str = "provider.toml"
    tables: tuple[str, ...] = ("aliases=aliases", "secrets=secrets")

    def argv(self, out: Path) -> list[str]:
        config = self.config if self.config.startswith("/") else str(DATA / self.config)
        argv = [config, "--upstream", str(DATA / self.profile)]
        for table in self.tables:
            name, _, file = table.partition("=")
            argv += ["--table", f"{name}={DATA / file}"]
        return [*argv, "--report-json", str(out / "report.json"), "--junit", str(out / "junit.xml")]


ALIASES_ONLY = ("aliases=aliases",)
CHECKS: dict[str, Check] = {
    # The corrected config: the twin of every failure that is one edit away from it.
    "good": Check("good.conf"),
    "wrong-password": Check("good.conf", tables=("aliases=aliases", "secrets=secrets-wrong-password")),
    "no-mail-from": Check("no-mail-from.conf"),
    "article": Check(str(ARTICLE), "provider-article.toml", ALIASES_ONLY),
    "article-fixed": Check("article-fixed.conf", "provider-article.toml", ALIASES_ONLY),
    "label-on-smtp": Check("label-on-smtp.conf"),
    "label-without-auth": Check("label-without-auth.conf"),
    "label-not-in-secrets": Check("good.conf", tables=("aliases=aliases", "secrets=secrets-other-label")),
    "auth-without-label": Check("auth-without-label.conf"),
    "starttls-to-plain": Check("plain-starttls.conf", "provider-plain.toml", ALIASES_ONLY),
    "notls-to-plain": Check("plain-notls.conf", "provider-plain.toml", ALIASES_ONLY),
    "starttls-to-implicit": Check("starttls-on-465.conf", "provider-implicit.toml"),
    "smtps-to-implicit": Check("smtps.conf", "provider-implicit.toml"),
    "cert-wrong-host": Check("good.conf", "provider-cert-wrong-host.toml"),
    "cert-expired": Check("good.conf", "provider-cert-expired.toml"),
    "cert-untrusted": Check("good.conf", "provider-cert-untrusted.toml"),
    "aliases-db": Check("aliases-db.conf"),
    "local-mail-relayed": Check("local-mail-relayed.conf"),
}


def _command() -> list[str]:
    exe = Path(sys.executable).with_name("relay-harness")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]


@dataclass(frozen=True)
class Outcome:
    """What one `relay-harness check` process left: exit code, output and both report files."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    json_text: str
    junit_text: str

    @property
    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.json_text)
        return data

    @property
    def junit(self) -> ET.Element:
        return ET.fromstring(self.junit_text)

    def probe(self, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [p for p in self.report["probes"] if p["name"] == name]
        assert len(found) == 1, f"no probe {name!r}\n{self.explain()}"
        return found[0]

    def lint(self, rule: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [f for f in self.report["lint"] if f["rule"] == rule]
        assert len(found) == 1, f"no lint finding {rule!r}\n{self.explain()}"
        return found[0]

    def explain(self) -> str:
        return f"$ relay-harness check {' '.join(self.argv)}\nexit {self.rc}\n{self.stdout}\n{self.stderr}"


def _run(argv: list[str], out: Path, env: dict[str, str]) -> Outcome:
    """One check, in a pool thread; `env` is copied in the test's thread (a copy of os.environ
    taken here raced pytest setting PYTEST_CURRENT_TEST: KeyError)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [*_command(), "check", *argv],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        check=False,
    )
    json_file, junit_file = out / "report.json", out / "junit.xml"
    return Outcome(
        argv,
        proc.returncode,
        proc.stdout,
        proc.stderr,
        json_file.read_text(encoding="utf-8") if json_file.exists() else "",
        junit_file.read_text(encoding="utf-8") if junit_file.exists() else "",
    )


class Checks:
    """Every CHECKS entry submitted at once to a small pool; `outcome(key)` waits for one."""

    def __init__(self, root: Path) -> None:
        self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="relay-harness-check")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._futures: dict[str, Future[Outcome]] = {
            key: self._pool.submit(_run, check.argv(root / key), root / key, env)
            for key, check in CHECKS.items()
        }

    def outcome(self, key: str) -> Outcome:
        return self._futures[key].result(timeout=RUN_TIMEOUT * len(CHECKS) / PARALLEL)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _skip_without_lab() -> None:
    try:
        check_environment()
    except LabError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the lab cannot run under CI: {exc}", pytrace=False)
        pytest.skip(f"lab unavailable: {exc}")


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checks]:
    _skip_without_lab()
    runner = Checks(tmp_path_factory.mktemp("check-cli"))
    try:
        yield runner
    finally:
        runner.close()


# -- assertions shared by the cases ----------------------------------------------------------------


def assert_clean_exit(out: Outcome, rc: int) -> None:
    assert out.rc == rc, out.explain()
    assert "Traceback" not in out.stdout + out.stderr, out.explain()
    assert out.stderr == "", out.explain()


def assert_passes(out: Outcome) -> None:
    """Exit 0, verdict pass, every probe passed, in all three reports."""
    assert_clean_exit(out, 0)
    report = out.report
    assert (report["verdict"], report["ok"]) == ("pass", True), out.explain()
    assert report["probes"] and all(p["ok"] for p in report["probes"]), out.explain()
    n = len(report["probes"])
    assert out.stdout.splitlines()[-1].startswith(f"PASS: {n} passed, 0 failed in "), out.explain()
    suite = out.junit
    assert (suite.get("tests"), suite.get("failures")) == (str(n), "0")


def assert_probe_fails(out: Outcome, probe: str, evidence: str, hint: str) -> dict[str, Any]:
    """Exit 1, verdict fail, `probe` failed with `evidence` (regex) and a fix containing `hint`."""
    assert_clean_exit(out, 1)
    assert (out.report["verdict"], out.report["ok"]) == ("fail", False), out.explain()
    p = out.probe(probe)
    assert p["ok"] is False, out.explain()
    matching = [e for e in p["evidence"] if re.search(evidence, e)]
    assert matching, f"no evidence matching {evidence!r}\n{out.explain()}"
    assert p["hint"] and hint in p["hint"], out.explain()
    text = out.stdout
    block = text[text.index(f"  FAIL  {probe}: ") :]
    assert f"        evidence: {matching[0]}\n" in block, out.explain()
    assert f"        fix: {p['hint']}" in block, out.explain()
    assert out.stdout.splitlines()[-1].startswith("FAIL: "), out.explain()
    # Settled by what smtpd logged, not by running out of time.
    assert p["seconds"] < PROBE_TIMEOUT, out.explain()
    return p


def relay_probes(out: Outcome) -> list[dict[str, Any]]:
    return [p for p in out.report["probes"] if p["expected"].startswith("arrives at ")]


def assert_all_relays_fail(out: Outcome, evidence: str, hint: str) -> None:
    """Every relayed probe fails for the same reason; the local deliveries still pass."""
    relays = relay_probes(out)
    names = [p["name"] for p in relays]
    assert names == ["relay-external", "alias-webmaster->alice@example.org"], out.explain()
    for p in relays:
        assert_probe_fails(out, p["name"], evidence, hint)
    local = [p for p in out.report["probes"] if p not in relays]
    assert local and all(p["ok"] for p in local), out.explain()


# -- 1. wrong password --------------------------------------------------------------------------


def _secret_forms(user: str, password: str) -> list[str]:
    blobs = [password, f"\0{user}\0{password}", f"{user}\0{user}\0{password}", f"{user}:{password}"]
    forms = [password]
    for blob in blobs:
        encoded = base64.b64encode(blob.encode()).decode()
        forms += [encoded, encoded.rstrip("=")]
    return forms


def assert_no_secret(out: Outcome, password: str) -> None:
    for where, text in {
        "stdout": out.stdout,
        "stderr": out.stderr,
        "JSON": out.json_text,
        "JUnit": out.junit_text,
    }.items():
        for form in _secret_forms(USER, password):
            assert form not in text, f"{where} leaks the password (as {form!r})"


def test_wrong_password_is_refused_by_the_provider_and_never_printed(checks: Checks) -> None:
    out = checks.outcome("wrong-password")
    assert_all_relays_fail(
        out,
        r"^\S+ mta error reason=AUTH rejected: 535 5\.7\.8 Authentication credentials invalid$",
        "the provider refused the credentials",
    )
    # The probes leave together (relaying paused while they are submitted), so the second relayed
    # probe is settled by the very rejection that settled the first, in the same session.
    first, later = out.probe("relay-external"), out.probe("alias-webmaster->alice@example.org")
    assert later["evidence"][0] == first["evidence"][0]
    assert out.junit_text and out.json_text
    assert_no_secret(out, WRONG_PASSWORD)
    assert_no_secret(out, RIGHT_PASSWORD)


def test_twin_matching_password_relays_authenticated(checks: Checks) -> None:
    out = checks.outcome("good")
    assert_passes(out)
    observed = out.probe("relay-external")["observed"]
    assert re.fullmatch(
        rf"arrived over TLS=starttls \(TLSv1\.\d\), AUTH as {USER}, MAIL FROM <root@example\.org>", observed
    )
    assert_no_secret(out, RIGHT_PASSWORD)


# -- 2. no mail-from ------------------------------------------------------------------------------


def test_missing_mail_from_is_rejected_by_the_provider(checks: Checks) -> None:
    out = checks.outcome("no-mail-from")
    assert_all_relays_fail(
        out,
        rf'result="PermFail" stat="550 5\.1\.8 <root@{HOST}>: Sender address rejected: Domain not found"$',
        'add mail-from "@DOMAIN" to the relay action',
    )


def test_twin_with_mail_from_sends_as_the_domain(checks: Checks) -> None:
    out = checks.outcome("good")
    assert_passes(out)
    assert out.probe("relay-external")["observed"].endswith("MAIL FROM <root@example.org>")


# -- 3. the article's config, verbatim -------------------------------------------------------------


def test_article_config_is_refused_no_such_dispatcher_line_27(checks: Checks) -> None:
    out = checks.outcome("article")
    assert_clean_exit(out, 1)
    report = out.report
    assert report["verdict"] == "refused" and report["ok"] is False
    assert (report["refusal"], report["refusal_line"]) == ("no such dispatcher: outbound", 27)
    assert report["refusal_stage"] == "smtpd -n"
    assert report["probes"] == []
    assert ARTICLE.read_text().splitlines()[26] == 'match from local for any action "outbound"'
    assert f"  REFUSED  smtpd -n: {ARTICLE}:27: no such dispatcher: outbound\n" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("FAIL (config refused): 0 passed, 0 failed")
    # lint said it first, in smtpd's words, on the same line.
    finding = out.lint("undefined-action")
    assert (finding["line"], finding["smtpd_says"], finding["stage"]) == (27, report["refusal"], "check")
    assert f"  lint  {ARTICLE}:27: error: " in out.stdout
    case = out.junit.find("testcase")
    assert case is not None and case.get("name") == "smtpd-accepts-config"
    failure = case.find("failure")
    assert failure is not None and "no such dispatcher: outbound" in (failure.get("message") or "")


def test_twin_article_with_action_renamed_outbound_passes(checks: Checks) -> None:
    article = ARTICLE.read_text()
    fixed = (DATA / "article-fixed.conf").read_text()
    assert fixed == article.replace('action "unbound" relay', 'action "outbound" relay')
    assert fixed != article
    out = checks.outcome("article-fixed")
    assert_passes(out)
    assert out.probe("relay-external")["observed"].endswith("MAIL FROM <root@your-domain.tld>")
    assert any(n.startswith("table secrets: not given, synthesized") for n in out.report["notes"])


# -- 4-6. relay URL / auth table mistakes that `smtpd -n` accepts ------------------------------------


def test_label_on_plain_smtp_url_fails_to_parse_at_delivery(checks: Checks) -> None:
    out = checks.outcome("label-on-smtp")
    said = "warn: Failed to parse smarthost smtp://perso@smtp.example.net:587"
    assert_all_relays_fail(out, f"^{re.escape(said)}$", "the relay URL cannot be used")
    assert out.lint("bad-relay-url")["smtpd_says"] == said


def test_label_without_auth_table(checks: Checks) -> None:
    out = checks.outcome("label-without-auth")
    said = 'warn: No auth table on action "outbound" for relay smtp+tls://perso@smtp.example.net:587'
    assert_all_relays_fail(out, f"^{re.escape(said)}$", "the action has no `auth <secrets>`")
    assert out.lint("label-without-auth")["smtpd_says"] == said


def test_label_missing_from_secrets_table(checks: Checks) -> None:
    out = checks.outcome("label-not-in-secrets")
    assert_all_relays_fail(
        out, r"^warn: credentials not found for secrets:perso$", "the URL's label is missing from the secrets"
    )


def test_twin_of_url_and_auth_mistakes_passes(checks: Checks) -> None:
    # good.conf is one edit away from each: label-on-smtp (smtp:// -> smtp+tls://),
    # label-without-auth (add `auth <secrets>`), label-not-in-secrets (the label in the table).
    assert_passes(checks.outcome("good"))


# -- 7. auth without a label --------------------------------------------------------------------


def test_auth_without_label_relays_unauthenticated_and_provider_refuses(checks: Checks) -> None:
    out = checks.outcome("auth-without-label")
    assert_all_relays_fail(
        out,
        r'result="PermFail" stat="530 5\.7\.0 Authentication required"$',
        "the provider requires AUTH",
    )
    assert out.lint("auth-without-label")["smtpd_says"] is None  # smtpd says nothing about it


# -- 8. TLS mode against what the provider offers ------------------------------------------------------


def test_starttls_against_a_provider_without_starttls(checks: Checks) -> None:
    out = checks.outcome("starttls-to-plain")
    assert_all_relays_fail(
        out,
        r"^\S+ mta error reason=TLS required but not supported by remote host$",
        "the provider does not offer STARTTLS",
    )


def test_twin_notls_against_the_plain_provider_passes(checks: Checks) -> None:
    out = checks.outcome("notls-to-plain")
    assert_passes(out)
    assert out.probe("relay-external")["observed"].startswith("arrived over TLS=none, AUTH as nobody")


def test_starttls_against_an_implicit_tls_port_is_reported_not_waited_out(checks: Checks) -> None:
    # smtpd logs nothing after `mta connected` (each side waits for the other); the harness
    # settles on those two lines instead of running out of time.
    out = checks.outcome("starttls-to-implicit")
    assert_all_relays_fail(
        out,
        r"^\S+ mta connecting address=smtp\+tls://[\d.]+:465 host=smtp\.example\.net$",
        "use smtps://",
    )
    evidence = out.probe("relay-external")["evidence"]
    assert re.fullmatch(r"\S+ mta connected", evidence[1])


def test_twin_smtps_against_the_implicit_tls_provider_passes(checks: Checks) -> None:
    out = checks.outcome("smtps-to-implicit")
    assert_passes(out)
    assert out.probe("relay-external")["observed"].startswith(
        f"arrived over TLS=implicit (TLSv1.3), AUTH as {USER}"
    )


# -- 9. provider certificate ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["wrong-host", "expired", "untrusted"])
def test_provider_certificate_that_does_not_verify(checks: Checks, fault: str) -> None:
    out = checks.outcome(f"cert-{fault}")
    assert_all_relays_fail(
        out,
        r"^\S+ mta error reason=SSL certificate check failed$",
        "the provider's certificate does not verify",
    )


def test_twin_provider_with_a_good_certificate_passes(checks: Checks) -> None:
    # Same config; provider.toml is provider-cert-*.toml without its [faults] cert.
    assert_passes(checks.outcome("good"))


# -- 10. aliases ---------------------------------------------------------------------------------


def test_alias_to_a_user_lands_in_the_mbox(checks: Checks) -> None:
    out = checks.outcome("good")
    assert_passes(out)
    for key in ("root", "alice"):
        p = out.probe(f"alias-{key}->alice")
        assert p["observed"] == "in alice's mailbox"
        assert re.search(
            rf"mda delivery .* to=<{key}@{HOST}> rcpt=<{key}@{HOST}> user=alice .*result=Ok stat=Delivered$",
            p["evidence"][0],
        )
    assert out.probe("alias-webmaster->alice@example.org")["ok"]


def test_db_aliases_table_is_built_with_makemap_and_used(checks: Checks) -> None:
    # No failing twin is possible here: the check builds the .db from the very file the
    # expectations come from, so a stale db (edited aliases, no makemap) cannot arise in a check.
    out = checks.outcome("aliases-db")
    assert_passes(out)
    good = checks.outcome("good")
    assert [p["name"] for p in out.report["probes"]] == [p["name"] for p in good.report["probes"]]
    assert "user=alice" in out.probe("alias-root->alice")["evidence"][0]


def test_local_mail_matched_by_the_relay_rule_first_is_relayed_not_aliased(checks: Checks) -> None:
    out = checks.outcome("local-mail-relayed")
    assert out.probe("relay-external")["ok"]
    for key in ("root", "alice"):
        p = assert_probe_fails(
            out, f"alias-{key}->alice", rf"mta delivery .* to=<{key}@{HOST}> .*result=\"Ok\"", UNEXPANDED
        )
        assert p["observed"] == "relayed"
    assert_probe_fails(
        out,
        "alias-webmaster->alice@example.org",
        rf"^upstream: received it for <webmaster@{HOST}>, not <alice@example\.org>$",
        UNEXPANDED,
    )
    relay_rule = (
        (DATA / "local-mail-relayed.conf")
        .read_text()
        .splitlines()
        .index('match from local for any action "outbound"')
    )
    assert out.lint("local-mail-relayed")["line"] == relay_rule + 1


# -- 11. usage errors: exit 2, one line, no traceback ------------------------------------------------


def _usage_line(rc: int, stdout: str, stderr: str) -> str:
    assert rc == 2, stdout + stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay-harness: "), stderr
    return lines[0]


def _subprocess_usage(*argv: str) -> str:
    proc = subprocess.run(
        [*_command(), "check", *argv], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    return _usage_line(proc.returncode, proc.stdout, proc.stderr)


def _in_process_usage(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(["check", *argv])
    captured = capsys.readouterr()
    return _usage_line(rc, captured.out, captured.err)


def test_usage_missing_config_file() -> None:
    missing = DATA / "no-such.conf"
    line = _subprocess_usage(str(missing), "--upstream", str(DATA / "provider.toml"))
    assert line == f"relay-harness: {missing}: cannot read: No such file or directory"


def test_usage_table_flag_without_equals() -> None:
    line = _subprocess_usage(
        str(DATA / "good.conf"), "--upstream", str(DATA / "provider.toml"), "--table", "bad"
    )
    assert line == "relay-harness: --table 'bad': expected NAME=FILE"


def test_usage_table_flag_with_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    missing = DATA / "no-such-aliases"
    line = _in_process_usage(
        capsys,
        str(DATA / "good.conf"),
        "--upstream",
        str(DATA / "provider.toml"),
        "--table",
        f"aliases={missing}",
    )
    assert line == f"relay-harness: --table aliases={missing}: cannot read: No such file or directory"


def test_usage_malformed_profile_names_file_line_and_field(capsys: pytest.CaptureFixture[str]) -> None:
    profile = DATA / "provider-malformed.toml"
    line = _in_process_usage(capsys, str(DATA / "good.conf"), "--upstream", str(profile))
    assert line == (
        f"relay-harness: {profile}:4: tls: 'startls-required' is not one of "
        "starttls-required, starttls-optional, implicit, none"
    )
    assert profile.read_text().splitlines()[3].startswith("tls = ")


def test_usage_used_table_without_content(capsys: pytest.CaptureFixture[str]) -> None:
    # Needs the lab: the tables are sorted out once the config is parsed on the way to smtpd.
    _skip_without_lab()
    line = _in_process_usage(
        capsys,
        str(DATA / "good.conf"),
        "--upstream",
        str(DATA / "provider.toml"),
        "--table",
        f"secrets={DATA / 'secrets'}",
    )
    assert line == (
        "relay-harness: the config's table 'aliases' (line 2, file:/etc/mail/aliases) needs content: "
        "pass --table aliases=FILE"
    )
    assert (DATA / "good.conf").read_text().splitlines()[1] == "table aliases file:/etc/mail/aliases"


# -- 12. JUnit and JSON reports -----------------------------------------------------------------------


def test_junit_has_one_testcase_per_probe_and_marks_failures(checks: Checks) -> None:
    for key in ("wrong-password", "good"):
        out = checks.outcome(key)
        probes = out.report["probes"]
        suite = out.junit
        assert suite.tag == "testsuite"
        assert suite.get("name") == f"relay-harness check {out.argv[0]}"
        cases = suite.findall("testcase")
        assert [c.get("name") for c in cases] == [p["name"] for p in probes]
        assert all(c.get("classname") == "relay-harness.check" for c in cases)
        failed = [p for p in probes if not p["ok"]]
        assert suite.get("tests") == str(len(probes))
        assert suite.get("failures") == str(len(failed))
        for case, p in zip(cases, probes, strict=True):
            failure = case.find("failure")
            if p["ok"]:
                assert failure is None
                continue
            assert failure is not None
            assert failure.get("message") == f"expected {p['expected']}; observed {p['observed']}"
            assert (failure.text or "").splitlines() == [*p["evidence"], f"fix: {p['hint']}"]
    assert checks.outcome("wrong-password").report["verdict"] == "fail"


def test_json_report_fields(checks: Checks) -> None:
    out = checks.outcome("wrong-password")
    report = out.report
    assert set(report) == {
        "config",
        "target",
        "verdict",
        "ok",
        "seconds",
        "error",
        "refusal",
        "refusal_line",
        "refusal_stage",
        "probes",
        "lint",
        "notes",
    }
    assert report["config"] == out.argv[0]
    assert re.fullmatch(rf"lab:{HOST}", report["target"])
    refusal = (report["refusal"], report["refusal_line"], report["refusal_stage"])
    assert (report["verdict"], report["ok"], report["error"]) == ("fail", False, None)
    assert refusal == (None, None, None)
    assert 0 < report["seconds"] < 60
    names = [p["name"] for p in report["probes"]]
    assert names == [
        "relay-external",
        "alias-alice->alice",
        "alias-root->alice",
        "alias-webmaster->alice@example.org",
    ]
    for p in report["probes"]:
        assert set(p) == {"name", "description", "ok", "expected", "observed", "evidence", "hint", "seconds"}
        assert isinstance(p["ok"], bool) and isinstance(p["evidence"], list) and p["seconds"] >= 0
    assert report["probes"][0]["expected"] == (
        "arrives at smtp.example.net:587 for relay-harness-probe@example.com over TLS=starttls, authenticated"
    )
    for finding in checks.outcome("label-on-smtp").report["lint"]:
        assert set(finding) == {"rule", "line", "severity", "message", "hint", "smtpd_says", "stage"}


def test_sigterm_mid_check_removes_the_test_host_and_exits_130() -> None:
    """A cancelled CI job sends SIGTERM: the check unwinds like Ctrl-C and leaves nothing behind."""
    import signal
    import time

    example = Path(__file__).parent.parent / "ci" / "examples"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "relay-harness"),
            "check",
            str(example / "smtpd.conf"),
            "--upstream",
            str(example / "provider.toml"),
            "--table",
            f"aliases={example / 'aliases'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # No event tells this process that another one's test host came to be: look, bounded.
    deadline = time.monotonic() + 30
    while not hosts_of(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hosts_of(proc.pid), "the check never built its test host"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "interrupted" in err
    assert own_lab_leftovers(proc.pid) == []


def test_a_signal_decides_the_exit_even_when_unwinding_raises_another_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM unwinds as KeyboardInterrupt; a `finally` on the way out whose SSH command the
    signal cut short may raise an error of its own, which replaced it: a cancelled check exited 2
    ("smtpd exited while the probes ran", 1 of 13 SIGTERMs landing mid-check). The signal decides."""
    import signal

    import harness.cli
    from harness.targets.base import TargetError

    def cancelled_mid_probe(args: object) -> int:
        try:
            signal.raise_signal(signal.SIGTERM)  # its handler runs here, in this (the main) thread
            return 0
        finally:
            raise TargetError("lab:host1.relay-harness.test: smtpd exited while the probes ran")

    monkeypatch.setattr(harness.cli, "cmd_check", cancelled_mid_probe)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    example = Path(__file__).parent.parent / "ci" / "examples"
    argv = ["check", str(example / "smtpd.conf"), "--upstream", str(example / "provider.toml")]
    try:
        code = main([*argv, "--target", "emulated"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert code == 130 and err == "relay-harness: interrupted\n", err
