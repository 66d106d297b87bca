"""Test hosts on this machine: a network namespace, a private /etc, the real smtpd, sshd inside.

A test host is what a small mail server looks like from outside: an address, sshd, OpenSMTPD
and its files. It is built from the machine's own binaries (Debian's opensmtpd and openssh)
with everything it writes kept private:
- its own network namespace, joined to this machine by a veth pair on 198.51.100.0/24
  (TEST-NET-2), and with its loopback renamed `lo0`, so OpenBSD's `listen on lo0` works as written;
- its own mount namespace: /etc is an overlay (writes land in the lab's temp dir), /run,
  /var/spool, /var/mail, /var/log and /root are fresh tmpfs, so several hosts run at once untouched
  (the private /root also spares each SSH command the machine's root shell start-up files);
- its own UTS namespace (host name `NAME.relay-harness.test`);
- resolv.conf naming only 127.0.0.1 with `lookup file`, so smtpd never asks any DNS server.
The harness reaches it over SSH only: the lab is a provider of SSH targets.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.targets.base import TargetError
from harness.targets.shell import Shell
from harness.targets.smtpd import SmtpdTarget

PREFIX = "rh"
LAB_NETWORK = ipaddress.IPv4Network("198.51.100.0/24")
SLOTS = LAB_NETWORK.num_addresses // 4 - 1  # one /30 per host; slot 0 is left unused
LOCK_FILE = "/run/relay-harness.lock"
TMP_PREFIX = "relay-harness-"
DOMAIN = "relay-harness.test"
READY_TIMEOUT = 15.0
# Host numbers are per process, not per Lab: names (rh-PID-N, rhPIDhN) must not collide when one
# process holds two Labs (a test building its own Lab beside the session fixture's).
_host_numbers = itertools.count(1)


class LabError(TargetError):
    """The lab cannot build a test host; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class Slot:
    index: int

    @property
    def outside(self) -> str:
        """This machine's end of the veth: where the fake upstream listens for this host."""
        return str(LAB_NETWORK.network_address + 4 * self.index + 1)

    @property
    def inside(self) -> str:
        return str(LAB_NETWORK.network_address + 4 * self.index + 2)


def check_environment() -> None:
    """Fail early with the fix, not with a traceback from deep inside `ip`."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network and mount namespaces): run as root or with sudo")
    missing = {
        "/usr/sbin/smtpd": "OpenSMTPD is not installed: apt-get install opensmtpd",
        "/usr/sbin/sshd": "sshd is not installed: apt-get install openssh-server",
    }
    for path, message in missing.items():
        if not os.path.exists(path):
            raise LabError(message)
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is not installed: apt-get install {package}")


def _ip(*args: str, netns: str | None = None, batch: str | None = None) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *(["-batch", "-"] if batch else []), *args]
    proc = subprocess.run(cmd, input=batch, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        what = batch.strip().replace("\n", "; ") if batch else " ".join(args)
        hint = ""
        if "Operation not permitted" in proc.stderr:
            hint = " (creating network namespaces needs CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        raise LabError(f"ip {what}: {proc.stderr.strip()}{hint}")
    return proc.stdout


@contextlib.contextmanager
def _lab_lock() -> Iterator[None]:
    """Serialise slot choice across concurrent runs (pytest-xdist workers, two CI jobs)."""
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _used_slots() -> set[int]:
    used = set()
    for m in re.finditer(r"inet (198\.51\.100\.\d+)/", _ip("-o", "-4", "addr", "show")):
        offset = int(ipaddress.IPv4Address(m.group(1))) - int(LAB_NETWORK.network_address)
        used.add(offset // 4)
    return used


def _key_pair() -> tuple[bytes, str]:
    """An ed25519 key: OpenSSH private PEM and the public line (paramiko cannot generate ed25519)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


BOOTSTRAP = r"""
set -e
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$RH_DIR/etc,workdir=$RH_DIR/etc-work" /etc
mount -t tmpfs -o mode=0755 rh-run /run
mkdir -p /run/sshd
mount -t tmpfs -o mode=0755 rh-spool /var/spool
mkdir -m 0711 /var/spool/smtpd
mount -t tmpfs -o "mode=1777" rh-mail /var/mail
mount -t tmpfs -o mode=0700 rh-root /root
mount -t tmpfs -o mode=0755 rh-log /var/log
hostname "$RH_HOSTNAME"
exec /usr/sbin/sshd -D -e -f "$RH_DIR/sshd_config"
"""


class LabHost:
    """One test host. Built by `Lab.create_host`; `target` is the SSH target that drives it."""

    def __init__(self, lab: Lab, index: int, slot: Slot) -> None:
        self.lab = lab
        self.index = index
        self.slot = slot
        self.netns = f"{PREFIX}-{os.getpid()}-{index}"
        self.veth = f"{PREFIX}{os.getpid()}h{index}"
        self.hostname = f"host{index}.{DOMAIN}"
        self.dir = lab.dir / f"host{index}"
        self.process: subprocess.Popen[bytes] | None = None
        self.sshd_log: list[str] = []
        self.target: SmtpdTarget | None = None

    @property
    def address(self) -> str:
        return self.slot.inside

    @property
    def upstream_address(self) -> str:
        return self.slot.outside

    def build(self) -> LabHost:
        self._network()
        self._files()
        self._start_sshd()
        self.target = self._connect()
        return self

    def _network(self) -> None:
        peer = f"{PREFIX}{os.getpid()}p{self.index}"
        _ip("netns", "add", self.netns)
        self.lab.created_netns.append(self.netns)
        _ip(
            batch=(
                f"link add {self.veth} type veth peer name {peer}\n"
                f"link set {peer} netns {self.netns}\n"
                f"addr add {self.slot.outside}/30 dev {self.veth}\n"
                f"link set {self.veth} up\n"
            )
        )
        _ip(
            netns=self.netns,
            batch=(
                f"link set {peer} name eth0\n"
                f"addr add {self.slot.inside}/30 dev eth0\n"
                "link set eth0 up\n"
                "link set lo name lo0\n"
                "link set lo0 up\n"
            ),
        )
        route = _ip("-o", "route", "get", self.slot.inside)
        if f"dev {self.veth}" not in route:  # never let lab traffic leave by the default route
            raise LabError(f"route to test host {self.slot.inside} does not use {self.veth}: {route.strip()}")

    def _files(self) -> None:
        etc = self.dir / "etc"
        (self.dir / "etc-work").mkdir(parents=True)
        (etc / "ssl" / "certs").mkdir(parents=True)
        (etc / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{self.slot.inside}\t{self.hostname} host{self.index}\n"
        )
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\nlookup file\n")
        (etc / "hostname").write_text(self.hostname + "\n")
        (etc / "mailname").write_text(self.hostname + "\n")
        (etc / "ssl" / "certs" / "ca-certificates.crt").write_bytes(self.lab.ca_pem)
        (self.dir / "sshd_config").write_text(
            f"ListenAddress {self.slot.inside}\n"
            "Port 22\n"
            f"HostKey {self.lab.dir / 'ssh_host_ed25519_key'}\n"
            f"AuthorizedKeysFile {self.lab.dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "PidFile none\n"
            "MaxSessions 50\n"
            "Subsystem sftp internal-sftp\n"
        )

    def _start_sshd(self) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "RH_DIR": str(self.dir), "RH_HOSTNAME": self.hostname}
        cmd = [
            "ip",
            "netns",
            "exec",
            self.netns,
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            BOOTSTRAP,
        ]
        self.process = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        ready = threading.Event()
        stderr = self.process.stderr
        assert stderr is not None

        def follow() -> None:
            for raw in stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                self.sshd_log.append(line)
                if "Server listening on" in line:
                    ready.set()
            ready.set()  # EOF: sshd exited, the waiter reports why

        threading.Thread(target=follow, daemon=True, name=f"sshd-{self.netns}").start()
        if not ready.wait(READY_TIMEOUT) or self.process.poll() is not None:
            log = "\n".join(self.sshd_log[-10:])
            raise LabError(f"test host {self.netns}: sshd did not start:\n{log}")

    def _client(self) -> paramiko.SSHClient:
        """A paramiko client to this host with its host key pinned (never trust on first use)."""
        client = paramiko.SSHClient()
        client.get_host_keys().add(self.address, "ssh-ed25519", self.lab.host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.address,
                username="root",
                pkey=self.lab.client_key,
                timeout=10,
                allow_agent=False,
                look_for_keys=False,
            )
        except (paramiko.SSHException, OSError) as exc:
            raise LabError(f"test host {self.netns} ({self.address}): SSH failed: {exc}") from exc
        return client

    def _connect(self) -> SmtpdTarget:
        name = f"lab:{self.hostname}"
        return SmtpdTarget(
            name,
            Shell(name, self._client()),
            self.upstream_address,
            fresh_spool="find /var/spool/smtpd /var/mail -mindepth 1 -delete",
            upstream_peers=(self.address,),  # smtpd's connections come from here, and nobody else's
        )

    def testinfra_host(self) -> Any:
        """A pytest-testinfra host for this test host, on its own SSH connection.

        testinfra's paramiko backend ignores UserKnownHostsFile and would only warn about an
        unknown key, so its (cached) client is replaced by one with the host key pinned.
        """
        import testinfra

        host = testinfra.get_host(f"paramiko://root@{self.address}", ssh_config=str(self.lab.ssh_config()))
        host.backend.__dict__["client"] = self._client()
        return host

    def enter_command(self) -> str:
        """How a person gets a shell on it (printed by --relay-keep)."""
        return f"ssh -F {self.lab.ssh_config()} root@{self.address}"

    def destroy(self) -> None:
        if self.target is not None:
            with contextlib.suppress(Exception):
                self.target.close()
            self.target = None
        if self.netns not in self.lab.created_netns:
            return  # `ip netns add` failed: the namespace of that name is not ours to kill
        kill_netns(self.netns)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        with contextlib.suppress(LabError):
            # Now, not with the namespace: the kernel tears a namespace down asynchronously, and
            # until then the veth and its address (the slot) are still on this machine.
            _ip("link", "del", self.veth)
        with contextlib.suppress(LabError):
            _ip("netns", "del", self.netns)
        with contextlib.suppress(ValueError):
            self.lab.created_netns.remove(self.netns)


def kill_netns(netns: str) -> None:
    """End every process inside a test host: sshd, its sessions and any smtpd they started."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = _netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _netns_pids(netns) and time.monotonic() < deadline:
            # Process exit in another namespace has no waitable event for us (not our children):
            # poll the kernel's list, bounded by the grace period.
            time.sleep(0.02)


def _netns_pids(netns: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


class Lab:
    """A set of test hosts sharing keys and the test CA; everything is removed by `close`."""

    def __init__(self, ca_pem: bytes) -> None:
        check_environment()
        self.ca_pem = ca_pem
        self.dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
        self.hosts: list[LabHost] = []
        self.created_netns: list[str] = []
        host_private, host_public = _key_pair()
        self._write(self.dir / "ssh_host_ed25519_key", host_private, 0o600)
        self.host_key = paramiko.Ed25519Key.from_private_key_file(str(self.dir / "ssh_host_ed25519_key"))
        client_private, client_public = _key_pair()
        self._write(self.dir / "id_ed25519", client_private, 0o600)
        self._write(self.dir / "authorized_keys", (client_public + "\n").encode(), 0o600)
        self.client_key = paramiko.Ed25519Key.from_private_key_file(str(self.dir / "id_ed25519"))
        self._host_public = host_public

    @staticmethod
    def _write(path: Path, data: bytes, mode: int) -> None:
        path.touch(mode=mode)
        path.write_bytes(data)

    def ssh_config(self) -> Path:
        path = self.dir / "ssh_config"
        known = self.dir / "known_hosts"
        known.write_text("".join(f"{h.address} {self._host_public}\n" for h in self.hosts))
        path.write_text(
            "Host 198.51.100.*\n"
            "  User root\n"
            f"  IdentityFile {self.dir / 'id_ed25519'}\n"
            f"  UserKnownHostsFile {known}\n"
            "  StrictHostKeyChecking yes\n"
            "  IdentitiesOnly yes\n"
        )
        return path

    def create_host(self) -> LabHost:
        with _lab_lock():
            used = _used_slots()
            free = next((i for i in range(1, SLOTS + 1) if i not in used), None)
            if free is None:
                raise LabError(f"no free address in {LAB_NETWORK} for another test host")
            host = LabHost(self, next(_host_numbers), Slot(free))
            self.hosts.append(host)
            try:
                host._network()
            except BaseException:
                host.destroy()
                self.hosts.remove(host)
                raise
        try:
            host._files()
            host._start_sshd()
            host.target = host._connect()
        except BaseException:
            host.destroy()
            self.hosts.remove(host)
            raise
        return host

    def destroy_host(self, host: LabHost) -> None:
        host.destroy()
        if host in self.hosts:
            self.hosts.remove(host)

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.destroy()
        self.hosts.clear()
        for netns in list(self.created_netns):
            kill_netns(netns)
            with contextlib.suppress(LabError):
                _ip("netns", "del", netns)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def clean_stale() -> list[str]:
    """Remove namespaces and temp dirs whose owning process is gone (a killed run's leftovers)."""
    removed: list[str] = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for m in re.finditer(rf"^({PREFIX}-(\d+)-(\d+))\b", listing, re.MULTILINE):
        netns, pid = m.group(1), int(m.group(2))
        if _alive(pid):
            continue
        kill_netns(netns)
        with contextlib.suppress(LabError):
            _ip("link", "del", f"{PREFIX}{pid}h{m.group(3)}")  # as in LabHost.destroy
        with contextlib.suppress(LabError):
            _ip("netns", "del", netns)
        removed.append(f"namespace {netns}")
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        owner = re.match(rf"{TMP_PREFIX}(\d+)-", path.name)
        if owner and not _alive(int(owner.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"directory {path}")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
