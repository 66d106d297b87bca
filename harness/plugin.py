"""pytest plugin (entry point `relay_harness`): fixtures for the test PKI, the lab and its hosts.

Lab fixtures skip where the lab cannot run (not root, no OpenSMTPD) on a developer's machine,
but fail under CI=true: a CI run that silently skipped every real test would be a green lie.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.pki import TestPki
from harness.targets.lab import Lab, LabError, LabHost, check_environment


def _lab_unavailable() -> str | None:
    try:
        check_environment()
    except LabError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def relay_pki() -> TestPki:
    """The test CA every lab host trusts and every fake upstream's certificate comes from."""
    return TestPki()


@pytest.fixture(scope="session")
def relay_lab(relay_pki: TestPki) -> Iterator[Lab]:
    """One lab per test session (per xdist worker); removed with everything in it at the end."""
    why = _lab_unavailable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the lab cannot run under CI: {why}", pytrace=False)
        pytest.skip(f"lab unavailable: {why}")
    lab = Lab(relay_pki.ca_pem)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def lab_host(relay_lab: Lab) -> Iterator[LabHost]:
    """A fresh test host per test (about 0.2 s): no state leaks from one test to the next."""
    host = relay_lab.create_host()
    try:
        yield host
    finally:
        relay_lab.destroy_host(host)
