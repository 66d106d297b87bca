"""The one error `accept` raises for a host it cannot check (exit 2)."""

from __future__ import annotations

from harness.errors import HarnessError


class AcceptError(HarnessError):
    """The harness cannot do its job on this host (unreachable, no sudo, no OpenSMTPD): exit 2."""
