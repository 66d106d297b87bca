"""relay-harness: end-to-end tests of OpenSMTPD relay configurations against a fake upstream.

The public API, left to right as mail flows: scenarios and checks submit to a target (a lab test
host or any host over SSH) running the real smtpd, which relays to the fake upstream.
"""

from harness.check import CheckInput, CheckReport, ProbeResult, run_check
from harness.pki import CERT_KINDS, ServerCert, TestPki
from harness.redact import Redactor
from harness.relay import DELIVERY, ConfigRejected, RelayRun, relay_run
from harness.scenarios import Case, CaseOutcome, Scenario, ScenarioError, load_scenario, run_case
from harness.targets import (
    Bundle,
    BundleFile,
    ConfigCheck,
    Lab,
    LabError,
    LabHost,
    LogFollower,
    OutgoingMail,
    SshTarget,
    Target,
    TargetError,
    clean_stale,
)
from harness.upstream import (
    AuthAttempt,
    Credential,
    Faults,
    MessageRecord,
    Profile,
    ProfileError,
    Recorder,
    SessionRecord,
    UpstreamError,
    UpstreamServer,
    load_profile,
    parse_profile,
    profile_from_data,
    running_upstream,
)

__all__ = [
    "CERT_KINDS",
    "DELIVERY",
    "AuthAttempt",
    "Bundle",
    "BundleFile",
    "Case",
    "CaseOutcome",
    "CheckInput",
    "CheckReport",
    "ConfigCheck",
    "ConfigRejected",
    "Credential",
    "Faults",
    "Lab",
    "LabError",
    "LabHost",
    "LogFollower",
    "MessageRecord",
    "OutgoingMail",
    "ProbeResult",
    "Profile",
    "ProfileError",
    "Recorder",
    "Redactor",
    "RelayRun",
    "Scenario",
    "ScenarioError",
    "ServerCert",
    "SessionRecord",
    "SshTarget",
    "Target",
    "TargetError",
    "TestPki",
    "UpstreamError",
    "UpstreamServer",
    "clean_stale",
    "load_profile",
    "load_scenario",
    "parse_profile",
    "profile_from_data",
    "relay_run",
    "run_case",
    "run_check",
    "running_upstream",
]
