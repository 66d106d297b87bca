"""The one way to run commands and move files on a host: a paramiko connection and a prefix.

How a host is reached (a lab test host, a staging machine as root or through `sudo -n`, a sandbox
on that machine entered with `nsenter`) is only a different prefix on the same connection; what
is done there (smtpd, facts, files) is written once, above this layer, as pytest-testinfra keeps
"how to reach a host" apart from "what to ask it".
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paramiko

from harness.names import dns_name_problem
from harness.redact import Redactor
from harness.targets import CONNECT_TIMEOUT
from harness.targets.base import LogFollower, TargetError
from harness.userfiles import read_bytes, read_text

# Each system's names for smtpd's two groups (OpenBSD and FreeBSD, Debian, Alpine and Arch): a
# file made for one (a config written on OpenBSD says root:_smtpd) gets whichever the host has.
SMTPD_GROUP_NAMES = (("_smtpd", "opensmtpd", "smtpd"), ("_smtpq", "opensmtpq", "smtpq"))


# Where systems put smtpd and its tools (Debian /usr/sbin, FreeBSD /usr/local/sbin), for a login
# whose PATH lacks them.
SEARCH_PATH = "PATH=$PATH:/usr/sbin:/sbin:/usr/local/sbin"


def find_smtpd(shell: Shell) -> str | None:
    """The path of the host's smtpd program, or None when it has none."""
    found = shell.run(f"{SEARCH_PATH} command -v smtpd")
    paths = found.stdout.strip().splitlines()
    return paths[0] if found.returncode == 0 and paths else None


def smtpd_version(said: str) -> str | None:
    """The version in what `smtpd -h` printed (`version: OpenSMTPD 6.8.0p2`): `6.8.0p2`."""
    m = re.search(r"OpenSMTPD\s+(\S+)", said)
    return m.group(1) if m else None


def group_alternatives(group: str) -> tuple[str, ...]:
    """`group`, then the other systems' names for it (just `group` for any other group)."""
    for family in SMTPD_GROUP_NAMES:
        if group in family:
            return (group, *(g for g in family if g != group))
    return (group,)


@dataclass(frozen=True)
class CommandResult:
    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()


class Shell:
    """Commands and files on one host, every command through `prefix` (none, sudo, nsenter).

    Without a prefix, files move over one SFTP session (a round trip per file, owner and mode
    set the same way); with one, SFTP would act outside it (as the login user, in the host's
    own mount namespace), so files go through the prefixed shell instead.
    """

    def __init__(
        self,
        name: str,
        client: paramiko.SSHClient,
        prefix: tuple[str, ...] = (),
        redactor: Redactor | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.prefix = prefix
        self.redactor = redactor or Redactor()
        self._sftp: paramiko.SFTPClient | None = None
        self._ids: dict[tuple[str, str], tuple[int, int]] = {}

    def within(self, *prefix: str, name: str | None = None) -> Shell:
        """The same connection with more prefix (e.g. `nsenter` into a sandbox after `sudo`)."""
        return Shell(name or self.name, self.client, (*self.prefix, *prefix), self.redactor)

    def wrap(self, command: str) -> str:
        """`command` as sent: through the prefix, which runs `sh -c` on the far side."""
        if not self.prefix:
            return command
        return " ".join((*self.prefix, "sh", "-c", shlex.quote(command)))

    def shown(self, command: str) -> str:
        """How a report quotes a command (what an admin would type): `sudo` kept, nsenter not."""
        return f"sudo {command}" if self.prefix[:1] == ("sudo",) else command

    # -- commands -------------------------------------------------------------------------------
    def transport(self) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise TargetError(f"{self.name}: the SSH connection is closed")
        return transport

    def run(self, command: str, stdin: bytes | None = None, timeout: float = 60) -> CommandResult:
        """Run to the end; output redacted. TargetError when SSH fails or time runs out."""
        try:
            chan = self.transport().open_session()
            chan.settimeout(timeout)
            chan.exec_command(self.wrap(command))
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read()  # paramiko buffers stderr meanwhile
            rc = chan.recv_exit_status()
        except TimeoutError as exc:
            raise TargetError(f"{self.name}: {command!r} did not finish within {timeout:g}s") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TargetError(f"{self.name}: SSH failed running {command!r}: {exc}") from exc
        return CommandResult(
            self.shown(command),
            rc,
            self.redactor(out.decode("utf-8", "replace")),
            self.redactor(err.decode("utf-8", "replace")),
        )

    def check(self, command: str, stdin: bytes | None = None, timeout: float = 60) -> CommandResult:
        result = self.run(command, stdin, timeout)
        if result.returncode != 0:
            raise TargetError(f"{self.name}: {command!r} exited {result.returncode}: {result.output}")
        return result

    def stream(self, command: str, log: LogFollower) -> paramiko.Channel:
        """Start a long-running command; its output (both streams) feeds `log` line by line."""
        try:
            chan = self.transport().open_session()
            chan.set_combine_stderr(True)
            chan.exec_command(self.wrap(command))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TargetError(f"{self.name}: SSH failed starting {command!r}: {exc}") from exc
        threading.Thread(
            target=follow_channel, args=(chan, log, self.redactor), daemon=True, name=f"log-{self.name}"
        ).start()
        return chan

    # -- files ----------------------------------------------------------------------------------
    def read(self, path: str) -> bytes | None:
        """The file's bytes as they are (not redacted: the caller knows what is secret); None if absent."""
        if not self.prefix:
            try:
                with self.sftp().file(path, "rb") as fh:
                    return bytes(fh.read())
            except FileNotFoundError:
                return None
            except (OSError, paramiko.SSHException, EOFError) as exc:
                raise TargetError(f"{self.name}: cannot read {path}: {exc}") from exc
        try:
            chan = self.transport().open_session()
            chan.settimeout(60)
            chan.exec_command(self.wrap(f"cat -- {shlex.quote(path)}"))
            chan.shutdown_write()
            data = chan.makefile("rb").read()
            chan.makefile_stderr("rb").read()
            rc = chan.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TargetError(f"{self.name}: reading {path} failed: {exc or type(exc).__name__}") from exc
        return bytes(data) if rc == 0 else None

    def write(
        self, path: str, content: bytes, mode: int = 0o644, owner: str = "root", group: str = "root"
    ) -> None:
        """Create or replace `path` (and its directories) with this owner and mode."""
        if self.prefix:
            q = shlex.quote(path)
            group_name = self._group_name(group)
            self.check(
                f'mkdir -p -- "$(dirname -- {q})" && cat > {q} && '
                f"chown {shlex.quote(owner)}:{shlex.quote(group_name)} {q} && chmod {mode:o} {q}",
                stdin=content,
            )
            return
        uid, gid = self.ids(owner, group)
        sftp = self.sftp()
        try:
            self._makedirs(sftp, path.rpartition("/")[0])
            with sftp.file(path, "wb") as fh:
                fh.write(content)
            sftp.chown(path, uid, gid)
            sftp.chmod(path, mode)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise TargetError(f"{self.name}: cannot write {path}: {exc}") from exc

    def set_owner(self, path: str, mode: int, owner: str, group: str) -> None:
        if self.prefix:
            q = shlex.quote(path)
            self.check(
                f"chown {shlex.quote(owner)}:{shlex.quote(self._group_name(group))} {q} && chmod {mode:o} {q}"
            )
            return
        uid, gid = self.ids(owner, group)
        try:
            self.sftp().chown(path, uid, gid)
            self.sftp().chmod(path, mode)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise TargetError(f"{self.name}: cannot set owner and mode of {path}: {exc}") from exc

    def sftp(self) -> paramiko.SFTPClient:
        """One SFTP session for the shell's life: opening one costs a round trip."""
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (OSError, paramiko.SSHException, EOFError) as exc:
                raise TargetError(f"{self.name}: cannot open SFTP: {exc}") from exc
        return self._sftp

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, directory: str) -> None:
        parts = [p for p in directory.split("/") if p]
        for n in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:n])
            try:
                sftp.stat(path)
            except FileNotFoundError:
                sftp.mkdir(path, 0o755)

    def _group_name(self, group: str) -> str:
        """OpenBSD's `_smtpd` is Debian's `opensmtpd` and Alpine's `smtpd`: the first the host has."""
        names = group_alternatives(group)
        if len(names) == 1:
            return group
        quoted = " ".join(shlex.quote(g) for g in names)
        probe = self.run(f"for g in {quoted}; do getent group $g >/dev/null && echo $g && break; done")
        return probe.stdout.strip() or group

    def ids(self, owner: str, group: str) -> tuple[int, int]:
        """Numeric ids for SFTP's chown, looked up once per name (group mapped as above)."""
        key = (owner, group)
        if key not in self._ids:
            q = shlex.quote(owner)
            groups = " || ".join(f"getent group {shlex.quote(g)}" for g in group_alternatives(group))
            out = self.check(f"id -u {q}; ({groups}) | cut -d: -f3 | head -n1")
            lines = out.stdout.split()
            if len(lines) != 2 or not all(x.isdigit() for x in lines):
                raise TargetError(f"{self.name}: no such user or group {owner}:{group}")
            self._ids[key] = (int(lines[0]), int(lines[1]))
        return self._ids[key]

    def close(self) -> None:
        """Close the connection (every shell `within` this one shares it)."""
        if self._sftp is not None:
            with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                self._sftp.close()
            self._sftp = None
        self.client.close()


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


# -- reaching an existing host --------------------------------------------------------------------
@dataclass(frozen=True)
class SshUrl:
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"ssh://{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


def parse_ssh_url(url: str) -> SshUrl:
    shown = repr(url) if any(ord(ch) < 32 or ord(ch) == 127 for ch in url) or not url else url
    if shown != url:  # urlsplit drops a newline or a tab silently: `ro\not` would log in as root
        raise TargetError(f"{shown}: expected ssh://USER@HOST[:PORT], without control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        what = "bad port" if "port" in str(exc).lower() else "not an ssh://USER@HOST[:PORT] URL"
        raise TargetError(f"{shown}: {what} ({exc})") from None
    if parts.scheme != "ssh" or not parts.hostname or not parts.username or parts.path not in ("", "/"):
        raise TargetError(f"{shown}: expected ssh://USER@HOST[:PORT]")
    if port == 0:
        raise TargetError(f"{shown}: bad port: 0 is not a port to connect to")
    problem = dns_name_problem(parts.hostname)
    if problem is not None:
        raise TargetError(f"{shown}: the host {problem}")
    if not re.fullmatch(r"[\w.@+-]+", parts.username):
        raise TargetError(f"{shown}: the user {parts.username!r} is not a user name")
    return SshUrl(parts.username, parts.hostname, port or 22)


def load_identity(identity: Path) -> paramiko.PKey:
    """--identity as a private key paramiko can use, read before connecting, so a wrong file
    is named as such (UserFileError or TargetError), not reported as a refused login."""
    read_bytes(identity, "--identity")
    try:
        return paramiko.PKey.from_path(identity)
    except paramiko.PasswordRequiredException:
        raise TargetError(
            f"--identity {identity}: the private key is encrypted: "
            "load it into ssh-agent and leave --identity out"
        ) from None
    except (paramiko.SSHException, ValueError, TypeError, UnicodeError) as exc:
        raise TargetError(f"--identity {identity}: not a private key paramiko can read ({exc})") from None


def connect(
    url: str, identity: Path | None = None, known_hosts: Path | None = None, timeout: float = CONNECT_TIMEOUT
) -> Shell:
    """A shell on the host (host key checked against known_hosts), or TargetError naming host and cause.

    Everything the user gave (URL, key, known_hosts) is checked before any connection is made.
    """
    where = parse_ssh_url(url)
    key = load_identity(identity) if identity is not None else None
    # paramiko logs a traceback of its own for a peer that does not speak SSH: the error below says it.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys()
        if known_hosts is not None:
            read_text(known_hosts, "--known-hosts")
            client.load_host_keys(str(known_hosts))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise TargetError(f"--known-hosts {known_hosts}: cannot read known hosts: {exc}") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        _connect(client, where, key, identity, timeout)
    except BaseException:
        client.close()  # paramiko's transport thread would otherwise outlive the error
        raise
    return Shell(f"{where.user}@{where.host}", client)


def _connect(
    client: paramiko.SSHClient,
    where: SshUrl,
    key: paramiko.PKey | None,
    identity: Path | None,
    timeout: float,
) -> None:
    name = f"{where.host}:{where.port}"
    try:
        client.connect(
            where.host,
            where.port,
            username=where.user,
            pkey=key,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=identity is None,
            look_for_keys=identity is None,
        )
    except paramiko.BadHostKeyException as exc:
        raise TargetError(f"{name}: host key mismatch ({exc.key.get_name()}): refusing to connect") from None
    except paramiko.AuthenticationException:
        keys = f"key {identity}" if identity else "the agent's and default keys"
        raise TargetError(f"{name}: authentication refused for user {where.user} with {keys}") from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        causes = "; ".join(sorted({getattr(e, "strerror", None) or str(e) for e in exc.errors.values()}))
        raise TargetError(f"{name}: unreachable: {causes}") from None
    except socket.gaierror as exc:
        raise TargetError(f"{where.host}: unreachable: cannot resolve the name: {exc.strerror}") from None
    except TimeoutError:
        raise TargetError(f"{name}: unreachable: no answer within {timeout:g}s") from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise TargetError(
                f"{name}: host key unknown: add it to ~/.ssh/known_hosts (check its fingerprint first) "
                "or pass --known-hosts FILE"
            ) from None
        raise TargetError(f"{name}: {_ssh_failure(exc, timeout)}") from None
    except (OSError, EOFError, ValueError) as exc:
        cause = getattr(exc, "strerror", None) or str(exc) or "the connection was closed"
        raise TargetError(f"{name}: unreachable: {cause}") from None


def _ssh_failure(exc: paramiko.SSHException, timeout: float) -> str:
    """paramiko's words for a peer that is not an SSH server, as a person would say it."""
    text = str(exc) or type(exc).__name__
    if "protocol banner" in text:
        return f"not an SSH server: no SSH banner within {timeout:g}s (paramiko: {text})"
    if "Incompatible version" in text:
        return f"not an SSH-2 server: {text}"
    if "No existing session" in text:
        # The transport thread gave up (no usable banner) before the client noticed.
        return f"not an SSH server: no usable SSH banner within {timeout:g}s, no SSH session began"
    return f"not an SSH server, or it broke off the key exchange: {text}"


def as_root(shell: Shell) -> Shell:
    """Root on the host: as logged in, or through passwordless `sudo -n`; TargetError otherwise."""
    if shell.run("id -u").stdout.strip() == "0":
        return shell
    probe = shell.run("sudo -n true")
    if probe.returncode != 0:
        raise TargetError(
            f"{shell.name}: not root and no passwordless sudo ({probe.output or 'sudo -n true failed'}): "
            "the harness needs root to read the secrets table"
        )
    return shell.within("sudo", "-n")
