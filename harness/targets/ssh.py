"""A target reached over SSH: a lab test host, or an existing machine (staging, after an upgrade).

Everything here is plain SSH: commands, SFTP and one long-lived channel carrying smtpd's log.
That is deliberate: the code that drives a lab host is the code that drives a staging host.
"""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paramiko

from harness.redact import Redactor, secrets_table_credentials
from harness.targets.base import (
    SMTPD_CONF,
    Bundle,
    BundleFile,
    ConfigCheck,
    LogFollower,
    OutgoingMail,
    Target,
    TargetError,
)

SMTPD = "/usr/sbin/smtpd"
SMTPCTL = "/usr/sbin/smtpctl"
# OpenBSD's names for smtpd's group; a config written there says root:_smtpd for the secrets table.
OPENBSD_GROUPS = {"_smtpd": "opensmtpd", "_smtpq": "opensmtpq"}
# smtpd is ready for a submission once its listeners are up and the queue process has loaded
# the (empty) queue into the scheduler; a submission before the latter can get EX_TEMPFAIL (75).
READY = (r"smtp: will accept at most \d+ clients", r"queue: done loading queue into scheduler")


@dataclass(frozen=True)
class CommandResult:
    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()


# SMTP submission from inside the target, with the target's own python3 (stdlib smtplib), so the
# connection comes from the host itself, as a local client's would: `listen on` + `match from local`.
_SMTP_SUBMIT = """
import smtplib, sys
host, port, sender, *rcpts = sys.argv[1:]
try:
    with smtplib.SMTP(host, int(port), timeout=30) as smtp:
        refused = smtp.sendmail(sender, rcpts, sys.stdin.buffer.read())
except (OSError, smtplib.SMTPException) as exc:
    sys.exit(f"SMTP to {host}:{port}: {exc}")
for rcpt, (code, text) in refused.items():
    print(f"refused {rcpt}: {code} {text.decode()}")
"""


def submission_command(mail: OutgoingMail) -> str:
    """The shell command that hands `mail` (on stdin) to smtpd: sendmail, or SMTP to a listener."""
    if any(ch in a for a in (mail.sender, *mail.recipients) for ch in "\0\r\n"):
        # sshd drops the whole connection on a NUL in a command line: refuse such input here.
        raise TargetError(f"refusing to submit mail with control characters in an address: {mail.recipients}")
    rcpts = " ".join(shlex.quote(r) for r in mail.recipients)
    if mail.via == "smtp":
        command = (
            f"python3 -c {shlex.quote(_SMTP_SUBMIT)} {shlex.quote(mail.smtp_address)} {mail.smtp_port} "
            f"{shlex.quote(mail.sender)} {rcpts}"
        )
    elif mail.via == "sendmail":
        command = f"/usr/sbin/sendmail -f {shlex.quote(mail.sender)} {rcpts}"
    else:
        raise TargetError(f"unknown submission {mail.via!r}: sendmail or smtp")
    if mail.user != "root":
        command = f"su -s /bin/sh {shlex.quote(mail.user)} -c {shlex.quote(command)}"
    return command


def follow_channel(chan: paramiko.Channel, log: LogFollower, redact: Callable[[str], str]) -> None:
    """Feed a channel's output to `log` line by line (redacted) until it ends; then close the log."""
    with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
        buf = b""
        while True:
            data = chan.recv(65536)
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                log.feed(redact(line.decode("utf-8", "replace").rstrip("\r")))
        if buf:
            log.feed(redact(buf.decode("utf-8", "replace")))
    log.close()


def wait_ready(log: LogFollower, timeout: float) -> None:
    """Every READY line, in whatever order smtpd's processes log them."""
    deadline = time.monotonic() + timeout
    for pattern in READY:
        log.wait_for(pattern, max(0.0, deadline - time.monotonic()))


class SshTarget(Target):
    """Drives smtpd on a host through a connected paramiko client."""

    def __init__(
        self,
        name: str,
        client: paramiko.SSHClient,
        upstream_address: str,
        fresh_spool: str | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self._upstream_address = upstream_address
        self._fresh_spool = fresh_spool
        self.redactor = redactor or Redactor()
        self._smtpd: paramiko.Channel | None = None
        self._smtpd_pid: int | None = None
        self._reader: threading.Thread | None = None
        self.log = LogFollower()
        self._sftp: paramiko.SFTPClient | None = None
        self._id_cache: dict[tuple[str, str], tuple[int, int]] = {}

    # -- plumbing -----------------------------------------------------------------------------
    def run(self, command: str, stdin: bytes | None = None, timeout: float = 60) -> CommandResult:
        try:
            chan = self._session()
            chan.settimeout(timeout)
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = _read_all(chan)
            rc = chan.recv_exit_status()
        except TimeoutError as exc:
            raise TargetError(f"{self.name}: {command!r} did not finish within {timeout:g}s") from exc
        except (paramiko.SSHException, OSError) as exc:
            raise TargetError(f"{self.name}: SSH failed running {command!r}: {exc}") from exc
        return CommandResult(command, rc, self.redact(out), self.redact(err))

    def check(self, command: str, stdin: bytes | None = None, timeout: float = 60) -> CommandResult:
        result = self.run(command, stdin, timeout)
        if result.returncode != 0:
            raise TargetError(f"{self.name}: {command!r} exited {result.returncode}: {result.output}")
        return result

    def _session(self) -> paramiko.Channel:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise TargetError(f"{self.name}: the SSH connection is closed")
        return transport.open_session()

    def redact(self, text: str) -> str:
        return self.redactor(text)

    def sftp(self) -> paramiko.SFTPClient:
        """One SFTP session for the target's life: opening one costs a round trip per file."""
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (OSError, paramiko.SSHException) as exc:
                raise TargetError(f"{self.name}: cannot open SFTP: {exc}") from exc
        return self._sftp

    def write_file(
        self, path: str, content: bytes, mode: int = 0o644, owner: str = "root", group: str = "root"
    ) -> None:
        uid, gid = self._ids(owner, group)
        sftp = self.sftp()
        try:
            self._makedirs(sftp, path.rpartition("/")[0])
            with sftp.file(path, "wb") as fh:
                fh.write(content)
            sftp.chown(path, uid, gid)
            sftp.chmod(path, mode)
        except (OSError, paramiko.SSHException) as exc:
            raise TargetError(f"{self.name}: cannot write {path}: {exc}") from exc

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, directory: str) -> None:
        parts = [p for p in directory.split("/") if p]
        for n in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:n])
            try:
                sftp.stat(path)
            except FileNotFoundError:
                sftp.mkdir(path, 0o755)

    def read_file(self, path: str) -> bytes:
        try:
            with self.sftp().file(path, "rb") as fh:
                return bytes(fh.read())
        except FileNotFoundError:
            return b""
        except (OSError, paramiko.SSHException) as exc:
            raise TargetError(f"{self.name}: cannot read {path}: {exc}") from exc

    def _ids(self, owner: str, group: str) -> tuple[int, int]:
        """Numeric ids for SFTP's chown, looked up once per name.

        OpenBSD's `_smtpd` is Debian's `opensmtpd`: the group is mapped when the host lacks it.
        """
        key = (owner, group)
        if key not in self._id_cache:
            fallback = OPENBSD_GROUPS.get(group, group)
            q, g, f = shlex.quote(owner), shlex.quote(group), shlex.quote(fallback)
            out = self.check(f"id -u {q}; (getent group {g} || getent group {f}) | cut -d: -f3 | head -n1")
            lines = out.stdout.split()
            if len(lines) != 2 or not all(x.isdigit() for x in lines):
                raise TargetError(f"{self.name}: no such user or group {owner}:{group}")
            self._id_cache[key] = (int(lines[0]), int(lines[1]))
        return self._id_cache[key]

    # -- Target ---------------------------------------------------------------------------------
    def install(self, bundle: Bundle) -> None:
        if bundle.users:
            names = " ".join(shlex.quote(u) for u in bundle.users)
            self.check(
                f'for u in {names}; do id -u "$u" >/dev/null 2>&1 || '
                f'useradd -M -N -s /usr/sbin/nologin "$u"; done'
            )
        self.write_file(bundle.config_path, bundle.config.encode(), 0o644)
        for f in bundle.files:
            self.install_file(f)

    def install_file(self, f: BundleFile) -> None:
        if f.secret:
            for user, password in secrets_table_credentials(f.content):
                self.redactor.add(user, password)
        self.write_file(f.path, f.content, f.mode, f.owner, f.group)
        if f.db is not None:
            self.makemap(f.path, f.db, f.aliases)
            uid, gid = self._ids(f.owner, f.group)
            try:
                self.sftp().chown(f.db, uid, gid)
                self.sftp().chmod(f.db, f.mode)
            except (OSError, paramiko.SSHException) as exc:
                raise TargetError(f"{self.name}: cannot set owner and mode of {f.db}: {exc}") from exc

    def makemap(self, source: str, db: str, aliases: bool = False) -> CommandResult:
        """Build the db from its source, as an admin runs makemap/newaliases after an edit."""
        kind = "-t aliases " if aliases else ""
        return self.check(f"makemap {kind}-o {shlex.quote(db)} {shlex.quote(source)}")

    def check_config(self, config_path: str = SMTPD_CONF) -> ConfigCheck:
        result = self.run(f"{SMTPD} -n -f {shlex.quote(config_path)}")
        return ConfigCheck.from_output(result.returncode, result.output, config_path)

    def start(self, config_path: str = SMTPD_CONF, trace: str | None = None) -> LogFollower:
        self.stop()
        if self._fresh_spool:
            self.check(self._fresh_spool)
        flags = f"-T {shlex.quote(trace)} " if trace else ""
        command = f"echo relay-harness-pid $$; exec {SMTPD} -d -v {flags}-f {shlex.quote(config_path)} 2>&1"
        self.log = LogFollower()
        chan = self._session()
        chan.set_combine_stderr(True)
        chan.exec_command(f"sh -c {shlex.quote(command)}")
        self._smtpd = chan
        self._reader = threading.Thread(
            target=self._follow, args=(chan, self.log), daemon=True, name=f"smtpd-log-{self.name}"
        )
        self._reader.start()
        first = self.log.wait_for(r"^relay-harness-pid (\d+)$", 10)
        self._smtpd_pid = int(first.group(1))
        self.wait_ready()
        return self.log

    def wait_ready(self, timeout: float = 10) -> None:
        """Until smtpd's control socket answers: only then are local submissions accepted."""
        try:
            wait_ready(self.log, timeout)
        except TimeoutError as exc:
            self.stop()
            raise TargetError(f"{self.name}: smtpd did not start:\n{self.redact(str(exc))}") from None

    def _follow(self, chan: paramiko.Channel, log: LogFollower) -> None:
        follow_channel(chan, log, self.redact)

    def submit(self, mail: OutgoingMail) -> str:
        result = self.run(submission_command(mail), stdin=mail.as_bytes())
        if result.returncode != 0:
            raise TargetError(f"{self.name}: {mail.via} exited {result.returncode}: {result.output}")
        return result.output

    def control(self, *args: str) -> str:
        return self.check(" ".join([SMTPCTL, *(shlex.quote(a) for a in args)])).output

    def queue(self) -> str:
        return self.run(f"{SMTPCTL} show queue").output

    def mailbox(self, user: str) -> bytes:
        return self.read_file(f"/var/mail/{user}")

    def point(self, names: Iterable[str], address: str) -> None:
        entries = "".join(f"{address}\t{name}\n" for name in names)
        self.check("cat >> /etc/hosts", stdin=entries.encode())

    def trust(self, ca_pem: bytes) -> None:
        self.write_file("/etc/ssl/certs/ca-certificates.crt", ca_pem, 0o644)

    def upstream_address(self) -> str:
        return self._upstream_address

    def stop(self) -> None:
        chan, pid = self._smtpd, self._smtpd_pid
        self._smtpd = self._smtpd_pid = None
        if chan is None:
            return
        if pid is not None and not chan.exit_status_ready():
            self.run(f"kill -TERM {pid} 2>/dev/null; true")
        if self._reader is not None:
            self._reader.join(timeout=10)
        chan.close()

    def close(self) -> None:
        with contextlib.suppress(TargetError):
            self.stop()
        if self._sftp is not None:
            with contextlib.suppress(OSError, paramiko.SSHException):
                self._sftp.close()
        self.client.close()


def _read_all(chan: paramiko.Channel) -> tuple[str, str]:
    """stdout then stderr; fine for command-sized output (paramiko buffers stderr meanwhile)."""
    out = chan.makefile("rb").read()
    err = chan.makefile_stderr("rb").read()
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
