"""The lab leaves nothing behind and touches nothing of the machine's (DESIGN.md: "Everything
cleans up").

A test host is root-owned kernel state (namespaces, veths, overlay mounts) plus processes that are
not our children (smtpd is started by sshd's session), so a leak survives the test run and the
next run trips over it. These tests look at the machine itself (/run/netns, `ip link`,
/proc/*/ns/net, /tmp), never at the lab's own bookkeeping, which is what a bug would corrupt.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from lab_footprint import Footprint, hosts_of, own_lab_leftovers

from harness.pki import TestPki
from harness.relay import DELIVERY
from harness.targets.base import Bundle, BundleFile, OutgoingMail
from harness.targets.lab import END_TIMEOUT, Lab, LabHost, clean_stale, running_hosts
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
EXAMPLE = Path(__file__).parent.parent / "ci" / "examples"
CHECK_ARGS = (
    "check",
    str(EXAMPLE / "smtpd.conf"),
    "--upstream",
    str(EXAMPLE / "provider.toml"),
    "--table",
    f"aliases={EXAMPLE / 'aliases'}",
)
CLI = Path(sys.executable).parent / "relay-harness"

# A real `relay-harness check`, stopped for good at one moment of its life: the step named is
# replaced by a stop that says "moment" on stdout, so the parent can SIGKILL it right there (no
# finally clause, no atexit handler of the lab runs after that).
KILLED_CHECK = """
import sys, threading
import harness.probes
from harness.targets import lab
moment, *argv = sys.argv[1:]

def stop(*args, **kw):
    print("moment", moment, flush=True)
    threading.Event().wait()

step = {
    "building": (lab.LabHost, "_veth"),  # the first process runs, no network yet
    "network": (lab.LabHost, "_start_sshd"),  # veth and interfaces up, sshd not started
    "probing": (harness.probes, "await_probe"),  # smtpd running, probes submitted
    "teardown": (lab.LabHost, "_end"),  # SSH closed, the lifeline not yet
}[moment]
setattr(*step, stop)
from harness.cli import main
sys.exit(main(argv))
"""

# A run that keeps its host (pytest --relay-keep), then ends.
KEEPING = """
from harness.pki import TestPki
from harness.targets.lab import Lab

lab = Lab(TestPki().ca_pem)
host = lab.create_host()
host.keep()
lab.ssh_config()
print("ready", host.name, host.pid, host.address, lab.dir, flush=True)
"""


def bundle(marker: str, users: tuple[str, ...] = ()) -> Bundle:
    return Bundle(CONF.format(marker=marker), (ALIASES,), users=users)


def footprint(host: LabHost) -> Footprint:
    return Footprint.of_host(host)


def start_smtpd_and_a_stray(target: SmtpdTarget) -> int:
    """smtpd running, plus a process detached from every SSH session (as a careless hook leaves);
    returns the stray's pid as the host sees it (known once forked, whatever it is named by then)."""
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
        assert stray in prints[0].inner_pids
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
    assert prints and prints[0].inner_pids >= set(strays)
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
        assert stray in fp.inner_pids
        lab.destroy_host(gone)
        assert fp.leftovers() == [f"directory {lab.dir}"]  # the lab's dir goes with the lab
        assert kept.target.check("hostname").stdout.strip() == kept.hostname


def test_a_host_that_does_not_end_in_time_is_entirely_gone_when_destroy_returns(
    relay_pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first process reads its lifeline only between steps (building a root under load takes
    a while), or may be stuck: after END_TIMEOUT it is killed. Killing `unshare` returned at once,
    with the host's processes still ending, so a run could exit with them on the machine; the kill
    goes to the host's PID 1, and destroy returns once the kernel has ended its PID namespace."""
    from harness.targets import lab as lab_module

    monkeypatch.setattr(lab_module, "END_TIMEOUT", 1.0)
    killed: list[str] = []
    kill = LabHost._kill_first_process

    def recorded(host: LabHost) -> None:
        killed.append(host.name)
        kill(host)

    monkeypatch.setattr(LabHost, "_kill_first_process", recorded)
    with Lab(relay_pki.ca_pem) as lab:
        host = lab.create_host()
        assert host.target is not None and host.pid is not None
        stray = start_smtpd_and_a_stray(host.target)
        fp = footprint(host)
        os.kill(host.pid, signal.SIGSTOP)  # deaf to its lifeline, as one busy or stuck is
        lab.destroy_host(host)
        assert killed == [host.name]  # the lifeline did not end it: the kill did
        assert {"sshd", "smtpd"} <= fp.commands and stray in fp.inner_pids
        assert fp.running() == []  # at once: no waiting for the kernel to finish


def test_two_labs_in_one_process_never_touch_each_others_hosts(relay_pki: TestPki) -> None:
    """Host names were numbered per Lab, so a second Lab's first host was `rh-PID-1` again: its
    `ip netns add` failed, and the failed host's cleanup killed and deleted the first Lab's host."""
    with Lab(relay_pki.ca_pem) as one:
        host_one = one.create_host()
        with Lab(relay_pki.ca_pem) as two:
            host_two = two.create_host()
            assert host_two.name != host_one.name and host_two.veth != host_one.veth
            assert host_two.target is not None
            assert host_two.target.check("hostname").stdout.strip() == host_two.hostname
        assert host_one.target is not None
        assert host_one.target.check("hostname").stdout.strip() == host_one.hostname
        assert host_one.name in hosts_of(os.getpid())


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


def _start(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )


def _kill_at(moment: str) -> tuple[int, list[Footprint]]:
    """A real check SIGKILLed at `moment`; its pid and the footprints of its hosts just before."""
    proc = _start(KILLED_CHECK, moment, *CHECK_ARGS)
    try:
        line = _read_line(proc, READY_TIMEOUT)
        if line != f"moment {moment}":
            proc.kill()
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the check did not reach {moment}: {line!r}\n{err.decode(errors='replace')}")
        prints = [
            Footprint.of(h.name, h.veth_name, h.pid, h.lab_dir)
            for h in running_hosts()
            if h.owner == proc.pid
        ]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return proc.pid, prints


def _gone(what: Callable[[], list[str]], timeout: float = 15.0) -> list[str]:
    """`what` until it is empty (the kernel ends another process's namespaces in its own time:
    no event reaches us, so look, bounded); what is left at the end."""
    deadline = time.monotonic() + timeout
    while (left := what()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_sigkill_at_any_moment_leaves_nothing_running_and_the_next_check_removes_the_rest() -> None:
    """No finally clause runs after SIGKILL: the host's first process reads the end of its
    owner's pipe and exits, the kernel ends its PID namespace (sshd, smtpd, strays) and with the
    last process its network namespace and veth. Left on disk: the lab's key directory, which
    the next run of any command removes (here: one ordinary check)."""
    killed: dict[str, tuple[int, list[Footprint]]] = {}
    for moment in ("building", "network", "probing", "teardown"):
        pid, prints = _kill_at(moment)
        assert len(prints) == 1, f"{moment}: the killed check had {len(prints)} test hosts"
        killed[moment] = (pid, prints)
        # Nothing of the host runs any more, and no lab code ran to make it so.
        assert _gone(prints[0].running) == [], moment
    assert {"sshd", "smtpd"} <= killed["probing"][1][0].commands  # what had to go was there
    assert "sshd" not in killed["network"][1][0].commands
    done = subprocess.run([str(CLI), *CHECK_ARGS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for moment, (pid, prints) in killed.items():
        assert own_lab_leftovers(pid) == [], moment
        assert prints[0].leftovers() == [], moment


@pytest.fixture
def alone_with_kept_hosts() -> Iterator[None]:
    """`lab clean` removes every kept host whose owner is gone, machine-wide (as documented): two
    tests that keep a host (two xdist workers, two checkouts' suites) would remove each other's."""
    with open("/run/relay-harness-tests-kept.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.mark.usefixtures("alone_with_kept_hosts")
def test_a_kept_host_outlives_its_run_until_lab_clean(tmp_path: Path) -> None:
    """--relay-keep: the host stays up for a person to enter after the run ended; automatic
    cleaning spares it, `relay-harness lab clean` removes it and says so."""
    proc = _start(KEEPING)
    line = _read_line(proc, READY_TIMEOUT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and line.startswith("ready "), line + err.decode(errors="replace")
    _, name, pid, address, directory = line.split()
    try:
        fp = Footprint.of(name, f"rh{proc.pid}h{name.rpartition('-')[2]}", int(pid), Path(directory))
        assert "sshd" in fp.commands
        clean_stale()  # what every run does first: a kept host is not a leftover
        assert fp.running() != [] and Path(directory).exists()
        client = paramiko.SSHClient()
        key = paramiko.Ed25519Key.from_private_key_file(f"{directory}/ssh_host_ed25519_key")
        client.get_host_keys().add(address, "ssh-ed25519", key)
        client.connect(address, username="root", key_filename=f"{directory}/id_ed25519", timeout=10)
        try:
            _, stdout, _ = client.exec_command("hostname")
            assert stdout.read().decode().strip().endswith(".relay-harness.test")
        finally:
            client.close()
        done = subprocess.run([str(CLI), "lab", "clean"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert f"removed test host {name}" in lines, lines
        # Its directory: removed by this `lab clean`, or, once the host was gone, by the cleaner
        # another check on the machine runs first (another xdist worker's): gone, either way.
        assert not Path(directory).exists(), lines
        assert re.search(r"^relay-harness lab clean: \d+ item\(s\) removed$", done.stdout, re.MULTILINE)
        assert fp.leftovers() == []
        again = subprocess.run([str(CLI), "lab", "clean"], capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and name not in again.stdout
    finally:
        clean_stale(kept=True)
    assert own_lab_leftovers(proc.pid) == []


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


# --- cleaners that cannot see the owner ---------------------------------------------------------

# `clean_stale` as a run in a PID namespace of its own sees it (a CI job in a namespace, sharing
# /tmp): no pid of this process exists there, so a pid check alone calls every lab here dead. Its
# /tmp is a private one holding only this test's lab dir and a dead run's, and it sees no named
# network namespace (its /run is a private one: a fresh machine may have no /run/netns at all):
# whatever it does, it cannot touch another run's files on this machine.
CLEAN_ELSEWHERE = """
set -e
mount -t tmpfs rh-test-run /run
mkdir -p /run/netns/keep
mount --bind "$2" /run/netns/keep
mount -t tmpfs rh-test-tmp /tmp
mkdir "/tmp/$1" /tmp/relay-harness-999999999-deadrun
touch /tmp/relay-harness-999999999-deadrun/.owner.lock
mount --move /run/netns/keep "/tmp/$1"
"$3" -c 'from harness.targets.lab import clean_stale; print(clean_stale())'
test ! -e /tmp/relay-harness-999999999-deadrun && echo dead-run-removed
test -e "/tmp/$1/.owner.lock" && echo live-lab-kept
"""


def test_a_cleaner_in_another_pid_namespace_leaves_a_live_lab_alone(relay_pki: TestPki) -> None:
    """Its twin in the same run: a dir whose owner is gone (its lock free) is removed by it."""
    with Lab(relay_pki.ca_pem) as lab:
        host = lab.create_host()
        assert host.target is not None
        unshare = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private"]
        done = subprocess.run(
            [*unshare, "sh", "-c", CLEAN_ELSEWHERE, "sh", lab.dir.name, str(lab.dir), sys.executable],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-2:] == ["dead-run-removed", "live-lab-kept"], done.stdout
        assert lab.dir.exists() and host.target.check("hostname").stdout.strip() == host.hostname


# A run in PID and mount namespaces of its own with a /tmp of its own (a CI job in a container, or
# ci/fresh-root.sh): seen from here, its owner's pid is another process and its lab dir is not
# there. Every other run's cleaner on the machine once took its hosts for a dead run's and
# SIGKILLed them (`unshare: sigprocmask unblock failed`: util-linux's words for that).
INSIDE = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private"]
OWN_TMP = 'mount -t tmpfs rh-test-tmp /tmp && cd "$1" && shift && exec "$@"'
# The owner, inside. `keep`: the host outlives it, and the namespace's first process (sh) stays
# until stdin ends, as a container's would.
OWNER_INSIDE = """
import sys
from harness.pki import TestPki
from harness.targets.lab import Lab

lab = Lab(TestPki().ca_pem)
host = lab.create_host()
assert host.target is not None
if sys.argv[1] == "keep":
    host.keep()
    print("ready", flush=True)
    sys.exit(0)
print("ready", flush=True)
sys.stdin.readline()  # the cleaner outside has run
print("alive", host.target.check("hostname").stdout.strip(), flush=True)
lab.close()
"""
STAY = '"$@" && read -r _ || true'


def _inside(*argv: str, stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    repo = str(Path(__file__).parent.parent)
    return subprocess.Popen(
        [*INSIDE, "sh", "-c", OWN_TMP, "sh", repo, *argv],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _hosts_of_namespace(unshare: int) -> list[int]:
    return [h.pid for h in running_hosts() if _descends_from(h.pid, unshare)]


def test_a_check_run_inside_a_pid_namespace_with_its_own_tmp_passes() -> None:
    """The README's main job, run where a container or the fresh-root CI runs it."""
    proc = _inside(str(CLI), *CHECK_ARGS)
    out, err = proc.communicate(timeout=180)
    text = out.decode(errors="replace") + err.decode(errors="replace")
    assert proc.returncode == 0, text
    assert re.search(r"^PASS: 5 passed, 0 failed", out.decode(), re.MULTILINE), text


def test_a_cleaner_outside_leaves_a_live_lab_inside_a_pid_namespace_alone() -> None:
    proc = _inside("sh", "-c", STAY, "sh", sys.executable, "-c", OWNER_INSIDE, "live", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        line = _read_line(proc, READY_TIMEOUT)
        assert line == "ready", line + (proc.stderr.read().decode() if proc.stderr else "")
        (pid,) = _hosts_of_namespace(proc.pid)
        judged = {h.pid: h for h in running_hosts()}[pid]
        assert judged.owner_alive and not judged.kept
        clean_stale()  # what every run on the machine does first
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        line = _read_line(proc, READY_TIMEOUT)
        assert line.startswith("alive ") and line.endswith(".relay-harness.test"), line
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert _gone(lambda: [str(p) for p in _hosts_of_namespace(proc.pid)]) == []


@pytest.mark.usefixtures("alone_with_kept_hosts")
def test_a_cleaner_outside_removes_a_kept_host_whose_owner_inside_a_pid_namespace_is_gone() -> None:
    """The twin: the owner's view is reached, not ignored; its lock free, its host is a leftover."""
    proc = _inside("sh", "-c", STAY, "sh", sys.executable, "-c", OWNER_INSIDE, "keep", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        line = _read_line(proc, READY_TIMEOUT)
        assert line == "ready", line + (proc.stderr.read().decode() if proc.stderr else "")
        (pid,) = _hosts_of_namespace(proc.pid)
        # The owner exits after its line: the host outlives it, owned by no one.
        assert _gone(lambda: [h.name for h in running_hosts() if h.pid == pid and h.owner_alive]) == []
        judged = {h.pid: h for h in running_hosts()}[pid]
        assert judged.kept
        clean_stale()  # a kept host is spared by automatic cleaning ...
        assert pid in _hosts_of_namespace(proc.pid)
        removed = clean_stale(kept=True)  # ... and removed by `lab clean`
        assert f"test host {judged.name}" in removed, removed
        assert pid not in _hosts_of_namespace(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_what_a_hosts_first_process_forks_is_not_a_host(tmp_path: Path) -> None:
    """A child the first process forks shows the host's words until it execs (sshd, at every
    host start). Taken for a host whose owner is gone, other runs' cleaners SIGKILLed it: `sshd
    did not start`, once in a few hundred starts under -n 2. Only PID 1 of its namespace is a
    host; the twin, the same words as PID 1 with its owner gone, is removed."""
    script = tmp_path / "lab_init.py"
    script.write_text("import sys; sys.stdin.read()\n")  # stays until its stdin ends
    words = [sys.executable, "-I", "-S", str(script), "relay-harness-host", "rh-999999-1", "999999", "0"]
    words.append(str(tmp_path))
    child = subprocess.Popen(words, stdin=subprocess.PIPE)
    first = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", *words], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not (seen := [h for h in running_hosts() if h.name == "rh-999999-1"]):
            assert time.monotonic() < deadline and first.poll() is None, "the first process never ran"
            time.sleep(0.02)
        assert child.pid not in [h.pid for h in seen]
        clean_stale()
        assert first.wait(timeout=END_TIMEOUT) is not None  # its first process SIGKILLed: unshare returns
        assert child.poll() is None, "a process that is not a host's first was killed"
        assert [h for h in running_hosts() if h.name == "rh-999999-1"] == []
    finally:
        for proc in (child, first):
            proc.kill()
            proc.wait()
