"""The fake upstream of a relay run on a lab host serves that host only: not `nobody` next door.

The upstream listens on this machine's end of the test host's veth, an address every local user
can connect to. Only the test host's address is served; `nobody` gets the connection closed before
the banner, so it cannot ask the upstream whether a password is right. The real smtpd relays
through the same upstream in the same run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.pki import TestPki
from harness.relay import relay_run
from harness.targets.base import Bundle, OutgoingMail
from harness.targets.lab import LabHost
from harness.upstream import UpstreamServer, parse_profile
from harness.upstream.server import REFUSED_PEER

pytestmark = pytest.mark.lab

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody (the venv's may live under /root)
# What `nobody` sees of the upstream: its first bytes, or that it was cut off.
PROBE = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), 5) as s:
    try:
        print(repr(s.recv(100)))
    except ConnectionResetError:
        print("reset")
"""
PROFILE = parse_profile(
    'host = "smtp.example.net"\nport = 587\ntls = "none"\nauth = "optional"\n'
    '[[credentials]]\nuser = "alice@example.org"\npassword = "peer-test-pw"\n'
)
CONFIG = (
    "listen on socket\n"
    'action "out" relay host smtp+notls://smtp.example.net:587\nmatch from local for any action "out"\n'
)


def _as_nobody(host: str, port: int) -> str:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run a client as nobody")
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", PROBE, host, str(port)],
        user="nobody",
        group="nogroup",
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=20,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_nobody_is_refused_while_the_test_host_relays(lab_host: LabHost, relay_pki: TestPki) -> None:
    target = lab_host.target
    assert target is not None
    with relay_run(target, Bundle(CONFIG), PROFILE, relay_pki) as run:
        upstream = run.upstream
        seen = _as_nobody(upstream.host, upstream.port)
        refused = upstream.recorder.wait_for(lambda s: s.refused is not None, 10)
        run.send(OutgoingMail("root", ("bob@example.com",)))
        session, _ = run.wait_relayed(10)
    assert seen in ("b''", "reset")
    assert refused.refused == REFUSED_PEER and refused.replies == ()
    assert refused.peer.startswith(f"{lab_host.upstream_address}:")  # a local user's own address
    assert session.peer.startswith(f"{lab_host.address}:")  # smtpd, from inside the test host


def test_twin_an_upstream_without_the_allow_list_answers_nobody(
    lab_host: LabHost, relay_pki: TestPki
) -> None:
    with UpstreamServer(PROFILE, relay_pki, lab_host.upstream_address, 0) as upstream:
        seen = _as_nobody(upstream.host, upstream.port)
    assert seen.startswith("b'220 ")
