"""The fake upstream: a smarthost that answers like a provider and records the wire."""

from harness.upstream.policy import (
    Credential,
    Faults,
    Profile,
    ProfileError,
    load_profile,
    parse_profile,
    profile_from_data,
)
from harness.upstream.record import AuthAttempt, MessageRecord, Recorder, SessionRecord
from harness.upstream.server import UpstreamError, UpstreamServer, running_upstream

__all__ = [
    "AuthAttempt",
    "Credential",
    "Faults",
    "MessageRecord",
    "Profile",
    "ProfileError",
    "Recorder",
    "SessionRecord",
    "UpstreamError",
    "UpstreamServer",
    "load_profile",
    "parse_profile",
    "profile_from_data",
    "running_upstream",
]
