"""End to end against the REAL OpenSMTPD on lab test hosts, relaying to the fake upstream.

Each behaviour has its broken twin beside it: the twin changes one thing in the config or the
provider and the same observation must then come out differently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.pki import TestPki
from harness.relay import DELIVERY, ConfigRejected, relay_run
from harness.targets.base import Bundle, BundleFile, OutgoingMail, TargetError
from harness.targets.lab import LabHost
from harness.upstream import Profile, parse_profile

pytestmark = pytest.mark.lab

PASSWORD = "correct-horse-7"
SECRETS = BundleFile(
    "/etc/mail/secrets", f"label alice@example.org:{PASSWORD}\n".encode(), 0o640, "root", "_smtpd", True
)
ALIASES = BundleFile("/etc/mail/aliases", b"root: alice\n")
ARTICLE = Path(__file__).parent / "data" / "article-smtpd.conf"


def config(relay: str, mail_from: str | None = '"@example.org"', auth: str = " auth <secrets>") -> str:
    """The config from the project brief, with the relay line varied by the tests."""
    tail = f" mail-from {mail_from}" if mail_from else ""
    return (
        "table aliases file:/etc/mail/aliases\n"
        "table secrets file:/etc/mail/secrets\n"
        "listen on socket\n"
        "listen on lo0\n"
        'action "local_mail" mbox alias <aliases>\n'
        f'action "outbound" relay host {relay}{auth}{tail}\n'
        'match from local for local action "local_mail"\n'
        'match from local for any action "outbound"\n'
    )


def provider(
    port: int = 587, tls: str = "starttls-required", auth: str = "required", password: str = PASSWORD
) -> Profile:
    return parse_profile(
        f'host = "smtp.example.net"\nport = {port}\ntls = "{tls}"\nauth = "{auth}"\n'
        'sender_domains = ["example.org"]\n'
        f'[[credentials]]\nuser = "alice@example.org"\npassword = "{password}"\n'
    )


def bundle(conf: str) -> Bundle:
    return Bundle(conf, (ALIASES, SECRETS), users=("alice",))


OUT = OutgoingMail("root", ("bob@example.com",))


def test_smtp_tls_uses_starttls_auth_plain_and_rewrites_sender(lab_host: LabHost, relay_pki: TestPki) -> None:
    assert lab_host.target is not None
    conf = config("smtp+tls://label@smtp.example.net:587")
    with relay_run(lab_host.target, bundle(conf), provider(), relay_pki) as run:
        run.send(OUT)
        session, message = run.wait_relayed(10)
    assert session.tls == "starttls"
    assert session.tls_version and session.tls_version.startswith("TLSv1.")
    assert [(a.mechanism, a.user, a.success, a.over_tls) for a in session.auth] == [
        ("PLAIN", "alice@example.org", True, True)
    ]
    assert message.mail_from == "root@example.org"
    assert message.rcpt_to == ("bob@example.com",)
    assert PASSWORD.encode() not in message.body


def test_broken_twin_without_mail_from_is_rejected_by_provider(lab_host: LabHost, relay_pki: TestPki) -> None:
    assert lab_host.target is not None
    conf = config("smtp+tls://label@smtp.example.net:587", mail_from=None)
    with relay_run(lab_host.target, bundle(conf), provider(), relay_pki) as run:
        mark = run.send(OUT)
        line = run.wait_log(DELIVERY, 10, since=mark)
    m = re.search(DELIVERY, line)
    assert m and m.group("result") == "PermFail"
    assert m.group("stat") == (
        "550 5.1.8 <root@host1.relay-harness.test>: Sender address rejected: Domain not found".replace(
            "host1", lab_host.hostname.split(".")[0]
        )
    )
    assert not any(msg.accepted for _, msg in run.upstream.recorder.messages())


def test_smtps_uses_implicit_tls_on_465(lab_host: LabHost, relay_pki: TestPki) -> None:
    assert lab_host.target is not None
    conf = config("smtps://label@smtp.example.net")
    with relay_run(lab_host.target, bundle(conf), provider(465, "implicit"), relay_pki) as run:
        run.send(OUT)
        session, _ = run.wait_relayed(10)
    assert session.tls == "implicit"
    assert session.listener.endswith(":465")
    assert session.authenticated_user == "alice@example.org"


def test_broken_twin_smtps_against_a_starttls_provider_never_delivers(
    lab_host: LabHost, relay_pki: TestPki
) -> None:
    assert lab_host.target is not None
    conf = config("smtps://label@smtp.example.net:587")
    with relay_run(lab_host.target, bundle(conf), provider(587, "starttls-required"), relay_pki) as run:
        mark = run.send(OUT)
        line = run.wait_log(r"mta error reason=|TempFail|Connection", 15, since=mark)
    assert not any(m.accepted for _, m in run.upstream.recorder.messages())
    assert line


def test_smtp_notls_relays_in_plain_text(lab_host: LabHost, relay_pki: TestPki) -> None:
    assert lab_host.target is not None
    conf = config("smtp+notls://smtp.example.net:587", auth="")
    with relay_run(lab_host.target, bundle(conf), provider(587, "none", "none"), relay_pki) as run:
        run.send(OUT)
        session, message = run.wait_relayed(10)
    assert session.tls == "none"
    assert session.auth == ()
    assert message.mail_from == "root@example.org"


def test_broken_twin_smtp_notls_against_a_tls_requiring_provider(
    lab_host: LabHost, relay_pki: TestPki
) -> None:
    assert lab_host.target is not None
    conf = config("smtp+notls://smtp.example.net:587", auth="")
    with relay_run(lab_host.target, bundle(conf), provider(587, "starttls-required"), relay_pki) as run:
        mark = run.send(OUT)
        line = run.wait_log(r"530 5\.7\.0 Must issue a STARTTLS command first", 10, since=mark)
    assert "530 5.7.0" in line
    assert not any(m.accepted for _, m in run.upstream.recorder.messages())


def test_wrong_password_is_reported_from_the_log_and_mail_stays_queued(
    lab_host: LabHost, relay_pki: TestPki
) -> None:
    assert lab_host.target is not None
    conf = config("smtp+tls://label@smtp.example.net:587")
    with relay_run(lab_host.target, bundle(conf), provider(password="another-password"), relay_pki) as run:
        mark = run.send(OUT)
        line = run.wait_log(r"AUTH rejected", 10, since=mark)
        queue = run.target.queue()
    assert "535 5.7.8 Authentication credentials invalid" in line
    assert "bob@example.com" in queue
    records = run.upstream.recorder.sessions
    assert [a.success for s in records for a in s.auth] and not any(
        a.success for s in records for a in s.auth
    )
    # The password never shows, in any encoding smtpd prints it in.
    assert all(PASSWORD not in line and "Y29ycmVjdC1ob3JzZS03" not in line for line in run.log.lines)


def test_article_config_verbatim_is_refused_with_no_such_dispatcher(
    lab_host: LabHost, relay_pki: TestPki
) -> None:
    assert lab_host.target is not None
    text = ARTICLE.read_text()
    with (
        pytest.raises(ConfigRejected) as refused,
        relay_run(lab_host.target, bundle(text), provider(), relay_pki),
    ):
        pass
    check = refused.value.check
    assert check.message == "no such dispatcher: outbound"
    lines = text.splitlines()
    assert check.line is not None and 'action "outbound"' in lines[check.line - 1]


def test_article_config_corrected_is_accepted(lab_host: LabHost, relay_pki: TestPki) -> None:
    assert lab_host.target is not None
    text = ARTICLE.read_text().replace('action "unbound"', 'action "outbound"')
    lab_host.target.install(bundle(text))
    check = lab_host.target.check_config()
    assert check.ok, check.output


def test_alias_sends_root_mail_to_alice(lab_host: LabHost, relay_pki: TestPki) -> None:
    assert lab_host.target is not None
    conf = config("smtp+tls://label@smtp.example.net:587")
    with relay_run(lab_host.target, bundle(conf), provider(), relay_pki) as run:
        mark = run.send(OutgoingMail("root", ("root",), subject="alias probe"))
        line = run.wait_log(DELIVERY, 10, since=mark)
        mbox = run.target.mailbox("alice")
    m = re.search(DELIVERY, line)
    assert m and (m.group("agent"), m.group("user"), m.group("result")) == ("mda", "alice", "Ok")
    assert b"Subject: alias probe" in mbox


def test_broken_twin_without_the_alias_nothing_reaches_alice(lab_host: LabHost, relay_pki: TestPki) -> None:
    assert lab_host.target is not None
    conf = config("smtp+tls://label@smtp.example.net:587")
    no_alias = Bundle(conf, (BundleFile("/etc/mail/aliases", b"postmaster: root\n"), SECRETS), ("alice",))
    with relay_run(lab_host.target, no_alias, provider(), relay_pki) as run:
        mark = run.send(OutgoingMail("root", ("root",), subject="alias probe"))
        line = run.wait_log(DELIVERY, 10, since=mark)
        mbox = run.target.mailbox("alice")
    m = re.search(DELIVERY, line)
    assert m and (m.group("agent"), m.group("user"), m.group("result")) == ("mda", "root", "Ok")
    assert mbox == b""


def test_testinfra_host_sees_the_test_host_not_this_machine(lab_host: LabHost, relay_pki: TestPki) -> None:
    """The testinfra host reaches the test host over SSH (its own /etc, its own host name)."""
    assert lab_host.target is not None
    lab_host.target.install(bundle(config("smtp+tls://label@smtp.example.net:587")))
    host = lab_host.testinfra_host()
    assert host.check_output("hostname") == lab_host.hostname
    assert host.package("opensmtpd").is_installed
    secrets = host.file("/etc/mail/secrets")
    assert (secrets.mode, secrets.user, secrets.group) == (0o640, "root", "opensmtpd")
    assert host.file("/etc/smtpd.conf").contains("label@smtp.example.net:587")
    assert host.user("alice").exists
    assert not Path("/etc/mail/secrets").exists() or Path("/etc/mail/secrets").read_bytes() != SECRETS.content


def test_smtpctl_waits_for_a_starting_smtpds_control_socket(lab_host: LabHost) -> None:
    """smtpd's control process listens in a process of its own and says nothing when it does:
    under load the READY lines came first and `smtpctl pause mta` said `smtpd doesn't seem to be
    running` of an smtpd that was starting. The socket away for a moment is that moment."""
    target = lab_host.target
    assert target is not None
    target.install(bundle(config("smtp+tls://label@smtp.example.net:587")))
    target.start()
    target.check("mv /run/smtpd.sock /run/smtpd.sock.away")
    target.check("(sleep 0.3; mv /run/smtpd.sock.away /run/smtpd.sock) </dev/null >/dev/null 2>&1 &")
    assert "MTA running" in target.control("show", "status")
    # The twin: smtpd gone for good, the answer comes at once (its end is the event), not after
    # the wait for a starting one.
    target.check("mv /run/smtpd.sock /run/smtpd.sock.away")
    target.check("pkill -KILL -x smtpd; true")
    with pytest.raises(TargetError, match="smtpd doesn't seem to be running"):
        target.control("show", "status")
