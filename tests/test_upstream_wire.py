"""The fake upstream on the wire: real smtplib clients, real TLS handshakes, the records they leave.

Every server listens on 127.0.0.1 port 0. Tests wait on the recorder (or on a reply), never sleep.
"""

from __future__ import annotations

import base64
import json
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable

import pytest
from upstream_helpers import (
    MESSAGE,
    PASSWORD,
    RCPT,
    SENDER,
    TIMEOUT,
    USER,
    LmtpClient,
    SslClient,
    client_context,
    closed,
    connect,
    features,
    profile,
    serve,
)

from harness.pki import TestPki
from harness.upstream import SessionRecord, UpstreamServer
from harness.upstream.server import TEMPFAIL, FaultBudget

# aiosmtpd warns whenever AUTH is offered without STARTTLS, which is deliberate for implicit TLS and
# tls = "none"; server.py filters it at import, but pytest resets warning filters after collection.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

STARTTLS_FIRST = (530, b"5.7.0 Must issue a STARTTLS command first")
AUTH_REQUIRED = (530, b"5.7.0 Authentication required")
AUTH_INVALID = (535, b"5.7.8 Authentication credentials invalid")


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki()


def _send(smtp: smtplib.SMTP) -> dict[str, tuple[int, bytes]]:
    return smtp.sendmail(SENDER, [RCPT], MESSAGE)


def _starttls(smtp: smtplib.SMTP, pki: TestPki) -> None:
    smtp.ehlo()
    smtp.starttls(context=client_context(pki))
    smtp.ehlo()


# --- TLS modes -------------------------------------------------------------------------------


def test_starttls_required_refuses_mail_and_auth_before_tls(pki: TestPki) -> None:
    with serve(pki, profile(tls="starttls-required")) as server:
        with connect(server) as smtp:
            smtp.ehlo()
            assert "starttls" in features(smtp)
            assert "auth" not in features(smtp)
            assert smtp.mail(SENDER) == STARTTLS_FIRST
            assert smtp.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0x\0y").decode()) == STARTTLS_FIRST
        record = closed(server)
    assert record.tls == "none" and record.tls_version is None
    assert record.auth == () and record.messages == ()
    assert record.replies.count("530 5.7.0 Must issue a STARTTLS command first") == 2


def test_starttls_required_delivers_after_tls_and_auth(pki: TestPki) -> None:
    with serve(pki, profile(tls="starttls-required")) as server:
        with connect(server) as smtp:
            _starttls(smtp, pki)
            assert "starttls" not in features(smtp)
            assert set(smtp.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
            smtp.login(USER, PASSWORD)
            assert _send(smtp) == {}
        record = closed(server)
    assert record.tls == "starttls"
    assert record.tls_version in {"TLSv1.2", "TLSv1.3"} and record.tls_cipher
    assert record.tls_error is None
    assert record.ehlo == "client.example.org"
    assert [(a.mechanism, a.user, a.success, a.over_tls) for a in record.auth] == [
        ("PLAIN", USER, True, True)
    ]
    assert record.authenticated_user == USER
    (msg,) = record.messages
    assert (msg.mail_from, msg.rcpt_to, msg.rejected_rcpt_to) == (SENDER, (RCPT,), ())
    assert msg.accepted and msg.reply.startswith("250 2.0.0 Ok: queued as RH")
    assert msg.body.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")
    assert msg.size == len(msg.body)
    assert record.replies[0] == "220 smtp.example.net ESMTP relay-harness"
    assert record.replies[-1] == "221 Bye"


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "starttls"])
def test_starttls_optional_accepts_mail_with_or_without_tls(pki: TestPki, use_tls: bool) -> None:
    with serve(pki, profile(tls="starttls-optional", auth="optional")) as server:
        with connect(server) as smtp:
            if use_tls:
                _starttls(smtp, pki)
                assert "auth" in features(smtp)
            else:
                smtp.ehlo()
                assert "starttls" in features(smtp)
                assert "auth" not in features(smtp)  # AUTH only after TLS while TLS is on offer
            assert _send(smtp) == {}
        record = closed(server)
    assert record.tls == ("starttls" if use_tls else "none")
    assert (record.tls_version is not None) == use_tls
    assert record.auth == ()
    assert [m.accepted for m in record.messages] == [True]


def test_starttls_optional_refuses_auth_before_tls(pki: TestPki) -> None:
    with serve(pki, profile(tls="starttls-optional", auth="optional")) as server:
        with connect(server) as smtp:
            smtp.ehlo()
            code, _ = smtp.docmd(
                "AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
            )
            assert code == 538
        record = closed(server)
    assert record.auth == ()


def test_implicit_tls_delivers(pki: TestPki) -> None:
    prof = profile(tls="implicit")
    with serve(pki, prof) as server:
        ctx = client_context(pki)
        with SslClient(
            prof.host, server.port, local_hostname="c.example.org", context=ctx, timeout=TIMEOUT
        ) as smtp:
            smtp.ehlo()
            assert "starttls" not in features(smtp)
            assert "auth" in features(smtp)
            smtp.login(USER, PASSWORD)
            assert _send(smtp) == {}
        record = closed(server)
    assert record.tls == "implicit"
    assert record.tls_version in {"TLSv1.2", "TLSv1.3"} and record.tls_cipher
    assert [(a.success, a.over_tls) for a in record.auth] == [(True, True)]
    assert [m.accepted for m in record.messages] == [True]


def test_implicit_tls_port_does_not_speak_plain_smtp(pki: TestPki) -> None:
    with serve(pki, profile(tls="implicit")) as server:
        with socket.create_connection(("127.0.0.1", server.port), TIMEOUT) as sock:
            sock.sendall(b"EHLO client.example.org\r\n")
            assert sock.recv(1024) == b""  # no banner: the server wanted a TLS handshake and hung up
        record = closed(server)
    assert record.tls == "none" and record.tls_version is None and record.tls_error
    assert record.replies == ()


def test_tls_none_offers_auth_in_clear_and_no_starttls(pki: TestPki) -> None:
    with serve(pki, profile(tls="none")) as server:
        with connect(server) as smtp:
            smtp.ehlo()
            assert "starttls" not in features(smtp)
            assert set(smtp.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
            assert smtp.docmd("STARTTLS")[0] == 454
            smtp.login(USER, PASSWORD)
            assert _send(smtp) == {}
        record = closed(server)
    assert record.tls == "none" and record.tls_version is None
    assert [(a.success, a.over_tls) for a in record.auth] == [(True, False)]
    assert [m.accepted for m in record.messages] == [True]


# --- AUTH --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "starttls-required"])
def test_mail_without_auth_is_refused_when_auth_required(pki: TestPki, tls: str) -> None:
    with serve(pki, profile(tls=tls, auth="required")) as server:
        with connect(server) as smtp:
            if tls == "none":
                smtp.ehlo()
            else:
                _starttls(smtp, pki)
            assert smtp.mail(SENDER) == AUTH_REQUIRED
            smtp.login(USER, PASSWORD)  # the twin: the same session, authenticated, may send
            assert smtp.mail(SENDER)[0] == 250
        record = closed(server)
    assert "530 5.7.0 Authentication required" in record.replies
    assert [a.success for a in record.auth] == [True]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize(
    ("user", "password", "ok"),
    [(USER, PASSWORD, True), (USER, "wrong-password", False), ("mallory@example.org", PASSWORD, False)],
    ids=["right", "wrong-password", "unknown-user"],
)
def test_auth_mechanisms_accept_only_the_right_credentials(
    pki: TestPki, mechanism: str, user: str, password: str, ok: bool
) -> None:
    with serve(pki, profile(tls="starttls-required")) as server:
        with connect(server) as smtp:
            _starttls(smtp, pki)
            smtp.user, smtp.password = user, password
            authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
            if ok:
                assert smtp.auth(mechanism, authobject)[0] == 235
            else:
                with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                    smtp.auth(mechanism, authobject)
                assert (err.value.smtp_code, err.value.smtp_error) == AUTH_INVALID
                assert smtp.mail(SENDER) == AUTH_REQUIRED
        record = closed(server)
    assert [(a.mechanism, a.user, a.success, a.over_tls) for a in record.auth] == [
        (mechanism, user, ok, True)
    ]
    assert record.authenticated_user == (user if ok else None)


@pytest.mark.parametrize("auth", ["none", "optional"])
def test_auth_none_is_not_offered_and_optional_is(pki: TestPki, auth: str) -> None:
    with serve(pki, profile(tls="starttls-required", auth=auth)) as server:
        with connect(server) as smtp:
            _starttls(smtp, pki)
            assert ("auth" in features(smtp)) == (auth == "optional")
            assert _send(smtp) == {}  # neither demands AUTH
        record = closed(server)
    assert record.auth == () and [m.accepted for m in record.messages] == [True]


# --- sender domains ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "allowed"), [("carol@Example.ORG", True), ("carol@elsewhere.test", False)]
)
def test_sender_domains(pki: TestPki, sender: str, allowed: bool) -> None:
    prof = profile(tls="none", auth="none", sender_domains=("example.org",))
    with serve(pki, prof) as server:
        with connect(server) as smtp:
            smtp.ehlo()
            assert smtp.mail(sender)[0] == 250
            code, text = smtp.rcpt(RCPT)
            if allowed:
                assert code == 250
                assert smtp.data(MESSAGE)[0] == 250
            else:
                assert (code, text) == (
                    550,
                    f"5.1.8 <{sender}>: Sender address rejected: Domain not found".encode(),
                )
        record = closed(server)
    (msg,) = record.messages
    assert msg.mail_from == sender and msg.accepted is allowed
    assert (msg.rcpt_to, msg.rejected_rcpt_to) == (((RCPT,), ()) if allowed else ((), (RCPT,)))
    if not allowed:
        assert msg.reply == f"550 5.1.8 <{sender}>: Sender address rejected: Domain not found"


# --- LMTP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipients", [1, 3])
def test_lmtp_answers_once_per_recipient(pki: TestPki, recipients: int) -> None:
    prof = profile(protocol="lmtp", tls="none", auth="none")
    rcpts = [f"user{i}@example.com" for i in range(recipients)]
    with serve(pki, prof) as server:
        with LmtpClient(prof.host, server.port, local_hostname="client.example.org", timeout=TIMEOUT) as lmtp:
            assert lmtp.ehlo()[0] == 250  # smtplib.LMTP sends LHLO
            assert lmtp.mail(SENDER)[0] == 250
            for rcpt in rcpts:
                assert lmtp.rcpt(rcpt)[0] == 250
            replies = [lmtp.data(MESSAGE)] + [lmtp.getreply() for _ in rcpts[1:]]
            assert [code for code, _ in replies] == [250] * recipients
            assert lmtp.noop() == (250, b"OK")  # no reply left over: the dialogue is in step
        record = closed(server)
    assert record.protocol == "lmtp"
    assert record.ehlo == "client.example.org"
    (msg,) = record.messages
    assert msg.rcpt_to == tuple(rcpts) and msg.accepted
    assert sum(r.startswith("250 2.0.0 Ok: queued") for r in record.replies) == recipients


def test_smtp_does_not_speak_lhlo(pki: TestPki) -> None:
    prof = profile(protocol="smtp", tls="none", auth="none")
    with serve(pki, prof) as server:
        with LmtpClient(prof.host, server.port, timeout=TIMEOUT) as lmtp:
            assert lmtp.ehlo()[0] == 500
        assert closed(server).protocol == "smtp"


# --- faults ------------------------------------------------------------------------------------

STAGES = ["connect", "ehlo", "auth", "mail", "rcpt", "data"]


def _dialogue(server: UpstreamServer) -> dict[str, tuple[int, bytes]]:
    """Each stage's reply up to the first failure, in a clear-text session with AUTH."""
    replies: dict[str, tuple[int, bytes]] = {}
    try:
        smtp = connect(server)
    except smtplib.SMTPConnectError as exc:
        text = exc.smtp_error
        return {"connect": (exc.smtp_code, text if isinstance(text, bytes) else text.encode())}
    with smtp:
        replies["connect"] = (220, b"")
        steps: list[tuple[str, Callable[[], tuple[int, bytes]]]] = [
            ("ehlo", smtp.ehlo),
            (
                "auth",
                lambda: smtp.docmd(
                    "AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
                ),
            ),
            ("mail", lambda: smtp.mail(SENDER)),
            ("rcpt", lambda: smtp.rcpt(RCPT)),
            ("data", lambda: smtp.data(MESSAGE)),
        ]
        for stage, step in steps:
            replies[stage] = step()
            if replies[stage][0] >= 400:
                break
    return replies


@pytest.mark.parametrize("stage", STAGES)
def test_tempfail_at_each_stage(pki: TestPki, stage: str) -> None:
    with serve(pki, profile(tls="none", tempfail=stage)) as server:
        replies = _dialogue(server)
        record = closed(server)
    assert list(replies) == STAGES[: STAGES.index(stage) + 1]
    code, text = replies[stage]
    assert f"{code} {text.decode()}" == TEMPFAIL[stage]
    assert all(c < 400 for c, _ in list(replies.values())[:-1])
    assert TEMPFAIL[stage] in record.replies
    assert record.messages == () or not any(m.accepted for m in record.messages)
    if stage in ("mail", "rcpt", "data"):
        (msg,) = record.messages
        assert msg.reply == TEMPFAIL[stage]


def test_tempfail_twin_no_fault_passes_every_stage(pki: TestPki) -> None:
    with serve(pki, profile(tls="none")) as server:
        replies = _dialogue(server)
        record = closed(server)
    assert list(replies) == STAGES
    assert [c for c, _ in replies.values()] == [220, 250, 235, 250, 250, 250]
    assert [m.accepted for m in record.messages] == [True]


def test_mail_after_tempfailed_ehlo_is_refused(pki: TestPki) -> None:
    with serve(pki, profile(tls="none", auth="none", tempfail="ehlo")) as server:
        with connect(server) as smtp:
            assert smtp.ehlo()[0] == 451
            assert smtp.docmd("MAIL", f"FROM:<{SENDER}>")[0] == 503
        assert closed(server).messages == ()


@pytest.mark.parametrize("drop", [None, "after-ehlo"])
def test_drop_after_ehlo(pki: TestPki, drop: str | None) -> None:
    with serve(pki, profile(tls="none", auth="none", drop=drop)) as server:
        smtp = connect(server)
        assert smtp.ehlo()[0] == 250
        if drop:
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.mail(SENDER)
        else:
            assert smtp.mail(SENDER)[0] == 250
            smtp.quit()
        smtp.close()
        record = closed(server)
    assert record.ehlo == "client.example.org"
    assert len(record.messages) == (0 if drop else 1)
    assert (record.replies[-1] == "221 Bye") is (drop is None)


@pytest.mark.parametrize("drop", [None, "after-data"])
def test_drop_after_data(pki: TestPki, drop: str | None) -> None:
    with serve(pki, profile(tls="none", auth="none", drop=drop)) as server:
        smtp = connect(server)
        if drop:
            with pytest.raises(smtplib.SMTPServerDisconnected):
                _send(smtp)
        else:
            assert _send(smtp) == {}
            smtp.quit()
        smtp.close()
        record = closed(server)
    (msg,) = record.messages
    assert msg.body  # the data arrived either way
    assert msg.accepted is (drop is None)
    if drop:
        assert msg.reply == "(connection dropped by fault after DATA)"
        assert record.replies[-1] == "354 End data with <CR><LF>.<CR><LF>"  # nothing sent after DATA


# --- faults that heal ----------------------------------------------------------------------------


def _wait_sessions(server: UpstreamServer, count: int) -> tuple[SessionRecord, ...]:
    server.recorder.wait_for(lambda _: sum(s.closed for s in server.recorder.sessions) >= count, TIMEOUT)
    return tuple(sorted(server.recorder.sessions, key=lambda s: s.id))


def test_tempfail_times_fires_that_often_then_heals(pki: TestPki) -> None:
    with serve(pki, profile(tls="none", auth="none", tempfail="rcpt", times=2)) as server:
        with connect(server) as smtp:
            smtp.ehlo()
            codes = []
            for _ in range(4):  # one session, four transactions: two refused, then healed
                smtp.mail(SENDER)
                codes.append(smtp.rcpt(RCPT)[0])
                smtp.rset()
        (record,) = _wait_sessions(server, 1)
    assert codes == [451, 451, 250, 250]
    assert record.replies.count(TEMPFAIL["rcpt"]) == 2
    assert server.budget.fired["tempfail"] == 2


def test_tempfail_twin_without_a_bound_never_heals(pki: TestPki) -> None:
    with serve(pki, profile(tls="none", auth="none", tempfail="rcpt")) as server, connect(server) as smtp:
        smtp.ehlo()
        codes = []
        for _ in range(4):
            smtp.mail(SENDER)
            codes.append(smtp.rcpt(RCPT)[0])
            smtp.rset()
    assert codes == [451] * 4


def test_drop_times_counts_across_connections(pki: TestPki) -> None:
    with serve(pki, profile(tls="none", auth="none", drop="after-data", times=1)) as server:
        with connect(server) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
            _send(smtp)
        with connect(server) as smtp:
            assert _send(smtp) == {}
        first, second = _wait_sessions(server, 2)
    assert [m.accepted for m in first.messages] == [False]
    assert [m.accepted for m in second.messages] == [True]


def test_tempfail_connect_times_heals_on_the_next_connection(pki: TestPki) -> None:
    with serve(pki, profile(tls="none", auth="none", tempfail="connect", times=1)) as server:
        with pytest.raises(smtplib.SMTPConnectError) as err:
            connect(server)
        assert err.value.smtp_code == 421
        with connect(server) as smtp:
            assert _send(smtp) == {}
        first, second = _wait_sessions(server, 2)
    assert first.replies == (TEMPFAIL["connect"],)
    assert [m.accepted for m in second.messages] == [True]


def test_for_seconds_window_opens_at_the_first_connection() -> None:
    """A clock under the test's control: the window is measured, not slept through."""
    now = [100.0]
    budget = FaultBudget(profile(tempfail="rcpt", for_seconds=20).faults, clock=lambda: now[0])
    now[0] = 500.0  # long after the upstream started: the window has not opened yet
    budget.connected()
    assert budget.tempfail("rcpt") and budget.tempfail("rcpt")
    assert not budget.tempfail("mail")  # not the fault's stage: not counted
    now[0] = 519.9
    assert budget.tempfail("rcpt")
    budget.connected()  # later connections do not move the window
    now[0] = 520.0
    assert not budget.tempfail("rcpt")
    assert budget.fired == {"tempfail": 3, "drop": 0}


@pytest.mark.parametrize("refused", [False, True])
def test_starttls_refused(pki: TestPki, refused: bool) -> None:
    with serve(pki, profile(tls="starttls-required", starttls_refused=refused)) as server:
        with connect(server) as smtp:
            smtp.ehlo()
            assert "starttls" in features(smtp)  # advertised either way
            if refused:
                with pytest.raises(smtplib.SMTPResponseException) as err:
                    smtp.starttls(context=client_context(pki))
                assert (err.value.smtp_code, err.value.smtp_error) == (
                    454,
                    b"4.7.0 TLS not available due to temporary reason",
                )
                assert smtp.mail(SENDER) == STARTTLS_FIRST
            else:
                assert smtp.starttls(context=client_context(pki))[0] == 220
        record = closed(server)
    assert record.tls == ("none" if refused else "starttls")


@pytest.mark.parametrize("advertised", [True, False])
def test_auth_advertised(pki: TestPki, advertised: bool) -> None:
    with serve(pki, profile(tls="starttls-required", auth_advertised=advertised)) as server:
        with connect(server) as smtp:
            _starttls(smtp, pki)
            assert ("auth" in features(smtp)) is advertised
            if not advertised:
                with pytest.raises(smtplib.SMTPNotSupportedError):
                    smtp.login(USER, PASSWORD)
        closed(server)


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_banner_delay(pki: TestPki, delay: float) -> None:
    with serve(pki, profile(tls="none", auth="none", banner_delay=delay)) as server:
        start = time.monotonic()
        with connect(server) as smtp:  # returns once the banner is read
            waited = time.monotonic() - start
            assert smtp.noop()[0] == 250
        closed(server)
    if delay:
        assert delay <= waited < delay + 2
    else:
        assert waited < 0.4  # well under the delayed twin's 0.5 s, with room for a slow CI


# --- certificates ------------------------------------------------------------------------------

# OpenSSL's X509_V_ERR_* codes: the reason each kind must fail for
VERIFY_CODES = {"wrong-host": 62, "expired": 10, "untrusted": 20, "self-signed": 18}


def _tls_session(pki: TestPki, tls: str, server: UpstreamServer, ctx: ssl.SSLContext) -> None:
    host = server.profile.host
    if tls == "implicit":
        with SslClient(host, server.port, context=ctx, timeout=TIMEOUT) as smtp:
            smtp.noop()
    else:
        with connect(server) as smtp:
            smtp.ehlo()
            smtp.starttls(context=ctx)
            smtp.noop()


@pytest.mark.parametrize("tls", ["starttls-required", "implicit"])
@pytest.mark.parametrize("kind", sorted(VERIFY_CODES))
def test_bad_certificate_fails_verification(pki: TestPki, tls: str, kind: str) -> None:
    with serve(pki, profile(tls=tls, cert=kind)) as server:
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            _tls_session(pki, tls, server, client_context(pki))
        assert err.value.verify_code == VERIFY_CODES[kind], err.value.verify_message
        failed = closed(server)
        # the twin: the certificate is real, a client that does not verify completes the handshake
        _tls_session(pki, tls, server, client_context(None))
        passed = server.recorder.wait_for(lambda s: s.closed and s.id != failed.id, TIMEOUT)
    assert failed.tls_error and failed.tls_version is None and failed.auth == ()
    assert passed.tls == ("implicit" if tls == "implicit" else "starttls") and passed.tls_error is None


@pytest.mark.parametrize("tls", ["starttls-required", "implicit"])
def test_good_certificate_passes_verification(pki: TestPki, tls: str) -> None:
    with serve(pki, profile(tls=tls, cert="good")) as server:
        _tls_session(pki, tls, server, client_context(pki))
        record = closed(server)
    assert record.tls_error is None and record.tls_version in {"TLSv1.2", "TLSv1.3"}


def test_good_certificate_is_for_the_profile_host_only(pki: TestPki) -> None:
    with serve(pki, profile(tls="implicit", cert="good")) as server:
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            SslClient("smtp.other.example", server.port, context=client_context(pki), timeout=TIMEOUT)
        assert err.value.verify_code == VERIFY_CODES["wrong-host"]


# --- the password stays secret -----------------------------------------------------------------


def _secret_forms(password: str) -> list[str]:
    forms = [password, base64.b64encode(password.encode()).decode()]
    for user in (USER, "mallory@example.org"):
        forms.append(base64.b64encode(f"\0{user}\0{password}".encode()).decode())
    return forms


def test_password_in_no_record_repr_or_log(pki: TestPki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mail.log")
    caplog.set_level(logging.DEBUG, logger="asyncio")
    wrong = "Wr0ng-but-still-private"
    prof = profile(tls="starttls-required")
    with serve(pki, prof) as server:
        for mechanism, password, initial in [
            ("PLAIN", wrong, True),
            ("LOGIN", wrong, True),
            ("PLAIN", wrong, False),
            ("PLAIN", PASSWORD, True),
            ("LOGIN", PASSWORD, True),
            ("PLAIN", PASSWORD, False),
        ]:
            with connect(server) as smtp:
                _starttls(smtp, pki)
                smtp.user, smtp.password = USER, password
                authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
                try:
                    smtp.auth(mechanism, authobject, initial_response_ok=initial)
                except smtplib.SMTPAuthenticationError:
                    assert password == wrong
                else:
                    assert password == PASSWORD
                    _send(smtp)
        records = server.recorder.wait_for(lambda s: len(server.recorder.sessions) == 6 and s.closed, TIMEOUT)
        sessions: tuple[SessionRecord, ...] = server.recorder.sessions
        summary = server.recorder.summary()
    assert records is not None
    assert [a.success for s in sessions for a in s.auth] == [False] * 3 + [True] * 3
    assert "AUTH PLAIN" in caplog.text  # the log did capture the dialogue
    texts = {
        "records": json.dumps([s.to_json() for s in sessions]),
        "reprs": repr(sessions) + repr(prof) + str(prof) + repr(server.cert) + summary,
        "log": caplog.text,
    }
    for where, text in texts.items():
        for secret in _secret_forms(PASSWORD) + _secret_forms(wrong):
            assert secret not in text, f"a form of a password appears in the {where}"


# --- what asyncio would print -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "printed"),
    [
        (ConnectionResetError(104, "Connection reset by peer"), False),
        (ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"), False),
        (BrokenPipeError(32, "Broken pipe"), False),
        (RuntimeError("a bug of ours"), True),  # the twin: not a peer's doing, printed as ever
    ],
    ids=["reset", "tls-alert", "broken-pipe", "our-bug"],
)
def test_a_peer_that_hangs_up_prints_no_traceback(
    pki: TestPki, caplog: pytest.LogCaptureFixture, exc: BaseException, printed: bool
) -> None:
    """A client that gave up on our certificate and reset the connection (swaks against another
    CA, under load) left `Future exception was never retrieved ... Connection reset by peer` on
    the stderr of `relay-harness upstream`: asyncio's own handler hook, given what it is given."""
    with serve(pki, profile()) as server, caplog.at_level(logging.ERROR, logger="asyncio"):
        loop = server._loop
        assert loop is not None
        done = threading.Event()

        def report() -> None:
            loop.call_exception_handler({"message": "Future exception was never retrieved", "exception": exc})
            done.set()

        loop.call_soon_threadsafe(report)
        assert done.wait(TIMEOUT)
    assert any(r.name == "asyncio" for r in caplog.records) == printed, caplog.records
