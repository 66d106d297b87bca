"""The relay probe on the host itself: a second smtpd in private namespaces, the host's files as they are.

Copying the config and tables into the local lab tests them with THIS machine's smtpd, users and
libraries; on the host, the host's own smtpd binary reads the host's own config and tables (and
its users, its /etc/ssl, its libraries) exactly where they are. What keeps that read-only:

- `unshare --net --mount --uts --pid`: a network namespace with only a loopback (nothing can
  leave it), a private mount namespace where /etc is an overlay whose writable layer is a tmpfs,
  and /run, /var/spool, /var/mail and /var/log are fresh tmpfs (so the host's queue, control
  socket, mailboxes and logs are never seen or touched); a PID namespace so that ending its first
  process ends every process in it (smtpd's children included), by the kernel's hand.
- In the overlay only: /etc/hosts names the smarthost 127.0.0.2 (the forwarder), resolv.conf is
  `nameserver 127.0.0.1` + `lookup file` (no DNS), and the CA bundle is the harness's test CA.
- The fake upstream runs here, in the harness, and nothing listens for it on the host: the
  sandbox's first process is a small forwarder (the host's python3) that listens on
  127.0.0.2:PORT inside the sandbox's own network namespace; for each connection smtpd opens it
  says `relay-harness-conn N` on its output, and the harness opens one more SSH exec channel,
  `nsenter --net` into the sandbox, whose pump joins connection N through an abstract Unix
  socket of that namespace (which only root, entering it, can reach) and carries the bytes over
  the channel to the upstream. No port on the host's loopback: no other local user can ask
  the upstream whether a password is right.
- Its only mark on the host's disk is an empty temp dir, removed when the sandbox ends. The
  sandbox ends when the harness closes the channel that started it, and also when the SSH
  connection drops (the forwarder's stdin reaches EOF, or its output breaks: it exits on
  anything), so a killed harness leaves nothing either.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import paramiko

from harness.errors import HarnessError
from harness.targets.base import LogFollower, TargetError
from harness.targets.shell import CommandResult, Shell
from harness.targets.smtpd import Enclosure, EnclosureLimit, SmtpdTarget

if TYPE_CHECKING:
    from harness.upstream import UpstreamServer

TMP_TEMPLATE = "/tmp/relay-harness-accept.XXXXXX"
# Where the smarthost's name points inside the sandbox: on its loopback (all of 127/8 is local
# there) but not an address smtpd binds for `listen on lo`, so a host listening on the relay's
# port itself (submission, 587) does not collide with the forwarder.
UPSTREAM_ADDRESS = "127.0.0.2"
TMP_PATTERN = re.compile(r"^/tmp/relay-harness-accept\.[A-Za-z0-9]{6}$")
READY_TIMEOUT = 15.0
END_TIMEOUT = 15.0
# The forwarder's own limit: should both the harness and the SSH connection hang without closing,
# the sandbox still ends (seconds).
MAX_LIFETIME = 3600

# The sandbox's first process (PID 1 of its PID namespace): while it lives, the sandbox lives.
# argv: LISTEN_PORT PUMP_SOCKET MAX_LIFETIME ADDRESS
FORWARDER = r"""
import itertools, os, signal, socket, sys, threading
listen_port, pump_name, lifetime, address = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((address, listen_port))
server.listen(16)
pumps = socket.socket(socket.AF_UNIX)
pumps.bind("\0" + pump_name)  # abstract: exists only in this network namespace
pumps.listen(16)
pending, lock, ids = {}, threading.Lock(), itertools.count(1)
def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def serve():
    while True:
        client, _ = server.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = next(ids)
        with lock:
            pending[n] = client
        print("relay-harness-conn", n, flush=True)
def join():
    while True:
        chan, _ = pumps.accept()
        line = b""
        while not line.endswith(b"\n"):
            data = chan.recv(1)
            if not data:
                break
            line += data
        with lock:
            client = pending.pop(int(line or b"0"), None)
        if client is None:
            chan.close()
            continue
        for a, b in ((client, chan), (chan, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()
# Whatever happens from here on (the harness gone: stdout is a broken pipe, stdin at EOF; a
# signal; the lifetime over), this process ends, and with it the sandbox: never an exception
# that leaves Python waiting at shutdown for a thread.
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda *_: os._exit(2))
try:
    for work in (serve, join):
        threading.Thread(target=work, daemon=True).start()
    timer = threading.Timer(lifetime, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    print("relay-harness-forwarder ready", flush=True)
    sys.stdin.buffer.read()
finally:
    os._exit(0)
"""

# One smtpd connection's way out: joins connection N at the forwarder, then carries its bytes
# over this command's stdin and stdout (the SSH channel). argv: PUMP_SOCKET N
PUMP = r"""
import os, socket, sys, threading
sock = socket.socket(socket.AF_UNIX)
sock.connect("\0" + sys.argv[1])
sock.sendall(sys.argv[2].encode() + b"\n")
def down():
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=down, daemon=True).start()
while True:
    data = sock.recv(65536)
    if not data:
        break
    os.write(1, data)
"""

# Runs as the sandbox's PID 1, in its new namespaces. $1 dir, $2 loopback name, $3 listen port,
# $4 pump socket name, $5 forwarder. The smarthost's name and the test CA are written later, by
# the driver (SmtpdTarget.point/trust), into this overlay.
INNER = r"""
set -e
echo "relay-harness-sandbox $(cut -d' ' -f4 /proc/self/stat) $(readlink /proc/self/ns/net)"
D=$1
mount -t tmpfs -o mode=0700 rh-sandbox "$D"
mkdir "$D/etc" "$D/etc-work"
mount -t overlay rh-sandbox-etc -o "lowerdir=/etc,upperdir=$D/etc,workdir=$D/etc-work" /etc
mount -t tmpfs -o mode=0755 rh-sandbox-run /run
mount -t tmpfs -o mode=0755 rh-sandbox-spool /var/spool
mkdir -m 0711 /var/spool/smtpd
mail=$(readlink -f /var/mail)
mkdir -p "$mail"
mount -t tmpfs -o mode=1777 rh-sandbox-mail "$mail"
mount -t tmpfs -o mode=0755 rh-sandbox-log /var/log
cat /etc/hosts > "$D/hosts"
rm -f /etc/hosts /etc/resolv.conf
cat "$D/hosts" > /etc/hosts
printf 'nameserver 127.0.0.1\nlookup file\n' > /etc/resolv.conf
[ "$2" = lo ] || ip link set lo name "$2"
ip link set "$2" up
exec python3 -c "$5" "$3" "$4" __LIFETIME__ __ADDRESS__
""".replace("__LIFETIME__", str(MAX_LIFETIME)).replace("__ADDRESS__", UPSTREAM_ADDRESS)

# On the host, in its namespaces: make the temp dir, run the sandbox, remove the dir after it
# (also when the harness is gone: a broken pipe or a hang-up must not stop it before `rmdir`).
OUTER = r"""
trap '' HUP PIPE
D=$(mktemp -d __TEMPLATE__) || exit 97
echo "relay-harness-dir $D"
unshare --net --mount --uts --pid --fork --kill-child --propagation private \
    sh -c "$1" rh-sandbox "$D" "$2" "$3" "$4" "$5" 2>&1
rc=$?
rmdir "$D" || rm -rf -- "$D"
echo "relay-harness-ended $rc"
""".replace("__TEMPLATE__", TMP_TEMPLATE)

CHECK = (
    "uname -s; "
    "for t in unshare nsenter ip python3 mktemp; do command -v $t >/dev/null || echo missing $t; done; "
    "unshare --net --mount --uts --pid --fork --propagation private true 2>&1 || echo cannot-unshare; "
    "ip -o link show 2>/dev/null | grep LOOPBACK | head -n1"
)


class SandboxUnavailable(EnclosureLimit):
    """The host cannot run the sandbox; the message says why (the lab way is used instead)."""


# smtpd's words for a listener it cannot set up (an interface or address the sandbox lacks).
LISTEN_LIMIT = re.compile(
    r"invalid virtual ip or interface|bind: Cannot assign requested address|interface .* not found"
)
# What the sandbox makes private: a bundle may write there and nowhere else on the host.
PRIVATE = ("/etc/", "/run/", "/var/spool/", "/var/mail/", "/var/log/")


@dataclass(frozen=True)
class SandboxCapability:
    loopback: str = "lo"
    reason: str | None = None  # why not, None when the host can


def probe_capability(run: Callable[[str], CommandResult]) -> SandboxCapability:
    """Linux, the tools, and a trial `unshare` that changes nothing (its namespaces die with it)."""
    result = run(CHECK)
    lines = result.stdout.splitlines()
    if not lines or lines[0].strip() != "Linux":
        return SandboxCapability(reason=f"not Linux ({lines[0].strip() if lines else 'uname failed'})")
    missing = [line.split()[1] for line in lines if line.startswith("missing ")]
    if missing:
        return SandboxCapability(reason=f"missing on the host: {', '.join(missing)}")
    if "cannot-unshare" in lines:
        said = next((line for line in lines[1:] if "unshare" in line and line != "cannot-unshare"), "")
        return SandboxCapability(reason=f"unshare of network/mount/PID namespaces is refused: {said}".strip())
    m = re.search(r"^\d+:\s*([^:@\s]+)[:@]", "\n".join(lines), re.MULTILINE)
    return SandboxCapability(loopback=m.group(1) if m else "lo")


class Sandbox(Enclosure):
    """Private namespaces on an existing host, opened when the upstream is attached.

    It hands the driver a shell inside itself (`nsenter` into its mount, network, UTS and PID
    namespaces): the same SmtpdTarget that drives a lab host then drives the host's own smtpd
    here. `close` ends it and looks: `leftovers` says what was still on the host (nothing).
    """

    seen_at = UPSTREAM_ADDRESS

    def __init__(self, host: Shell, capability: SandboxCapability, service_port: int) -> None:
        self.host = host
        self.name = f"sandbox on {host.name}"
        self.capability = capability
        self.service_port = service_port
        self.dir: str | None = None
        self.pid: int | None = None  # the sandbox's PID 1, as the host numbers it
        self.netns: str | None = None  # e.g. net:[4026532601]
        self.log = LogFollower()
        self.on_shell: Callable[[Shell], None] | None = None
        self._pump_name = f"relay-harness-pump-{secrets.token_hex(8)}"
        self._chan: paramiko.Channel | None = None
        self._upstream: UpstreamServer | None = None
        self._seen = 0
        self._pumps: list[threading.Thread] = []
        self._closed = False
        self.leftovers: list[str] = []

    def inside(self, *, pid_ns: bool = True) -> Shell:
        """A shell in the sandbox (PID namespace too: smtpd must die with the sandbox)."""
        if self.pid is None:
            raise TargetError(f"{self.name}: the sandbox is not running")
        flags = ["--mount", "--net", "--uts", *(["--pid"] if pid_ns else [])]
        return self.host.within("nsenter", "--target", str(self.pid), *flags, "--", name=self.name)

    def attach(self, upstream: UpstreamServer) -> None:
        """Start the sandbox with its forwarder; from now on each connection is pumped to `upstream`."""
        self._upstream = upstream
        self.log.subscribe(self._on_output)
        args = [OUTER, "rh-outer", INNER, self.capability.loopback, str(self.service_port)]
        args += [self._pump_name, FORWARDER]
        self._chan = self.host.stream("sh -c " + " ".join(shlex.quote(a) for a in args), self.log)
        try:
            self.dir = self.log.wait_for(r"^relay-harness-dir (\S+)$", READY_TIMEOUT).group(1)
            if not TMP_PATTERN.match(self.dir):
                raise TargetError(f"{self.name}: unexpected temp dir {self.dir!r}")
            m = self.log.wait_for(r"^relay-harness-sandbox (\d+) (net:\[\d+\])$", READY_TIMEOUT)
            self.pid, self.netns = int(m.group(1)), m.group(2)
            self.log.wait_for(r"^relay-harness-forwarder ready$", READY_TIMEOUT)
        except TimeoutError as exc:
            raise SandboxUnavailable(f"the sandbox did not start: {self.host.redactor(str(exc))}") from None
        if self.on_shell is not None:
            self.on_shell(self.inside())

    def may_write(self, path: str) -> bool:
        normal = "/" + "/".join(p for p in path.split("/") if p and p != ".")
        return ".." not in normal.split("/") and normal.startswith(PRIVATE)

    def limit(self, text: str) -> str | None:
        m = LISTEN_LIMIT.search(text)
        if m is None:
            return None
        return (
            f"its smtpd cannot listen there as configured ({text.strip()}): "
            "the sandbox has only a loopback interface"
        )

    def _on_output(self) -> None:
        """Called on each line of the forwarder's output: a new connection gets its pump."""
        lines = self.log.lines
        while self._seen < len(lines):
            m = re.match(r"^relay-harness-conn (\d+)$", lines[self._seen])
            self._seen += 1
            if m is not None and self._upstream is not None:
                t = threading.Thread(target=self._pump, args=(m.group(1),), daemon=True, name="sandbox-pump")
                t.start()
                self._pumps.append(t)

    def _pump(self, n: str) -> None:
        """One connection: an exec channel into the sandbox's network namespace ↔ the upstream here."""
        assert self._upstream is not None and self.pid is not None
        command = self.host.within("nsenter", "--target", str(self.pid), "--net", "--").wrap(
            " ".join(shlex.quote(a) for a in ("python3", "-c", PUMP, self._pump_name, n))
        )
        try:
            chan = self.host.transport().open_session()
            chan.exec_command(command)
        except (TargetError, paramiko.SSHException, OSError, EOFError):
            return
        near, far = socket.socketpair()
        try:
            self._upstream.serve_socket(far, peer=f"{self.name}, connection {n}")
        except HarnessError:
            for end in (near, far):
                end.close()
            chan.close()
            return
        _bridge(chan, near)

    def close(self) -> None:
        """End everything, then look: no process in its namespace, no temp dir; `leftovers` says."""
        if self._closed:
            return
        self._closed = True
        chan = self._chan
        if chan is not None:
            # EOF on the forwarder's stdin ends the sandbox's PID 1, and the kernel ends the rest;
            # the outer shell then removes the temp dir and exits: wait for that exit (bounded).
            with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                chan.shutdown_write()
            ended = self.log.wait_closed(END_TIMEOUT)
            if not ended and self.pid is not None:
                with contextlib.suppress(TargetError):
                    self.host.run(f"kill -KILL {self.pid} 2>/dev/null; true")
                ended = self.log.wait_closed(END_TIMEOUT)
            if not ended:
                self.leftovers.append("the sandbox did not end within the time allowed")
            with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                chan.close()
        for t in self._pumps:
            t.join(timeout=5)
        with contextlib.suppress(TargetError):
            self.leftovers.extend(self.remains())

    def remains(self) -> list[str]:
        """What of the sandbox is still on the host: processes in its network namespace, the dir."""
        checks = []
        if self.netns is not None:
            # Every process whose network namespace is the sandbox's (the kernel's own list).
            checks.append(
                "for p in /proc/[0-9]*; do "
                f'[ "$(readlink $p/ns/net 2>/dev/null)" = {shlex.quote(self.netns)} ] '
                '&& echo "process ${p#/proc/}"; '
                "done; true"
            )
        if self.dir is not None:
            checks.append(f"[ -e {shlex.quote(self.dir)} ] && echo 'directory {self.dir}'; true")
        if not checks:
            return []
        result = self.host.run("; ".join(checks))
        return [line for line in result.stdout.splitlines() if line.strip()]

    def outcome(self) -> str:
        """The sandbox's own start-up messages (for a report when it failed), redacted."""
        return "\n".join(self.log.lines[-15:])


def sandbox_target(
    host: Shell, sbin: str, capability: SandboxCapability, service_port: int
) -> tuple[SmtpdTarget, Sandbox]:
    """The host's own smtpd (in `sbin`), driven inside a sandbox that opens when the upstream attaches."""
    sandbox = Sandbox(host, capability, service_port)
    target = SmtpdTarget(
        sandbox.name,
        host,
        UPSTREAM_ADDRESS,
        sbin=sbin,
        enclosure=sandbox,
        on_close=sandbox.close,
        owns_connection=False,
    )

    def use(shell: Shell) -> None:
        target.shell = shell

    sandbox.on_shell = use
    return target, sandbox


def _bridge(chan: paramiko.Channel, sock: socket.socket) -> None:
    """One pumped connection ↔ the upstream's end of a socketpair, until either side closes."""

    out = threading.Thread(
        target=_copy, args=(sock.recv, chan.sendall, chan.shutdown_write), daemon=True, name="pump-out"
    )
    out.start()
    _copy(chan.recv, sock.sendall, lambda: sock.shutdown(socket.SHUT_WR))
    out.join(timeout=30)
    sock.close()
    chan.close()


def _copy(recv: Callable[[int], bytes], send: Callable[[bytes], object], done: Callable[[], object]) -> None:
    """Bytes from one side to the other until EOF or an error, then half-close the far side."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        while data := recv(65536):
            send(data)
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        done()
