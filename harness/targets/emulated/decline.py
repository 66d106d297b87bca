"""What the emulation does not model, said as such: it never guesses what smtpd would do."""

from __future__ import annotations

from harness.targets.base import TargetError


class Declined(TargetError):
    """A construct outside the model: the run cannot say what the real smtpd would do.

    Not the config's fault (check exits 2, a scenario is skipped); the real smtpd on a lab test
    host can run it.
    """

    def __init__(self, construct: str, line: int | None) -> None:
        self.construct = construct
        self.line = line
        where = f" at line {line}" if line else ""
        super().__init__(f"emulated target cannot model {construct}{where}: use --target lab")
