"""Waiting on several event sources at once (the upstream's records and smtpd's log).

A probe is decided by whichever comes first: the upstream accepting the message or smtpd
logging a failure. Each source calls back on news; nothing here sleeps for a guess.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Subscribers:
    """The callbacks an event source calls on news (a new log line, a new record snapshot)."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Add `callback`; returns the function that removes it again."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def notify(self) -> None:
        for callback in list(self._callbacks):
            callback()


class EventSource(Protocol):
    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]: ...


def wait_until(decide: Callable[[], T | None], sources: list[EventSource], timeout: float) -> T | None:
    """`decide()`'s first non-None answer, re-asked on every event; None at the deadline."""
    news = threading.Event()
    unsubscribe = [source.subscribe(news.set) for source in sources]
    deadline = time.monotonic() + timeout
    try:
        while True:
            answer = decide()
            if answer is not None:
                return answer
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not news.wait(remaining):
                return decide()
            news.clear()
    finally:
        for stop in unsubscribe:
            stop()
