"""Passwords never leave in clear: every text the harness prints passes through a Redactor.

smtpd itself prints credentials in debug output (`got secret for ...: <base64 of the AUTH
PLAIN blob>`), and SMTP traces carry them base64-encoded, so redacting the plain password is
not enough: each password is also redacted in the encodings it travels in.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

MASK = "[REDACTED]"


class Redactor:
    def __init__(self, credentials: Iterable[tuple[str, str]] = ()) -> None:
        self._needles: set[str] = set()
        for user, password in credentials:
            self.add(user, password)

    def add(self, user: str, password: str) -> None:
        if not password:
            return
        forms = {
            password,
            f"\0{user}\0{password}",  # AUTH PLAIN blob
            f"{user}\0{user}\0{password}",
            f"{user}:{password}",  # the secrets table's "user:password"
        }
        self._needles.add(password)
        for form in forms:
            self._needles.add(base64.b64encode(form.encode()).decode())
        self._needles.add(base64.b64encode(password.encode()).decode().rstrip("="))

    def extend(self, other: Redactor) -> None:
        """Redact what `other` redacts, too (a target's redactor learning a run's credentials)."""
        self._needles |= other._needles

    def __call__(self, text: str) -> str:
        # Longest first, so an encoded blob is masked whole before a shorter needle cuts into it.
        for needle in sorted(self._needles, key=len, reverse=True):
            if needle in text:
                text = text.replace(needle, MASK)
        return text

    def __bool__(self) -> bool:
        return bool(self._needles)


def secrets_table_credentials(content: bytes) -> list[tuple[str, str]]:
    """(user, password) pairs of an smtpd secrets table: lines `label user:password`."""
    pairs = []
    for raw in content.decode("utf-8", "replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        parts = line.split(None, 1)
        if len(parts) == 2 and ":" in parts[1]:
            user, _, password = parts[1].strip().partition(":")
            pairs.append((user, password))
    return pairs
