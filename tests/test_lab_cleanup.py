"""The lab leaves nothing behind and touches nothing of the machine's (DESIGN.md: "Everything
cleans up").

A test host is root-owned kernel state (namespaces, veths, overlay mounts) plus processes that are
not our children (smtpd is started by sshd's session), so a leak survives the test run and the
next run trips over it. These tests look at the machine itself (/run/netns, `ip link`,
/proc/*/ns/net, /tmp), never at the lab's own bookkeeping, which is what a bug would corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.pki import TestPki
from harness.relay import DELIVERY
from harness.targets.base import Bundle, BundleFile, OutgoingMail
from harness.targets.lab import PREFIX, TMP_PREFIX, Lab, LabHost, clean_stale
from harness.targets.smtpd import SmtpdTarget

pytestmark = pytest.mark.lab

# The relay goes to the host's upstream address where nothing listens: the mail stays queued in
# the host's spool (a refused connection is a temporary failure), which is what the spool tests need.
CONF = (
    "# {marker}\n"
    "table aliases file:/etc/mail/aliases\n"
    "listen on socket\n"
    "listen on lo0\n"
    'action "local_mail" mbox alias <aliases>\n'
    'action "outbound" relay host smtp://smtp.example.net:2525\n'
    'match from local for local action "local_mail"\n'
    'match from local for any action "outbound"\n'
)
ALIASES = BundleFile("/etc/mail/aliases", b"postmaster: root\n")
# The killed child's config: smtpd running with one relay route, nothing else to install.
CHILD_CONF = (
    "listen on socket\n"
    'action "outbound" relay host smtp://smtp.example.net:2525\n'
    'match from local for any action "outbound"\n'
)
SECRETS = BundleFile(
    "/etc/mail/secrets", b"label alice@example.org:cleanup-secret\n", 0o640, "root", "_smtpd", True
)
# What a bundle, `point`, `trust` and useradd write inside a host, plus the machine's identity.
MACHINE_FILES = (
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/smtpd.conf",
    "/etc/hostname",
    "/etc/mailname",
    "/etc/mail/aliases",
    "/etc/mail/secrets",
    "/etc/ssl/certs/ca-certificates.crt",
    "/var/log/lastlog",
    "/var/log/faillog",
    "/var/log/wtmp",
)
READY_TIMEOUT = 60.0

# A run killed after building a host and starting smtpd: the parent reads the "ready" line, then
# SIGKILLs it, so no finally clause and no atexit handler of the lab runs.
CHILD = """
import sys
from harness.pki import TestPki
from harness.targets.base import Bundle
from harness.targets.lab import Lab

lab = Lab(TestPki().ca_pem)
host = lab.create_host()
host.target.install(Bundle(sys.argv[1]))
host.target.point(["smtp.example.net"], host.upstream_address)
host.target.start()
print("ready", host.netns, host.veth, lab.dir, flush=True)
sys.stdin.read()  # never returns: the parent writes nothing and kills us
"""


def bundle(marker: str, users: tuple[str, ...] = ()) -> Bundle:
    return Bundle(CONF.format(marker=marker), (ALIASES,), users=users)


# --- looking at the machine ------------------------------------------------------------------


def _proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of a process, None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces and parens
    return fields[0], int(fields[19])


def _running(pid: int, start: int) -> bool:
    """The same process (not a reused pid) still exists and has not exited.

    A zombie counts as ended: it holds no namespace, mount or socket. Here zombies do appear, since
    smtpd's parent (sshd's session) dies first and the container's PID 1 does not reap orphans.
    """
    now = _proc_start(pid)
    return now is not None and now[1] == start and now[0] != "Z"


def _pids_in_netns(inode: int) -> list[int]:
    """Every live process whose network namespace is `inode`, from /proc, not from `ip netns`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            link = os.readlink(entry / "ns" / "net")
        except OSError:
            continue  # gone meanwhile, or a zombie (no namespaces left)
        if link == f"net:[{inode}]":
            found.append(int(entry.name))
    return found


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)[@:]", out, re.MULTILINE)}


@dataclass(frozen=True)
class Footprint:
    """What one test host put on the machine, taken while it runs."""

    netns: str
    veth: str
    inode: int
    processes: tuple[tuple[int, int], ...]  # (pid, start time): survives pid reuse
    directory: Path
    commands: frozenset[str]  # what ran inside: proves the check saw what must be gone

    @classmethod
    def of(cls, netns: str, veth: str, directory: Path) -> Footprint:
        inode = os.stat(f"/run/netns/{netns}").st_ino
        processes, commands = [], set()
        for pid in _pids_in_netns(inode):
            start = _proc_start(pid)
            with contextlib.suppress(OSError):
                commands.add(Path(f"/proc/{pid}/comm").read_text().strip())
            if start is not None:
                processes.append((pid, start[1]))
        return cls(netns, veth, inode, tuple(processes), directory, frozenset(commands))

    def leftovers(self) -> list[str]:
        """What is still there, in words; empty when the host is entirely gone."""
        left = []
        if self.netns in _netns_names() or Path(f"/run/netns/{self.netns}").exists():
            left.append(f"namespace {self.netns}")
        if self.veth in _links():
            left.append(f"veth {self.veth}")
        left += [f"process {pid} in the namespace" for pid in _pids_in_netns(self.inode)]
        left += [f"process {pid}" for pid, start in self.processes if _running(pid, start)]
        if self.directory.exists():
            left.append(f"directory {self.directory}")
        return left


def footprint(host: LabHost) -> Footprint:
    return Footprint.of(host.netns, host.veth, host.lab.dir)


def own_lab_leftovers(pid: int) -> list[str]:
    """Anything carrying this process's lab names: namespaces, veths, temp dirs."""
    left = [f"namespace {n}" for n in _netns_names() if n.startswith(f"{PREFIX}-{pid}-")]
    left += [f"veth {n}" for n in _links() if re.fullmatch(rf"{PREFIX}{pid}[hp]\d+", n)]
    left += [f"directory {p}" for p in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}{pid}-*")]
    return left


def start_smtpd_and_a_stray(target: SmtpdTarget) -> int:
    """smtpd running, plus a process detached from every SSH session (as a careless hook leaves);
    returns the stray's pid (known once forked, whatever it is named by then)."""
    target.install(bundle("cleanup"))
    target.point(["smtp.example.net"], target.upstream_address())
    target.start()
    return int(target.check("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout)


# --- Lab.close --------------------------------------------------------------------------------


@pytest.mark.parametrize("smtpd_running", [True, False], ids=["smtpd-running", "smtpd-stopped"])
def test_close_removes_namespaces_veths_processes_and_temp_dir(
    relay_pki: TestPki, smtpd_running: bool
) -> None:
    lab = Lab(relay_pki.ca_pem)
    stray: int | None = None
    try:
        first, second = lab.create_host(), lab.create_host()
        assert first.target is not None and second.target is not None
        stray = start_smtpd_and_a_stray(first.target) if smtpd_running else None
        prints = [footprint(first), footprint(second)]
    finally:
        lab.close()
    if stray is not None:  # the check saw what it must see gone
        assert {"sshd", "smtpd"} <= prints[0].commands
        assert stray in {pid for pid, _ in prints[0].processes}
    for fp in prints:
        assert fp.leftovers() == []
    assert not lab.dir.exists()


@pytest.mark.parametrize("smtpd_running", [True, False], ids=["smtpd-running", "smtpd-stopped"])
def test_an_exception_inside_with_lab_still_removes_everything(
    relay_pki: TestPki, smtpd_running: bool
) -> None:
    prints: list[Footprint] = []
    strays: list[int] = []
    with pytest.raises(RuntimeError, match="the body failed"), Lab(relay_pki.ca_pem) as lab:
        host = lab.create_host()
        assert host.target is not None
        if smtpd_running:
            strays.append(start_smtpd_and_a_stray(host.target))
        prints.append(footprint(host))
        raise RuntimeError("the body failed")
    assert prints and {pid for pid, _ in prints[0].processes} >= set(strays)
    if smtpd_running:
        assert "smtpd" in prints[0].commands
    assert prints[0].leftovers() == []
    assert not lab.dir.exists()


def test_destroy_host_removes_that_host_and_keeps_the_others(relay_pki: TestPki) -> None:
    """The per-test fixture path: a destroyed host is gone at once, its neighbour still answers."""
    with Lab(relay_pki.ca_pem) as lab:
        gone, kept = lab.create_host(), lab.create_host()
        assert gone.target is not None and kept.target is not None
        stray = start_smtpd_and_a_stray(gone.target)
        fp = footprint(gone)
        assert stray in {pid for pid, _ in fp.processes}
        lab.destroy_host(gone)
        assert fp.leftovers() == [f"directory {lab.dir}"]  # the lab's dir goes with the lab
        assert kept.target.check("hostname").stdout.strip() == kept.hostname


def test_two_labs_in_one_process_never_touch_each_others_hosts(relay_pki: TestPki) -> None:
    """Host names were numbered per Lab, so a second Lab's first host was `rh-PID-1` again: its
    `ip netns add` failed, and the failed host's cleanup killed and deleted the first Lab's host."""
    with Lab(relay_pki.ca_pem) as one:
        host_one = one.create_host()
        with Lab(relay_pki.ca_pem) as two:
            host_two = two.create_host()
            assert host_two.netns != host_one.netns and host_two.veth != host_one.veth
            assert host_two.target is not None
            assert host_two.target.check("hostname").stdout.strip() == host_two.hostname
        assert host_one.target is not None
        assert host_one.target.check("hostname").stdout.strip() == host_one.hostname
        assert host_one.netns in _netns_names()


# --- a killed run -----------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The child's first stdout line, waiting on the pipe (select) with a deadline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the child printed no line within {timeout:g}s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                break  # EOF: the child died; its stderr says why
            buf += chunk
    return buf.decode().partition("\n")[0]


@dataclass
class KilledRun:
    pid: int
    footprint: Footprint


@pytest.fixture
def killed_run(tmp_path: Path) -> Iterator[KilledRun]:
    """A child that built a host and started smtpd, SIGKILLed: its leftovers are on the machine."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), CHILD_CONF],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        line = _read_line(proc, READY_TIMEOUT)
        if not line.startswith("ready "):
            proc.kill()
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"child did not get ready: {line!r}\n{err.decode(errors='replace')}")
        _, netns, veth, directory = line.split()
        fp = Footprint.of(netns, veth, Path(directory))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)  # reaped: a zombie owner would still look alive to clean_stale
        yield KilledRun(proc.pid, fp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        clean_stale()  # whatever the test did, leave no stale host to the next run


def test_a_killed_run_leaves_a_host_behind_that_clean_stale_removes(killed_run: KilledRun) -> None:
    fp = killed_run.footprint
    # Without cleaning, the kill leaves everything running: this is what clean_stale is for.
    assert {"sshd", "smtpd"} <= fp.commands
    assert set(fp.leftovers()) >= {f"namespace {fp.netns}", f"veth {fp.veth}", f"directory {fp.directory}"}

    removed = clean_stale()

    assert f"namespace {fp.netns}" in removed
    assert f"directory {fp.directory}" in removed
    assert fp.leftovers() == []
    assert own_lab_leftovers(killed_run.pid) == []


def test_lab_clean_cli_reports_and_removes_a_killed_runs_host(killed_run: KilledRun) -> None:
    fp = killed_run.footprint
    cli = Path(sys.executable).parent / "relay-harness"
    done = subprocess.run([str(cli), "lab", "clean"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"removed namespace {fp.netns}" in lines
    assert f"removed directory {fp.directory}" in lines
    assert re.search(r"^relay-harness lab clean: \d+ item\(s\) removed$", done.stdout, re.MULTILINE)
    assert fp.leftovers() == []
    again = subprocess.run([str(cli), "lab", "clean"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    assert fp.netns not in again.stdout and str(fp.directory) not in again.stdout


# --- the machine's own files -------------------------------------------------------------------


def _machine_state() -> dict[str, str | None]:
    state: dict[str, str | None] = {}
    for path in MACHINE_FILES:
        try:
            state[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except FileNotFoundError:
            state[path] = None
    for directory in ("/var/mail", "/var/spool/smtpd"):
        try:
            state[directory] = " ".join(sorted(str(p) for p in Path(directory).rglob("*")))
        except (FileNotFoundError, PermissionError):
            state[directory] = None
    state["hostname"] = socket.gethostname()
    return state


def test_a_host_that_installed_a_bundle_leaves_the_machines_files_untouched(relay_pki: TestPki) -> None:
    before = _machine_state()
    with Lab(relay_pki.ca_pem) as lab:
        host = lab.create_host()
        target = host.target
        assert target is not None
        target.install(Bundle(CONF.format(marker="machine files"), (ALIASES, SECRETS), ("alice", "bob")))
        target.point(["smtp.example.net", "smtp.example.com"], host.upstream_address)
        target.trust(relay_pki.ca_pem)
        log = target.start()
        mark = log.mark()
        target.submit(OutgoingMail("root", ("root",), subject="stays in the host"))
        log.wait_for(DELIVERY, 10, since=mark)
        # The writes happened, inside the host ...
        assert "alice:" in target.check("cat /etc/passwd").stdout
        assert "smtp.example.com" in target.check("cat /etc/hosts").stdout
        assert "machine files" in target.check("cat /etc/smtpd.conf").stdout
        assert b"stays in the host" in target.mailbox("root")
        # ... and not on the machine, while the host runs and after it is gone.
        assert _machine_state() == before
    assert _machine_state() == before


def test_two_hosts_at_once_do_not_see_each_others_config_or_spool(relay_lab: Lab, lab_host: LabHost) -> None:
    other = relay_lab.create_host()
    try:
        a, b = lab_host.target, other.target
        assert a is not None and b is not None
        for host, target in ((lab_host, a), (other, b)):
            target.install(bundle(f"config of {host.hostname}"))
            target.point(["smtp.example.net"], host.upstream_address)
        log_a = a.start()
        b.start()
        assert a.check("cat /etc/smtpd.conf").stdout.startswith(f"# config of {lab_host.hostname}\n")
        assert b.check("cat /etc/smtpd.conf").stdout.startswith(f"# config of {other.hostname}\n")

        mark = log_a.mark()
        a.submit(OutgoingMail("root", ("bob@example.com",), subject="queued on A"))
        a.submit(OutgoingMail("root", ("root",), subject="delivered on A"))
        log_a.wait_for(r"mda delivery .* result=Ok", 10, since=mark)

        assert "bob@example.com" in a.queue()
        assert a.check("find /var/spool/smtpd -type f").stdout.strip() != ""
        assert b"delivered on A" in a.mailbox("root")
        assert b.queue().strip() == ""
        assert b.check("find /var/spool/smtpd /var/mail -type f").stdout.strip() == ""
        assert b.mailbox("root") == b""
    finally:
        relay_lab.destroy_host(other)
