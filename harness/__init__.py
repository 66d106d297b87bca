"""relay-harness: end-to-end tests of OpenSMTPD relay configurations against a fake upstream."""

from harness.pki import CERT_KINDS, ServerCert, TestPki
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
    running_upstream,
)

__all__ = [
    "CERT_KINDS",
    "AuthAttempt",
    "Credential",
    "Faults",
    "MessageRecord",
    "Profile",
    "ProfileError",
    "Recorder",
    "ServerCert",
    "SessionRecord",
    "TestPki",
    "UpstreamError",
    "UpstreamServer",
    "load_profile",
    "parse_profile",
    "running_upstream",
]
