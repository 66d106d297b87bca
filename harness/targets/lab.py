"""Test hosts on this machine: private network, filesystem, processes and name; sshd inside.

A test host is what a small mail server looks like from outside: an address, sshd, OpenSMTPD
and its files. Built from a lower root (the machine's `/`, or a directory holding another Debian
release) with everything it writes kept private:
- its own network namespace, joined to this machine by a veth pair on 198.51.100.0/24
  (TEST-NET-2; `eth0` inside), with `lo` (127.0.0.1, ::1) as on any Linux host and an interface
  `lo0` (127.0.0.1) so OpenBSD's `listen on lo0` works as written; every other interface,
  address or host name a config's `listen on` names is made when the bundle is installed;
- its own root (lab_init.py): an overlay of every top-level directory of the lower root whose
  writes go to a tmpfs, and fresh /proc, /sys, /dev, /run, /tmp, /var/spool, /var/mail,
  /var/log and /root; whatever a bundle names, wherever, is written inside the host only;
- its own PID, UTS and IPC namespaces (host name `NAME.relay-harness.test`); the first process
  holds a pipe from the owner, so a killed run takes its test hosts with it, by the kernel's hand;
- resolv.conf naming only 127.0.0.1 with `lookup file`, so smtpd never asks any DNS server.
The harness reaches it over SSH only: the lab is a provider of SSH targets.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.smtpdconf import (
    Account,
    Backend,
    ListenNeeds,
    LmtpServer,
    Program,
    RelaySource,
    accounts,
    backends,
    listen_needs,
    lmtp_servers,
    programs,
    relay_sources,
    smarthosts,
)
from harness.targets.base import Bundle, TargetError
from harness.targets.shell import Shell
from harness.targets.smtpd import SmtpdTarget
from harness.targets.testnet import (
    DOMAIN,
    LAB_NETWORK,
    LISTEN_V4,
    LISTEN_V6,
    address_problem,
    egress_note,
    interface_problem,
)
from harness.upstream import UpstreamError, UpstreamServer

if TYPE_CHECKING:
    from harness.targets.images import Image, ImageLease

PREFIX = "rh"
SLOTS = LAB_NETWORK.num_addresses // 4 - 1  # one /30 per host; slot 0 is left unused
LOCK_FILE = "/run/relay-harness.lock"
TMP_PREFIX = "relay-harness-"
INIT_MARK = "relay-harness-init"  # the first process's lines on stdout
# The first process's argv word. Up to 2026-12 it was INIT_MARK, and cleaners of those versions
# judge a host by its owner's pid and lab dir in their own view, so they SIGKILL the live hosts of
# a run in another PID or mount namespace (a container, ci/fresh-root.sh): a host of this version
# is not theirs to see. This version's cleaners see both words.
HOST_MARK = "relay-harness-host"
KEPT_MARKER = "/run/relay-harness/kept"  # in a test host's own root: lab_init.py writes it on `keep`
INIT = Path(__file__).with_name("lab_init.py")
CLONE_NEWNET = 0x40000000
# The interface a relay URL's address literal is assigned to, inside the host (see serve_upstream_at).
UPSTREAM_LINK = "rh-upstream"
READY_TIMEOUT = 15.0
END_TIMEOUT = 10.0
# Host numbers are per process, not per Lab: names (rh-PID-N, rhPIDhN) must not collide when one
# process holds two Labs (a test building its own Lab beside the session fixture's).
_host_numbers = itertools.count(1)
# Interface kinds that make a plain interface with addresses, best first: `dummy` needs its
# module (absent on some kernels), `ifb` is often built in, a veth pair always works (its peer,
# `NAME-p` where the name allows, stays unused inside the host).
_INTERFACE_KINDS = ("dummy", "ifb", "veth")


class LabError(TargetError):
    """The lab cannot build or equip a test host; the message says what is missing and how to get it."""


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


def check_environment(root: str | os.PathLike[str] = "/") -> None:
    """Fail early with the fix, not with a traceback from deep inside `ip`."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network and mount namespaces): run as root or with sudo")
    where = "" if str(root) == "/" else f" in {root}"
    missing = {
        "usr/sbin/smtpd": f"OpenSMTPD is not installed{where}: apt-get install opensmtpd",
        "usr/sbin/sshd": f"sshd is not installed{where}: apt-get install openssh-server",
    }
    for path, message in missing.items():
        if not os.path.exists(os.path.join(root, path)):
            raise LabError(message)
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is not installed: apt-get install {package}")


def _run(cmd: list[str], what: str, batch: str | None = None) -> str:
    proc = subprocess.run(cmd, input=batch, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        hint = ""
        if "Operation not permitted" in proc.stderr:
            hint = " (creating network namespaces needs CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        raise LabError(f"{what}: {proc.stderr.strip()}{hint}")
    return proc.stdout


def _ip(*args: str, batch: str | None = None, pid: int | None = None) -> str:
    """`ip` on this machine, or (pid) in the network namespace of that test host's first process."""
    inside = ["nsenter", "--target", str(pid), "--net"] if pid is not None else []
    cmd = [*inside, "ip", *(["-batch", "-"] if batch else []), *args]
    what = batch.strip().replace("\n", "; ") if batch else " ".join(args)
    return _run(cmd, f"ip {what}", batch)


@contextlib.contextmanager
def _lab_lock() -> Iterator[None]:
    """Serialise slot choice across concurrent runs (pytest-xdist workers, two CI jobs)."""
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until a resource is created and recorded, or removed.

    SIGTERM unwinds like Ctrl-C (cli.py), and an exception raised between "the kernel made it"
    and "the lab noted it" left it to no one: a cancelled CI job once left its namespace behind
    (`ip netns add` interrupted after creating it, before the lab recorded it as its own). Only
    the main thread gets Python's signal handlers, so elsewhere there is nothing to defer.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, FrameType | None]] = []
    caught = (signal.SIGINT, signal.SIGTERM)
    previous: dict[int, Any] = {int(sig): signal.getsignal(sig) for sig in caught}

    def later(signum: int, frame: FrameType | None) -> None:
        pending.append((signum, frame))

    for sig in caught:
        signal.signal(sig, later)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for signum, frame in pending[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


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


def _start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot): a pid with its start time
    names one process for good, where a bare pid may have been reused. None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


SSHD_CONFIG = """\
ListenAddress {address}
Port 22
HostKey /run/relay-harness/ssh_host_ed25519_key
AuthorizedKeysFile /run/relay-harness/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PidFile none
MaxSessions 50
Subsystem sftp internal-sftp
"""


class LabHost:
    """One test host. Built by `Lab.create_host`; `target` is the SSH target that drives it."""

    def __init__(self, lab: Lab, index: int, root: Path | None = None, release: str | None = None) -> None:
        self.lab = lab
        self.index = index
        self.root = root or lab.root  # the lower root: the lab's, or an image's (lab:RELEASE)
        self.release = release
        self.name = f"{PREFIX}-{os.getpid()}-{index}"
        self.veth = f"{PREFIX}{os.getpid()}h{index}"
        self.hostname = f"host{index}.{DOMAIN}"
        self.dir = lab.dir / f"host{index}"
        self.slot: Slot | None = None
        self.process: subprocess.Popen[bytes] | None = None  # `unshare`, parent of the first process
        self.pid: int | None = None  # the host's first process (PID 1 inside), as this machine sees it
        self._pidfd: int | None = None  # the first process, for a kill that cannot hit a reused pid
        self.sshd_pid: int | None = None  # as the host sees it
        self.sshd_log: list[str] = []
        self.notes: list[str] = []  # what the host made for a config (an interface, a test address)
        self.target: LabTarget | None = None
        self.kept = False
        self.lo0_kind: str | None = None  # the kind of interface lo0 is: dummy, ifb or veth
        self._said: list[tuple[str, str]] = []  # the first process's protocol lines (lab_init.py)
        self._news = threading.Condition()
        self._ended = False
        self._reader: threading.Thread | None = None
        self._test_addresses = itertools.count(1)
        self._serving: list[tuple[str, int, tuple[socket.socket, threading.Thread]]] = []

    @property
    def address(self) -> str:
        assert self.slot is not None
        return self.slot.inside

    @property
    def upstream_address(self) -> str:
        assert self.slot is not None
        return self.slot.outside

    def describe_image(self) -> str:
        """The release and smtpd a host of an image runs, with `smtpd -h`'s version (for reports)."""
        assert self.release is not None
        image = self.lab._image(self.release)
        return (
            f"Debian {self.release} image ({image.smtpd_version}, opensmtpd {image.opensmtpd}, "
            f"built {image.built_at})"
        )

    @property
    def netns_path(self) -> str:
        """The host's network namespace, for setns(2) or `nsenter --net=`."""
        return f"/proc/{self.pid}/ns/net"

    # -- building -----------------------------------------------------------------------------
    def _start(self) -> None:
        """The first process: namespaces, then (lab_init.py) the private root."""
        self.dir.mkdir()
        (self.dir / "root").mkdir()
        (self.dir / "layers").mkdir()
        owner = os.getpid()
        cmd = ["unshare", "--net", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child"]
        cmd += ["--propagation", "private", sys.executable, "-I", "-S", str(INIT), HOST_MARK]
        cmd += [self.name, str(owner), str(_start_time(owner)), str(self.lab.dir)]
        with _signals_deferred():
            self.process = subprocess.Popen(
                cmd,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        self._reader = threading.Thread(target=self._follow, daemon=True, name=f"init-{self.name}")
        self._reader.start()
        self._send(json.dumps(self._spec()))
        self.pid = int(self._wait("pid"))
        with contextlib.suppress(OSError):  # gone already: its end is read from the pipe anyway
            self._pidfd = os.pidfd_open(self.pid)

    def _spec(self) -> dict[str, Any]:
        private, public = self.lab.host_key_pem, self.lab.client_public
        files: list[tuple[str, int, bytes]] = [
            ("/etc/hosts", 0o644, self.hosts_text().encode()),
            ("/etc/resolv.conf", 0o644, b"nameserver 127.0.0.1\nlookup file\n"),
            ("/etc/hostname", 0o644, f"{self.hostname}\n".encode()),
            ("/etc/mailname", 0o644, f"{self.hostname}\n".encode()),
            ("/etc/ssl/certs/ca-certificates.crt", 0o644, self.lab.ca_pem),
            ("/run/relay-harness/ssh_host_ed25519_key", 0o600, private),
            ("/run/relay-harness/authorized_keys", 0o600, f"{public}\n".encode()),
            ("/run/relay-harness/sshd_config", 0o644, SSHD_CONFIG.format(address=self.address).encode()),
        ]
        return {
            "lower": str(self.root),
            "newroot": str(self.dir / "root"),
            "layers": str(self.dir / "layers"),
            "skip": [str(self.lab.dir)],
            "owner_lock": str(self.lab.dir / OWNER_LOCK),
            "hostname": self.hostname,
            "files": [[path, mode, base64.b64encode(data).decode()] for path, mode, data in files],
            "sshd": ["/usr/sbin/sshd", "-D", "-e", "-f", "/run/relay-harness/sshd_config"],
        }

    def hosts_text(self) -> str:
        return f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{self.address}\t{self.hostname} host{self.index}\n"

    def _veth(self) -> None:
        """This machine's end of the link (under the lab lock: its address marks the slot used)."""
        assert self.pid is not None and self.slot is not None
        # The peer is born inside the host's namespace: if this run dies from here on, the
        # kernel removes the pair with the namespace.
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.pid))
        _ip(batch=f"addr add {self.slot.outside}/30 dev {self.veth}\nlink set {self.veth} up\n")

    def _network(self) -> None:
        """Inside: lo (as on any Linux host), eth0 (the link), lo0 (for OpenBSD configs)."""
        assert self.pid is not None and self.slot is not None
        _ip(
            batch=f"link set lo up\naddr add {self.slot.inside}/30 dev eth0\nlink set eth0 up\n", pid=self.pid
        )
        self.lo0_kind = self._interface("lo0")
        _ip(batch="addr add 127.0.0.1/8 dev lo0\n", pid=self.pid)
        route = _ip("-o", "route", "get", self.slot.inside)
        if f"dev {self.veth}" not in route:  # never let lab traffic leave by the default route
            raise LabError(f"route to test host {self.slot.inside} does not use {self.veth}: {route.strip()}")

    def _interface(self, name: str) -> str:
        """A plain interface NAME inside the host, up; returns the kind used."""
        assert self.pid is not None
        errors = []
        for kind in _INTERFACE_KINDS:
            args = ["link", "add", name, "type", kind]
            if kind == "veth":
                peer = f"{name}-p" if len(name) <= 13 else f"rhp{next(self._test_addresses)}"
                args += ["peer", "name", peer]
            try:
                _ip(*args, pid=self.pid)
            except LabError as exc:
                errors.append(str(exc))
                continue
            if kind == "veth":
                _ip("link", "set", args[-1], "up", pid=self.pid)
            _ip("link", "set", name, "up", pid=self.pid)
            return kind
        raise LabError(f"the test host cannot provide interface {name}: {'; '.join(errors)}")

    def _start_sshd(self) -> None:
        self._send("start")
        self._wait("sshd")
        deadline = time.monotonic() + READY_TIMEOUT
        with self._news:
            while not any("Server listening on" in line for line in self.sshd_log):
                exited = [value for word, value in self._said if word in ("exited", "error")]
                if self._ended or time.monotonic() > deadline or exited:
                    why = (
                        f"its first process said {exited[0]!r}"
                        if exited
                        else "its first process exited"
                        if self._ended
                        else f"not listening within {READY_TIMEOUT:g}s"
                    )
                    log = "\n".join(self.sshd_log[-10:]) or "(sshd wrote nothing)"
                    raise LabError(f"test host {self.name}: sshd did not start ({why}):\n{log}")
                self._news.wait(max(0.0, deadline - time.monotonic()))
        self.sshd_pid = int(self._wait("sshd"))

    # -- talking to the first process ---------------------------------------------------------
    def _follow(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._news:
                word, _, rest = line.partition(" ")
                if word == INIT_MARK:
                    what, _, value = rest.partition(" ")
                    self._said.append((what, value))
                    if what == "note":
                        self.notes.append(value)
                else:
                    self.sshd_log.append(line)
                self._news.notify_all()
        with self._news:
            self._ended = True
            self._news.notify_all()

    def _send(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except OSError as exc:
            raise LabError(f"test host {self.name}: its first process is gone ({exc})") from None

    def _wait(self, what: str, timeout: float = READY_TIMEOUT) -> str:
        """The value of the first process's line `what`; its `error` line if it fails first."""
        deadline = time.monotonic() + timeout
        with self._news:
            while True:
                for word, value in self._said:
                    if word == what:
                        return value
                    if word == "error":
                        raise LabError(f"test host {self.name}: {value}")
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    tail = "\n".join(self.sshd_log[-10:])
                    why = "its first process exited" if self._ended else f"no answer within {timeout:g}s"
                    raise LabError(
                        f"test host {self.name}: {why} (waiting for {what}){':' if tail else ''}\n{tail}"
                    )
                self._news.wait(remaining)

    def failure(self) -> str | None:
        """The first process's own account of why it failed, if it gave one."""
        with self._news:
            return next((f"test host {self.name}: {v}" for w, v in self._said if w == "error"), None)

    # -- what a config listens on -------------------------------------------------------------
    def provide(self, needs: ListenNeeds) -> list[str]:
        """Every interface, address and host name the config's `listen on` lines name, made in
        the host (with test addresses) unless it has them; returns notes saying what was made."""
        assert self.pid is not None and self.target is not None
        links = {link["ifname"] for link in json.loads(_ip("-j", "link", "show", pid=self.pid))}
        present = self._addresses()
        notes: list[str] = []
        for name in needs.interfaces:
            base, colon, _ = name.partition(":")
            if name in links or (colon and name in present.values()):
                continue
            _check_interface_name(base, name)
            if base not in links:
                kind = self._interface(base)
                links.add(base)
            else:
                kind = "label"
            v4, v6 = self._test_address(4, present), self._test_address(6, present)
            label = f" label {name}" if colon else ""
            batch = f"addr add {v4}/32 dev {base}{label}\n"
            if not colon:
                batch += f"addr add {v6}/128 dev {base} nodad\n"
            _ip(batch=batch, pid=self.pid)
            what = f"an address labelled {name} on {base}" if colon else f"an interface {name} ({kind})"
            extra = f" and {v6}" if not colon else ""
            notes.append(f"listen on {name}: the test host has {what} with {v4}{extra} (test addresses)")
            if name == "egress":
                notes.append(egress_note(name))
        for text in needs.addresses:
            if self._assign(ipaddress.ip_address(text), present):
                notes.append(f"listen on {text}: assigned to the test host's eth0")
        hosts = ""
        for name in needs.hostnames:
            if self.target.run(f"getent hosts {shlex.quote(name)}").returncode == 0:
                continue  # localhost, the host's own name, one made before
            v4 = self._test_address(4, present)
            _ip(batch=f"addr add {v4}/32 dev eth0\n", pid=self.pid)
            hosts += f"{v4}\t{name}\n"
            notes.append(
                f"listen on {name}: the name resolves to {v4} (a test address on eth0) in /etc/hosts"
            )
        if hosts:
            self.target.check("cat >> /etc/hosts", stdin=hosts.encode())
        self.notes.extend(notes)
        return notes

    def _assign(
        self,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        present: dict[str, str],
        use: str = "listen on",
    ) -> bool:
        """ADDRESS on the host's eth0, as the host the config ships to has it on an interface;
        False where it is there already (0.0.0.0, ::, 127.0.0.0/8, ::1, one assigned before)."""
        if address.is_unspecified or address.is_loopback or str(address) in present:
            return False
        problem = address_problem(address, use)
        if problem is not None:
            raise LabError(problem)
        size = 32 if address.version == 4 else 128
        _ip(batch=f"addr add {address}/{size} dev eth0{' nodad' if size == 128 else ''}\n", pid=self.pid)
        present[str(address)] = "eth0"
        return True

    def provide_sources(self, sources: Sequence[RelaySource]) -> list[str]:
        """Every address a relay action sends from (`src`), assigned in the host; returns notes.

        The fake upstream listens on this machine, which routes no test address back to a test
        host, so a host with sources is served the upstream inside its own network namespace
        (see serve_upstream_inside): smtpd's connection from the source stays in the host."""
        assert self.pid is not None
        present = self._addresses()
        notes = [
            f'relay src {s.address} (action "{s.action}", line {s.line}): assigned to the test host\'s eth0'
            for s in sources
            if self._assign(ipaddress.ip_address(s.address), present, "send from")
        ]
        self.notes.extend(notes)
        return notes

    def _addresses(self) -> dict[str, str]:
        """Address → interface (or its label, eth0:1) of every address in the host."""
        found = {}
        for link in json.loads(_ip("-j", "addr", "show", pid=self.pid)):
            for info in link.get("addr_info", ()):
                found[info["local"]] = info.get("label", link["ifname"])
        return found

    def _test_address(self, version: int, present: dict[str, str]) -> str:
        network = LISTEN_V4 if version == 4 else LISTEN_V6
        while True:
            candidate = str(network.network_address + next(self._test_addresses))
            if candidate not in present:
                present[candidate] = ""
                return candidate

    # -- the fake upstream at a relay URL's address -------------------------------------------
    def serve_upstream_at(self, address: str, upstream: UpstreamServer, what: str = "smarthost") -> None:
        """The fake upstream answering at ADDRESS (a relay URL's literal) on its port, inside the
        host: the address assigned there (on lo), the listening socket made in the host's network
        namespace (so only the host can reach it), each connection handed to the upstream."""
        assert self.pid is not None
        ip = ipaddress.ip_address(address)
        if (ip.version == 4 and ip in LAB_NETWORK) or ip.is_multicast or ip.is_unspecified:
            raise LabError(
                f"the test host cannot provide the smarthost address {ip}: it is the lab's own "
                f"network ({LAB_NETWORK}) or no unicast address; give the relay URL a host name"
            )
        key = (str(ip), upstream.port)
        if key in {(a, p) for a, p, _ in self._serving}:
            return
        if not ip.is_loopback and str(ip) not in self._addresses():
            # Not on lo: `listen on lo` would make smtpd listen there too (and relay to itself).
            links = {link["ifname"] for link in json.loads(_ip("-j", "link", "show", pid=self.pid))}
            if UPSTREAM_LINK not in links:
                self._interface(UPSTREAM_LINK)
            size = 32 if ip.version == 4 else 128
            nodad = " nodad" if size == 128 else ""
            _ip(batch=f"addr add {ip}/{size} dev {UPSTREAM_LINK}{nodad}\n", pid=self.pid)
            self.notes.append(
                f"{what} {ip}: assigned to the test host's {UPSTREAM_LINK}, where the fake upstream answers"
            )
        sock = self._socket_inside(str(ip), upstream.port)
        thread = threading.Thread(
            target=_hand_over, args=(sock, upstream), daemon=True, name=f"upstream-at-{ip}"
        )
        thread.start()
        self._serving.append((str(ip), upstream.port, (sock, thread)))

    def serve_upstream_inside(self, version: int, upstream: UpstreamServer) -> str:
        """The fake upstream at a test address of the host's own (IPv4 or IPv6), for the names it
        relays to: where smtpd's connections from a relay `src` reach it without leaving the
        host. Returns the address."""
        address = self._test_address(version, self._addresses())
        self.serve_upstream_at(address, upstream, what="upstream for relay src")
        return address

    def stop_serving(self) -> None:
        for _, _, (sock, thread) in self._serving:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the hand-over thread
            sock.close()
            thread.join(timeout=END_TIMEOUT)
        self._serving.clear()

    def _socket_inside(self, address: str, port: int) -> socket.socket:
        """A listening TCP socket in the host's network namespace: one thread enters it (setns),
        binds, and ends; the socket stays where it was made."""
        made: list[socket.socket] = []
        failed: list[OSError] = []

        def make() -> None:
            try:
                _enter_netns(self.netns_path)
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((address, port))
                    sock.listen(16)
                except OSError:
                    sock.close()
                    raise
                made.append(sock)
            except OSError as exc:
                failed.append(exc)

        thread = threading.Thread(target=make, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if failed:
            why = failed[0].strerror or str(failed[0])
            raise LabError(f"the test host cannot serve the fake upstream at {address}:{port}: {why}")
        return made[0]

    # -- the host from outside ----------------------------------------------------------------
    def _connect(self) -> LabTarget:
        return LabTarget(self, self._client())

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
            raise LabError(f"test host {self.name} ({self.address}): SSH failed: {exc}") from exc
        return client

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

    def keep(self) -> None:
        """Let the host outlive this process (pytest --relay-keep) until `relay-harness lab clean`."""
        self._send("keep")
        self._wait("kept")  # from here no cleaner takes it for a leftover
        (self.lab.dir / f"{self.name}.kept").touch()
        self.kept = True

    def destroy(self) -> None:
        with _signals_deferred():
            if self.target is not None:
                with contextlib.suppress(Exception):
                    self.target.close()
                self.target = None
            if self.process is not None:
                self._end()
            with contextlib.suppress(LabError):
                # Now, not with the namespace: the kernel frees a network namespace asynchronously,
                # and until then the veth and its address (the slot) are still on this machine.
                _ip("link", "del", self.veth)
            shutil.rmtree(self.dir, ignore_errors=True)

    def _end(self) -> None:
        """Close the lifeline; the first process exits and the kernel ends every process of the host
        (`unshare` returns once they are all gone: the first process of a PID namespace is reaped
        only after the rest). One that does not end in time (it reads the lifeline only between
        steps: building its root under load takes a while; or stuck) is killed: the first process
        itself, never `unshare` alone, which returned at once with the host's processes still
        ending, so a run could exit 130 with them still on the machine."""
        assert self.process is not None
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=END_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill_first_process()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=END_TIMEOUT)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._reader is not None:
            self._reader.join(timeout=END_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def _kill_first_process(self) -> None:
        """SIGKILL to the host's PID 1 ends its whole PID namespace. Before it said its pid, it
        is `unshare`'s child (`unshare` still runs: no other process can have that pid)."""
        assert self.process is not None
        pidfds = [] if self._pidfd is None else [self._pidfd]
        if not pidfds:
            pid = self.process.pid
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                    with contextlib.suppress(OSError):
                        pidfds.append(os.pidfd_open(int(child)))
        if not pidfds:  # no child (yet), or no children list: --kill-child takes it along
            self.process.kill()
        for fd in pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            if fd != self._pidfd:
                os.close(fd)


class LabTarget(SmtpdTarget):
    """The target of a test host: installing a bundle first makes what its listeners name, and
    the fake upstream answers at every address literal its relay URLs dial."""

    def __init__(self, host: LabHost, client: paramiko.SSHClient) -> None:
        # lab:HOST, or lab:RELEASE/HOST for a host of another release's image
        name = f"lab:{host.release}/{host.hostname}" if host.release else f"lab:{host.hostname}"
        super().__init__(
            name,
            Shell(name, client),
            host.upstream_address,
            fresh_spool="find /var/spool/smtpd /var/mail -mindepth 1 -delete",
            upstream_peers=(host.address,),  # smtpd's connections come from here, and nobody else's
        )
        self.host = host
        # which release and smtpd a report's verdict is about, for a host of an image
        self._root_notes = (f"{name}: {host.describe_image()}",) if host.release is not None else ()
        self.notes = self._root_notes
        self._upstream: UpstreamServer | None = None
        self._inside: str | None = None  # where the upstream answers inside the host (relay src)

    def upstream_address(self) -> str:
        """Where the relay names point: this machine's end of the link, or for a config whose
        relays send from a `src` address, the upstream inside the host (no route leads back)."""
        return self._inside or super().upstream_address()

    def attach_upstream(self, upstream: UpstreamServer) -> None:
        super().attach_upstream(upstream)
        self.host.stop_serving()  # an earlier run's upstream is gone
        self._upstream = upstream

    def install(self, bundle: Bundle) -> None:
        config = bundle.parsed  # None: smtpd judges it; nothing to check for it
        if config is not None:
            self.host.provide(listen_needs(config))
        elif (readable := bundle.readable) is not None:
            # smtpd refuses it for its own error; what it listens on is made so smtpd says that
            # error, and what cannot be made is left to smtpd's words too
            with contextlib.suppress(LabError):
                self.host.provide(listen_needs(readable))
        super().install(bundle)
        made: list[str] = []
        self._inside = None
        if config is not None:
            sources = relay_sources(config, {f.path: f.content for f in bundle.files})
            self.host.provide_sources(sources)
            if sources and self._upstream is not None:
                version = 6 if all(":" in s.address for s in sources) else 4
                self._inside = self.host.serve_upstream_inside(version, self._upstream)
            self._check_backends(backends(config))
            self._check_programs(programs(config))
            self._check_lmtp(lmtp_servers(config))
            made = self._provide_accounts(accounts(config))
        if config is not None and self._upstream is not None:
            for address in smarthosts(config):
                if _is_address(address):
                    self.host.serve_upstream_at(address, self._upstream)
        self.notes = (*self._root_notes, *self.host.notes, *made)  # its root, what was made for it

    def _first_missing(self, tests: Sequence[str], prelude: str = "") -> int | None:
        """The index of the first shell test that fails on the host (None: all hold), asked in
        one command: a config's needs are checked without an SSH round trip each."""
        script = "; ".join(f"{test} || echo {i}" for i, test in enumerate(tests))
        missing = self.check(f"{prelude}{script}; true").stdout.split()
        return int(missing[0]) if missing else None

    def _check_backends(self, needed: Iterable[Backend]) -> None:
        """Every table backend the config names that Debian packages is installed: else smtpd -n
        says `backend "sqlite" does not exist` and the config would be blamed for it. A backend
        Debian does not ship (a typo, or one built by hand) is left to smtpd's judgement."""
        known = [b for b in needed if b.package is not None]
        if not known:
            return
        first = self._first_missing([f"test -x {shlex.quote(b.program)}" for b in known])
        if first is not None:
            b = known[first]
            raise LabError(
                f"the test host cannot provide the table backend {b.backend} (table {b.table}, line "
                f"{b.line}): {b.program} is not installed; Debian ships it in {b.package}: "
                f"apt-get install {b.package} (on this machine, or in the image)"
            )

    def _check_programs(self, needed: Iterable[Program]) -> None:
        """Every program the config runs is on the host: else smtpd would fail each delivery or
        exit, and the config be blamed for what the test host lacks."""
        wanted = [p for p in needed if p.executable is not None]
        if not wanted:
            return
        # smtpd runs them through /bin/sh with its default PATH (_PATH_DEFPATH)
        first = self._first_missing(
            [f"command -v {shlex.quote(p.executable or '')} >/dev/null" for p in wanted],
            prelude="PATH=/usr/bin:/bin:/usr/sbin:/sbin; ",
        )
        if first is not None:
            p = wanted[first]
            exe = p.executable or ""
            install = f"apt-get install {p.package}" if p.package else "apt-get install"
            # --file takes a path; the shell looks a bare mda name up in PATH, /usr/bin first
            given = exe if exe.startswith("/") else f"/usr/bin/{exe}"
            raise LabError(
                f"the test host cannot provide {exe}, the program of {p.what} (line {p.line}: "
                f'"{p.command}"): it is not installed here; install it ({install} on this machine, '
                f"or in the image), or give it with --file {given}=LOCAL"
            )

    def _provide_accounts(self, needed: Iterable[Account]) -> list[str]:
        """The users and groups the config runs things as, made in the test host (its /etc is
        its own) where this machine lacks them, as the host the config ships to has them (a
        filter's package makes its user; an admin makes vmail): else smtpd exits at start-up
        (`getpwnam: Success`) or fails every delivery, and the config is blamed. Said in the notes."""
        steps: list[str] = []
        for a in needed:
            where = f"{a.what}, line {a.line}"
            if a.group is not None:
                g, said = shlex.quote(a.group), shlex.quote(f"group {a.group} ({where})")
                steps.append(f"getent group {g} >/dev/null || {{ groupadd --system {g} && echo {said}; }}")
            if a.user is not None:
                u, said = shlex.quote(a.user), shlex.quote(f"user {a.user} ({where})")
                in_group = f"-g {shlex.quote(a.group)}" if a.group is not None else "-U"
                steps.append(
                    f"getent passwd {u} >/dev/null || {{ useradd --system -M -d /nonexistent "
                    f"-s /usr/sbin/nologin {in_group} {u} && echo {said}; }}"
                )
        if not steps:
            return []
        made = self.check("; ".join(steps)).stdout.splitlines()
        return [
            f"{line}: not on this machine; made in the test host, as the host the config ships to has it"
            for line in made
            if line.strip()
        ]

    def _check_lmtp(self, needed: Iterable[LmtpServer]) -> None:
        """An `lmtp` action delivers to another service of the host (dovecot, cyrus): a test
        host runs none, so local delivery would fail with `mail.lmtp: connect: ...` and the
        config be blamed for what the test host lacks."""
        wanted = list(needed)
        if not wanted:
            return
        first = self._first_missing(
            [f"test -S {shlex.quote(s.socket)}" if s.socket else "false" for s in wanted]
        )
        if first is not None:
            s = wanted[first]
            raise LabError(
                f"the test host cannot provide the LMTP server at {s.destination}, where action "
                f'"{s.action}" (line {s.line}) delivers: it is another service of the host (dovecot, '
                "cyrus), which the test host does not run; test local delivery where that server runs "
                "(--target ssh://USER@HOST), or check the relaying with the action as mbox or maildir"
            )

    def close(self) -> None:
        self.host.stop_serving()
        super().close()


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_interface_name(base: str, name: str) -> None:
    """Linux's rules for an interface name (and an address label `base:x`)."""
    problem = interface_problem(base, name)
    if problem is not None:
        raise LabError(problem)


def _enter_netns(path: str) -> None:
    """This thread (only) into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        setns = getattr(os, "setns", None)  # Python 3.12+
        if setns is not None:
            setns(fd, CLONE_NEWNET)
        elif _libc().setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _hand_over(sock: socket.socket, upstream: UpstreamServer) -> None:
    """Each connection to `sock` becomes one session of the upstream, until either is closed."""
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        try:
            upstream.serve_socket(conn, peer=f"{peer[0]}:{peer[1]}")
        except UpstreamError:
            conn.close()
            return


class Lab:
    """A set of test hosts sharing keys and the test CA; everything is removed by `close`.

    `root` is the lower root of every host's filesystem: this machine's `/` by default, or a
    directory holding another system (a Debian release unpacked by debootstrap).
    """

    def __init__(self, ca_pem: bytes, root: str | os.PathLike[str] = "/") -> None:
        check_environment(root)
        self.root = Path(root)
        self.ca_pem = ca_pem
        self.hosts: list[LabHost] = []
        self._images: dict[str, ImageLease] = {}
        with contextlib.suppress(OSError, LabError):
            clean_stale()  # what killed runs left, before adding to it
        with _signals_deferred():
            self.dir, self._owner_lock = _owned_dir()
        try:
            host_private, host_public = _key_pair()
            self.host_key_pem = host_private
            self._write(self.dir / "ssh_host_ed25519_key", host_private, 0o600)
            self.host_key = paramiko.Ed25519Key.from_private_key_file(str(self.dir / "ssh_host_ed25519_key"))
            client_private, self.client_public = _key_pair()
            self._write(self.dir / "id_ed25519", client_private, 0o600)
            self._write(self.dir / "authorized_keys", (self.client_public + "\n").encode(), 0o600)
            self.client_key = paramiko.Ed25519Key.from_private_key_file(str(self.dir / "id_ed25519"))
            self._host_public = host_public
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._owner_lock)
            raise

    @staticmethod
    def _write(path: Path, data: bytes, mode: int) -> None:
        path.touch(mode=mode)
        path.write_bytes(data)

    def ssh_config(self) -> Path:
        path = self.dir / "ssh_config"
        known = self.dir / "known_hosts"
        known.write_text("".join(f"{h.address} {self._host_public}\n" for h in self.hosts if h.slot))
        path.write_text(
            "Host 198.51.100.*\n"
            "  User root\n"
            f"  IdentityFile {self.dir / 'id_ed25519'}\n"
            f"  UserKnownHostsFile {known}\n"
            "  StrictHostKeyChecking yes\n"
            "  IdentitiesOnly yes\n"
        )
        return path

    def create_host(self, release: str | None = None) -> LabHost:
        """A fresh test host; `release`: of that Debian release's image (built on first use)."""
        root = None
        if release is not None:
            image = self._image(release)
            root = image.root
        host = LabHost(self, next(_host_numbers), root, release)
        self.hosts.append(host)
        try:
            with _lab_lock():
                used = _used_slots()
                free = next((i for i in range(1, SLOTS + 1) if i not in used), None)
                if free is None:
                    raise LabError(f"no free address in {LAB_NETWORK} for another test host")
                host.slot = Slot(free)
                host._start()
                host._veth()
            host._network()
            host._wait("built")
            host._start_sshd()
            host.target = host._connect()
        except LabError as exc:
            cause = host.failure()
            self.destroy_host(host)
            if cause is not None:  # the first process said why: that, not what failed after it
                raise LabError(cause) from exc
            raise
        except BaseException:
            self.destroy_host(host)
            raise
        return host

    def destroy_host(self, host: LabHost) -> None:
        host.destroy()
        if host in self.hosts:
            self.hosts.remove(host)

    def _image(self, release: str) -> Image:
        """The image of `release`, held (shared) until the lab closes: no rebuild swaps it meanwhile."""
        from harness.targets.images import use_image

        if release not in self._images:
            lease = use_image(release)
            try:
                check_environment(lease.image.root)
            except BaseException:
                lease.close()
                raise
            self._images[release] = lease
        return self._images[release].image

    def close(self) -> None:
        with _signals_deferred():
            for host in reversed(self.hosts):
                host.destroy()
            self.hosts.clear()
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.close(self._owner_lock)
            for lease in self._images.values():
                lease.close()
            self._images.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- what killed runs left ---------------------------------------------------------------------

OWNER_LOCK = ".owner.lock"


def _owned_dir() -> tuple[Path, int]:
    """The lab's temp dir, and the descriptor of the lock its owner holds on it for life.

    A pid says whether a run is alive only inside one PID namespace: a cleaner in another one (a
    CI job run in a namespace of its own, sharing /tmp) sees no such pid. The lock is the
    kernel's, the same everywhere, and goes with the last descriptor when the owner dies, however
    (each test host's first process holds one too: a kept host's dir stays while it lives).
    The dir gets its final name only once locked, so no cleaner ever sees it unlocked.
    """
    partial = Path(tempfile.mkdtemp(prefix=f".{TMP_PREFIX}partial-"))
    fd = os.open(partial / OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)  # shared: a forked child holding it too changes nothing
    final = Path(tempfile.gettempdir()) / f"{TMP_PREFIX}{os.getpid()}-{partial.name.rpartition('-')[2]}"
    os.rename(partial, final)
    return final, fd


def _nested_pid_namespace() -> bool:
    """This process is not in the machine's first PID namespace: pids it cannot see may be alive
    (PROC_PID_INIT_INO, the initial namespace's fixed inode number)."""
    try:
        return os.readlink("/proc/self/ns/pid") != "pid:[4026531836]"
    except OSError:
        return True


def _owner_holds(lab_dir: Path) -> bool:
    """Someone (in any PID namespace) holds the lab dir's owner lock: its run is alive."""
    try:
        fd = os.open(lab_dir / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # a dir of an older version, or half removed: its pid decides
    except OSError:
        return True  # cannot tell: keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class StaleHost:
    """A test host's first process found on this machine, with the run that owns it.

    `owner` and `lab_dir` are in the owner's own view: a run in a container or in
    ci/fresh-root.sh has PID and mount namespaces and a /tmp of its own, where this process sees
    another process or nothing. Judging a live run's host by them got it SIGKILLed by every other
    run's cleaner on the machine (`unshare: sigprocmask unblock failed`, util-linux's words for a
    first process killed by SIGKILL). The kernel's process tree is the same in every view: the
    host's parent is `unshare`, whose parent is the owner for as long as the owner lives.
    """

    pid: int
    name: str
    owner: int
    owner_start: int | None
    lab_dir: Path

    @property
    def owner_alive(self) -> bool:
        unshare = _parent(self.pid)
        owner = _parent(unshare) if unshare is not None else None
        if owner is None or _innermost_pid(owner) != self.owner:
            return False  # unshare's parent is a reaper now (or the host is ending)
        return self.owner_start is None or _start_time(owner) == self.owner_start

    @property
    def kept(self) -> bool:
        """Kept (pytest --relay-keep): the host says so in its own /run, which its /proc/PID/root
        shows from any view; the owner's lab dir says so for hosts of older versions."""
        marker = Path(f"/proc/{self.pid}/root{KEPT_MARKER}")
        return marker.exists() or (self.lab_dir / f"{self.name}.kept").exists()

    @property
    def veth_name(self) -> str:
        """This machine's end of its link, named as LabHost names it."""
        owner, _, number = self.name.removeprefix(f"{PREFIX}-").partition("-")
        return f"{PREFIX}{owner}h{number}"


def _parent(pid: int) -> int | None:
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return parent if parent > 0 else None


def _innermost_pid(pid: int) -> int | None:
    """The process's pid in its own PID namespace (the last of NSpid), as it knows itself."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return pid


HOST_MARKS = (HOST_MARK.encode(), INIT_MARK.encode())


def running_hosts() -> list[StaleHost]:
    """Every test host running on this machine (its first process), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The first process is `python3 -I -S lab_init.py MARK ...` (its parent, `unshare`, has
        # the same words further on: not the host), and PID 1 of its namespace: a child it forks
        # shows the same words until it execs (sshd, every moment of every host start), and a
        # cleaner that took it for a host whose owner is gone SIGKILLed it (`sshd -9`).
        if len(argv) < 9 or argv[4] not in HOST_MARKS or not argv[3].endswith(b"lab_init.py"):
            continue
        if _innermost_pid(int(entry.name)) != 1:
            continue
        at = 4
        try:
            name, owner, start, lab_dir = (a.decode() for a in argv[at + 1 : at + 5])
            found.append(
                StaleHost(
                    int(entry.name), name, int(owner), int(start) if start.isdigit() else None, Path(lab_dir)
                )
            )
        except ValueError:
            continue
    return found


def clean_stale(kept: bool = False) -> list[str]:
    """Remove what runs that are gone left: test hosts, named namespaces of older versions, temp dirs.

    A killed run's hosts end by themselves (their first process reads the end of its pipe), so
    mostly a key directory is left. `kept` also removes hosts kept with --relay-keep (`lab clean`).
    """
    removed: list[str] = []
    spared: set[Path] = set()
    for host in running_hosts():
        if host.owner_alive:
            continue
        if host.kept and not kept:
            spared.add(host.lab_dir)
            continue
        # Its `unshare` (in the host's network namespace too) ends only once it has reaped the
        # host: wait for both, so what follows finds the host entirely gone (its lab dir was
        # spared while `unshare`, then holding the dir's lock too, lived on for a moment).
        ends = _pidfds(host.pid, *_unshare_of(host.pid))
        if ends:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(ends[0], signal.SIGKILL)  # the kernel ends its PID namespace
        _wait_exits(ends)
        with contextlib.suppress(LabError):
            _ip("link", "del", host.veth_name)
        removed.append(f"test host {host.name}")
    nested = _nested_pid_namespace()
    listing = "" if nested else subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for m in re.finditer(rf"^({PREFIX}-(\d+)-(\d+))\b", listing, re.MULTILINE):
        netns, pid = m.group(1), int(m.group(2))  # named namespaces: test hosts of older versions
        if _start_time(pid) is not None:
            continue
        kill_netns(netns)
        with contextlib.suppress(LabError):
            _ip("link", "del", f"{PREFIX}{pid}h{m.group(3)}")
        with contextlib.suppress(LabError):
            _ip("netns", "del", netns)
        removed.append(f"namespace {netns}")
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        owner_m = re.match(rf"{TMP_PREFIX}(\d+)-", path.name)
        if owner_m is None or path in spared:
            continue
        if (path / OWNER_LOCK).exists():
            if _owner_holds(path):
                continue  # the lock decides, whatever PID namespace its owner is in
        elif nested or _start_time(int(owner_m.group(1))) is not None:
            continue  # an older version's dir: only its pid can tell, and only seen from the root
        shutil.rmtree(path, ignore_errors=True)
        removed.append(f"directory {path}")
    for path in Path(tempfile.gettempdir()).glob(f".{TMP_PREFIX}partial-*"):
        # A run killed between making its dir and naming it (microseconds): old and unlocked.
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > 60 and not _owner_holds(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"directory {path}")
    return removed


def _unshare_of(pid: int) -> list[int]:
    """The `unshare` that started a host's first process, while it still is its parent."""
    parent = _parent(pid)
    with contextlib.suppress(OSError):
        if parent is not None and Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0].endswith(
            b"unshare"
        ):
            return [parent]
    return []


def _pidfds(*pids: int) -> list[int]:
    """Descriptors of those processes (that exist): a signal or a wait through one never reaches
    another process that reused the pid."""
    fds = []
    for pid in pids:
        with contextlib.suppress(OSError):
            fds.append(os.pidfd_open(pid))
    return fds


def _wait_exits(pidfds: list[int], timeout: float = END_TIMEOUT) -> None:
    """Until those processes (not our children) have exited: a pidfd is readable then. Bounded;
    the descriptors are closed."""
    deadline = time.monotonic() + timeout
    waiting = list(pidfds)
    try:
        while waiting and (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(waiting, [], [], remaining)
            waiting = [fd for fd in waiting if fd not in ready]
    finally:
        for fd in pidfds:
            os.close(fd)


def kill_netns(netns: str) -> None:
    """End every process inside a named network namespace (test hosts of older versions)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = _netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _netns_pids(netns) and time.monotonic() < deadline:
            time.sleep(0.02)


def _netns_pids(netns: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []
