"""The emulated smtpd at run time: submission sessions, the queue and its scheduler, local
delivery (mbox) and bounces, with the relay side in mta.py; one asyncio loop in one thread.

Every state change happens on the loop, so log lines come out in one order, as from smtpd's
processes writing to one stderr. Callers in other threads (the Target methods) hand their work
to the loop and wait for its answer, as `sendmail` waits for smtpd to commit a message.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from harness.targets.base import OutgoingMail
from harness.targets.emulated.config import Dispatcher, Listener, Loaded
from harness.targets.emulated.decline import Declined
from harness.targets.emulated.expand import Delivery, Refused, expand
from harness.targets.emulated.host import EmulatedHost
from harness.targets.emulated.message import (
    bounce_message,
    duration_to_text,
    enqueue_headers,
    mbox_entry,
    received,
    stored_message,
    uid,
)
from harness.targets.emulated.mta import Mta
from harness.targets.emulated.network import Network
from harness.targets.emulated.relays import OK, TEMPFAIL
from harness.targets.emulated.ruleset import Subject
from harness.targets.emulated.tables import MailAddr

T = TypeVar("T")
BACKOFF = {"mta": 400, "mda": 10}  # scheduler_ramqueue.c BACKOFF_TRANSFER / BACKOFF_DELIVERY
BOUNCE_DELAY = 1.0  # bounce.c: a bounce leaves one second after the failure


@dataclass
class Envelope:
    id: int
    kind: str  # mta or mda
    sender: str  # user@domain, "" for a bounce
    rcpt: str
    dest: str
    dispatcher: Dispatcher
    mda_user: str | None
    source: str  # local, inet4, inet6
    authenticated: bool
    creation: float
    retry: int = 0
    lasttry: float = 0.0
    nexttry: float = 0.0
    inflight: bool = False
    errorline: str = ""
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def msgid(self) -> int:
        return self.id >> 32


class SubmissionFailed(Exception):
    """What the submitting program printed and its exit code, when it fails."""

    def __init__(self, output: str, code: int) -> None:
        super().__init__(output)
        self.output, self.code = output, code


class Daemon:
    def __init__(
        self, host: EmulatedHost, loaded: Loaded, network: Network, log: Callable[[str], None]
    ) -> None:
        self.host = host
        self.loaded = loaded
        self.network = network
        self.log = log
        self.envelopes: dict[int, Envelope] = {}
        self.messages: dict[int, bytes] = {}
        self.mailboxes: dict[str, bytearray] = {}
        self.paused: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.mta = Mta(
            loaded,
            host.hostname,
            network,
            lambda: host.trusted_ca,
            self.log,
            self._mta_result,
            self.messages.__getitem__,
            self._fatal,
        )
        self.on_exit: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._run, name=f"emulated-smtpd-{host.hostname}", daemon=True)

    # -- the loop -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self.call(self._startup)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop and return its result (or raise its exception) here."""

        async def run() -> T:
            return fn()

        return self.run(run())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            self.mta.stop()
            for evp in self.envelopes.values():
                if evp.timer is not None:
                    evp.timer.cancel()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self._thread.join(timeout=10)

    def _startup(self) -> None:
        self.log("info: OpenSMTPD 6.8.0p2 starting")
        for line in self.loaded.startup_log:
            self.log(line)
        for listener in self.loaded.listeners:
            shown = f"[{listener.address}]" if ":" in listener.address else listener.address
            self.log(f'debug: smtp: listen on {shown} port {listener.port} flags 0x400 pki "" ca ""')
        self.log("debug: smtp: will accept at most 9995 clients")
        self.log("debug: queue: done loading queue into scheduler")

    # -- submission ---------------------------------------------------------------------------
    def submit(self, mail: OutgoingMail) -> str:
        if mail.user not in self.host.users:
            raise Declined(f"submitting as {mail.user!r}, a user the host does not have", None)
        if mail.via == "sendmail":
            return self.call(lambda: self._sendmail(mail))
        return self.call(lambda: self._smtp(mail))

    def _sendmail(self, mail: OutgoingMail) -> str:
        """enqueue.c over the local socket: EHLO localhost, qualified addresses, stop at a refusal."""
        host = self.host.hostname
        sender = mail.sender if "@" in mail.sender else f"{mail.sender}@{host}"
        rcpts = [r if "@" in r else f"{r}@{host}" for r in mail.recipients]
        now = time.time()
        session = _Session(self, "local", host, "localhost", True)
        accepted = []
        for rcpt in rcpts:
            try:
                accepted.append((rcpt, session.rcpt(sender, rcpt)))
            except Refused as refused:
                reply = f"{refused.reply}: <{rcpt}>"
                session.failed(f"RCPT TO:<{rcpt}> ", reply, "disconnect")
                raise SubmissionFailed(f"sendmail: command failed: {reply}", 70) from None
        raw = enqueue_headers(mail.as_bytes(), now)
        session.commit(sender, accepted, raw, now, add_date=True)
        return ""

    def _smtp(self, mail: OutgoingMail) -> str:
        """smtplib (as the lab target's submission runs it) to a listener of the host."""
        address, port = mail.smtp_address, mail.smtp_port
        where = f"SMTP to {address}:{port}"
        if address not in self.host.addresses:
            raise Declined(f"SMTP submission to {address}, an address the host does not have", None)
        listener = next(
            (lst for lst in self.loaded.listeners if (lst.address, lst.port) == (address, port)), None
        )
        if listener is None:
            raise SubmissionFailed(f"{where}: [Errno 111] Connection refused", 1)
        host = self.host.hostname
        helo = host  # smtplib's socket.getfqdn() on the host
        session = _Session(self, address, self.network.reverse(address) or address, helo, False, listener)
        sender = mail.sender if "@" in mail.sender else f"{mail.sender}@{host}"
        accepted, refused = [], {}
        for rcpt_text in mail.recipients:
            rcpt = rcpt_text if "@" in rcpt_text else f"{rcpt_text}@{host}"
            try:
                accepted.append((rcpt, session.rcpt(sender, rcpt)))
            except Refused as exc:
                reply = f"{exc.reply}: <{rcpt}>"
                session.failed(f"rcpt TO:<{rcpt_text}>", reply, None)
                code, _, text = reply.partition(" ")
                refused[rcpt_text] = (int(code), text.encode())
        if not accepted:
            session.disconnect("quit")
            import smtplib  # for its words only, here: not paid by every check

            raise SubmissionFailed(f"{where}: {smtplib.SMTPRecipientsRefused(refused)}", 1)
        now = time.time()
        session.commit(sender, accepted, mail.as_bytes(), now, add_date=listener.local or port == 587)
        return "\n".join(f"refused {r}: {code} {text.decode()}" for r, (code, text) in refused.items())

    # -- the queue ----------------------------------------------------------------------------
    def _fatal(self) -> None:
        """A fatalx() in one of smtpd's processes: the daemon exits, its log ends."""
        self.mta.stop()
        self.paused.update(("mta", "mda"))
        self.on_exit()

    def commit(self, envelopes: list[Envelope], message: bytes) -> None:
        """queue_commit(): the scheduler then takes a message's envelopes in evpid order."""
        self.messages[envelopes[0].msgid] = message
        for evp in sorted(envelopes, key=lambda e: e.id):
            self.envelopes[evp.id] = evp
            evp.nexttry = evp.creation
            self.loop.call_soon(self._schedule, evp)

    def _schedule(self, evp: Envelope) -> None:
        if evp.id not in self.envelopes or evp.inflight or evp.kind in self.paused:
            return
        if evp.nexttry > time.time():
            evp.timer = self.loop.call_at(self._loop_time(evp.nexttry), self._schedule, evp)
            return
        evp.timer = None
        evp.inflight = True
        evp.lasttry = time.time()
        if evp.kind == "mda":
            self._mda(evp)
        else:
            self.mta.handle(evp.id, evp.dispatcher, evp.sender, evp.dest, evp.rcpt, evp.creation)

    def _loop_time(self, when: float) -> float:
        return self.loop.time() + max(0.0, when - time.time())

    def _result(self, evp: Envelope, result: str, status: str) -> None:
        """queue.c + scheduler: Ok removes, TempFail retries after a backoff, PermFail bounces."""
        evp.inflight = False
        if result == OK:
            self._remove(evp)
            return
        if result == TEMPFAIL:
            evp.errorline = status
            evp.retry += 1
            base = BACKOFF[evp.kind]
            step = evp.retry
            while evp.creation + base * step * step <= time.time():
                step += 1
            evp.nexttry = evp.creation + base * step * step
            self._schedule(evp)
            return
        original = self.messages.get(evp.msgid, b"")
        self._remove(evp)
        if evp.sender:
            self.loop.call_later(BOUNCE_DELAY, self._bounce, evp, status, original)

    def _remove(self, evp: Envelope) -> None:
        self.envelopes.pop(evp.id, None)
        if not any(e.msgid == evp.msgid for e in self.envelopes.values()):
            self.messages.pop(evp.msgid, None)

    def _mta_result(self, evpid: int, result: str, status: str) -> None:
        evp = self.envelopes.get(evpid)
        if evp is not None:
            self._result(evp, result, status)

    def _bounce(self, failed: Envelope, status: str, original: bytes) -> None:
        """bounce.c: the failure notice, enqueued to the sender over the local socket."""
        host = self.host.hostname
        line = status[4:] if len(status) > 4 and status[0] in "16" else status
        now = time.time()
        notice = bounce_message(host, failed.sender, [(failed.dest, line)], original, now)
        session = _Session(self, "local", host, host, True)
        try:
            deliveries = session.rcpt("", failed.sender)
        except (Refused, Declined) as exc:
            self.log(f"warn: bounce to {failed.sender} refused: {exc}")
            return
        session.commit("", [(failed.sender, deliveries)], notice, now, add_date=False)

    # -- local delivery -----------------------------------------------------------------------
    def _mda(self, evp: Envelope) -> None:
        """mda.c + mail.local: append to /var/mail/USER, logged as smtpd logs it."""
        user = evp.mda_user or ""
        session = uid()
        self.log(f'mda: new user {session:016x} for "<getpwnam>:{user}"')
        message = self.messages[evp.msgid]
        entry = mbox_entry(evp.sender, evp.rcpt, message, time.time())
        self.mailboxes.setdefault(user, bytearray()).extend(entry)
        self.log(
            f"{session:016x} mda delivery evpid={evp.id:016x} from=<{evp.sender}> to=<{evp.dest}> "
            f"rcpt=<{evp.rcpt}> user={user} delay={duration_to_text(time.time() - evp.creation)} "
            "result=Ok stat=Delivered"
        )
        self._result(evp, OK, "Delivered")

    # -- smtpctl ------------------------------------------------------------------------------
    def control(self, args: tuple[str, ...]) -> str:
        if len(args) == 2 and args[0] in ("pause", "resume") and args[1] in ("mta", "mda", "smtp"):
            return self.call(lambda: self._pause(args[0], args[1]))
        if args == ("schedule", "all"):
            return self.call(self._schedule_all)
        raise Declined(f"`smtpctl {' '.join(args)}`", None)

    def _pause(self, verb: str, what: str) -> str:
        if verb == "pause":
            self.paused.add(what)
            self.log(f"info: {what} paused")
        else:
            self.paused.discard(what)
            self.log(f"info: {what} resumed")
            for evp in list(self.envelopes.values()):
                if evp.kind == what:
                    self._schedule(evp)
        return "command succeeded"

    def _schedule_all(self) -> str:
        for evp in list(self.envelopes.values()):
            if not evp.inflight:
                evp.nexttry = time.time()
                if evp.timer is not None:
                    evp.timer.cancel()
                self._schedule(evp)
        return "command succeeded"

    def show_queue(self) -> str:
        return self.call(self._show_queue)

    def _show_queue(self) -> str:
        """smtpctl.c show_queue_envelope(), one line per envelope, in the queue's order."""
        now = time.time()
        lines = []
        for evp in sorted(self.envelopes.values(), key=lambda e: e.id):
            status = "auth" if evp.authenticated else ""
            if evp.inflight:
                runstate = f"inflight|{int(now - evp.lasttry)}"
            else:
                runstate = f"pending|{int(evp.nexttry - now)}"
            lasttry = int(evp.lasttry) if evp.inflight or evp.retry else 0
            lines.append(
                f"{evp.id:016x}|{evp.source}|{evp.kind}|{status}|{evp.sender or '@'}|{evp.rcpt}|{evp.dest}|"
                f"{int(evp.creation)}|{int(evp.creation)}|{lasttry}|{evp.retry}|{runstate}|{evp.errorline}"
            )
        return "\n".join(lines)


class _Session:
    """One smtp-in session (smtp_session.c): RCPTs through lka, then the message committed."""

    def __init__(
        self,
        daemon: Daemon,
        address: str,
        rdns: str,
        helo: str,
        authenticated: bool,
        listener: Listener | None = None,
    ) -> None:
        self.daemon = daemon
        self.id = uid()
        self.address = address
        self.rdns = rdns
        self.helo = helo
        self.authenticated = authenticated
        self.source = "local" if address == "local" else ("inet6" if ":" in address else "inet4")
        daemon.log(f"{self.id:016x} smtp connected address={address} host={rdns}")

    def rcpt(self, sender: str, rcpt: str) -> list[Delivery]:
        sender_addr = MailAddr.parse(sender) if sender else MailAddr("", "")
        subject = Subject(self.address, sender_addr, MailAddr.parse(rcpt), authenticated=self.authenticated)
        return expand(self.daemon.loaded, self.daemon.host, subject, self.daemon.log)

    def failed(self, command: str, reply: str, disconnect: str | None) -> None:
        self.daemon.log(f'{self.id:016x} smtp failed-command command="{command}" result="{reply}"')
        if disconnect:
            self.disconnect(disconnect)

    def disconnect(self, reason: str) -> None:
        self.daemon.log(f"{self.id:016x} smtp disconnected reason={reason}")

    def commit(
        self, sender: str, accepted: list[tuple[str, list[Delivery]]], raw: bytes, now: float, add_date: bool
    ) -> None:
        daemon = self.daemon
        host = daemon.host.hostname
        msgid = secrets.randbits(32) or 1
        header = received(
            self.helo,
            self.rdns,
            self.address,
            host,
            True,
            self.authenticated,
            msgid,
            [r for r, _ in accepted],
            now,
        )
        message = stored_message(raw, hostname=host, header_prefix=header, add_date=add_date, when=now)
        daemon.log(
            f"{self.id:016x} smtp message msgid={msgid:08x} size={len(raw)} nrcpt={len(accepted)} proto=ESMTP"
        )
        envelopes: list[Envelope] = []
        for rcpt, deliveries in accepted:
            first = None
            for d in deliveries:
                evpid = (msgid << 32) | (secrets.randbits(32) or 1)
                first = first or evpid
                envelopes.append(
                    Envelope(
                        evpid,
                        "mda" if d.dispatcher.local else "mta",
                        sender,
                        rcpt,
                        str(d.dest),
                        d.dispatcher,
                        d.mda_user,
                        self.source,
                        self.authenticated,
                        now,
                    )
                )
            daemon.log(f"{self.id:016x} smtp envelope evpid={first:016x} from=<{sender}> to=<{rcpt}>")
        daemon.commit(envelopes, message)
        self.disconnect("quit")
