"""EmulatedTarget: the Target interface answered in-process, for where no smtpd can run.

No root, no namespaces, no OpenSMTPD, no paramiko: the config and its files live in memory
(host.py), `smtpd -n` is config.py, the running smtpd is daemon.py, and the relay goes over real
TCP and TLS to the same fake upstream the lab uses (an ephemeral port on 127.0.0.1). What the
model does not cover raises Declined rather than being guessed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from harness.redact import Redactor, secrets_table_credentials
from harness.smtpdconf import ConfigSyntaxError, listen_needs, parse_config
from harness.targets.base import (
    SMTPD_CONF,
    Bundle,
    ConfigCheck,
    LogFollower,
    OutgoingMail,
    Target,
    TargetError,
    submission_failed,
)
from harness.targets.emulated.config import Loaded, load
from harness.targets.emulated.daemon import Daemon, SubmissionFailed
from harness.targets.emulated.host import HARNESS_ADDRESS, EmulatedHost, StoredFile
from harness.targets.emulated.network import Network
from harness.targets.emulated.tables import TableLoadError, load_makemap

if TYPE_CHECKING:
    from harness.upstream import UpstreamServer

# OpenBSD's names for smtpd's groups, as the lab's hosts map them (Debian: opensmtpd).
_GROUPS = {"_smtpd": "opensmtpd", "_smtpq": "opensmtpq"}


class EmulatedTarget(Target):
    def __init__(self, host: EmulatedHost | None = None) -> None:
        self.host = host or EmulatedHost()
        self.name = f"emulated:{self.host.hostname}"
        self.notes = (
            "ran on the emulated target: an in-process model of OpenSMTPD 6.8, not the real smtpd "
            "(what it does not model it declines; --target lab runs the real one)",
        )
        self.network = Network(self.host)
        self.redactor = Redactor()
        self.log = LogFollower()
        self._daemon: Daemon | None = None
        self._loaded: Loaded | None = None
        self._mailboxes: dict[str, bytearray] = {}

    # -- Target -----------------------------------------------------------------------------------
    def install(self, bundle: Bundle) -> None:
        for user in bundle.users:
            self.host.add_user(user)
        self._loaded = None
        if bundle.config is not None:  # None: the config already in place is used as it is
            try:
                config = parse_config(bundle.config, bundle.config_path)
            except ConfigSyntaxError:
                config = None  # smtpd judges it; there is nothing the host could make for it
            if config is not None:
                self.notes = (*self.notes, *self.host.provide(listen_needs(config)))
            self.host.files[bundle.config_path] = StoredFile(bundle.config.encode(), 0o644, "root", "root")
        for f in bundle.files:
            if f.secret:
                for user, password in secrets_table_credentials(f.content):
                    self.redactor.add(user, password)
            group = _GROUPS.get(f.group, f.group)
            self.host.files[f.path] = StoredFile(f.content, f.mode, f.owner, group)
            if f.db is not None:
                kind = "-t aliases " if f.aliases else ""
                try:
                    self.host.databases[f.db] = load_makemap(f.db, f.content, f.path, f.aliases)
                except TableLoadError as exc:
                    command = f"makemap {kind}-o {f.db} {f.path}"
                    raise TargetError(f"{self.name}: {command!r} exited 1: {exc}") from None
                self.host.files[f.db] = StoredFile(b"", f.mode, f.owner, group)

    def check_config(self, config_path: str = SMTPD_CONF) -> ConfigCheck:
        content = self.host.read(config_path)
        if content is None:
            return ConfigCheck.from_output(1, f"smtpd: could not open {config_path}", config_path)
        self._loaded = load(content.decode("utf-8", "surrogateescape"), config_path, self.host)
        return self._loaded.check

    def start(self, config_path: str = SMTPD_CONF) -> LogFollower:
        self.stop()
        loaded = self._loaded
        if loaded is None:
            self.check_config(config_path)
            loaded = self._loaded
        assert loaded is not None
        if not loaded.check.ok:
            raise TargetError(f"{self.name}: smtpd did not start:\n{self.redactor(loaded.check.output)}")
        self.log = follower = LogFollower()
        self._daemon = Daemon(
            self.host, loaded, self.network, lambda line: follower.feed(self.redactor(line))
        )
        self._mailboxes = self._daemon.mailboxes
        self._daemon.on_exit = follower.close
        self._daemon.start()
        return follower

    def submit(self, mail: OutgoingMail) -> str:
        if any(ch in a for a in (mail.sender, *mail.recipients) for ch in "\0\r\n"):
            raise TargetError(
                f"refusing to submit mail with control characters in an address: {mail.recipients}"
            )
        if mail.via not in ("sendmail", "smtp"):
            raise TargetError(f"unknown submission {mail.via!r}: sendmail or smtp")
        daemon = self._running()
        try:
            return daemon.submit(mail)
        except SubmissionFailed as failed:
            raise submission_failed(
                f"{self.name}: {mail.via} exited {failed.code}: {failed.output}", failed.output
            ) from None

    def control(self, *args: str) -> str:
        return self._running().control(args)

    def queue(self) -> str:
        return self._running().show_queue() if self._daemon is not None else ""

    def mailbox(self, user: str) -> bytes:
        return bytes(self._mailboxes.get(user, b""))

    def point(self, names: Iterable[str], address: str) -> None:
        for name in names:
            self.host.hosts.setdefault(name, address)

    def trust(self, ca_pem: bytes) -> None:
        self.host.trusted_ca = ca_pem

    def upstream_address(self) -> str:
        return HARNESS_ADDRESS

    def upstream_listen(self) -> None:
        """No listener: each relay connection is a TCP pair made here and handed over (network.py)."""
        return None

    def attach_upstream(self, upstream: UpstreamServer) -> None:
        """The host sees the provider at 198.51.100.1 on its profile's port; connections there
        are handed to the upstream in-process."""
        self.network.serve(HARNESS_ADDRESS, upstream.profile.port, upstream.serve_socket)

    def stop(self) -> None:
        daemon, self._daemon = self._daemon, None
        if daemon is not None:
            daemon.stop()
            self.log.close()

    def close(self) -> None:
        self.stop()

    def _running(self) -> Daemon:
        if self._daemon is None:
            raise TargetError(f"{self.name}: smtpd is not running")
        return self._daemon
