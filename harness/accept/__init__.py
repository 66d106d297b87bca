"""`relay-harness accept`: acceptance checks on an existing mail host over SSH (after an upgrade).

`register(subparsers)` adds the subcommand to the CLI; the work is in `run` (orchestration and
reports), `facts` (what is read from the host) and `baseline` (before/after comparison).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add `accept` to an argparse subparsers object; its func returns the exit code."""
    from harness.accept.run import RELAY_MODES, cmd_accept

    p: argparse.ArgumentParser = subparsers.add_parser(
        "accept",
        help="read-only acceptance checks of an existing mail host over SSH (before/after an upgrade)",
        description="Check, without changing anything on it, that a host's OpenSMTPD still relays as before.",
    )
    p.add_argument("url", metavar="ssh://USER@HOST[:PORT]", help="the host to check")
    p.add_argument("--identity", type=Path, help="SSH private key (default: agent and ~/.ssh keys)")
    p.add_argument("--known-hosts", type=Path, help="known_hosts file with the host's key (besides ~/.ssh)")
    p.add_argument(
        "--upstream", type=Path, metavar="PROFILE.toml", help="provider profile for the relay probe"
    )
    p.add_argument("--baseline", type=Path, metavar="FILE.json", help="compare with a saved baseline")
    p.add_argument(
        "--save-baseline", type=Path, metavar="FILE.json", help="save this run's facts as a baseline"
    )
    p.add_argument("--report-json", type=Path, metavar="FILE", help="write the report as JSON here")
    p.add_argument(
        "--junit", type=Path, metavar="FILE", help="write a JUnit XML report (one testcase per check)"
    )
    p.add_argument(
        "--config", help="smtpd.conf path on the host (default /etc/smtpd.conf, /etc/mail/smtpd.conf)"
    )
    p.add_argument("--mail-log", help="mail log on the host (default /var/log/mail.log or /var/log/maillog)")
    p.add_argument("--no-relay", action="store_true", help="skip the relay probe (facts only)")
    p.add_argument(
        "--relay-mode",
        choices=RELAY_MODES,
        default="auto",
        help="where the relay probe runs: sandbox = a second smtpd in private namespaces on the host "
        "(its binary, config and tables as they are), lab = the host's files copied into a local lab "
        "host, auto = the sandbox when the host can run it (default)",
    )
    p.set_defaults(func=cmd_accept)
