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
- The fake upstream runs here, in the harness: sshd listens on the host's 127.0.0.1 for it
  (an SSH reverse tunnel, paramiko `request_port_forward`), and the sandbox's first process is a
  small forwarder (the host's python3) that listens on 127.0.0.2:PORT in the sandbox and connects
  to that tunnel in the host's network namespace (one thread `setns`es back, with a descriptor
  of the host's namespace opened before `unshare`).
- Its only mark on the host's disk is an empty temp dir, removed when the sandbox ends. The
  sandbox ends when the harness closes the channel that started it, and also when the SSH
  connection drops (the forwarder's stdin reaches EOF, or its output breaks: it exits on
  anything), so a killed harness leaves nothing either.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paramiko

from harness.redact import Redactor
from harness.targets.base import (
    SMTPD_CONF,
    Bundle,
    ConfigCheck,
    LogFollower,
    OutgoingMail,
    Target,
    TargetError,
)
from harness.targets.ssh import CommandResult, SshTarget, follow_channel, submission_command, wait_ready

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
# argv: LISTEN_PORT TUNNEL_PORT HOST_NETNS_FD MAX_LIFETIME ADDRESS
FORWARDER = r"""
import ctypes, os, signal, socket, sys, threading
listen_port, tunnel_port, host_ns, lifetime = (int(a) for a in sys.argv[1:5])  # argv[5]: address
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[5], listen_port))
server.listen(16)
ready = threading.Event()
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
    # Only this thread goes back to the host's network namespace, for the tunnel's connections:
    # the main thread stays in the sandbox's, which is what /proc/PID/ns/net (nsenter) shows.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(host_ns, 0x40000000) != 0:  # CLONE_NEWNET
        print("relay-harness-forwarder: setns failed:", os.strerror(ctypes.get_errno()), flush=True)
        os._exit(4)
    ready.set()
    while True:
        client, _ = server.accept()
        try:
            tunnel = socket.create_connection(("127.0.0.1", tunnel_port), 10)
        except OSError as exc:
            try:
                print("relay-harness-forwarder: tunnel:", exc, flush=True)
            except OSError:
                pass
            client.close()
            continue
        for a, b in ((client, tunnel), (tunnel, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()
# Whatever happens from here on (the harness gone: stdout is a broken pipe, stdin at EOF; a
# signal; the lifetime over), this process ends, and with it the sandbox: never an exception
# that leaves Python waiting at shutdown for a thread.
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda *_: os._exit(2))
try:
    threading.Thread(target=serve, daemon=True).start()
    ready.wait()
    os.close(host_ns)
    timer = threading.Timer(lifetime, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    print("relay-harness-forwarder ready", flush=True)
    sys.stdin.buffer.read()
finally:
    os._exit(0)
"""

# Runs as the sandbox's PID 1, in its new namespaces. $1 dir, $2 hosts lines, $3 CA PEM,
# $4 loopback name, $5 listen port, $6 tunnel port, $7 forwarder. fd 3: the host's netns.
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
{ printf '%s' "$2"; cat /etc/hosts; } > "$D/hosts"
rm -f /etc/hosts /etc/resolv.conf
cat "$D/hosts" > /etc/hosts
printf 'nameserver 127.0.0.1\nlookup file\n' > /etc/resolv.conf
mkdir -p /etc/ssl/certs
# The CA bundle smtpd was built with: Debian's always, the others where the host has them.
for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
    if [ -e "$ca" ] || [ "$ca" = /etc/ssl/certs/ca-certificates.crt ]; then
        rm -f "$ca"
        printf '%s' "$3" > "$ca"
    fi
done
[ "$4" = lo ] || ip link set lo name "$4"
ip link set "$4" up
exec python3 -c "$7" "$5" "$6" 3 __LIFETIME__ __ADDRESS__
""".replace("__LIFETIME__", str(MAX_LIFETIME)).replace("__ADDRESS__", UPSTREAM_ADDRESS)

# On the host, in its namespaces: make the temp dir, run the sandbox, remove the dir after it
# (also when the harness is gone: a broken pipe or a hang-up must not stop it before `rmdir`).
OUTER = r"""
trap '' HUP PIPE
D=$(mktemp -d __TEMPLATE__) || exit 97
echo "relay-harness-dir $D"
exec 3</proc/self/ns/net
unshare --net --mount --uts --pid --fork --kill-child --propagation private \
    sh -c "$1" rh-sandbox "$D" "$2" "$3" "$4" "$5" "$6" "$7" 2>&1
rc=$?
exec 3<&-
rmdir "$D" || rm -rf -- "$D"
echo "relay-harness-ended $rc"
""".replace("__TEMPLATE__", TMP_TEMPLATE)

CHECK = (
    "uname -s; "
    "for t in unshare nsenter ip python3 mktemp; do command -v $t >/dev/null || echo missing $t; done; "
    "unshare --net --mount --uts --pid --fork --propagation private true 2>&1 || echo cannot-unshare; "
    "ip -o link show 2>/dev/null | grep LOOPBACK | head -n1"
)


class SandboxUnavailable(TargetError):
    """The host cannot run the sandbox; the message says why (the lab way is used instead)."""


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


class SandboxTarget(Target):
    """The Target interface on the in-host sandbox, enough for `RelayRun` and the probes.

    `install` does nothing (the host's files are used as they are); `point` and `trust` are
    remembered and applied by the sandbox's start script, inside its overlay. `open` starts the
    sandbox and the tunnel; `close` ends both and proves they left nothing behind.
    """

    def __init__(
        self,
        ssh: SshTarget,
        sudo: bool,
        smtpd: str,
        capability: SandboxCapability,
        redactor: Redactor,
    ) -> None:
        self.name = f"sandbox on {ssh.name}"
        self.ssh = ssh
        self.sudo = sudo
        self.smtpd = smtpd
        self.smtpctl = smtpd.rpartition("/")[0] + "/smtpctl" if "/" in smtpd else "smtpctl"
        self.capability = capability
        self.redactor = redactor
        self.names: tuple[str, ...] = ()
        self.ca_pem = b""
        self.dir: str | None = None
        self.pid: int | None = None  # the sandbox's PID 1, as the host numbers it
        self.netns: str | None = None  # e.g. net:[4026532601]
        self.log = LogFollower()
        self.sandbox_log = LogFollower()
        self._sandbox: paramiko.Channel | None = None
        self._smtpd: paramiko.Channel | None = None
        self._smtpd_pid: int | None = None
        self._tunnel_port: int | None = None
        self._readers: list[threading.Thread] = []
        self._bridges: list[threading.Thread] = []
        self._closed = False
        self.leftovers: list[str] = []  # what `close` found still on the host (should stay empty)

    # -- plumbing -----------------------------------------------------------------------------
    def _wrap(self, command: str) -> str:
        return f"sudo -n sh -c {shlex.quote(command)}" if self.sudo else command

    def _transport(self) -> paramiko.Transport:
        transport = self.ssh.client.get_transport()
        if transport is None or not transport.is_active():
            raise TargetError(f"{self.ssh.name}: the SSH connection is closed")
        return transport

    def _inside(self, command: str, pid_ns: bool = False) -> str:
        """`command` run inside the sandbox (its mounts, network and host name)."""
        if self.pid is None:
            raise TargetError(f"{self.name}: the sandbox is not running")
        flags = "--mount --net --uts" + (" --pid" if pid_ns else "")
        return self._wrap(f"nsenter --target {self.pid} {flags} -- sh -c {shlex.quote(command)}")

    def run_inside(self, command: str, stdin: bytes | None = None, timeout: float = 60) -> CommandResult:
        return self.ssh.run(self._inside(command), stdin=stdin, timeout=timeout)

    def _channel(self, command: str, log: LogFollower) -> paramiko.Channel:
        chan = self._transport().open_session()
        chan.set_combine_stderr(True)
        chan.exec_command(command)
        reader = threading.Thread(target=self._follow, args=(chan, log), daemon=True, name=f"log-{self.name}")
        reader.start()
        self._readers.append(reader)
        return chan

    def _follow(self, chan: paramiko.Channel, log: LogFollower) -> None:
        follow_channel(chan, log, self.redactor)

    # -- the tunnel ---------------------------------------------------------------------------
    def _tunnel(self, upstream_port: int) -> int:
        """sshd listens on the host's 127.0.0.1; each connection is bridged to the local upstream."""

        def handler(chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]) -> None:
            # Called in paramiko's transport thread: hand the connection to a thread at once.
            t = threading.Thread(target=_bridge, args=(chan, upstream_port), daemon=True, name="tunnel")
            t.start()
            self._bridges.append(t)

        try:
            port = self._transport().request_port_forward("127.0.0.1", 0, handler)
        except paramiko.SSHException as exc:
            raise SandboxUnavailable(
                f"sshd refused the reverse tunnel ({exc}): AllowTcpForwarding is off on the host"
            ) from None
        self._tunnel_port = port
        return port

    # -- the sandbox --------------------------------------------------------------------------
    def open(self, listen_port: int, upstream_port: int) -> None:
        """Tunnel, then the sandbox with its forwarder; returns when the forwarder listens."""
        tunnel_port = self._tunnel(upstream_port)
        hosts = "".join(f"{UPSTREAM_ADDRESS}\t{name}\n" for name in self.names)
        args = [OUTER, "rh-outer", INNER, hosts, self.ca_pem.decode(), self.capability.loopback]
        args += [str(listen_port), str(tunnel_port), FORWARDER]
        command = self._wrap("sh -c " + " ".join(shlex.quote(a) for a in args))
        self._sandbox = self._channel(command, self.sandbox_log)
        log = self.sandbox_log
        try:
            self.dir = log.wait_for(r"^relay-harness-dir (\S+)$", READY_TIMEOUT).group(1)
            if not TMP_PATTERN.match(self.dir):
                raise TargetError(f"{self.name}: unexpected temp dir {self.dir!r}")
            m = log.wait_for(r"^relay-harness-sandbox (\d+) (net:\[\d+\])$", READY_TIMEOUT)
            self.pid, self.netns = int(m.group(1)), m.group(2)
            log.wait_for(r"^relay-harness-forwarder ready$", READY_TIMEOUT)
        except TimeoutError as exc:
            raise TargetError(f"{self.name}: the sandbox did not start:\n{exc}") from None

    # -- Target ---------------------------------------------------------------------------------
    def install(self, bundle: Bundle) -> None:
        """Nothing to install: the host's config and tables are used where they are."""

    def point(self, names: Iterable[str], address: str) -> None:
        if address != UPSTREAM_ADDRESS:
            raise TargetError(f"{self.name}: the smarthost can only point at the tunnel ({UPSTREAM_ADDRESS})")
        self.names = tuple(dict.fromkeys(names))

    def trust(self, ca_pem: bytes) -> None:
        self.ca_pem = ca_pem

    def upstream_address(self) -> str:
        """Where the sandbox reaches the upstream (the forwarder); the upstream itself runs here."""
        return UPSTREAM_ADDRESS

    def check_config(self, config_path: str = SMTPD_CONF) -> ConfigCheck:
        result = self.run_inside(f"{shlex.quote(self.smtpd)} -n -f {shlex.quote(config_path)}")
        return ConfigCheck.from_output(result.returncode, result.output, config_path)

    def start(self, config_path: str = SMTPD_CONF) -> LogFollower:
        """The host's smtpd in the foreground, in the sandbox's PID namespace; its log followed."""
        self.stop()
        smtpd = f"exec {shlex.quote(self.smtpd)} -d -v -f {shlex.quote(config_path)} 2>&1"
        command = f"echo relay-harness-pid $(cut -d' ' -f4 /proc/self/stat); {smtpd}"
        self.log = LogFollower()
        if self.pid is None:
            raise TargetError(f"{self.name}: the sandbox is not running")
        self._smtpd = self._channel(self._inside(command, pid_ns=True), self.log)
        try:
            self._smtpd_pid = int(self.log.wait_for(r"^relay-harness-pid (\d+)$", READY_TIMEOUT).group(1))
            wait_ready(self.log, READY_TIMEOUT)
        except TimeoutError as exc:
            self.stop()
            raise TargetError(f"{self.name}: smtpd did not start:\n{exc}") from None
        return self.log

    def submit(self, mail: OutgoingMail) -> str:
        result = self.run_inside(submission_command(mail), stdin=mail.as_bytes())
        if result.returncode != 0:
            raise TargetError(f"{self.name}: {mail.via} exited {result.returncode}: {result.output}")
        return result.output

    def control(self, *args: str) -> str:
        result = self.run_inside(" ".join([shlex.quote(self.smtpctl), *(shlex.quote(a) for a in args)]))
        if result.returncode != 0:
            raise TargetError(f"{self.name}: smtpctl {' '.join(args)} exited {result.returncode}")
        return result.output

    def queue(self) -> str:
        return self.run_inside(f"{shlex.quote(self.smtpctl)} show queue").output

    def mailbox(self, user: str) -> bytes:
        result = self.run_inside(f"cat -- /var/mail/{shlex.quote(user)} 2>/dev/null || true")
        return result.stdout.encode()

    def stop(self) -> None:
        """End the sandbox's smtpd (the sandbox itself ends in `close`)."""
        chan, pid = self._smtpd, self._smtpd_pid
        self._smtpd = self._smtpd_pid = None
        if chan is None:
            return
        if pid is not None and not chan.exit_status_ready():
            with contextlib.suppress(TargetError):
                self.ssh.run(self._wrap(f"kill -TERM {pid} 2>/dev/null; true"))
        with contextlib.suppress(OSError, paramiko.SSHException):
            chan.close()

    def close(self) -> None:
        """End everything, then look: no process in its namespace, no temp dir; `leftovers` says."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TargetError):
            self.stop()
        chan = self._sandbox
        if chan is not None:
            # EOF on the forwarder's stdin ends the sandbox's PID 1, and the kernel ends the rest;
            # the outer shell then removes the temp dir and exits: wait for that exit (bounded).
            with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                chan.shutdown_write()
            ended = _wait_exit(chan, END_TIMEOUT)
            if not ended and self.pid is not None:
                with contextlib.suppress(TargetError):
                    self.ssh.run(self._wrap(f"kill -KILL {self.pid} 2>/dev/null; true"))
                ended = _wait_exit(chan, END_TIMEOUT)
            if not ended:
                self.leftovers.append("the sandbox did not end within the time allowed")
            with contextlib.suppress(OSError, paramiko.SSHException):
                chan.close()
        if self._tunnel_port is not None:
            with contextlib.suppress(paramiko.SSHException, OSError, EOFError, TargetError):
                self._transport().cancel_port_forward("127.0.0.1", self._tunnel_port)
            self._tunnel_port = None
        for t in self._bridges:
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
        result = self.ssh.run(self._wrap("; ".join(checks)))
        return [line for line in result.stdout.splitlines() if line.strip()]

    def outcome(self) -> str:
        """The sandbox's own start-up messages (for a report when it failed), redacted."""
        return "\n".join(self.sandbox_log.lines[-15:])


def _wait_exit(chan: paramiko.Channel, timeout: float) -> bool:
    """Until the remote command exits; paramiko sets an event we can wait on (no polling)."""
    event = getattr(chan, "status_event", None)
    if isinstance(event, threading.Event):
        return event.wait(timeout)
    deadline = time.monotonic() + timeout
    while not chan.exit_status_ready() and time.monotonic() < deadline:
        time.sleep(0.05)  # fallback only: this paramiko has no exit event to wait on
    return chan.exit_status_ready()


def _bridge(chan: paramiko.Channel, upstream_port: int) -> None:
    """One tunnelled connection ↔ the local fake upstream, until either side closes."""
    try:
        sock = socket.create_connection(("127.0.0.1", upstream_port), timeout=10)
    except OSError:
        chan.close()
        return
    sock.settimeout(None)

    def pump_out() -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chan.sendall(data)
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            chan.shutdown_write()

    out = threading.Thread(target=pump_out, daemon=True, name="tunnel-out")
    out.start()
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        while True:
            data = chan.recv(65536)
            if not data:
                break
            sock.sendall(data)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    out.join(timeout=30)
    sock.close()
    chan.close()
