"""relay-harness: end-to-end tests of OpenSMTPD relay configurations against a fake upstream.

The public API, left to right as mail flows: a check or a scenario case submits to a target (a
lab test host, a sandbox on any host over SSH) running the real smtpd, which relays to the fake
upstream; `relay_run` wires one config to one upstream on one target.

Names are imported on first use (PEP 562), so that `import harness` (the pytest plugin does it
in every pytest run of a user's environment) loads neither paramiko, aiosmtpd nor cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "HarnessError": "harness.errors",
    "Bundle": "harness.targets.base",
    "BundleFile": "harness.targets.base",
    "OutgoingMail": "harness.targets.base",
    "Target": "harness.targets.base",
    "SmtpdTarget": "harness.targets.smtpd",
    "Lab": "harness.targets.lab",
    "LabHost": "harness.targets.lab",
    "TestPki": "harness.pki",
    "Profile": "harness.upstream",
    "load_profile": "harness.upstream",
    "UpstreamServer": "harness.upstream",
    "RelayRun": "harness.relay",
    "relay_run": "harness.relay",
    "CheckInput": "harness.check",
    "run_check": "harness.check",
    "load_scenario": "harness.scenarios",
    "run_case": "harness.scenarios",
}

__all__ = [
    "Bundle",
    "BundleFile",
    "CheckInput",
    "HarnessError",
    "Lab",
    "LabHost",
    "OutgoingMail",
    "Profile",
    "RelayRun",
    "SmtpdTarget",
    "Target",
    "TestPki",
    "UpstreamServer",
    "load_profile",
    "load_scenario",
    "relay_run",
    "run_case",
    "run_check",
]

if TYPE_CHECKING:
    from harness.check import CheckInput, run_check
    from harness.errors import HarnessError
    from harness.pki import TestPki
    from harness.relay import RelayRun, relay_run
    from harness.scenarios import load_scenario, run_case
    from harness.targets.base import Bundle, BundleFile, OutgoingMail, Target
    from harness.targets.lab import Lab, LabHost
    from harness.targets.smtpd import SmtpdTarget
    from harness.upstream import Profile, UpstreamServer, load_profile


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
