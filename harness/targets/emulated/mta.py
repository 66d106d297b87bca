"""mta.c: queued envelopes to relays and sessions, and their results back to the queue.

Before a session, smtpd resolves what the relay needs, in this order and with these words:
the smarthost URL (`Failed to parse smarthost`), the action's auth table for a label
(`No auth table on action`), `tls` against a plain scheme, the label's credentials
(`credentials not found`), the host's address (`Failed to resolve MX`). Those lookups are
asynchronous in smtpd, so envelopes handed over together meet their answers together.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

from harness.smtpdconf.expect import rewrite_sender
from harness.smtpdconf.relayurl import RelayUrlError, parse_relay_url
from harness.targets.emulated.config import Dispatcher, Loaded
from harness.targets.emulated.message import duration_to_text
from harness.targets.emulated.mta_session import MtaSession
from harness.targets.emulated.network import Network
from harness.targets.emulated.relays import (
    ROUTE_DELAY_BASE,
    ROUTE_DELAY_MAX,
    TEMPFAIL,
    MtaEnvelope,
    Relay,
    Route,
    Task,
)
from harness.targets.emulated.tables import Service, credentials

Report = Callable[[int, str, str], None]  # evpid, result, status line


class Mta:
    """The relay side of the daemon: envelopes in, delivery results out (by `report`)."""

    def __init__(
        self,
        loaded: Loaded,
        hostname: str,
        network: Network,
        trusted_ca: Callable[[], bytes],
        log: Callable[[str], None],
        report: Report,
        message: Callable[[int], bytes],
        fatal: Callable[[], None],
    ) -> None:
        self.fatal = fatal
        self.loaded = loaded
        self.message = message
        self.hostname = hostname
        self.network = network
        self.trusted_ca = trusted_ca
        self.log = log
        self.report = report
        self.relays: dict[tuple[object, ...], Relay] = {}
        self.sessions: set[MtaSession] = set()

    # -- mta_handle_envelope() ----------------------------------------------------------------
    def handle(
        self, evpid: int, dispatcher: Dispatcher, sender: str, dest: str, rcpt: str, creation: float
    ) -> None:
        text = dispatcher.smarthost or ""
        try:
            url = parse_relay_url(text)
        except RelayUrlError:
            self.log(f"warn: Failed to parse smarthost {text}")
            self.report(evpid, TEMPFAIL, "Cannot parse smarthost")
            return
        if url.label is not None and dispatcher.auth is None:
            self.log(f'warn: No auth table on action "{dispatcher.name}" for relay {text}')
            self.report(evpid, TEMPFAIL, "No auth table for relaying")
            return
        tls = {
            "starttls-optional": "opportunistic",
            "starttls-required": "starttls",
            "implicit": "smtps",
        }.get(url.tls_mode, "no")
        if dispatcher.tls_required:
            if tls == "no":
                self.log(f'warn: TLS required for action "{dispatcher.name}"')
                self.report(evpid, TEMPFAIL, "TLS required for relaying")
                return
            if tls == "opportunistic":
                tls = "starttls"
        verify = tls in ("starttls", "smtps") and not dispatcher.tls_noverify
        key = (
            url.host,
            url.port,
            tls,
            url.lmtp,
            url.label,
            dispatcher.auth,
            dispatcher.helo,
            dispatcher.ca,
            verify,
        )
        relay = self.relays.get(key)
        if relay is None:
            relay = self.relays[key] = Relay(url, dispatcher, tls, verify)
        msgid = evpid >> 32
        task = next((t for t in relay.tasks if t.msgid == msgid), None)
        if task is None:
            task = Task(msgid, rewrite_sender(dispatcher.mail_from, sender))
            relay.tasks.append(task)
        task.envelopes.append(MtaEnvelope(evpid, dest, rcpt if rcpt != dest else None, creation))
        if not relay.draining:
            # smtpd asks lka for the secret and the address asynchronously: envelopes handed
            # over together (one scheduler batch) meet those answers together.
            relay.draining = True
            asyncio.get_running_loop().call_soon(self._drain, relay)

    def _drain(self, relay: Relay) -> None:
        """mta_drain(): the secret, the host's address, then a session unless one is running."""
        relay.draining = False
        if not relay.tasks:
            return
        if relay.url.label is not None and relay.secret is None:
            table = self.loaded.tables.get(relay.dispatcher.auth or "")
            value = table.lookup(Service.CREDENTIALS, relay.url.label) if table is not None else None
            creds = credentials(value, relay.url.label) if value is not None else None
            if creds is None:
                if value is None:
                    self.log(f"warn: credentials not found for {relay.dispatcher.auth}:{relay.url.label}")
                self.log(f"warn: Failed to retrieve secret for {relay.text()}")
                self._flush(relay, TEMPFAIL, "Could not retrieve credentials")
                return
            relay.secret = base64.b64encode(f"\0{creds[0]}\0{creds[1]}".encode()).decode()
        if relay.route is None:
            addresses = self.network.resolve(relay.url.connect_host)
            if not addresses:
                self.log(f"smtp-out: Failed to resolve MX for {relay.text()}: Host not found")
                self._flush(relay, TEMPFAIL, "Host not found")
                return
            relay.route = Route(addresses[0], self.network.reverse(addresses[0]))
        if relay.session is not None:
            relay.session.wake()
            return
        now = time.time()
        if relay.route.disabled_until > now:
            if relay.reconnect is None:
                delay = relay.route.disabled_until - now
                relay.reconnect = asyncio.get_running_loop().call_later(delay, self._enable, relay)
            return
        session = MtaSession(self, relay)
        relay.session = session
        self.sessions.add(session)
        session.start()

    def _enable(self, relay: Relay) -> None:
        relay.reconnect = None
        route = relay.route
        if route is not None and route.disabled_until:
            self.log(f"smtp-out: Enabling route {route.text()}")
            route.disabled_until = 0.0
            route.new = True
        self._drain(relay)

    def _flush(self, relay: Relay, result: str, error: str) -> None:
        """mta_flush(): every queued envelope of the relay fails, logged with no session."""
        while relay.tasks:
            task = relay.tasks.pop(0)
            for e in task.envelopes:
                self.delivery_log(e, task, None, relay.url.host, result, error)
                self.report(e.id, result, error)

    def delivery_log(
        self, e: MtaEnvelope, task: Task, source: str | None, relay: str, result: str, status: str
    ) -> None:
        delay = time.time() - e.creation
        self.log(
            f"{e.session:016x} mta delivery evpid={e.id:016x} from=<{task.sender}> to=<{e.dest}> "
            f'rcpt=<{e.rcpt or "-"}> source="{source or "-"}" relay="{relay}" '
            f'delay={duration_to_text(delay)} result="{result}" stat="{status}"'
        )

    def session_done(self, session: MtaSession) -> None:
        """mta_free() + mta_route_collect(): a first session that never got ready disables the route."""
        relay = session.relay
        self.sessions.discard(session)
        if relay.session is session:
            relay.session = None
        route = relay.route
        if route is not None and route.new and not session.ready:
            route.penalty += 1
            delay = min(ROUTE_DELAY_BASE * route.penalty * route.penalty, ROUTE_DELAY_MAX)
            self.log(f"smtp-out: Disabling route {route.text()} for {delay}s")
            route.disabled_until = time.time() + delay
        self._drain(relay)

    def stop(self) -> None:
        for session in list(self.sessions):
            session.abort()
        for relay in self.relays.values():
            if relay.reconnect is not None:
                relay.reconnect.cancel()
