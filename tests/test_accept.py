"""`relay-harness accept` against lab test hosts made to look like real mail hosts.

Each host has its config in /etc/smtpd.conf, tables in /etc/mail, a running smtpd daemon (not
`-d`: as a service runs it) and a mail log in /var/log/mail.log (a tmpfs private to the test
host, so the machine's own log is never touched). Each broken twin changes one thing.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from harness.accept.facts import AcceptError
from harness.accept.run import WAY_COPY, AcceptOptions, AcceptReport, run_accept
from harness.cli import build_parser
from harness.errors import HarnessError
from harness.pki import TestPki
from harness.report import accept_text as text_report
from harness.targets.base import Bundle, BundleFile, Target
from harness.targets.lab import Lab, LabHost
from harness.targets.smtpd import SmtpdTarget

pytestmark = pytest.mark.lab

PROVIDER = Path(__file__).parent / "data" / "check" / "provider.toml"
PASSWORD = "Right-Pass-4f7c"  # the provider profile's password for perso@example.org
WRONG = "Wrong-Pass-0b1d"
URL = "smtp+tls://perso@smtp.example.net:587"
HEALTHY_LOG = (
    "Nov 27 09:00:01 mx smtpd[812]: 1f2e3d4c5b6a7980 mta delivery evpid=0a1b2c3d4e5f6071 "
    'from=<root@example.org> to=<bob@example.com> rcpt=<-> source="192.0.2.10" '
    'relay="203.0.113.5 (smtp.example.net)" delay=1s result="Ok" stat="250 2.0.0 Ok: queued"\n'
)
FAILING_LOG = HEALTHY_LOG + (
    "Nov 27 09:10:01 mx smtpd[812]: 1f2e3d4c5b6a7981 mta error reason=AUTH rejected: "
    "535 5.7.8 Authentication credentials invalid\n"
    "Nov 27 09:11:02 mx smtpd[812]: warn: Failed to parse smarthost smtp+tls://perso@:99999\n"
)


def config(relay: str = URL, extra: str = "") -> str:
    return (
        "table aliases db:/etc/mail/aliases.db\n"
        "table secrets file:/etc/mail/secrets\n"
        f"{extra}"
        "listen on socket\n"
        "listen on lo\n"
        'action "local_mail" mbox alias <aliases>\n'
        f'action "outbound" relay host {relay} auth <secrets> mail-from "@example.org"\n'
        'match from local for local action "local_mail"\n'
        'match from local for any action "outbound"\n'
    )


def secrets(password: str = PASSWORD, mode: int = 0o640) -> BundleFile:
    content = f"perso perso@example.org:{password}\n".encode()
    return BundleFile("/etc/mail/secrets", content, mode, "root", "_smtpd", True)


ALIASES = BundleFile(
    "/etc/mail/aliases", b"root: alice\npostmaster: root\n", db="/etc/mail/aliases.db", aliases=True
)


def make_real(
    host: LabHost,
    conf: str = "",
    files: tuple[BundleFile, ...] = (),
    log: str = HEALTHY_LOG,
    after: str = "",
    config_path: str = "/etc/smtpd.conf",
    start: str | None = None,
) -> SmtpdTarget:
    """Install like an admin would, start smtpd as a daemon, write a mail log; `after` breaks it.

    `start` is the command that starts smtpd (default: with -f `config_path`); "" leaves it stopped.
    """
    target = host.target
    assert target is not None
    target.check("mount -t tmpfs -o mode=0755 rh-log /var/log")
    target.install(Bundle(conf or config(), files or (ALIASES, secrets()), ("alice",), config_path))
    target.write_file("/var/log/mail.log", log.encode(), 0o640)
    if start == "":
        if after:
            target.check(after)
        return target
    target.check(f"/usr/sbin/smtpd -f {config_path}" if start is None else start)
    # The daemon returns before its control socket is up, and enables its listeners after that
    # (once the queue is loaded), one listen() per address of lo (127.0.0.1 and ::1): wait for
    # all of them, bounded, so a test sees the host as it runs (a listener snapshot taken between
    # two listen() calls saw one appear later: tests/test_target_ssh.py, under load).
    listening = (
        "[ $(ss -Hltn 'sport = :25' | wc -l) -ge $(ip -o addr show dev lo | wc -l) ]"
        if "listen on lo\n" in (conf or config())
        else "true"
    )
    target.check(
        "for i in $(seq 100); do smtpctl show status >/dev/null 2>&1 && "
        f"{listening} && exit 0; sleep 0.05; done; exit 1"
    )
    if after:
        target.check(after)
    return target


def lab_factory(lab: Lab) -> Callable[[TestPki, str | None], AbstractContextManager[Target]]:
    """The relay probe's local lab host, from the session's lab (a second test host)."""

    @contextmanager
    def factory(pki: TestPki, release: str | None) -> Iterator[Target]:
        host = lab.create_host(release=release)
        try:
            assert host.target is not None
            yield host.target
        finally:
            lab.destroy_host(host)

    return factory


def accept(lab: Lab, host: LabHost, **kw: object) -> AcceptReport:
    lab.ssh_config()  # writes known_hosts for the lab's hosts
    kw.setdefault("upstream", PROVIDER)
    kw.setdefault("relay_mode", "lab")  # the copied-lab way; the sandbox way: test_accept_sandbox
    options = AcceptOptions(
        f"ssh://root@{host.address}",
        identity=lab.dir / "id_ed25519",
        known_hosts=lab.dir / "known_hosts",
        **kw,  # type: ignore[arg-type]
    )
    return run_accept(options, lab_factory(lab))


def fact(report: AcceptReport, name: str) -> tuple[str, str]:
    found = [f for f in report.facts if f.name == name]
    assert found, f"no fact {name}: {[f.name for f in report.facts]}"
    return found[0].status, found[0].summary


def snapshot(target: SmtpdTarget) -> str:
    """Content hash, mode, owner and mtime of every file the host's mail setup is made of."""
    return target.check(
        "find /etc/smtpd.conf /etc/mail /var/log -type f | sort | "
        "xargs stat -c '%n %a %U %G %Y %s' && find /etc/smtpd.conf /etc/mail /var/log -type f | sort | "
        "xargs sha256sum"
    ).stdout


def test_healthy_host_passes_and_is_left_byte_identical(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = make_real(lab_host)
    before = snapshot(target)
    parser = build_parser()
    relay_lab.ssh_config()
    args = parser.parse_args(
        [
            "accept",
            f"ssh://root@{lab_host.address}",
            "--identity",
            str(relay_lab.dir / "id_ed25519"),
            "--known-hosts",
            str(relay_lab.dir / "known_hosts"),
            "--upstream",
            str(PROVIDER),
            "--relay-mode",
            "lab",
            "--save-baseline",
            str(tmp_path / "base.json"),
            "--report-json",
            str(tmp_path / "r.json"),
            "--junit",
            str(tmp_path / "r.xml"),
        ]
    )
    code = args.func(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert snapshot(target) == before
    report = json.loads((tmp_path / "r.json").read_text())
    status = {f["name"]: f["status"] for f in report["facts"]}
    for name in (
        "smtpd-present",
        "config-grammar",
        "smtpd-n",
        "service",
        "table:secrets",
        "table:aliases",
        "credentials:perso",
        "mail-log",
        "relay:relay-external",
        "relay:alias-root->alice",
        "host-unchanged",
    ):
        assert status[name] == "pass", (name, out)
    assert [s for n, s in status.items() if n.startswith("listen:")] == ["pass", "pass"]
    assert report["relay_way"] == WAY_COPY
    assert "OpenSMTPD 6.8.0p2" in out and "smtpctl show status" in out
    assert "no systemd or rcctl" in out
    for text in (out, (tmp_path / "r.json").read_text(), (tmp_path / "r.xml").read_text()):
        assert PASSWORD not in text
    suite = ET.parse(tmp_path / "r.xml").getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests") or 0) == len(status)
    saved = (tmp_path / "base.json").read_text()
    assert PASSWORD not in saved and json.loads(saved)["routes"]["outbound#0"]["url"] == URL


def test_secrets_with_the_wrong_mode_fail(relay_lab: Lab, lab_host: LabHost) -> None:
    make_real(lab_host, files=(ALIASES, secrets(mode=0o644)))
    report = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(report, "table:secrets")
    assert status == "fail" and "mode 644 root:opensmtpd, must be mode 640 root:opensmtpd" in summary
    assert not report.ok


def test_stale_aliases_db_fails_with_newaliases(relay_lab: Lab, lab_host: LabHost) -> None:
    stale = "touch -d @$(( $(stat -c %Y /etc/mail/aliases.db) + 60 )) /etc/mail/aliases"
    make_real(lab_host, after=stale)
    report = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(report, "table:aliases")
    assert status == "fail" and "stale" in summary
    assert next(f for f in report.facts if f.name == "table:aliases").hint == "newaliases"


def test_config_naming_a_missing_table_fails(relay_lab: Lab, lab_host: LabHost) -> None:
    extra = "table mynets file:/etc/mail/mynets\n"
    files = (ALIASES, secrets(), BundleFile("/etc/mail/mynets", b"192.0.2.0/24\n"))
    make_real(lab_host, config(extra=extra), files, after="rm /etc/mail/mynets")
    report = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(report, "table:mynets")
    assert status == "fail" and "/etc/mail/mynets does not exist" in summary
    assert fact(report, "smtpd-n")[0] == "fail"


def test_wrong_password_fails_in_facts_relay_and_log_and_is_never_shown(
    relay_lab: Lab, lab_host: LabHost
) -> None:
    make_real(lab_host, files=(ALIASES, secrets(WRONG)), log=FAILING_LOG)
    report = accept(relay_lab, lab_host)
    status, summary = fact(report, "credentials:perso")
    assert status == "fail" and "differs from the profile's" in summary
    relay = next(f for f in report.facts if f.name == "relay:relay-external")
    assert relay.status == "fail" and any("AUTH rejected" in e for e in relay.evidence)
    log = next(f for f in report.facts if f.name == "mail-log")
    assert log.status == "fail"
    assert "authentication failed (1)" in log.summary and "cannot parse smarthost (1)" in log.summary
    assert any("535 5.7.8" in e for e in log.evidence)
    text = text_report(report)
    assert WRONG not in text and PASSWORD not in text
    assert fact(report, "host-unchanged")[0] == "pass"


def test_baseline_catches_a_changed_relay_url(relay_lab: Lab, lab_host: LabHost, tmp_path: Path) -> None:
    """Without --upstream the fake provider follows the URL, so the relay passes both times and
    only the baseline tells that the route (and what the relay did on the wire) changed."""
    target = make_real(lab_host)
    first = accept(relay_lab, lab_host, upstream=None, save_baseline=tmp_path / "b.json")
    assert first.ok, text_report(first)
    assert any("password itself was not verified" in n for n in first.notes)
    target.write_file("/etc/smtpd.conf", config("smtps://perso@smtp.example.net:465").encode())
    again = accept(relay_lab, lab_host, upstream=None, baseline=tmp_path / "b.json")
    assert again.differences is not None and not again.ok
    assert not any(f.failed for f in again.facts), text_report(again)
    diffs = again.differences
    assert f"routes.outbound#0.url: {URL} → smtps://perso@smtp.example.net:465" in diffs
    assert "routes.outbound#0.port: 587 → 465" in diffs
    assert "routes.outbound#0.tls: starttls-required → implicit" in diffs
    assert any(d.startswith("config.sha256:") for d in diffs)
    relayed = [d for d in diffs if d.startswith("relay.probes.relay:relay-external.summary:")]
    assert relayed and "TLS=starttls" in relayed[0] and "TLS=implicit" in relayed[0]
    assert f"FAIL  baseline: {len(diffs)} difference(s)" in text_report(again)


def test_baseline_of_an_unchanged_host_shows_no_difference(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path
) -> None:
    """The twin of the changed-URL test: the same host twice compares equal, so a difference
    reported after an upgrade is the upgrade's, not noise from the harness."""
    make_real(lab_host)
    first = accept(relay_lab, lab_host, upstream=None, save_baseline=tmp_path / "b.json")
    assert first.ok, text_report(first)
    again = accept(relay_lab, lab_host, upstream=None, baseline=tmp_path / "b.json")
    assert again.differences == [], again.differences
    assert again.ok, text_report(again)


def test_unreachable_host_is_exit_2_naming_host_and_cause() -> None:
    with pytest.raises(AcceptError, match=r"127\.0\.0\.1:1: unreachable: .*[Cc]onnection refused"):
        run_accept(AcceptOptions("ssh://root@127.0.0.1:1", relay=False))


def test_refused_key_and_unknown_host_key(relay_lab: Lab, lab_host: LabHost, tmp_path: Path) -> None:
    from harness.targets.lab import _key_pair

    private, _ = _key_pair()
    other = tmp_path / "other_key"
    other.write_bytes(private)
    other.chmod(0o600)
    relay_lab.ssh_config()
    url = f"ssh://root@{lab_host.address}"
    with pytest.raises(AcceptError, match=rf"{lab_host.address}:22: authentication refused for user root"):
        run_accept(AcceptOptions(url, identity=other, known_hosts=relay_lab.dir / "known_hosts", relay=False))
    with pytest.raises(AcceptError, match=rf"{lab_host.address}:22: host key unknown"):
        run_accept(AcceptOptions(url, identity=relay_lab.dir / "id_ed25519", relay=False))


def test_missing_sudo_and_missing_opensmtpd(relay_lab: Lab, lab_host: LabHost) -> None:
    target = lab_host.target
    assert target is not None
    target.check("useradd -M -N -s /bin/sh tester && usermod -p '*' tester")
    relay_lab.ssh_config()
    known = relay_lab.dir / "known_hosts"
    key = relay_lab.dir / "id_ed25519"
    # sshd reads authorized_keys as the user: let `tester` read the host's (public) one.
    target.check("chmod 0711 /run/relay-harness && chmod 0644 /run/relay-harness/authorized_keys")
    with pytest.raises(AcceptError, match=rf"tester@{lab_host.address}: not root and no passwordless sudo"):
        run_accept(AcceptOptions(f"ssh://tester@{lab_host.address}", key, known, relay=False))
    target.check("mount --bind /dev/null /usr/sbin/smtpd")
    with pytest.raises(AcceptError, match=rf"root@{lab_host.address}: OpenSMTPD is not installed"):
        run_accept(AcceptOptions(f"ssh://root@{lab_host.address}", key, known, relay=False))


def test_cli_maps_errors_to_usage_error(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["accept", "ssh://root@127.0.0.1:1", "--no-relay"])
    with pytest.raises(HarnessError, match="unreachable"):
        args.func(args)
    bad = tmp_path / "b.json"
    bad.write_text("{}")
    args = parser.parse_args(["accept", "ssh://root@127.0.0.1:1", "--baseline", str(bad)])
    with pytest.raises(HarnessError, match="not a relay-harness baseline"):
        args.func(args)
