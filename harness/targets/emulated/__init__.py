"""An in-process model of OpenSMTPD 6.8's path from submission to relay, behind the Target
interface: `--target emulated` where no smtpd, root or namespaces are available.

Proven against the real smtpd by bench/differential.py; what it does not model it declines
(`Declined`, exit 2 from check, a skip in scenarios) instead of guessing.
"""

from harness.targets.emulated.decline import Declined
from harness.targets.emulated.target import EmulatedTarget

__all__ = ["Declined", "EmulatedTarget"]
