"""The fake provider: aiosmtpd listeners that answer like a real smarthost and record everything.

aiosmtpd's handler hooks (EHLO, MAIL, RCPT, DATA, the authenticator) carry the provider's policy;
a small subclass adds what hooks cannot see: the connection's lifetime, the TLS layer, the
replies actually sent, and the faults that act below the command level (banner, drops).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import re
import socket
import ssl
import threading
import time
import warnings
import weakref
from asyncio import sslproto
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

from harness.errors import HarnessError
from harness.pki import ServerCert, TestPki
from harness.upstream.policy import Faults, Profile
from harness.upstream.record import AuthAttempt, MessageRecord, Recorder, SessionBuilder

TEMPFAIL = {
    "connect": "421 4.3.2 Service not available, closing transmission channel",
    "ehlo": "451 4.3.0 Try again later",
    "auth": "454 4.7.0 Temporary authentication failure",
    "mail": "451 4.3.0 Try again later",
    "rcpt": "451 4.3.0 Try again later",
    "data": "451 4.3.0 Try again later",
}
STARTTLS_REFUSED = "454 4.7.0 TLS not available due to temporary reason"
SENDER_REJECTED = "550 5.1.8 <{}>: Sender address rejected: Domain not found"
# aiosmtpd's require_starttls reply lacks the RFC 3463 code that real providers (Postfix) send.
_AIOSMTPD_STARTTLS_FIRST = "530 Must issue a STARTTLS command first"
# `<dot-atom@domain> params`: the path nearly every client sends, parsed without the email package.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"\s*<({_ATEXT}(?:\.{_ATEXT})*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*(.*)", re.S)
STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"

_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only

_session_ids = itertools.count(1)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REFUSED_PEER = "peer not allowed: connection closed before the banner"
log = logging.getLogger(__name__)

# aiosmtpd itself sets the attribute it deprecates on every successful AUTH and logs a warning
# about it (logger "mail.log"); there is nothing for a user to act on.
logging.getLogger("mail.log").addFilter(lambda record: "login_data is deprecated" not in record.getMessage())
# AUTH without STARTTLS is always deliberate here: the session is already TLS (implicit), or the
# profile says tls = "none". aiosmtpd warns about it (a warning and a log line) on every connection.
logging.getLogger("mail.log").addFilter(lambda record: "auth_require_tls == False" not in record.getMessage())
warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning, "aiosmtpd")


class UpstreamError(HarnessError):
    """The upstream cannot do what it was asked (typically: cannot listen where told)."""


class FaultBudget:
    """Whether a bounded fault fires now: shared by every connection of one upstream (one thread).

    `times`: each of tempfail and drop fires that many times, then the provider is healthy.
    `for_seconds`: they fire until that long after the first connection. Neither: always.
    """

    def __init__(self, faults: Faults, clock: Callable[[], float] = time.monotonic) -> None:
        self.faults = faults
        self.fired = {"tempfail": 0, "drop": 0}
        self._clock = clock
        self._first_connection: float | None = None

    def connected(self) -> None:
        if self._first_connection is None:
            self._first_connection = self._clock()

    def fires(self, kind: str) -> bool:
        """Call only when the fault applies here (its stage): a firing is counted."""
        f = self.faults
        if f.times is not None and self.fired[kind] >= f.times:
            return False
        now = self._clock()
        since = now - (now if self._first_connection is None else self._first_connection)
        if f.for_seconds is not None and since >= f.for_seconds:
            return False
        self.fired[kind] += 1
        return True

    def tempfail(self, stage: str) -> bool:
        return self.faults.tempfail == stage and self.fires("tempfail")

    def drop(self, when: str) -> bool:
        return self.faults.drop == when and self.fires("drop")


class _Recording:
    """Mixin over aiosmtpd's SMTP/LMTP: one SessionBuilder per TCP connection, faults below hooks."""

    profile: Profile
    recorder: Recorder
    budget: FaultBudget
    listener: str
    implicit_tls: bool
    implicit_context: ssl.SSLContext | None
    transport: Any
    _tls_protocol: Any
    session: Session | None

    def _init_recording(
        self, server: UpstreamServer, implicit: ssl.SSLContext | None, peer_label: str | None
    ) -> None:
        self.profile, self.recorder, self.budget = server.profile, server.recorder, server.budget
        self.listener = f"{server.host}:{server.port}" if server.listening else "in-process"
        self.allowed, self.peer_label = server.allowed, peer_label
        self.refused = False
        self.implicit_tls = implicit is not None
        self.implicit_context = implicit
        self.builder: SessionBuilder | None = None
        self.pending: dict[str, Any] | None = None
        self.raw_transport: asyncio.Transport | None = None  # implicit TLS: the TCP layer

    def publish(self) -> None:
        if self.builder is not None:
            self.recorder.publish(self.builder.snapshot())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.builder is None:
            peer = transport.get_extra_info("peername")
            self.builder = SessionBuilder(
                id=next(_session_ids),
                peer=self.peer_label or (f"{peer[0]}:{peer[1]}" if peer else "?"),
                listener=self.listener,
                protocol=self.profile.protocol,
            )
            if not self._peer_allowed(peer):
                self._refuse(transport)
                return
            self.budget.connected()
            if self.implicit_context is not None:
                self._start_implicit_tls(transport)
                self.publish()
                return
        else:
            self._note_tls("implicit" if self.implicit_tls else "starttls", transport)
        super().connection_made(transport)  # type: ignore[misc]
        self.publish()

    def _peer_allowed(self, peer: Any) -> bool:
        if self.allowed is None or self.peer_label is not None:
            return True  # no allow-list, or a socket handed over in-process (serve_socket)
        try:
            address = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address in self.allowed

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        """Not one byte to a peer that is not the target: no banner, no AUTH, no oracle."""
        assert self.builder is not None
        self.refused = True
        self.builder.refused = REFUSED_PEER
        self.builder.ended = time.time()
        self.publish()
        assert isinstance(transport, asyncio.Transport)
        transport.abort()

    def _start_implicit_tls(self, transport: asyncio.BaseTransport) -> None:
        """TLS on connect, done here rather than by the listener so a failed handshake is recorded.

        With `create_server(ssl=...)` a handshake the client rejects (a bad certificate) never
        reaches the protocol. Here the TLS layer calls connection_made again once it is up, and
        the SMTP session starts then, exactly as it would have.
        """
        assert isinstance(transport, asyncio.Transport) and self.implicit_context is not None
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        tls = sslproto.SSLProtocol(loop, self, self.implicit_context, waiter, server_side=True)  # type: ignore[arg-type]
        self.raw_transport = transport
        transport.set_protocol(tls)
        tls.connection_made(transport)
        waiter.add_done_callback(self._implicit_tls_done)

    def _implicit_tls_done(self, waiter: asyncio.Future[None]) -> None:
        error = None if waiter.cancelled() else waiter.exception()
        if error is None or self.builder is None:
            return
        self.builder.tls_error = str(error) or type(error).__name__
        if self.builder.ended is None:
            self.builder.ended = time.time()
        self.publish()

    def _note_tls(self, mode: str, transport: asyncio.BaseTransport) -> None:
        assert self.builder is not None
        tls = transport.get_extra_info("ssl_object")
        if tls is None:
            return
        self.builder.tls = "implicit" if mode == "implicit" else "starttls"
        self.builder.tls_version = tls.version()
        cipher = tls.cipher()
        self.builder.tls_cipher = cipher[0] if cipher else None

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self._ack_now()
        super().data_received(data)  # type: ignore[misc]

    def _ack_now(self) -> None:
        """ACK what just arrived at once instead of after Linux's delayed-ACK timer (40 ms).

        smtpd writes a message's body and its final `.` in two writes, and its socket has Nagle
        on, so the `.` waits until the body is ACKed; the upstream has nothing to answer before
        the `.` and so ACKs only when the timer fires: one 40 ms stall per message (22 msg/s in
        one session). A real provider across a network hides this behind the round trip; on a
        veth it was the whole pace. asyncio already sets TCP_NODELAY on accepted sockets (so our
        own replies are never held); TCP_QUICKACK is the receiving side's counterpart, and Linux
        clears it as soon as a reply is sent, hence once per read. Not on Linux: nothing to do.
        """
        if _TCP_QUICKACK is None:
            return
        transport = self.raw_transport or self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):  # not a socketpair
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return  # aiosmtpd never saw this connection
        self.finish_message(None)
        if self.builder is not None and self.builder.ended is None:
            self.builder.ended = time.time()
            self.publish()
        super().connection_lost(error)  # type: ignore[misc]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser, minus its cost for plain paths (bench/upstream_throughput.py).

        aiosmtpd defines a typing.Protocol class and runs the full RFC 5322 header parser on every
        MAIL and RCPT: about 60 % of the server's time per message. Anything but a plain
        `<local@domain>` still goes to it, so replies and edge cases stay aiosmtpd's.
        """
        m = _SIMPLE_PATH.fullmatch(arg)
        limit = getattr(self, "local_part_limit", 0)
        if m is None or (limit and len(m.group(1)) > limit):
            return super()._getaddr(arg)  # type: ignore[misc, no-any-return]
        return f"{m.group(1)}@{m.group(2)}", m.group(3)

    async def push(self, status: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # a fault closed the connection: nothing is sent, so nothing is recorded
        if status == _AIOSMTPD_STARTTLS_FIRST:
            status = STARTTLS_FIRST
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if self.builder is not None:
            self.builder.replies.extend(text.split("\r\n"))  # several replies in one write: LMTP
        await super().push(status)  # type: ignore[misc]

    async def _handle_client(self) -> None:
        faults = self.profile.faults
        if faults.banner_delay:
            await asyncio.sleep(faults.banner_delay)  # the fault itself: a slow provider
        if self.budget.tempfail("connect"):
            await self.push(TEMPFAIL["connect"])
            self.transport.close()
            return
        await super()._handle_client()  # type: ignore[misc]

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.profile.faults.starttls_refused:
            await self.push(STARTTLS_REFUSED)
            return
        try:
            await super().smtp_STARTTLS(arg)  # type: ignore[misc]
        except Exception as exc:
            if self.builder is not None:
                self.builder.tls_error = str(exc.__cause__ or exc)
                self.publish()
            raise

    async def after_greeting(self) -> None:
        if self.budget.drop("after-ehlo"):
            self.transport.close()

    def start_message(self, mail_from: str) -> None:
        self.finish_message(None)
        self.pending = {"mail_from": mail_from, "rcpt": [], "rejected": [], "reply": ""}

    def pending_reply(self, reply: str) -> None:
        if self.pending is not None:
            self.pending["reply"] = reply

    def finish_message(self, data: tuple[bytes, str] | None) -> None:
        """Close the current transaction into a MessageRecord (accepted only with a DATA reply)."""
        if self.pending is None or self.builder is None:
            return
        body, reply = data if data else (b"", self.pending["reply"])
        self.builder.messages.append(
            MessageRecord(
                mail_from=self.pending["mail_from"],
                rcpt_to=tuple(self.pending["rcpt"]),
                rejected_rcpt_to=tuple(self.pending["rejected"]),
                size=len(body),
                reply=reply,
                accepted=data is not None and reply.startswith("2"),
                body=body,
            )
        )
        self.pending = None
        self.publish()


class RecordingSMTP(_Recording, SMTP):
    async def smtp_EHLO(self, hostname: str) -> None:
        await super().smtp_EHLO(hostname)
        await self.after_greeting()


class RecordingLMTP(_Recording, LMTP):
    async def smtp_LHLO(self, arg: str) -> None:
        await super().smtp_LHLO(arg)
        await self.after_greeting()


class ProviderHandler:
    """aiosmtpd hooks that apply the profile's policy, in the provider's own words."""

    def __init__(self, profile: Profile, budget: FaultBudget) -> None:
        self.profile = profile
        self.budget = budget
        self._queue_ids = itertools.count(1)

    async def handle_EHLO(
        self,
        server: _Recording,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if server.builder is not None:
            server.builder.ehlo = hostname
        if self.budget.tempfail("ehlo"):
            return [TEMPFAIL["ehlo"]]  # and no host_name: MAIL stays refused (503) as after no EHLO
        session.host_name = hostname
        if self.profile.auth == "none" or not self.profile.faults.auth_advertised:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return responses

    async def handle_MAIL(
        self,
        server: _Recording,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        server.start_message(address)
        if self.budget.tempfail("mail"):
            server.pending_reply(TEMPFAIL["mail"])
            return TEMPFAIL["mail"]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: _Recording,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        pending = server.pending
        reply = "250 2.1.5 Ok"
        if not self.profile.sender_allowed(envelope.mail_from or ""):
            reply = SENDER_REJECTED.format(envelope.mail_from)
        elif self.budget.tempfail("rcpt"):
            reply = TEMPFAIL["rcpt"]
        if pending is not None:
            pending["rcpt" if reply.startswith("2") else "rejected"].append(address)
            pending["reply"] = reply
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply

    async def handle_DATA(self, server: _Recording, session: Session, envelope: Envelope) -> str:
        body = envelope.original_content or envelope.content or b""
        assert isinstance(body, bytes)
        if self.budget.drop("after-data"):
            server.finish_message((body, "(connection dropped by fault after DATA)"))
            server.transport.abort()
            return "451 4.3.0 unreachable: the connection is already gone"
        if self.budget.tempfail("data"):
            reply = TEMPFAIL["data"]
        else:
            reply = f"250 2.0.0 Ok: queued as RH{next(self._queue_ids):06d}"
        server.finish_message((body, reply))
        if self.profile.protocol == "lmtp":
            # LMTP answers once per accepted recipient (RFC 2033); aiosmtpd sends only one. The
            # replies go out in one write, as an LMTP server that has them all sends them: the
            # client then reads them together, whatever the scheduling of the two processes.
            return "\r\n".join([reply] * max(1, len(envelope.rcpt_tos)))
        return reply

    async def handle_exception(self, error: Exception) -> str:
        """A client refusing our certificate is an expected event here, not a crash to print."""
        if isinstance(error, TLSSetupException):
            log.info("TLS handshake failed: %s", error.__cause__ or error)
            return "454 4.7.0 TLS handshake failed"  # never sent: aiosmtpd closes the connection
        log.exception("SMTP session exception")
        return f"500 Error: ({type(error).__name__}) {error}"

    def authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(server, _Recording)
        over_tls = server.implicit_tls or getattr(server, "_tls_protocol", None) is not None
        user = password = ""
        if isinstance(data, LoginPassword):
            user = data.login.decode("utf-8", "replace")
            password = data.password.decode("utf-8", "replace")
        if self.budget.tempfail("auth"):
            ok, message = False, TEMPFAIL["auth"]
        else:
            ok, message = self.profile.check_password(user, password), None
        if server.builder is not None:
            server.builder.auth.append(AuthAttempt(mechanism, user, ok, over_tls))
            server.publish()
        return AuthResult(success=ok, handled=False, message=message, auth_data=data if ok else None)


class UpstreamServer:
    """One listener of the fake provider, served from its own event-loop thread.

    A thread, not the caller's loop, because the harness's callers are synchronous (pytest, the
    CLI, SSH-driven targets) and must be able to block on the recorder while mail flows.
    aiosmtpd's Controller is not used: its readiness probe opens a connection of its own, which
    would show up as a session in the records.
    """

    def __init__(
        self,
        profile: Profile,
        pki: TestPki,
        host: str = "127.0.0.1",
        port: int | None = None,
        recorder: Recorder | None = None,
        *,
        allowed_peers: Iterable[str] | None = None,
        listen: bool = True,
    ) -> None:
        """`allowed_peers`: the only addresses whose connections are served (the target's own);
        any other peer's connection is closed before the banner and recorded as refused, so no
        other local user can try passwords on it. None: every peer (the standalone upstream).
        `listen` False: no listener at all, connections come only through `serve_socket`.
        """
        self.profile = profile
        self.pki = pki
        self.host = host
        self.port = profile.port if port is None else port
        self.listening = listen
        self.allowed = None if allowed_peers is None else frozenset(_addresses(allowed_peers))
        self.recorder = recorder or Recorder()
        self.budget = FaultBudget(profile.faults)
        self.cert: ServerCert = pki.server_cert(profile.host, profile.faults.cert)
        self._tls_context = self.cert.server_context()  # built once: loading a chain costs ~1 ms
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._protocols: weakref.WeakSet[_Recording] = weakref.WeakSet()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _factory(self, peer_label: str | None = None) -> SMTP:
        profile = self.profile
        handler = ProviderHandler(profile, self.budget)
        tls_context = self._tls_context if profile.tls.startswith("starttls") else None
        cls = RecordingLMTP if profile.protocol == "lmtp" else RecordingSMTP
        smtp = cls(
            handler,
            hostname=profile.host,
            ident="ESMTP relay-harness",
            tls_context=tls_context,
            require_starttls=profile.tls == "starttls-required",
            auth_required=profile.auth == "required",
            auth_require_tls=profile.tls.startswith("starttls"),
            authenticator=handler.authenticator,
            decode_data=False,
            loop=self._loop,
        )
        implicit = self._tls_context if profile.tls == "implicit" else None
        smtp._init_recording(self, implicit, peer_label)
        self._protocols.add(smtp)
        return smtp

    def start(self) -> UpstreamServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_quiet_about_peers)
            self._loop = loop
            try:
                if self.listening:
                    self._server = loop.run_until_complete(
                        loop.create_server(self._factory, self.host, self.port, reuse_address=True)
                    )
                    self.port = self._server.sockets[0].getsockname()[1]
            except OSError as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"upstream-{self.host}:{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise UpstreamError(f"cannot listen on {self.host}:{self.port}: {failure[0]}")
        return self

    def serve_socket(self, sock: socket.socket, peer: str = "in-process", timeout: float = 10) -> None:
        """Serve an already connected socket as one more session (e.g. one end of a socketpair
        whose other end a tunnel feeds), with no TCP listener involved. `peer` is what the record
        calls the other side. The allow-list does not apply: only this process can hand a socket.
        """
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise UpstreamError("serve_socket: the upstream is not running (start it first)")
        factory = functools.partial(self._factory, peer)
        future = asyncio.run_coroutine_threadsafe(loop.connect_accepted_socket(factory, sock), loop)
        try:
            future.result(timeout)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"serve_socket: {exc}") from exc

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for proto in list(self._protocols):
                transport = proto.transport or proto.raw_transport
                if transport is not None and not transport.is_closing():
                    transport.abort()
            await asyncio.sleep(0)  # let connection_lost callbacks publish the final records
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _quiet_about_peers(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A peer that resets its connection or breaks off TLS is the peer's doing, and its session's
    record says so; asyncio would print it as a traceback (`Future exception was never
    retrieved ... Connection reset by peer`, a client that gave up on our certificate, under load)
    on the stderr of `relay-harness upstream`. Anything else is reported as asyncio would."""
    if isinstance(context.get("exception"), (ConnectionError, ssl.SSLError)):
        return
    loop.default_exception_handler(context)


def _addresses(peers: Iterable[str]) -> Iterator[IPAddress]:
    for peer in peers:
        try:
            yield ipaddress.ip_address(peer)
        except ValueError:
            raise UpstreamError(f"allowed peer {peer!r} is not an IP address") from None


@contextmanager
def running_upstream(
    profile: Profile, pki: TestPki | None = None, host: str = "127.0.0.1", port: int | None = None
) -> Iterator[UpstreamServer]:
    with UpstreamServer(profile, pki or TestPki(), host, port) as server:
        yield server
