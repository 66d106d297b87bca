"""One config under test wired to one fake upstream on one target: the unit every check runs.

Order matters and is the same everywhere (tests, `check`, scenarios, `accept`, benchmarks): start
the upstream and attach the target to it, install the bundle verbatim, point the smarthost's name
at the upstream, trust the test CA, let smtpd judge the config, then start a fresh smtpd.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from harness.pki import TestPki
from harness.smtpdconf import backends, smarthosts
from harness.targets.base import (
    Bundle,
    ConfigCheck,
    LogFollower,
    OutgoingMail,
    StartFailed,
    StartRefused,
    Target,
    TargetError,
)
from harness.targets.testnet import CANNOT
from harness.upstream import MessageRecord, Profile, SessionRecord, UpstreamServer

# smtpd logs one line per delivery attempt, relayed (mta, quoted fields) or local (mda, bare):
#   mta delivery evpid=.. from=<..> to=<..> rcpt=<-> source=".." relay=".." delay=0s result="Ok" stat="250 .."
#   mda delivery evpid=.. from=<..> to=<..> rcpt=<..> user=alice delay=0s result=Ok stat=Delivered
DELIVERY = (
    r"(?P<agent>mta|mda) delivery evpid=\S+ from=<(?P<sender>[^>]*)> to=<(?P<rcpt>[^>]*)>"
    r"(?: rcpt=<[^>]*>)?(?:.* user=(?P<user>\S+))?"
    r".* result=\"?(?P<result>\w+)\"? stat=\"?(?P<stat>[^\"]*)\"?$"
)


class ConfigRejected(TargetError):
    """smtpd -n refused the config; `check` carries smtpd's message and the line it blamed."""

    def __init__(self, target: str, check: ConfigCheck, stage: str = "smtpd -n") -> None:
        self.check = check
        self.stage = stage  # "smtpd -n", or "smtpd start" for a config -n accepts and start refuses
        where = f"line {check.line}: " if check.line else ""
        super().__init__(f"{target}: smtpd refused the config: {where}{check.message}")


@dataclass
class RelayRun:
    target: Target
    upstream: UpstreamServer
    log: LogFollower
    check: ConfigCheck

    def send(self, mail: OutgoingMail) -> int:
        """Submit and return a log mark: what smtpd logs about this mail comes after it."""
        mark = self.log.mark()
        self.target.submit(mail)
        return mark

    def wait_relayed(
        self, timeout: float, predicate: Callable[[SessionRecord, MessageRecord], bool] | None = None
    ) -> tuple[SessionRecord, MessageRecord]:
        """The first message the upstream accepted (matching `predicate`), as soon as it arrives."""
        return self.upstream.recorder.wait_for_message(
            lambda s, m: m.accepted and (predicate is None or predicate(s, m)), timeout
        )

    def wait_log(self, pattern: str, timeout: float, since: int = 0) -> str:
        return self.log.wait_for(pattern, timeout, since).string


def relay_names(bundle: Bundle) -> tuple[str, ...]:
    """The host names the config relays to (not address literals: a target serves those itself,
    see Target.attach_upstream): each resolves to the fake upstream, so the relay is tested as
    written whatever name the URL gives (`mailhub`, or the provider's own)."""
    config = bundle.parsed
    if config is None:
        return ()  # smtpd judges it
    return tuple(h for h in smarthosts(config) if not _is_address(h))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@contextmanager
def relay_run(
    target: Target, bundle: Bundle, profile: Profile, pki: TestPki, extra_names: tuple[str, ...] = ()
) -> Iterator[RelayRun]:
    """The only way a config meets a fake upstream, on any target.

    The upstream starts first (milliseconds) so that a target reaching it through a tunnel can
    attach before anything else runs there; then the bundle, the names, the CA, `smtpd -n`, and
    a fresh smtpd.
    """
    where = target.upstream_listen()
    host, port = where or ("127.0.0.1", None)
    peers = target.upstream_peers()
    with UpstreamServer(profile, pki, host, port, allowed_peers=peers, listen=where is not None) as upstream:
        target.attach_upstream(upstream)
        target.install(bundle)
        target.point((profile.host, *relay_names(bundle), *extra_names), target.upstream_address())
        target.trust(pki.ca_pem)
        check = target.check_config(bundle.config_path)
        if not check.ok:
            raise ConfigRejected(target.name, check)
        try:
            log = target.start(bundle.config_path)
        except StartRefused as refused:  # accepted by smtpd -n, refused when smtpd starts
            raise ConfigRejected(target.name, refused.check, "smtpd start") from None
        except StartFailed as failed:  # a backend's server missing: the same words, early or late
            why = backend_server_why(failed.lines, bundle)
            if why is None:
                raise
            raise SmtpdExited(target.name, why) from None
        try:
            yield RelayRun(target, upstream, log, check)
        except TargetError as exc:
            if isinstance(exc, SmtpdExited):
                raise
            # smtpctl can find smtpd gone before smtpd's output stream has ended: wait for that end
            # (an event, milliseconds when smtpd died) before deciding the error is not its exit
            if not log.closed and not log.wait_closed(EXIT_GRACE):
                raise
            raise SmtpdExited(target.name, exited_why(log.lines, bundle)) from None
        finally:
            target.stop()


EXIT_GRACE = 3.0  # seconds an error's caller waits for a dying smtpd's output to end


class SmtpdExited(TargetError):
    """smtpd was ready, then exited while the probes ran (a table backend or filter gave up)."""

    def __init__(self, target: str, why: str) -> None:
        super().__init__(f"{target}: {why}")


# A table backend's own process logs as the table: `aliases[36]: fatal: failed to connect`.
_BACKEND_FATAL = re.compile(r"^(?P<table>[^\s\[]+)\[\d+\]: fatalx?: (?P<why>.+)$")


def exited_why(lines: list[str], bundle: Bundle) -> str:
    """smtpd's own line for why it exited, and whose fault."""
    # here, not at the top: harness.targets.smtpd imports paramiko, which the emulated path never needs
    from harness.targets.smtpd import startup_failure

    cause = startup_failure(lines)
    return _server_why(cause, bundle) or f"smtpd exited while the probes ran: `{cause or 'no reason logged'}`"


def backend_server_why(lines: list[str], bundle: Bundle) -> str | None:
    """A table backend that cannot reach its server (ldap:, mysql:, postgres:, redis:) needs a
    server the test host does not run: that, with smtpd's line, or None if that is not why."""
    from harness.targets.smtpd import startup_failure  # (see exited_why)

    return _server_why(startup_failure(lines), bundle)


def _server_why(cause: str | None, bundle: Bundle) -> str | None:
    m = _BACKEND_FATAL.match(cause or "")
    config = bundle.parsed
    if m is None or config is None:
        return None
    table = next((b for b in backends(config) if b.table == m.group("table")), None)
    if table is None or table.backend not in SERVER_BACKENDS:
        return None
    return (
        f"{CANNOT} the {table.backend} server of table {table.table} (line {table.line}): smtpd "
        f"exited, its table-{table.backend} said `{cause}`; a test host reaches no server but the "
        f"fake upstream: test with a file: table of the same content (--table {table.table}=FILE "
        "and `file:` in a copy of the config), or where that server runs (--target ssh://USER@HOST)"
    )


# Backends that talk to a server of their own (the others read a file: sqlite, passwd).
SERVER_BACKENDS = frozenset({"ldap", "mysql", "postgres", "redis", "socketmap"})
