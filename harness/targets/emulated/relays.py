"""mta.c's bookkeeping: relays (a smarthost as smtpd keys it), their tasks and routes.

A task is one message's envelopes for one relay (one MAIL FROM, several RCPT TO); a route is
the relay's address as smtpd dials it, disabled for 15 s (then 60, 135, ...) when a first
session on it never got as far as sending mail.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.smtpdconf.relayurl import RelayUrl
from harness.targets.emulated.config import Dispatcher

if TYPE_CHECKING:
    from harness.targets.emulated.mta_session import MtaSession

OK, TEMPFAIL, PERMFAIL = "Ok", "TempFail", "PermFail"
ROUTE_DELAY_BASE = 15
ROUTE_DELAY_MAX = 3600


@dataclass
class MtaEnvelope:
    """mta.c's `struct mta_envelope`: one recipient of one task."""

    id: int
    dest: str
    rcpt: str | None  # the original recipient when an alias changed it
    creation: float
    session: int = 0


@dataclass
class Task:
    msgid: int
    sender: str
    envelopes: list[MtaEnvelope] = field(default_factory=list)


@dataclass
class Route:
    """[] <-> ADDRESS (PTR): source-less route to one address of the smarthost."""

    address: str
    ptr: str | None
    new: bool = True
    disabled_until: float = 0.0
    penalty: int = 0

    def text(self) -> str:
        return f"[] <-> {self.host_text()}"

    def host_text(self) -> str:
        return f"{self.address} ({self.ptr})" if self.ptr else self.address


@dataclass
class Relay:
    """One smarthost as smtpd keys it: URL parts, auth, helo, ca and the action's TLS options."""

    url: RelayUrl
    dispatcher: Dispatcher
    tls: str  # opportunistic, starttls, smtps, no
    verify: bool
    tasks: list[Task] = field(default_factory=list)
    secret: str | None = None
    route: Route | None = None
    session: MtaSession | None = None
    reconnect: asyncio.TimerHandle | None = None
    draining: bool = False

    def route_text(self) -> str:
        return self.route.host_text() if self.route is not None else self.url.host

    def text(self) -> str:
        """mta_relay_to_text()."""
        scheme = {"opportunistic": "smtp", "starttls": "smtp+tls", "smtps": "smtps"}.get(self.tls)
        scheme = scheme or ("lmtp" if self.url.lmtp else "smtp+notls")
        out = f"[relay:{self.url.host},port={self.url.port},{scheme}"
        if self.url.label:
            out += f",auth={self.dispatcher.auth}:{self.url.label}"
        out += ",mx"
        if self.dispatcher.helo:
            out += f",heloname={self.dispatcher.helo}"
        return out + "]"
