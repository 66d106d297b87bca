"""Who may talk to the fake upstream: the allow-list, and sockets handed over in-process.

A check's upstream knows a password; if any local user could connect, its 235 or 535 would tell
them whether a guess is right. 127.0.0.2 plays the other local user here (all of 127.0.0.0/8 is
loopback on Linux, so a client can bind it as its source without any setup).
"""

from __future__ import annotations

import smtplib
import socket
import threading

import pytest
from upstream_helpers import (
    HOST,
    MESSAGE,
    PASSWORD,
    RCPT,
    SENDER,
    TIMEOUT,
    USER,
    Client,
    client_context,
    profile,
)

from harness.pki import TestPki
from harness.upstream import SessionRecord, UpstreamError, UpstreamServer
from harness.upstream.server import REFUSED_PEER

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki()


def _from(server: UpstreamServer, source: str) -> Client:
    return Client(
        HOST, server.port, local_hostname="client.example.org", timeout=TIMEOUT, source_address=(source, 0)
    )


def _session_from(server: UpstreamServer, source: str) -> SessionRecord:
    return server.recorder.wait_for(lambda s: s.closed and s.peer.startswith(f"{source}:"), TIMEOUT)


def _raw_first_bytes(port: int, source: str) -> bytes | str:
    """What a client reads first: the banner, b"" (closed) or the reset it got."""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT, source_address=(source, 0)) as sock:
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return "reset"


def test_a_peer_not_allowed_gets_no_banner_and_is_recorded_as_refused(pki: TestPki) -> None:
    prof = profile(tls="none", auth="optional")
    with UpstreamServer(prof, pki, "127.0.0.1", 0, allowed_peers=["127.0.0.1"]) as server:
        assert _raw_first_bytes(server.port, "127.0.0.2") in (b"", "reset")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            _from(server, "127.0.0.2")
        refused = _session_from(server, "127.0.0.2")
        # The allowed peer, same server, same moment: served as usual, password checked.
        with _from(server, "127.0.0.1") as smtp:
            smtp.login(USER, PASSWORD)
            assert smtp.sendmail(SENDER, [RCPT], MESSAGE) == {}
        served = _session_from(server, "127.0.0.1")
    assert refused.refused == REFUSED_PEER
    assert refused.replies == () and refused.auth == () and refused.messages == ()
    assert served.refused is None and served.authenticated_user == USER
    assert "refused: peer not allowed" in server.recorder.summary()


def test_twin_without_an_allow_list_serves_any_local_peer(pki: TestPki) -> None:
    with UpstreamServer(profile(tls="none", auth="optional"), pki, "127.0.0.1", 0) as server:
        first = _raw_first_bytes(server.port, "127.0.0.2")
        assert isinstance(first, bytes) and first.startswith(b"220 ")
        with _from(server, "127.0.0.2") as smtp:
            assert smtp.login(USER, PASSWORD)[0] == 235  # the oracle the allow-list closes
        assert _session_from(server, "127.0.0.2").refused is None


def test_a_refused_peer_does_not_use_up_a_fault(pki: TestPki) -> None:
    prof = profile(tls="none", auth="none", tempfail="rcpt", times=1)
    with UpstreamServer(prof, pki, "127.0.0.1", 0, allowed_peers=["127.0.0.1"]) as server:
        _raw_first_bytes(server.port, "127.0.0.2")
        _session_from(server, "127.0.0.2")
        with _from(server, "127.0.0.1") as smtp:
            smtp.ehlo()
            smtp.mail(SENDER)
            assert smtp.rcpt(RCPT)[0] == 451  # the one tempfail is still there for the target


def test_allowed_peers_must_be_addresses(pki: TestPki) -> None:
    with pytest.raises(UpstreamError, match="allowed peer 'host1' is not an IP address"):
        UpstreamServer(profile(), pki, allowed_peers=["host1"])


class _Over(smtplib.SMTP):
    """smtplib over a socket made elsewhere (one end of a socketpair)."""

    def __init__(self, sock: socket.socket) -> None:
        self._given = sock
        super().__init__(local_hostname="client.example.org", timeout=TIMEOUT)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._given


def test_serve_socket_runs_a_full_session_without_any_listener(pki: TestPki) -> None:
    with UpstreamServer(profile(tls="starttls-required"), pki, listen=False) as server:
        assert not server.listening
        ours, theirs = socket.socketpair()
        server.serve_socket(theirs, peer="tunnel:1")
        with _Over(ours) as smtp:
            smtp.connect(HOST, 0)
            smtp._host = HOST  # type: ignore[attr-defined]  # the name the certificate is checked for
            smtp.starttls(context=client_context(pki))
            smtp.login(USER, PASSWORD)
            assert smtp.sendmail(SENDER, [RCPT], MESSAGE) == {}
        record = server.recorder.wait_for(lambda s: s.closed, TIMEOUT)
    assert (record.peer, record.listener, record.tls) == ("tunnel:1", "in-process", "starttls")
    assert record.authenticated_user == USER
    assert [m.accepted for m in record.messages] == [True]


def test_serve_socket_is_served_even_with_an_allow_list(pki: TestPki) -> None:
    """Only this process can hand a socket over: the allow-list is for what arrives by TCP."""
    prof = profile(tls="none", auth="none")
    with UpstreamServer(prof, pki, listen=False, allowed_peers=["198.51.100.2"]) as server:
        ours, theirs = socket.socketpair()
        server.serve_socket(theirs)
        with _Over(ours) as smtp:
            assert smtp.connect(HOST, 0)[0] == 220


def test_serve_socket_before_start_is_an_error(pki: TestPki) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs, pytest.raises(UpstreamError, match="not running"):
        UpstreamServer(profile(), pki, listen=False).serve_socket(theirs)


def test_many_sockets_handed_over_at_once_are_served_concurrently(pki: TestPki) -> None:
    with UpstreamServer(profile(tls="none", auth="none"), pki, listen=False) as server:
        pairs = [socket.socketpair() for _ in range(5)]
        for n, (_, theirs) in enumerate(pairs):
            server.serve_socket(theirs, peer=f"tunnel:{n}")
        errors: list[BaseException] = []

        def send(sock: socket.socket) -> None:
            try:
                with _Over(sock) as smtp:
                    smtp.connect(HOST, 0)
                    smtp.sendmail(SENDER, [RCPT], MESSAGE)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(ours,)) for ours, _ in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        server.recorder.wait_for(lambda _: sum(s.closed for s in server.recorder.sessions) == 5, TIMEOUT)
    assert not errors
    assert sorted(s.peer for s in server.recorder.sessions) == [f"tunnel:{n}" for n in range(5)]
