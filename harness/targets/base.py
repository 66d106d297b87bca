"""The one small interface every target answers: lab test hosts, existing hosts, the emulation.

A scenario never asks which kind of target it has. It installs a bundle (the config and the
files it names, as they will ship), checks it, starts smtpd, submits mail, observes, and stops.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.errors import HarnessError
from harness.waiting import Subscribers

if TYPE_CHECKING:
    from harness.smtpdconf import Config
    from harness.upstream import UpstreamServer

SMTPD_CONF = "/etc/smtpd.conf"


class TargetError(HarnessError):
    """The target cannot do what was asked; the message says which target and why."""


class MailRefused(TargetError):
    """smtpd refused a submitted message with an SMTP reply (`reply`: its code and text), by its
    config's own rules (no `match` takes it, a `reject`, a filter): the config's doing, not the
    target's."""

    def __init__(self, message: str, reply: str) -> None:
        self.reply = reply
        super().__init__(message)


def submission_failed(said: str, output: str) -> TargetError:
    """What a failed submission is: MailRefused when smtpd refused it with a reply (sendmail, that
    is smtpctl enqueue, says `sendmail: command failed: 550 Invalid recipient: <x>`), else a
    TargetError. `said` is the whole story for the user; `output` the submitter's words."""
    reply = re.search(r"command failed: ([245]\d\d\b.*)", output)
    if reply is not None:
        return MailRefused(said, reply.group(1).strip())
    return TargetError(said)


@dataclass(frozen=True)
class BundleFile:
    """A file the config names (a table, a certificate), put where the config says it is."""

    path: str
    content: bytes = field(repr=False)
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    secret: bool = False  # its content is credentials: never printed, compared by hash only
    db: str | None = None  # a `db:` table: build this path from the file, as makemap would
    aliases: bool = False  # with db: the source is in aliases(5) format (`makemap -t aliases`)


@dataclass(frozen=True)
class Bundle:
    """What ships: smtpd.conf verbatim, the files it names, the local users mail goes to.

    `config` None: the config already at `config_path` is used as it is (a host's own files,
    read in place by a sandbox on it).
    """

    config: str | None
    files: tuple[BundleFile, ...] = ()
    users: tuple[str, ...] = ()
    config_path: str = SMTPD_CONF

    @functools.cached_property
    def parsed(self) -> Config | None:
        """The config as data, read once for every reader of one run (the target making what it
        names, the relay names, why smtpd exited), with the widest grammar: its declarations
        whatever the release. None when there is no text or the harness cannot parse it: smtpd
        judges it then, and nothing is made for it."""
        from harness.smtpdconf import ConfigSyntaxError, parse_config
        from harness.smtpdconf.parse import WIDEST_GRAMMAR

        if self.config is None:
            return None
        try:
            return parse_config(self.config, self.config_path, WIDEST_GRAMMAR, include=self._included)
        except ConfigSyntaxError:
            return None

    @functools.cached_property
    def readable(self) -> Config | None:
        """What can be read of a config smtpd will refuse (its statements up to and around the
        errors, as smtpd's parser goes on): what it listens on is still made, so smtpd names the
        config's own error rather than an interface the test host lacked. None: no text."""
        from harness.smtpdconf import parse_config
        from harness.smtpdconf.parse import WIDEST_GRAMMAR

        if self.config is None:
            return None
        return parse_config(self.config, self.config_path, WIDEST_GRAMMAR, errors=[], include=self._included)

    def _included(self, path: str) -> str | None:
        """An `include` line's file, if the bundle has it."""
        content = next((f.content for f in self.files if f.path == path), None)
        return None if content is None else content.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ConfigCheck:
    """`smtpd -n`'s verdict in its own words; `line` is the config line it blamed, if any."""

    ok: bool
    output: str
    line: int | None = None
    message: str | None = None

    @classmethod
    def from_output(cls, returncode: int, output: str, config_path: str) -> ConfigCheck:
        text = output.strip()
        m = re.search(rf"^{re.escape(config_path)}:(\d+): (.*)$", text, re.MULTILINE)
        if returncode == 0:
            return cls(True, text)
        if m:
            return cls(False, text, int(m.group(1)), m.group(2))
        # fatalx(NULL) after a log_warnx ends the output with a bare "smtpd": the warning says why.
        said = [line for line in text.splitlines() if line.strip() not in ("", "smtpd", "smtpd:")]
        last = said[-1] if said else f"smtpd -n exited {returncode}"
        return cls(False, text, None, last)


class StartFailed(TargetError):
    """smtpd did not become ready, for a reason that is not the config's (or not known to be);
    `lines` is what it logged, for a caller that knows the config to explain (a table backend
    whose server the host lacks gives up at start or a moment later, as the machine's load has it)."""

    def __init__(self, message: str, lines: list[str]) -> None:
        super().__init__(message)
        self.lines = lines


class StartRefused(TargetError):
    """smtpd accepted the config (`smtpd -n`) but exited while starting with it: the config's fault.

    OpenSMTPD 7.x checks some settings only when its processes start (a misspelt `protocols`,
    an unknown cipher): `check` carries the line the process that gave up logged.
    """

    def __init__(self, target: str, check: ConfigCheck) -> None:
        self.check = check
        super().__init__(f"{target}: smtpd exited while starting: {check.message}")


@dataclass(frozen=True)
class OutgoingMail:
    """A message to submit: `via="sendmail"` as a local user would, or `via="smtp"` to a listener."""

    sender: str
    recipients: tuple[str, ...]
    subject: str = "relay-harness probe"
    body: str = "This message was sent by relay-harness.\n"
    via: str = "sendmail"
    user: str = "root"
    smtp_address: str = "127.0.0.1"
    smtp_port: int = 25

    def as_bytes(self) -> bytes:
        from email.message import EmailMessage

        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Subject"] = self.subject
        msg.set_content(self.body)
        return msg.as_bytes()


@dataclass(frozen=True)
class Submission:
    """One message of a bulk submission: did the submitting program take it, and what it printed."""

    ok: bool
    output: str


class LogFollower:
    """smtpd's log as a stream of lines one can wait on, filled by a reader thread.

    Waiting on a pattern (not sleeping) is what lets a check report an AUTH failure the moment
    smtpd logs it, instead of waiting for a retry that comes minutes later.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._news = Subscribers()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` on every new line and at the end; returns the unsubscriber."""
        return self._news.subscribe(callback)

    def feed(self, line: str) -> None:
        with self._cond:
            self._lines.append(line)
            self._cond.notify_all()
        self._news.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._news.notify()

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_closed(self, timeout: float) -> bool:
        """Until the stream has ended (the process exited and its output was read)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)

    def lines_since(self, index: int) -> list[str]:
        """The lines from `index` on (a reader that follows a long log keeps its own index)."""
        with self._cond:
            return self._lines[index:]

    def mark(self) -> int:
        """A position; `wait_for(..., since=mark)` ignores lines logged before it."""
        with self._cond:
            return len(self._lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, since: int = 0) -> re.Match[str]:
        """The first line from `since` on matching `pattern`; TimeoutError quoting the tail."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            index = since
            while True:
                while index < len(self._lines):
                    m = regex.search(self._lines[index])
                    index += 1
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    tail = "\n".join(self._lines[-15:])
                    why = "smtpd exited" if self._closed else f"not within {timeout:g}s"
                    raise TimeoutError(f"no log line matched {regex.pattern!r} ({why}); last lines:\n{tail}")
                self._cond.wait(remaining)

    def matching(self, pattern: str, since: int = 0) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.lines[since:] if regex.search(line)]


@dataclass(frozen=True)
class Handshake:
    """One TLS handshake with one address of a listener, from inside the target (as a client of
    the host would connect). `certificate`: the DER the listener served; `error`: the TLS
    error's own words when the handshake did not complete."""

    word: str  # the `listen on` word it was resolved from
    address: str
    port: int
    mode: str  # "smtps" or "starttls"
    certificate: bytes | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Target(ABC):
    """Where a config runs: SmtpdTarget (any real smtpd: lab, existing host, sandbox), emulated."""

    name: str
    notes: tuple[str, ...] = ()  # what a report should say about where and how the config ran

    @abstractmethod
    def install(self, bundle: Bundle) -> None:
        """Put the bundle in place with the owners and modes smtpd needs."""

    @abstractmethod
    def check_config(self, config_path: str = SMTPD_CONF) -> ConfigCheck:
        """`smtpd -n`: does smtpd accept the config (and open every table it names)?"""

    @abstractmethod
    def start(self, config_path: str = SMTPD_CONF) -> LogFollower:
        """A fresh smtpd with an empty queue; returns its log, followed live."""

    @abstractmethod
    def submit(self, mail: OutgoingMail) -> str:
        """Hand a message to smtpd; returns what the submitting program printed."""

    def submit_many(self, mails: Sequence[OutgoingMail]) -> list[Submission]:
        """Hand many messages to smtpd in order; one result each, a failure does not stop the rest.

        This default submits one by one; a target where each submission costs a round trip
        (SSH) does them all in one command.
        """
        results = []
        for mail in mails:
            try:
                results.append(Submission(True, self.submit(mail)))
            except TargetError as exc:
                results.append(Submission(False, str(exc)))
        return results

    @abstractmethod
    def control(self, *args: str) -> str:
        """`smtpctl ARGS` on the running smtpd (pause/resume mta, schedule all, ...), as printed."""

    @abstractmethod
    def queue(self) -> str:
        """`smtpctl show queue` as printed."""

    @abstractmethod
    def mailbox(self, user: str) -> bytes:
        """The user's mbox content (empty when there is none)."""

    @abstractmethod
    def point(self, names: Iterable[str], address: str) -> None:
        """Make the given host names resolve to `address` for smtpd (the fake upstream)."""

    @abstractmethod
    def trust(self, ca_pem: bytes) -> None:
        """Make smtpd trust this CA (the harness's test CA) in place of the system bundle."""

    @abstractmethod
    def upstream_address(self) -> str:
        """The address smtpd connects to for the fake upstream (what `point` names it as)."""

    def upstream_listen(self) -> tuple[str, int | None] | None:
        """Where the harness's upstream listens (port None: the profile's); by default the same.

        None: nowhere; `attach_upstream` hands it each connection in-process (no port at all).
        """
        return self.upstream_address(), None

    def upstream_peers(self) -> tuple[str, ...] | None:
        """The addresses smtpd's relay connections come from: the only peers the upstream serves.

        None: any peer (where the target cannot say, e.g. through a tunnel from this machine).
        """
        return None

    def attach_upstream(self, upstream: UpstreamServer) -> None:
        """Join smtpd's side to the running upstream, before smtpd starts.

        Nothing to do where smtpd reaches the upstream directly; a sandbox opens its tunnel here.
        """
        return None

    def tls_handshakes(self, listeners: Sequence[tuple[str, str, int, str]]) -> list[Handshake] | None:
        """A TLS handshake with every address each (word, kind, port, mode) listener resolves to
        on the target, with smtpd running. None: this target cannot make one (the emulation):
        such a listener is reported as not tested, never as passed."""
        return None

    @abstractmethod
    def stop(self) -> None:
        """Stop the smtpd that `start` started (idempotent)."""

    @abstractmethod
    def close(self) -> None:
        """Stop everything and give back what the target changed."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
