"""`--target SPEC` → a target: the one place check, the scenario plugin and accept turn one.

SPEC is `lab` (a test host built here; the default), `lab:RELEASE` (a test host running another
Debian release's sshd and smtpd from an image, built on first use; the machine's own release is
plain `lab`), `ssh://USER@HOST[:PORT]` (a sandbox on an existing host: its own smtpd binary,
nothing on it modified), or `emulated` (an in-process model of OpenSMTPD 6.8: no root, no smtpd;
what it does not model it declines, exit 2). Where the host cannot sandbox (not Linux, no
unshare, or the config needs what the sandbox lacks), the run falls back to the lab and says
why, naming the host's smtpd version.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.pki import TestPki
from harness.targets.base import Target, TargetError

T = TypeVar("T")
SPECS = "lab, lab:RELEASE (e.g. lab:trixie), emulated or ssh://USER@HOST[:PORT]"


@dataclass(frozen=True)
class TargetSpec:
    """A parsed --target: its kind and, for ssh, how to reach the host."""

    text: str
    kind: str  # "lab", "emulated" or "ssh"
    identity: Path | None = None
    known_hosts: Path | None = None
    release: str | None = None  # lab:RELEASE of another release than the machine's: its image


def parse_target(
    text: str, identity: Path | None = None, known_hosts: Path | None = None, flag: str = "--target"
) -> TargetSpec:
    """The spec, or HarnessError naming `flag` (pytest's is --relay-target) and what is wrong."""
    if text in ("lab", "emulated"):
        return TargetSpec(text, text)
    if text.startswith("lab:"):
        from harness.targets.images import check_release_name, machine_release

        release = check_release_name(text.removeprefix("lab:"))
        return TargetSpec(text, "lab", release=None if release == machine_release() else release)
    if text.startswith("ssh://"):
        from harness.targets.shell import parse_ssh_url

        try:
            parse_ssh_url(text)
        except TargetError as exc:
            raise HarnessError(f"{flag} {exc}") from None
        return TargetSpec(text, "ssh", identity, known_hosts)
    raise HarnessError(f"{flag} {text!r}: expected {SPECS}")


@contextlib.contextmanager
def lab_target(pki: TestPki, release: str | None = None) -> Iterator[Target]:
    """One fresh lab test host (of `release`'s image, or of this machine), removed afterwards."""
    from harness.targets.lab import Lab

    with Lab(pki.ca_pem) as lab:
        host = lab.create_host(release=release)
        assert host.target is not None
        yield host.target


@contextlib.contextmanager
def host_sandbox(spec: TargetSpec, service_port: int) -> Iterator[Target]:
    """The host's own smtpd in a sandbox on it; SandboxUnavailable when the host cannot."""
    from harness.targets.sandbox import SandboxUnavailable, probe_capability, sandbox_target
    from harness.targets.shell import as_root, connect, find_smtpd, smtpd_version

    shell = connect(spec.text, spec.identity, spec.known_hosts)
    try:
        root = as_root(shell)
        smtpd = find_smtpd(root)
        if smtpd is None:
            raise TargetError(f"{shell.name}: OpenSMTPD is not installed (no smtpd on PATH)")
        number = smtpd_version(root.run(f"{shlex.quote(smtpd)} -h 2>&1").output)
        version = f"OpenSMTPD {number}" if number else ""
        capability = probe_capability(root.run)
        if capability.reason is not None:
            raise SandboxUnavailable(f"{shell.name} ({version or 'OpenSMTPD'}): {capability.reason}")
        target, _ = sandbox_target(root, smtpd.rpartition("/")[0], capability, service_port)
        target.notes = (f"ran in a sandbox on {shell.name} with the host's {smtpd} ({version or '?'})",)
        try:
            yield target
        finally:
            target.close()
    finally:
        shell.close()


def run_on(
    spec: TargetSpec, pki: TestPki, service_port: int, work: Callable[[Target], T]
) -> tuple[T, list[str]]:
    """`work` on the target SPEC names; on an ssh host that cannot sandbox, on the lab instead.

    Returns what `work` returned and notes saying where it ran (and why not where asked).
    """
    if spec.kind == "emulated":
        from harness.targets.emulated import EmulatedTarget

        with EmulatedTarget() as emulated:
            return work(emulated), list(emulated.notes)
    from harness.targets.smtpd import EnclosureLimit

    if spec.kind == "ssh":
        try:
            with host_sandbox(spec, service_port) as target:
                return work(target), list(target.notes)
        except EnclosureLimit as exc:
            why = str(exc)
        notes = [f"{spec.text}: the sandbox cannot run this ({why}); ran in the local lab instead"]
    else:
        notes = []
    with lab_target(pki, spec.release) as target:
        return work(target), [*notes, *target.notes]
