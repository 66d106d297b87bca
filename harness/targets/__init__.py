"""Where a config runs; every target answers the one interface in `base`."""

from harness.targets.base import (
    SMTPD_CONF,
    Bundle,
    BundleFile,
    ConfigCheck,
    LogFollower,
    OutgoingMail,
    Target,
    TargetError,
)
from harness.targets.lab import Lab, LabError, LabHost, clean_stale
from harness.targets.ssh import CommandResult, SshTarget

__all__ = [
    "SMTPD_CONF",
    "Bundle",
    "BundleFile",
    "CommandResult",
    "ConfigCheck",
    "Lab",
    "LabError",
    "LabHost",
    "LogFollower",
    "OutgoingMail",
    "SshTarget",
    "Target",
    "TargetError",
    "clean_stale",
]
