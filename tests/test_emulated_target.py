"""The emulated target end to end: real TCP and TLS to the fake upstream, no smtpd, no root.

The scenario library (pinned to the real smtpd on lab hosts) must pass on it as it is; the
behaviours below are the ones the library does not pin, each checked in smtpd's own words (as
the real smtpd printed them on a lab host: see bench/differential.py for the run on both).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.pki import TestPki
from harness.relay import DELIVERY, relay_run
from harness.scenarios import Case, Scenario, judge_twin, load_scenario, run_case
from harness.targets.base import Bundle, BundleFile, OutgoingMail, TargetError
from harness.targets.emulated import Declined, EmulatedTarget
from harness.upstream import Profile, parse_profile

LIBRARY = Path(__file__).parent.parent / "scenarios"
PASSWORD = "correct-horse-7"
SECRETS = BundleFile(
    "/etc/mail/secrets", f"label alice@example.org:{PASSWORD}\n".encode(), 0o640, "root", "_smtpd", True
)
ALIASES = BundleFile("/etc/mail/aliases", b"root: alice\nwebmaster: carol@example.com\n")
HEAD = "table aliases file:/etc/mail/aliases\ntable secrets file:/etc/mail/secrets\nlisten on socket\n"
LOCAL = 'action "local_mail" mbox alias <aliases>\n'
RELAY = (
    'action "outbound" relay host smtp+tls://label@smtp.example.net:587 auth <secrets> '
    'mail-from "@example.org"\n'
)
RULES = 'match from local for local action "local_mail"\nmatch from local for any action "outbound"\n'
CONFIG = HEAD + LOCAL + RELAY + RULES


def provider(
    extra: str = "", tls: str = "starttls-required", auth: str = "required", port: int = 587
) -> Profile:
    return parse_profile(
        f'host = "smtp.example.net"\nport = {port}\ntls = "{tls}"\nauth = "{auth}"\n'
        'sender_domains = ["example.org"]\n'
        f'[[credentials]]\nuser = "alice@example.org"\npassword = "{PASSWORD}"\n{extra}'
    )


def bundle(config: str = CONFIG, *files: BundleFile) -> Bundle:
    return Bundle(config, files or (ALIASES, SECRETS), users=("alice",))


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki()


@pytest.fixture
def target() -> Iterator[EmulatedTarget]:
    with EmulatedTarget() as t:
        yield t


def _library() -> list[tuple[Scenario, Case]]:
    out = []
    for path in sorted(LIBRARY.rglob("*.toml")):
        scenario = load_scenario(path)
        out.extend((scenario, case) for case in scenario.cases)
    return out


@pytest.mark.parametrize(("scenario", "case"), _library(), ids=lambda x: getattr(x, "name", ""))
def test_the_scenario_library_passes_on_the_emulated_target(
    scenario: Scenario, case: Case, pki: TestPki
) -> None:
    """As the plugin runs it: the case's own expectations met, and a twin failing its positive's."""
    with EmulatedTarget() as target:
        try:
            outcome = run_case(target, scenario, case, pki)
        except Declined as exc:
            if "upgrade" not in case.markers:  # only the 6.8 -> 7.6 cases go beyond the model
                raise
            pytest.skip(f"the emulated target declines this release-difference case: {exc}")
    assert outcome.ok, outcome.explain()
    if case.twin_of is not None:
        verdict = judge_twin(scenario.case(case.twin_of), outcome.observation)
        assert verdict.proves, verdict.explain()


def test_relays_over_starttls_with_auth_plain_and_the_rewritten_sender(
    target: EmulatedTarget, pki: TestPki
) -> None:
    with relay_run(target, bundle(), provider(), pki) as run:
        run.send(OutgoingMail("root", ("bob@example.com",), subject="hello"))
        session, message = run.wait_relayed(10)
        line = run.wait_log(r'mta delivery .* result="Ok"', 10)
    assert (session.tls, session.tls_version, session.ehlo) == ("starttls", "TLSv1.3", target.host.hostname)
    assert [(a.mechanism, a.user, a.success, a.over_tls) for a in session.auth] == [
        ("PLAIN", "alice@example.org", True, True)
    ]
    assert (message.mail_from, message.rcpt_to) == ("root@example.org", ("bob@example.com",))
    assert re.search(
        rb"^Received: from localhost \(host\d+\.relay-harness\.test \[local\]\)\r$", message.body, re.M
    )
    assert b"\r\nSubject: hello\r\n" in message.body and b"\r\nMessage-ID: <" in message.body
    assert 'source="198.51.100.2" relay="198.51.100.1 (smtp.example.net)"' in line
    assert all(PASSWORD not in x for x in run.log.lines)


def test_the_helo_option_names_the_client(target: EmulatedTarget, pki: TestPki) -> None:
    config = CONFIG.replace("mail-from", 'helo "mail.example.org" mail-from')
    with relay_run(target, bundle(config), provider(), pki) as run:
        run.send(OutgoingMail("root", ("bob@example.com",)))
        session, _ = run.wait_relayed(10)
    assert session.ehlo == "mail.example.org"


def test_unmatched_recipient_is_refused_at_submission_as_sendmail_reports_it(
    target: EmulatedTarget, pki: TestPki
) -> None:
    config = HEAD + LOCAL + 'match from local for local action "local_mail"\n'
    with relay_run(target, bundle(config), provider(), pki) as run:
        with pytest.raises(TargetError) as refused:
            run.send(OutgoingMail("root", ("bob@example.com",)))
        line = run.wait_log("failed-command", 5)
    reply = "550 Invalid recipient: <bob@example.com>"
    assert str(refused.value) == f"{target.name}: sendmail exited 70: sendmail: command failed: {reply}"
    assert line.endswith(f' smtp failed-command command="RCPT TO:<bob@example.com> " result="{reply}"')


def test_a_refused_smtp_submission_reads_as_smtplib_reports_it(target: EmulatedTarget, pki: TestPki) -> None:
    config = HEAD + "listen on lo0\n" + LOCAL + RELAY + 'match from socket for any action "outbound"\n'
    with relay_run(target, bundle(config), provider(), pki) as run:
        with pytest.raises(TargetError) as refused:
            run.send(OutgoingMail("root", ("bob@example.com",), via="smtp"))
        run.send(OutgoingMail("root", ("bob@example.com",)))  # sendmail is `from socket`
        run.wait_relayed(10)
    assert str(refused.value) == (
        f"{target.name}: smtp exited 1: SMTP to 127.0.0.1:25: "
        "{'bob@example.com': (550, b'Invalid recipient: <bob@example.com>')}"
    )


def test_match_tls_is_a_temporary_failure_in_smtpd_6_8(target: EmulatedTarget, pki: TestPki) -> None:
    config = HEAD + LOCAL + 'match from local tls for local action "local_mail"\n'
    with relay_run(target, bundle(config), provider(), pki) as run, pytest.raises(TargetError) as refused:
        run.send(OutgoingMail("root", ("root",)))
    assert str(refused.value).endswith(f"451 Temporary failure: <root@{target.host.hostname}>")


def test_virtual_table_with_a_catch_all(target: EmulatedTarget, pki: TestPki) -> None:
    virt = BundleFile(
        "/etc/mail/virt",
        b"alice@example.org alice\nteam@example.org alice, carol@example.com\n@example.org bob\n",
    )
    config = (
        HEAD
        + "table virt file:/etc/mail/virt\n"
        + 'action "v" mbox virtual <virt>\n'
        + LOCAL
        + RELAY
        + 'match from local for domain "example.org" action "v"\n'
        + RULES
    )
    with relay_run(
        target, Bundle(config, (ALIASES, SECRETS, virt), ("alice", "bob")), provider(), pki
    ) as run:
        run.send(OutgoingMail("root", ("zed@example.org",)))
        mark = run.send(OutgoingMail("root", ("team@example.org",)))
        _, message = run.wait_relayed(10)
        run.wait_log(r"mda delivery .* to=<team@example.org> .* user=alice", 10, mark)
        zed = run.wait_log(r"mda delivery .* to=<zed@example.org>", 10)
    assert "user=bob " in zed
    assert message.rcpt_to == ("carol@example.com",)


def test_no_virtual_entry_is_the_expansion_error(target: EmulatedTarget, pki: TestPki) -> None:
    virt = BundleFile("/etc/mail/virt", b"alice@example.org alice\n")
    config = HEAD + "table virt file:/etc/mail/virt\n" + 'action "v" mbox virtual <virt>\n'
    config += 'match from local for domain "example.org" action "v"\n'
    with (
        relay_run(target, Bundle(config, (ALIASES, SECRETS, virt), ("alice",)), provider(), pki) as run,
        pytest.raises(TargetError) as refused,
    ):
        run.send(OutgoingMail("root", ("zed@example.org",)))
    assert str(refused.value).endswith("524 5.2.4 Mailing list expansion problem: <zed@example.org>")


def test_queue_listing_while_relaying_is_paused(target: EmulatedTarget, pki: TestPki) -> None:
    with relay_run(target, bundle(), provider(), pki) as run:
        assert target.control("pause", "mta") == "command succeeded"
        run.send(OutgoingMail("root", ("bob@example.com",)))
        queue = target.queue()
        assert target.control("resume", "mta") == "command succeeded"
        run.wait_relayed(10)
        run.wait_log(r'mta delivery .* result="Ok"', 10)
        after = target.queue()
    host = target.host.hostname
    assert re.fullmatch(
        rf"[0-9a-f]{{16}}\|local\|mta\|auth\|root@{host}\|bob@example.com\|bob@example.com\|(\d+)\|\1\|0\|0\|pending\|0\|",
        queue,
    ), queue
    assert after == ""
    assert "info: mta paused" in run.log.lines and "info: mta resumed" in run.log.lines


def test_a_temporary_failure_stays_queued_with_smtpds_retry_delay(
    target: EmulatedTarget, pki: TestPki
) -> None:
    with relay_run(target, bundle(), provider('[faults]\ntempfail = "rcpt"\n'), pki) as run:
        run.send(OutgoingMail("root", ("bob@example.com",)))
        line = run.wait_log(DELIVERY, 10)
        queue = target.queue()
    assert line.endswith('result="TempFail" stat="451 4.3.0 Try again later"')
    fields = queue.split("|")
    assert fields[2] == "mta" and fields[10:] == ["1", "pending", fields[12], "451 4.3.0 Try again later"]
    assert 395 <= int(fields[12]) <= 400  # scheduler_ramqueue.c: creation + 400 s * retry²


def test_permanent_failure_bounces_to_the_local_sender(target: EmulatedTarget, pki: TestPki) -> None:
    config = CONFIG.replace(' mail-from "@example.org"', "")
    with relay_run(target, bundle(config), provider(), pki) as run:
        run.send(OutgoingMail("root", ("bob@example.com",)))
        run.wait_log(r"mda delivery evpid=\S+ from=<> .* user=alice ", 10)
        mbox = target.mailbox("alice").decode()
    host = target.host.hostname
    assert mbox.startswith("From MAILER-DAEMON ")
    assert "\nSubject: Delivery status notification: failed\n" in mbox
    assert f"\nbob@example.com: 550 5.1.8 <root@{host}>: Sender address rejected: Domain not found\n" in mbox
    assert "\nFinal-Recipient: rfc822; bob@example.com\nAction: failed\nStatus: 5.0.0\n" in mbox
    assert "\nThis message was sent by relay-harness.\n" in mbox  # the original, after its headers


def test_mbox_framing_is_mail_locals(target: EmulatedTarget, pki: TestPki) -> None:
    with relay_run(target, bundle(), provider(), pki) as run:
        run.send(OutgoingMail("root", ("root",), body="From me\n>From you\n.\n"))
        run.wait_log(r"mda delivery .* user=alice ", 10)
        mbox = target.mailbox("alice").decode()
    host = target.host.hostname
    assert re.match(rf"From root@{host} \w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d \d{{4}}\n", mbox)
    assert f"\nReturn-Path: <root@{host}>\nDelivered-To: root@{host}\nReceived: " in mbox
    assert "\n>From me\n>From you\n.\n" in mbox and mbox.endswith("\n\n")


def test_a_port_nobody_serves_is_refused_and_the_route_disabled(target: EmulatedTarget, pki: TestPki) -> None:
    config = CONFIG.replace(":587", ":2525")
    with relay_run(target, bundle(config), provider(), pki) as run:
        run.send(OutgoingMail("root", ("bob@example.com",)))
        error = run.wait_log("mta error", 10)
        disabled = run.wait_log("Disabling route", 10)
    assert error.endswith(" mta error reason=IO Error: Connection refused")
    assert disabled == "smtp-out: Disabling route [] <-> 198.51.100.1 (smtp.example.net) for 15s"


def test_an_alias_to_a_program_is_declined_when_mail_reaches_it(target: EmulatedTarget, pki: TestPki) -> None:
    aliases = BundleFile("/etc/mail/aliases", b'root: alice\nlist: "|/usr/bin/mlmmj-receive"\n')
    with relay_run(target, bundle(CONFIG, aliases, SECRETS), provider(), pki) as run:
        run.send(OutgoingMail("root", ("root",)))
        with pytest.raises(Declined) as declined:
            run.send(OutgoingMail("root", ("list",)))
    assert "an alias to a filter" in str(declined.value) and str(declined.value).endswith(
        "at line 4: use --target lab"
    )


def test_what_listen_lines_name_is_made_on_the_host_as_the_lab_makes_it(
    target: EmulatedTarget, pki: TestPki
) -> None:
    listens = "listen on 192.0.2.1\nlisten on wg0\nlisten on mail.example.org\n"
    config = HEAD + listens + LOCAL + RELAY + RULES
    with relay_run(target, bundle(config), provider(), pki) as run:
        run.send(OutgoingMail("root", ("bob@example.com",), via="smtp", smtp_address="192.0.2.1"))
        run.wait_relayed(10)
    assert tuple(n for n in target.notes if n.startswith("listen on")) == (
        "listen on wg0: the test host has an interface wg0 (emulated) with 203.0.113.1 and 2001:db8:113::2 "
        "(test addresses)",
        "listen on 192.0.2.1: assigned to the test host's eth0",
        "listen on mail.example.org: the name resolves to 203.0.113.3 (a test address on eth0) in /etc/hosts",
    )


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("all", "the test host cannot provide interface all: Linux reserves the names all and default."),
        (
            "a-very-long-ifname",
            "the test host cannot provide interface a-very-long-ifname: a Linux interface",
        ),
        (
            "198.51.100.77",
            "the test host cannot provide address 198.51.100.77: it is in the lab's own network",
        ),
    ],
)
def test_what_a_test_host_cannot_have_is_said_as_the_lab_says_it(
    target: EmulatedTarget, listen: str, message: str
) -> None:
    with pytest.raises(TargetError) as failed:
        target.install(bundle(HEAD + f"listen on {listen}\n" + LOCAL + RELAY + RULES))
    assert str(failed.value).startswith(message)


def test_makemap_refuses_a_duplicate_key_as_makemap_does(target: EmulatedTarget) -> None:
    db = BundleFile("/etc/mail/aliases", b"root: alice\nroot: bob\n", db="/etc/mail/aliases.db", aliases=True)
    with pytest.raises(TargetError) as failed:
        target.install(Bundle(CONFIG, (db,)))
    assert str(failed.value).endswith(
        "'makemap -t aliases -o /etc/mail/aliases.db /etc/mail/aliases' exited 1: "
        "makemap: /etc/mail/aliases:2: duplicate entry for root"
    )


def test_the_emulated_path_needs_neither_paramiko_nor_smtpd() -> None:
    code = (
        "import sys\n"
        "from harness.pki import TestPki\n"
        "from harness.scenarios import load_scenario, run_case\n"
        "from harness.targets.emulated import EmulatedTarget\n"
        f"s = load_scenario(__import__('pathlib').Path({str(LIBRARY / 'tls' / 'smtp_tls.toml')!r}))\n"
        "with EmulatedTarget() as t:\n"
        "    assert run_case(t, s, s.cases[0], TestPki()).ok\n"
        "assert 'paramiko' not in sys.modules, 'paramiko was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/bin"},
    )
    assert proc.returncode == 0, proc.stderr
