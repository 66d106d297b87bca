"""Immutable records of what crossed the wire at the fake upstream, and a recorder to await.

Records are the harness's truth about the wire (DESIGN.md): a scenario passes or fails on them,
so they hold facts only (never a password) and are published as snapshots while a session is
still open, because smtpd keeps a relay session open for seconds after a delivery and a check
must not wait for the session to end to see the message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.waiting import Subscribers

TlsMode = Literal["starttls", "implicit", "none"]


@dataclass(frozen=True)
class AuthAttempt:
    mechanism: str
    user: str
    success: bool
    over_tls: bool


@dataclass(frozen=True)
class MessageRecord:
    mail_from: str
    rcpt_to: tuple[str, ...]
    rejected_rcpt_to: tuple[str, ...]
    size: int
    reply: str
    accepted: bool
    body: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class SessionRecord:
    id: int
    peer: str
    listener: str
    protocol: str
    tls: TlsMode
    tls_version: str | None
    tls_cipher: str | None
    tls_error: str | None
    ehlo: str | None
    auth: tuple[AuthAttempt, ...]
    messages: tuple[MessageRecord, ...]
    replies: tuple[str, ...]
    started: float
    ended: float | None
    refused: str | None = None  # closed before the banner, and why (a peer not allowed)

    @property
    def closed(self) -> bool:
        return self.ended is not None

    @property
    def authenticated_user(self) -> str | None:
        return next((a.user for a in self.auth if a.success), None)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; the body as text so a record file stays readable by people."""
        out = dataclasses.asdict(self)
        for msg in out["messages"]:
            msg["body"] = msg["body"].decode("utf-8", "replace")
        return out


SessionPredicate = Callable[[SessionRecord], bool]


class Recorder:
    """Collects session snapshots from the server thread; callers block or await on a predicate.

    `wait_for` wakes on every new snapshot (a condition variable), so a check returns the moment
    the fact it waits for is on the wire, and fails at its deadline with what was seen instead.
    """

    def __init__(self, on_closed: Callable[[SessionRecord], None] | None = None) -> None:
        self._sessions: dict[int, SessionRecord] = {}
        self._cond = threading.Condition()
        self._on_closed = on_closed
        self._news = Subscribers()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the server thread) on every new snapshot; returns the unsubscriber."""
        return self._news.subscribe(callback)

    def publish(self, snapshot: SessionRecord) -> None:
        with self._cond:
            self._sessions[snapshot.id] = snapshot
            self._cond.notify_all()
        self._news.notify()
        if snapshot.closed and self._on_closed is not None:
            self._on_closed(snapshot)

    @property
    def sessions(self) -> tuple[SessionRecord, ...]:
        with self._cond:
            return tuple(self._sessions.values())

    def messages(self) -> Iterator[tuple[SessionRecord, MessageRecord]]:
        for session in self.sessions:
            for message in session.messages:
                yield session, message

    def clear(self) -> None:
        with self._cond:
            self._sessions.clear()

    def wait_for(self, predicate: SessionPredicate, timeout: float) -> SessionRecord:
        """The first session snapshot satisfying `predicate`; TimeoutError naming what was seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for snapshot in self._sessions.values():
                    if predicate(snapshot):
                        return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no upstream session matched within {timeout:g}s; seen: {self.summary()}"
                    )
                self._cond.wait(remaining)

    async def wait_for_async(self, predicate: SessionPredicate, timeout: float) -> SessionRecord:
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    def wait_for_message(
        self, predicate: Callable[[SessionRecord, MessageRecord], bool], timeout: float
    ) -> tuple[SessionRecord, MessageRecord]:
        session = self.wait_for(lambda s: any(predicate(s, m) for m in s.messages), timeout)
        return session, next(m for m in session.messages if predicate(session, m))

    def summary(self) -> str:
        """One line a session, for failure messages; no bodies, no secrets."""
        sessions = list(self._sessions.values())
        if not sessions:
            return "no sessions"
        parts = []
        for s in sessions:
            auth = ",".join(f"{a.mechanism}:{a.user}:{'ok' if a.success else 'failed'}" for a in s.auth)
            msgs = ";".join(f"{m.mail_from}->{','.join(m.rcpt_to)}={m.reply}" for m in s.messages)
            last = s.replies[-1] if s.replies else "-"
            if s.refused:
                parts.append(f"[#{s.id} peer={s.peer} refused: {s.refused}]")
                continue
            parts.append(
                f"[#{s.id} tls={s.tls} ehlo={s.ehlo} auth={auth or '-'} msgs={msgs or '-'} "
                f"last_reply={last!r}]"
            )
        return " ".join(parts)


@dataclass
class SessionBuilder:
    """The mutable side, owned by one connection in the server thread."""

    id: int
    peer: str
    listener: str
    protocol: str
    tls: TlsMode = "none"
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_error: str | None = None
    ehlo: str | None = None
    auth: list[AuthAttempt] = field(default_factory=list)
    messages: list[MessageRecord] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    refused: str | None = None

    def snapshot(self) -> SessionRecord:
        return SessionRecord(
            id=self.id,
            peer=self.peer,
            listener=self.listener,
            protocol=self.protocol,
            tls=self.tls,
            tls_version=self.tls_version,
            tls_cipher=self.tls_cipher,
            tls_error=self.tls_error,
            ehlo=self.ehlo,
            auth=tuple(self.auth),
            messages=tuple(self.messages),
            replies=tuple(self.replies),
            started=self.started,
            ended=self.ended,
            refused=self.refused,
        )
