"""`accept` with the relay probe in a sandbox on the host itself (`--relay-mode sandbox|auto`).

The hosts are lab test hosts made to look like real ones (see test_accept: config in
/etc/smtpd.conf, a daemon smtpd running, a mail log). What matters besides the verdicts: the
sandbox must not disturb the running smtpd (it still answers, its queue and files are as they
were) and must leave nothing behind (process, mount, namespace, temp dir), also when the run
is interrupted mid-probe.
"""

from __future__ import annotations

import shlex

import pytest
from test_accept import ALIASES, PROVIDER, WRONG, accept, config, fact, make_real, secrets, snapshot

from harness.accept.facts import AcceptError
from harness.accept.run import WAY_COPY, WAY_SANDBOX, AcceptReport
from harness.report import accept_text as text_report
from harness.targets.lab import Lab, LabHost
from harness.targets.smtpd import SmtpdTarget

pytestmark = pytest.mark.lab


def host_state(target: SmtpdTarget) -> str:
    """What a sandbox could disturb on the host, apart from the files (see `snapshot`).

    The host's own processes (those in its network namespace, sshd sessions aside: they come and
    go with the harness's connections) with their mount namespaces, its mounts, the temp dirs,
    the running smtpd's queue and status.
    """
    return target.check(
        "me=$(readlink /proc/self/ns/net); for p in /proc/[0-9]*; do "
        '  [ "$(readlink $p/ns/net 2>/dev/null)" = "$me" ] || continue; '
        # an empty command line: a process in the middle of exiting (an SSH session ending)
        '  c=$(tr "\\0" " " < $p/cmdline 2>/dev/null) && [ -n "$c" ] || continue; '
        '  echo "proc ${p#/proc/} $(readlink $p/ns/mnt) $c"; '
        # this command's own processes (the loop's shells, the pipeline) are not the host's
        "done | grep -v -E -e 'for p in|sshd' -e '^proc [0-9]+ \\S+ (sort|grep|tr|readlink|cut) ' | sort; "
        # other test hosts' namespaces (parallel workers) show up under /run/netns and /sys, and
        # other tests' temp dirs change names when a pytest session retires them (garbage-*)
        "echo mounts; cut -d' ' -f5,9 /proc/self/mountinfo "
        "| grep -v -e '^/run/netns/' -e '^/sys ' -e '^/tmp/pytest-of-' | sort; "
        "echo spool and mail; find /var/spool/smtpd /var/mail | sort; "
        "echo queue; smtpctl show queue; echo status; smtpctl show status"
    ).stdout


def alive(target: SmtpdTarget) -> None:
    """The host's own smtpd answers on its control socket and on its listener."""
    assert "MDA running" in target.check("smtpctl show status").stdout
    greeting = target.check(
        'python3 -c \'import socket; s = socket.create_connection(("127.0.0.1", 25), 5); '
        "print(s.recv(200).decode())'"
    ).stdout
    assert greeting.startswith("220 "), greeting


# Run on the test host: what of a sandbox is there. The machine runs other test hosts (parallel
# workers) with sandboxes of their own, so look only at this host's: descendants of its sshd, any
# process with a mount on one of this host's sandbox dirs, and any process in the network
# namespace of one of its sandboxes (an orphan: once the harness's SSH connection is gone, what
# its sessions started no longer descends from sshd; a pump is in the sandbox's network namespace
# only). This host's /proc shows its own PID namespace and those below it: no other host's.
LEFTOVERS = r"""
import os, re, sys
sshd, known = sys.argv[1], set(sys.argv[2:])
dirs = {k for k in known if k.startswith("/")}
nets = known - dirs
def read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
def netns(p):
    try:
        return os.readlink(f"/proc/{p}/ns/net")
    except OSError:
        return None
ppid, procs = {}, [p for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid())]
for p in procs:
    stat = read(f"/proc/{p}/stat")
    ppid[p] = stat.rpartition(")")[2].split()[1] if stat else "0"
def descends(p):
    for _ in range(64):
        if p == sshd:
            return True
        if p not in ppid or p in ("0", "1"):
            return False
        p = ppid[p]
    return False
me = os.readlink("/proc/self/ns/net")
for p in procs:  # what this host's sandboxes are: their dirs and network namespaces
    if descends(p):
        dirs.update(re.findall(r" (/tmp/relay-harness-accept\.\w+) ", read(f"/proc/{p}/mountinfo")))
        if netns(p) not in (None, me):
            nets.add(netns(p))
found = set()
for p in procs:
    net, args = netns(p), read(f"/proc/{p}/cmdline").replace("\0", " ")
    for d in re.findall(r" (/tmp/relay-harness-accept\.\w+) ", read(f"/proc/{p}/mountinfo")):
        if d in dirs:
            found.add(f"process {p} with a mount on {d}")
    if net is not None and net in nets:
        found.add(f"process {p} ({net}): {args[:80]}")
    elif descends(p) and re.search("rh-sandbox|relay-harness-forwarder|unshare", args):
        found.add(f"process {p} ({net}): {args[:80]}")
for d in sorted(dirs):
    if os.path.exists(d):
        found.add(f"directory {d}")
print("\n".join(sorted(found)))
print("known " + " ".join(sorted(dirs | nets)))
"""


def leftovers(host: LabHost, dirs: list[str], nets: list[str] | None = None) -> list[str]:
    """Anything of this host's sandboxes still there: processes (so their mounts and network
    namespace), temp dirs. `dirs` (known ones) is extended with the sandbox dirs found running,
    `nets` with their network namespaces (net:[INODE]), so a later call finds their orphans."""
    assert host.target is not None and host.sshd_pid is not None
    nets = [] if nets is None else nets
    args = " ".join([str(host.sshd_pid), *dirs, *(shlex.quote(n) for n in nets)])  # the lab's sshd
    out = host.target.check(f"python3 - {args}", stdin=LEFTOVERS.encode()).stdout.splitlines()
    known = out[-1].split()[1:]
    dirs[:] = sorted(set(dirs) | {k for k in known if k.startswith("/")})
    nets[:] = sorted(set(nets) | {k for k in known if not k.startswith("/")})
    return [line for line in out[:-1] if line.strip()]


@pytest.fixture
def dirs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The temp dirs of the sandboxes this test's runs start, as the harness names them."""
    from harness.targets.sandbox import Sandbox
    from harness.upstream import UpstreamServer

    seen: list[str] = []
    real_attach = Sandbox.attach

    def attach_and_record(self: Sandbox, upstream: UpstreamServer) -> None:
        try:
            real_attach(self, upstream)
        finally:
            if self.dir is not None:
                seen.append(self.dir)

    monkeypatch.setattr(Sandbox, "attach", attach_and_record)
    return seen


def relay_fact_names(report: AcceptReport) -> dict[str, str]:
    return {f.name: f.status for f in report.facts if f.name.startswith(("relay", "sandbox"))}


def test_healthy_host_passes_in_the_sandbox_and_is_left_as_it_was(
    relay_lab: Lab, lab_host: LabHost, dirs: list[str]
) -> None:
    target = make_real(lab_host)
    files, state = snapshot(target), host_state(target)
    report = accept(relay_lab, lab_host, relay_mode="sandbox")
    text = text_report(report)
    assert report.ok, text
    assert report.relay_way == WAY_SANDBOX and WAY_SANDBOX in text
    status = relay_fact_names(report)
    assert status == {
        "relay:relay-external": "pass",
        "relay:alias-postmaster->alice": "pass",
        "relay:alias-root->alice": "pass",
        "sandbox-removed": "pass",
    }, text
    assert (
        "in the sandbox on root@" in next(f for f in report.facts if f.name == "relay:relay-external").command
    )
    assert fact(report, "host-unchanged")[0] == "pass"
    assert snapshot(target) == files
    assert host_state(target) == state
    assert len(dirs) == 1 and leftovers(lab_host, dirs) == []
    alive(target)


def test_wrong_password_fails_in_the_sandbox_with_the_providers_535(
    relay_lab: Lab, lab_host: LabHost, dirs: list[str]
) -> None:
    target = make_real(lab_host, files=(ALIASES, secrets(WRONG)))
    state = host_state(target)
    report = accept(relay_lab, lab_host, relay_mode="sandbox")
    assert report.relay_way == WAY_SANDBOX
    relay = next(f for f in report.facts if f.name == "relay:relay-external")
    assert relay.status == "fail", text_report(report)
    assert any("AUTH rejected" in e and "535 5.7.8" in e for e in relay.evidence), relay.evidence
    assert WRONG not in text_report(report)
    assert fact(report, "sandbox-removed")[0] == "pass"
    assert host_state(target) == state
    assert leftovers(lab_host, dirs) == []
    alive(target)


def test_auto_uses_the_sandbox_also_when_the_host_listens_on_the_relays_port(
    relay_lab: Lab, lab_host: LabHost
) -> None:
    """The host's smtpd (in the sandbox) takes 127.0.0.1:587 itself: the forwarder is elsewhere."""
    make_real(lab_host, config(extra="listen on lo port 587\n"))
    report = accept(relay_lab, lab_host, relay_mode="auto")
    assert report.relay_way == WAY_SANDBOX and report.ok, text_report(report)


def test_auto_falls_back_to_the_lab_and_says_why(relay_lab: Lab, lab_host: LabHost) -> None:
    """No unshare on the host (hidden by a bind mount in the test host's own mount namespace)."""
    target = make_real(lab_host)
    target.check("mount --bind /dev/null $(command -v unshare)")
    report = accept(relay_lab, lab_host, relay_mode="auto")
    assert report.relay_way == WAY_COPY and report.ok, text_report(report)
    notes = " ".join(report.notes)
    assert (
        "the host cannot run the relay sandbox (unshare of network/mount/PID namespaces is refused" in notes
    )
    assert "/usr/bin/unshare: Permission denied" in notes
    assert WAY_COPY in text_report(report)
    with pytest.raises(AcceptError, match="--relay-mode sandbox: the host cannot run the sandbox: unshare"):
        accept(relay_lab, lab_host, relay_mode="sandbox")


def test_a_listener_the_sandbox_lacks_falls_back_to_the_lab(
    relay_lab: Lab, lab_host: LabHost, dirs: list[str]
) -> None:
    """A listener on the host's eth0 runs on the host but not in the sandbox (only a loopback
    there): the sandbox's limit, not the host's fault, so auto copies to the lab (an eth0 there)."""
    target = make_real(lab_host, config(extra="listen on eth0 inet4\n"))
    state = host_state(target)
    report = accept(relay_lab, lab_host, relay_mode="auto")
    assert report.relay_way == WAY_COPY and report.ok, text_report(report)
    assert "invalid virtual ip or interface: eth0" in " ".join(report.notes), report.notes
    assert host_state(target) == state and leftovers(lab_host, dirs) == []


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_run_leaves_nothing_on_the_host(
    relay_lab: Lab,
    lab_host: LabHost,
    dirs: list[str],
    monkeypatch: pytest.MonkeyPatch,
    interrupt: type[BaseException],
) -> None:
    """The run stops mid-probe (after the probe was submitted): the sandbox is still removed."""
    import harness.probes

    target = make_real(lab_host)
    files, state = snapshot(target), host_state(target)

    during: list[str] = []

    def stop_after_submit(*args: object, **kw: object) -> object:
        during.extend(leftovers(lab_host, dirs))
        raise interrupt("interrupted mid-probe")

    monkeypatch.setattr(harness.probes, "await_probe", stop_after_submit)
    with pytest.raises(interrupt, match="interrupted mid-probe"):
        accept(relay_lab, lab_host, relay_mode="sandbox")
    # What `leftovers` looks for was there while the probe ran: its empty answer below means gone.
    assert len(dirs) == 1 and any(line.startswith("process ") for line in during), during
    assert f"directory {dirs[0]}" in during, during
    assert leftovers(lab_host, dirs) == []
    assert host_state(target) == state
    assert snapshot(target) == files
    alive(target)


def test_probes_are_planned_from_text_never_from_a_binary_db() -> None:
    """A Berkeley DB file read as aliases text yields garbage "keys" with NUL bytes; a probe to
    one made sshd drop the whole connection (`session_exec_req: parse packet: invalid format`)."""
    from harness.accept.facts import FileStat, HostFacts, HostFile, TableFacts
    from harness.accept.run import host_bundle as _bundle
    from harness.probes import plan_probes
    from harness.smtpdconf import parse_config

    stat = FileStat(0o644, "root", "root", 0, 0)
    text = HostFile("/etc/mail/aliases", b"root: alice\n", stat)
    db = HostFile("/etc/mail/aliases.db", b"\x00\x02\x00junk:\x00\x00more\nroot\x00alice\x00", stat)
    conf = HostFile("/etc/smtpd.conf", config().encode(), stat)
    facts = HostFacts("h", config_path=conf.path, config=conf, parsed=parse_config(config(), conf.path))
    facts.tables = [TableFacts("aliases", "db", db.path, False, True, db, text)]
    probes, _ = plan_probes(_bundle(facts), facts.parsed)
    assert [p.recipient for p in probes] == ["relay-harness-probe@example.com", "root"]


@pytest.mark.parametrize("when", ["mid-probe", "during-setup"])
def test_a_killed_harness_leaves_nothing_on_the_host(
    relay_lab: Lab, lab_host: LabHost, dirs: list[str], when: str
) -> None:
    """SIGKILL: no finally runs here, so the host must clean up by itself when the SSH
    connection drops (the forwarder, the sandbox's PID 1, reads EOF or writes to a broken pipe;
    the kernel ends the rest; the outer shell removes the temp dir). "during-setup": the harness
    is gone before the forwarder says it is ready (that once left it waiting an hour)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    target = make_real(lab_host)
    files, state = snapshot(target), host_state(target)
    relay_lab.ssh_config()
    nets: list[str] = []  # the sandbox's network namespace, once seen: its orphans are found too
    stall = (
        "import sys, threading, harness.probes as c, harness.targets.sandbox as s; "
        "c.await_probe = lambda *a, **k: threading.Event().wait(); "
        # A window, on the host, between the sandbox's mounts and the forwarder's start, for
        # the kill to land in (a delay placed on purpose, not a guess at an event).
        + ("s.FORWARDER = 'import time; time.sleep(3)\\n' + s.FORWARDER; " if when == "during-setup" else "")
        + "from harness.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = [f"ssh://root@{lab_host.address}", "--identity", str(relay_lab.dir / "id_ed25519")]
    args += ["--known-hosts", str(relay_lab.dir / "known_hosts"), "--upstream", str(PROVIDER)]
    proc = subprocess.Popen(
        [sys.executable, "-c", stall, "accept", *args, "--relay-mode", "sandbox"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The sandbox lives on another machine (here: another namespace): no event reaches us
        # when it is up or gone, so look, bounded.
        deadline = time.monotonic() + 30
        up = "smtpd -d" if when == "mid-probe" else "python3 -c"
        while not any(up in line for line in leftovers(lab_host, dirs, nets)):
            assert proc.poll() is None and time.monotonic() < deadline, "the sandbox never came up"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while leftovers(lab_host, dirs, nets) and time.monotonic() < deadline:
        time.sleep(0.1)
    # What is looked for below was seen: the sandbox's dir and network namespace (and maybe the
    # trial namespace of probe_capability's `unshare ... true`, if a look fell in its run).
    assert len(dirs) == 1 and nets, (dirs, nets)
    assert leftovers(lab_host, dirs, nets) == []
    assert host_state(target) == state and snapshot(target) == files
    alive(target)
