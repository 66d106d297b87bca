"""mta_session.c: one connection to the smarthost, over real TCP (and TLS), driven by its replies.

The client is written here over asyncio (a Protocol, not smtplib) because smtpd's exact
behaviour lives in details smtplib hides: which extension lines it reads from EHLO, STARTTLS
only where the scheme asks, the certificate checked after a completed handshake, AUTH PLAIN
before LOGIN and never without TLS, a reply followed by unrequested data being an error, the
multi-line reply text it logs. Each state below is the one of the same name in mta_session.c,
and every log line is smtpd's.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from typing import TYPE_CHECKING

from harness.targets.emulated import tlscheck
from harness.targets.emulated.message import uid
from harness.targets.emulated.network import Unreachable
from harness.targets.emulated.relays import OK, PERMFAIL, TEMPFAIL, Relay, Task

if TYPE_CHECKING:
    from harness.targets.emulated.mta import Mta

MAX_TRY_BEFORE_DISABLE = 10
MAX_MAIL_PER_SESSION = 100
SESSION_KEEPALIVE = 10  # limits->sessdelay_keepalive
IO_TIMEOUT = 300.0
LINE_MAX = 2048
# OpenSSL 3 reason codes of the SSL library (lib 20) that a TLS failure here can carry.
_SSL_REASONS = {
    "WRONG_VERSION_NUMBER": 0x10B,
    "UNEXPECTED_EOF_WHILE_READING": 0x126,
    "PACKET_LENGTH_TOO_LONG": 0xC6,
    "RECORD_LAYER_FAILURE": 0x139,
    "SSLV3_ALERT_HANDSHAKE_FAILURE": 0x410,
    "TLSV1_ALERT_PROTOCOL_VERSION": 0x46C,
    "TLSV1_ALERT_INTERNAL_ERROR": 0x438,
}


def ssl_error_text(exc: BaseException) -> str:
    """OpenSSL's ERR_error_string() for a TLS failure: `error:0A00010B:SSL routines::wrong version number`."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        reason_text = text.split("] ", 1)[-1].rsplit(" (_ssl.c", 1)[0]
        code = _SSL_REASONS.get(exc.reason)
        if exc.library == "SSL" and code is not None:
            return f"error:{(20 << 23) | code:08X}:SSL routines::{reason_text}"
        return reason_text
    return str(exc) or type(exc).__name__


# The session's states, named as in mta_session.c.
INIT, BANNER, EHLO, HELO, LHLO, STARTTLS, AUTH, AUTH_PLAIN, AUTH_LOGIN = range(9)
AUTH_LOGIN_USER, AUTH_LOGIN_PASS, READY, MAIL, RCPT, DATA, BODY, EOM, LMTP_EOM, RSET, QUIT = range(9, 20)


class MtaSession(asyncio.Protocol):
    """One connection to the smarthost, driven by its replies as mta_io()/mta_response() are."""

    def __init__(self, mta: Mta, relay: Relay) -> None:
        self.mta = mta
        self.relay = relay
        self.id = uid()
        self.log = mta.log
        self.state = INIT
        self.attempt = 0
        self.use_smtps = self.use_starttls = self.use_smtp_tls = False
        self.downgrade_plain = False
        self.tls_on = False
        self.tls_verified = False
        self.ready = False
        self.ext: set[str] = set()
        self.ext_size = 0
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.replybuf = ""
        self.task: Task | None = None
        self.current: int = 0  # index of the envelope whose RCPT is pending
        self.msgtried = self.msgcount = self.rcptcount = 0
        self.hangon = 0
        self.hangon_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.username = ""
        self.freed = False
        self.reading = False
        self.waiting_task = False
        self.pointer = 0x550000000000 | (self.id & 0xFFFFFFFFF0)  # how smtpd's debug lines name it
        self.debug(f"spawned for relay {relay.text()}")

    def debug(self, text: str) -> None:
        """smtpd's `debug: mta: %p: ...` lines (printed with -v, as the lab runs it)."""
        self.log(f"debug: mta: 0x{self.pointer:x}: {text}")

    # -- connection -----------------------------------------------------------------------------
    def start(self) -> None:
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        """mta_connect(): the scheme of this attempt, then a TCP connection."""
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        relay = self.relay
        self.use_smtps = self.use_starttls = self.use_smtp_tls = False
        if self.attempt == 0:
            if relay.tls == "smtps":
                self.use_smtps = True
            elif relay.tls == "starttls":
                self.use_starttls = True
            elif relay.tls == "opportunistic":
                self.use_smtp_tls = True
        elif not (self.attempt == 1 and self.downgrade_plain):
            self.free()
            return
        port = relay.url.port or (465 if self.use_smtps else 25)
        self.attempt += 1
        if self.use_smtp_tls:
            schema = "smtp://"
        elif self.use_starttls:
            schema = "smtp+tls://"
        elif self.use_smtps:
            schema = "smtps://"
        elif relay.url.lmtp:
            schema = "lmtp://"
        else:
            schema = "smtp+notls://"
        route = relay.route
        assert route is not None
        ptr = route.ptr or "(null)"  # glibc prints a NULL %s so
        self.log(f"{self.id:016x} mta connecting address={schema}{route.address}:{port} host={ptr}")
        self.state = INIT
        self.tls_on = False
        self.buffer = b""
        loop = asyncio.get_running_loop()
        try:
            await self.mta.network.connect(loop, lambda: self, route.address, port)
        except Unreachable as exc:
            self.error(f"Connection failed: {exc.strerror}")
            self.free()
        except OSError as exc:
            self.error(f"IO Error: {exc.strerror or exc}")
            self.free()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.tls_on:
            return  # start_tls() hands the TLS transport back; mta_tls_ready runs after it
        self.transport = transport
        self.log(f"{self.id:016x} mta connected")
        self._arm_timeout()
        if self.use_smtps:
            asyncio.get_running_loop().create_task(self._start_tls())
        else:
            self.state = BANNER

    def connection_lost(self, exc: Exception | None) -> None:
        if self.freed or self.transport is None:
            return
        if self.state == QUIT:
            self.free()
            return
        self.transport = None
        self.error("Connection closed unexpectedly")
        if not self.ready:
            asyncio.get_running_loop().create_task(self._connect())
        else:
            self.free()

    def _arm_timeout(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = asyncio.get_running_loop().call_later(IO_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self.error("Connection timeout")
        if not self.ready:
            asyncio.get_running_loop().create_task(self._connect())
        else:
            self.free()

    async def _start_tls(self) -> None:
        """mta_cert_init() + io_start_tls(): no verification in the handshake, no SNI."""
        assert self.transport is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        loop = asyncio.get_running_loop()
        plain = self.transport
        self.tls_on = True
        try:
            tls = await loop.start_tls(plain, self, context, server_side=False)
        except (ssl.SSLError, OSError, ConnectionError) as exc:
            self.tls_on = False
            self._tls_failed(exc)
            return
        if tls is None:
            self._tls_failed(ConnectionResetError("Connection reset by peer"))
            return
        self.transport = tls
        self._tls_ready()

    def _tls_failed(self, exc: BaseException) -> None:
        if self.freed:
            return
        if self.state == STARTTLS and self.use_smtp_tls:
            self.log(
                f"smtp-out: Error on session {self.id:016x}: opportunistic TLS failed, downgrading to plain"
            )
            self.downgrade_plain = True
            self.transport = None
            asyncio.get_running_loop().create_task(self._connect())
            return
        self.error(f"IO Error: {ssl_error_text(exc)}")
        self.free()

    def _tls_ready(self) -> None:
        """IO_TLSREADY, then mta_cert_verify() and mta_tls_verified()."""
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        version = obj.version() if obj else "?"
        name, _, bits = obj.cipher() if obj else ("?", "?", 0)
        self.log(f"{self.id:016x} mta tls ciphers={version}:{name}:{bits}")
        self.tls_on = True
        leaf = obj.getpeercert(binary_form=True) if obj else None
        if leaf:
            self.tls_verified = self._verify(leaf)
            if not self.tls_verified and self.relay.verify:
                self.error("SSL certificate check failed")
                self.free()
                return
            result = "success" if self.tls_verified else "failure"
            self.log(f'{self.id:016x} mta server-cert-check result="{result}"')
        elif self.relay.verify:
            self.error("SSL certificate check failed")
            self.free()
            return
        if self.use_smtps:
            self.state = BANNER
        else:
            self.enter(EHLO)

    def _verify(self, leaf: bytes) -> bool:
        ca_name = self.relay.dispatcher.ca
        pem = self.mta.loaded.cas.get(ca_name, b"") if ca_name else self.mta.trusted_ca()
        if not tlscheck.chain_ok(leaf, tlscheck.load_cas(pem)):
            return False
        name = self.relay.url.host
        if not tlscheck.name_ok(leaf, name):
            self.log(f"{self.id:016x} mta ssl_check_name: no match for '{name}' in cert")
            return False
        return True

    # -- reading replies ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Bytes join the input buffer; they are read as smtpd reads them, on its next turn.

        smtpd's mta is an event loop in its own process: by the time it reads a readable
        socket, whatever the server sent in one burst is there (an LMTP server's replies, one
        per recipient). Reading on the loop's next turn, not in this callback, gives the rest of
        such a burst the same chance to arrive first.
        """
        if self.freed:
            return
        self._arm_timeout()
        self.buffer += data
        if not self.reading:
            self.reading = True
            asyncio.get_running_loop().call_soon(self._read)

    def _read(self) -> None:
        """mta_io(IO_DATAIN): lines up to a complete reply, acted on; more data after it is an error."""
        self.reading = False
        while not self.freed:
            nl = self.buffer.find(b"\n")
            if nl < 0:
                if len(self.buffer) >= LINE_MAX:
                    self.error("Input too long")
                    self.free()
                return
            raw, self.buffer = self.buffer[:nl], self.buffer[nl + 1 :]
            line = raw.decode("utf-8", "replace").removesuffix("\r")
            if not self._reply_line(line):
                continue
            if self.freed or self.transport is None:
                return
            if self.buffer:
                self.log("debug: mta: remaining data in input buffer")
                self.error("Remote host sent too much data")
                self.free()
                return
            return

    def _reply_line(self, line: str) -> bool:
        """One line; True when it completed a reply (which has then been acted on)."""
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            self.error("Bad response: invalid response")
            self.free()
            return True
        cont = len(line) > 3 and line[3] == "-"
        msg = line[4:]
        if self.state == EHLO:
            self._extension(msg)
        if not self.replybuf:
            self.replybuf = line
        elif len(line) > 4:
            text = line[4:]
            if (
                len(text) > 5
                and text[0].isdigit()
                and text[1] == "."
                and text[2].isdigit()
                and text[3] == "."
                and text[4].isdigit()
                and text[5].isspace()
            ):
                text = text[5:]
            self.replybuf += text
        if cont:
            return False
        reply, self.replybuf = self.replybuf, ""
        if self.state == QUIT:
            self.log(f"{self.id:016x} mta disconnected reason=quit messages={self.msgcount}")
            self.free()
            return True
        self.response(reply)
        return True

    def _extension(self, msg: str) -> None:
        if msg == "STARTTLS":
            self.ext.add("STARTTLS")
        elif msg.startswith("AUTH "):
            self.ext.add("AUTH")
            words = msg.split()
            if "PLAIN" in words[1:]:
                self.ext.add("PLAIN")
            if "LOGIN" in words[1:]:
                self.ext.add("LOGIN")
        elif msg == "PIPELINING":
            self.ext.add("PIPELINING")
        elif msg.startswith("SIZE ") and msg[5:].isdigit():
            self.ext.add("SIZE")
            self.ext_size = int(msg[5:])

    # -- writing --------------------------------------------------------------------------------
    def send(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(text.encode() + b"\r\n")

    def enter(self, state: int) -> None:
        """mta_enter_state(), its `goto again` as a loop."""
        while True:
            self.state = state
            if state == EHLO:
                self.ext = set()
                self.send(f"EHLO {self.helo}")
            elif state == HELO:
                self.ext = set()
                self.send(f"HELO {self.helo}")
            elif state == LHLO:
                self.ext = set()
                self.send(f"LHLO {self.helo}")
            elif state == STARTTLS:
                if self.downgrade_plain or self.tls_on:
                    state = AUTH
                    continue
                if "STARTTLS" not in self.ext:
                    if self.relay.tls in ("starttls", "smtps"):
                        self.error("TLS required but not supported by remote host")
                        asyncio.get_running_loop().create_task(self._connect())
                        return
                    state = AUTH
                    continue
                self.send("STARTTLS")
            elif state == AUTH:
                secret = self.relay.secret
                if secret and self.tls_on:
                    if "AUTH" in self.ext:
                        if "PLAIN" in self.ext:
                            state = AUTH_PLAIN
                            continue
                        if "LOGIN" in self.ext:
                            state = AUTH_LOGIN
                            continue
                        self.debug("no supported AUTH method on session")
                        self.error("no supported AUTH method")
                    else:
                        self.debug("AUTH not advertised on session")
                        self.error("AUTH not advertised")
                    return  # smtpd neither frees the session nor moves on: it waits, connected
                if secret:
                    self.debug("not using AUTH on non-TLS session")
                    self.error("Refuse to AUTH over unsecure channel")
                    asyncio.get_running_loop().create_task(self._connect())
                    return
                state = READY
                continue
            elif state == AUTH_PLAIN:
                self.username = self._blob()[0]
                self.send(f"AUTH PLAIN {self.relay.secret}")
            elif state == AUTH_LOGIN:
                self.send("AUTH LOGIN")
            elif state == AUTH_LOGIN_USER:
                self.username = self._blob()[0]
                self.send(base64.b64encode(self.username.encode()).decode())
            elif state == AUTH_LOGIN_PASS:
                self.send(base64.b64encode(self._blob()[1].encode()).decode())
            elif state == READY:
                next_state = self._ready()
                if next_state is None:
                    return
                state = next_state
                continue
            elif state == MAIL:
                assert self.task is not None
                self.current = 0
                self.hangon = 0
                self.msgtried += 1
                self.send(f"MAIL FROM:<{self.task.sender}>")
            elif state == RCPT:
                assert self.task is not None
                self.send(f"RCPT TO:<{self.task.envelopes[self.current].dest}>")
                self.rcptcount += 1
            elif state == DATA:
                self.send("DATA")
            elif state == BODY:
                self._body()
                state = EOM
                continue
            elif state == EOM:
                self.send(".")
            elif state == LMTP_EOM:
                pass  # the next per-recipient reply is read as it comes
            elif state == RSET:
                self.send("RSET")
            elif state == QUIT:
                self.send("QUIT")
            return

    @property
    def helo(self) -> str:
        return self.relay.dispatcher.helo or self.mta.hostname

    def _blob(self) -> tuple[str, str]:
        raw = base64.b64decode(self.relay.secret or "").decode("utf-8", "replace")
        _, user, password = [*raw.split("\0"), "", "", ""][:3]
        return user, password

    def _ready(self) -> int | None:
        """MTA_READY: take the next task, or hang on for SESSION_KEEPALIVE one-second ticks."""
        if not self.ready:
            self.ready = True
            route = self.relay.route
            if route is not None:
                route.new = False
        if self.msgtried >= MAX_TRY_BEFORE_DISABLE:
            self.log(f"{self.id:016x} mta host-rejects-all-mails")
            return QUIT
        if self.msgcount >= MAX_MAIL_PER_SESSION:
            return QUIT
        if self.task is None and self.relay.tasks:
            self.task = self.relay.tasks.pop(0)
            for e in self.task.envelopes:
                e.session = self.id
        if self.task is None:
            if self.hangon >= SESSION_KEEPALIVE:
                return QUIT
            self.waiting_task = True
            self.hangon_timer = asyncio.get_running_loop().call_later(1, self._hangon_tick)
            return None
        self.waiting_task = False
        if "SIZE" in self.ext and self.ext_size and len(self._data()) > self.ext_size:
            self.flush(PERMFAIL, "message too large for peer")
            return READY
        return MAIL

    def _hangon_tick(self) -> None:
        self.hangon_timer = None
        self.log("mta: timeout for session hangon")
        self.hangon += 1
        if not self.freed:
            self.enter(READY)

    def wake(self) -> None:
        """New work for a session that hangs on: it is picked at the next tick, as smtpd does."""

    def _data(self) -> bytes:
        assert self.task is not None
        return self.mta.message(self.task.msgid)

    def _body(self) -> None:
        """mta_queue_data(): each stored line, dot-stuffed, with CRLF."""
        lines = self._data().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        out = [(b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines]
        if self.transport is not None:
            self.transport.write(b"".join(out))

    # -- replies --------------------------------------------------------------------------------
    def response(self, line: str) -> None:
        """mta_response()."""
        state = self.state
        if state in (INIT, AUTH, READY, BODY):
            self.log("pony express: mta_response() bad state")  # fatalx(): smtpd exits
            self.mta.fatal()
            return
        if state == BANNER:
            if line[0] != "2":
                self.error(f"BANNER rejected: {line}")
                self.free()
                return
            self.enter(LHLO if self.relay.url.lmtp else EHLO)
        elif state == EHLO:
            if line[0] != "2":
                if self.relay.url.label is not None or self.relay.tls in ("starttls", "smtps"):
                    self.error(f"EHLO rejected: {line}")
                    self.free()
                    return
                self.enter(HELO)
                return
            self.enter(READY if self.relay.tls == "no" else STARTTLS)
        elif state in (HELO, LHLO):
            if line[0] != "2":
                self.error(f"{'HELO' if state == HELO else 'LHLO'} rejected: {line}")
                self.free()
                return
            self.enter(READY)
        elif state == STARTTLS:
            if line[0] != "2":
                if self.relay.tls not in ("starttls", "smtps"):
                    self.enter(AUTH)
                    return
                self.error(f"STARTTLS rejected: {line}")
                self.free()
                return
            asyncio.get_running_loop().create_task(self._start_tls())
        elif state in (AUTH_PLAIN, AUTH_LOGIN_PASS):
            if line[0] != "2":
                self.error(f"AUTH rejected: {line}")
                self.free()
                return
            self.enter(READY)
        elif state in (AUTH_LOGIN, AUTH_LOGIN_USER):
            if not line.startswith("334 "):
                self.error(f"AUTH rejected: {line}")
                self.free()
                return
            self.enter(AUTH_LOGIN_USER if state == AUTH_LOGIN else AUTH_LOGIN_PASS)
        elif state == MAIL:
            if line[0] != "2":
                self.flush(PERMFAIL if line[0] == "5" else TEMPFAIL, line)
                self.enter(RSET)
                return
            self.enter(RCPT)
        elif state == RCPT:
            self._rcpt(line)
        elif state == DATA:
            if line[0] in "23":
                self.enter(BODY)
                return
            self.flush(PERMFAIL if line[0] == "5" else TEMPFAIL, line)
            self.enter(RSET)
        elif state in (EOM, LMTP_EOM):
            result = OK if line[0] == "2" else PERMFAIL if line[0] == "5" else TEMPFAIL
            if result == OK:
                self.msgtried = 0
                self.msgcount += 1
            self.flush(result, line, count=1 if self.relay.url.lmtp else 0)
            if self.task is not None:
                self.rcptcount -= 1
                self.enter(LMTP_EOM)
            else:
                self.rcptcount = 0
                self.enter(READY)
        elif state == RSET:
            self.rcptcount = 0
            self.enter(READY)

    def _rcpt(self, line: str) -> None:
        task = self.task
        assert task is not None
        e = task.envelopes[self.current]
        if line[0] == "2":
            self.current += 1
        else:
            result = PERMFAIL if line[0] == "5" else TEMPFAIL
            task.envelopes.pop(self.current)
            self.mta.delivery_log(e, task, self.mta.network.source, self.relay.route_text(), result, line)
            self.mta.report(e.id, result, line)
            if not task.envelopes:
                self.task = None
                self.enter(RSET)
                return
        if self.current >= len(task.envelopes):
            self.enter(DATA)
        else:
            self.enter(RCPT)

    def flush(self, result: str, error: str, count: int = 0) -> None:
        """mta_flush_task(): log and report the task's envelopes (the first `count` only)."""
        task = self.task
        if task is None:
            return
        n = 0
        while task.envelopes:
            if count and n == count:
                return
            e = task.envelopes.pop(0)
            self.mta.delivery_log(e, task, self.mta.network.source, self.relay.route_text(), result, error)
            self.mta.report(e.id, result, error)
            n += 1
        self.task = None

    def error(self, text: str) -> None:
        """mta_error(): logged; the current task (if any) fails temporarily with this text."""
        if self.msgcount:
            sent = f"{self.msgcount} message{'s' if self.msgcount > 1 else ''} sent"
            self.log(f"smtp-out: Error on session {self.id:016x} after {sent}: {text}")
        else:
            self.log(f"{self.id:016x} mta error reason={text}")
        if self.task is not None:
            self.flush(TEMPFAIL, text)

    def free(self) -> None:
        if self.freed:
            return
        self.freed = True
        for timer in (self.hangon_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        if self.task is not None:  # a session ends with its task handed back
            self.relay.tasks.insert(0, self.task)
            self.task = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.mta.session_done(self)

    def abort(self) -> None:
        """smtpd stopped: the connection is cut, nothing more is logged."""
        self.freed = True
        for timer in (self.hangon_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        if self.transport is not None:
            self.transport.abort()
