"""What a scenario case must see, typed and frozen, and the judge that compares it with what was seen.

Each `[case.expect]` key is one group (a small frozen dataclass) that knows three things: how to
judge an Observation (`judge`, returning mismatches, never waiting), whether the event it needs
has not happened yet (`pending`, which drives event-driven waiting), and how it is written in
TOML (for the generated index). Keeping judging free of waiting is what lets a twin's observed
outcome be judged by its positive's expectations without running smtpd again.

Reading the groups from a scenario file, with every type checked, is harness.expectations_parse:
by the time a group exists here its values are known good, so judging never validates.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from harness.observation import DeliveryLine, Observation
from harness.upstream.record import MessageRecord, TlsMode

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One expectation that the observation does not meet, in words a person can act on."""

    field: str  # the [case.expect] key, dotted for a sub-key: "tls", "delivery.result"
    wanted: str
    saw: str

    def __str__(self) -> str:
        return f"{self.field}: expected {self.wanted}, saw {self.saw}"


def toml_value(value: object) -> str:
    """A value as it would be written in a scenario file (for the generated index)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str):
        if "'" not in value and "\n" not in value:
            return f"'{value}'"
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


class Expectation:
    """One group of a case's expectations; subclasses are frozen slotted dataclasses."""

    __slots__ = ()
    key: ClassVar[str]

    def judge(self, obs: Observation) -> list[Mismatch]:
        raise NotImplementedError

    def pending(self, obs: Observation) -> bool:
        """True while the event this group needs has not been seen (only log and records count)."""
        return False

    def _values(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def inline(self) -> str:
        """The group's value in TOML: `true`, `'starttls'`, `{ user = 'alice' }`."""
        values = self._values()
        if list(values) == ["value"]:
            return toml_value(values["value"])
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None) + " }"

    def toml(self) -> str:
        return f"{self.key} = {self.inline()}"


@dataclass(frozen=True, slots=True)
class Relayed(Expectation):
    key: ClassVar[str] = "relayed"
    value: bool

    def judge(self, obs: Observation) -> list[Mismatch]:
        relayed = obs.relayed_message()
        if self.value and relayed is None:
            return [Mismatch(self.key, "the upstream to accept the mail", "nothing accepted")]
        accepted = obs.accepted_messages()
        if not self.value and accepted:
            m = accepted[0]
            saw = f"it accepted mail from <{m.mail_from}> to {', '.join(m.rcpt_to)}"
            return [Mismatch(self.key, "nothing accepted by the upstream", saw)]
        return []

    def pending(self, obs: Observation) -> bool:
        return self.value and obs.relayed_message() is None


@dataclass(frozen=True, slots=True)
class Tls(Expectation):
    key: ClassVar[str] = "tls"
    value: TlsMode

    def judge(self, obs: Observation) -> list[Mismatch]:
        session = obs.relay_session()
        if session is None:
            return [Mismatch(self.key, f"TLS {self.value}", "no session at the upstream")]
        if session.tls != self.value:
            return [Mismatch(self.key, f"TLS {self.value}", f"TLS {session.tls}")]
        return []


@dataclass(frozen=True, slots=True)
class Auth(Expectation):
    """The last AUTH attempt at the upstream (its mechanism, user, and whether it succeeded)."""

    key: ClassVar[str] = "auth"
    mechanism: str | None = None
    user: str | None = None
    success: bool | None = None

    def judge(self, obs: Observation) -> list[Mismatch]:
        attempts = obs.auth_attempts()
        if not attempts:
            return [Mismatch(self.key, f"an AUTH attempt {self.inline()}", "none")]
        last = attempts[-1]
        out = []
        for name in ("mechanism", "user", "success"):
            wanted, got = getattr(self, name), getattr(last, name)
            if wanted is not None and wanted != got:
                out.append(Mismatch(f"auth.{name}", f"AUTH {name} {wanted!r}", repr(got)))
        return out

    def pending(self, obs: Observation) -> bool:
        return not obs.auth_attempts()


@dataclass(frozen=True, slots=True)
class AuthAttempted(Expectation):
    key: ClassVar[str] = "auth_attempted"
    value: bool

    def judge(self, obs: Observation) -> list[Mismatch]:
        attempts = obs.auth_attempts()
        if bool(attempts) == self.value:
            return []
        if self.value:
            return [Mismatch(self.key, "an AUTH attempt", "none")]
        users = ", ".join(f"{a.mechanism} as {a.user}" for a in attempts)
        return [Mismatch(self.key, "no AUTH attempt", f"AUTH {users}")]


def _session_messages(obs: Observation) -> list[MessageRecord] | None:
    session = obs.relay_session()
    if session is None:
        return None
    return [m for m in session.messages if m.accepted] or list(session.messages)


@dataclass(frozen=True, slots=True)
class MailFrom(Expectation):
    key: ClassVar[str] = "mail_from"
    value: str

    def judge(self, obs: Observation) -> list[Mismatch]:
        messages = _session_messages(obs)
        if messages is None:
            return [Mismatch(self.key, f"MAIL FROM <{self.value}>", "no session at the upstream")]
        senders = [m.mail_from for m in messages]
        if self.value not in senders:
            saw = ", ".join(f"<{s}>" for s in senders) or "no MAIL FROM"
            return [Mismatch(self.key, f"MAIL FROM <{self.value}>", saw)]
        return []


@dataclass(frozen=True, slots=True)
class RcptTo(Expectation):
    """Exactly these recipients at the upstream, in the session that relayed the mail."""

    key: ClassVar[str] = "rcpt_to"
    value: tuple[str, ...]

    def judge(self, obs: Observation) -> list[Mismatch]:
        wanted = sorted(set(self.value))
        messages = _session_messages(obs)
        if messages is None:
            return [Mismatch(self.key, f"RCPT TO {wanted}", "no session at the upstream")]
        got = sorted({r for m in messages for r in m.rcpt_to})
        return [] if got == wanted else [Mismatch(self.key, f"RCPT TO {wanted}", f"RCPT TO {got}")]

    def pending(self, obs: Observation) -> bool:
        """Until each recipient is accepted: a case's messages may arrive one after the other."""
        return not set(self.value) <= {r for m in obs.accepted_messages() for r in m.rcpt_to}


@dataclass(frozen=True, slots=True)
class Log(Expectation):
    """Each pattern matches some line smtpd logged after the first submission."""

    key: ClassVar[str] = "log"
    value: tuple[str, ...]

    def _missing(self, obs: Observation) -> list[str]:
        return [p for p in self.value if not any(re.search(p, line) for line in obs.log)]

    def judge(self, obs: Observation) -> list[Mismatch]:
        return [Mismatch(self.key, f"a log line matching {p!r}", "no such line") for p in self._missing(obs)]

    def pending(self, obs: Observation) -> bool:
        return bool(self._missing(obs))


@dataclass(frozen=True, slots=True)
class LogAbsent(Expectation):
    key: ClassVar[str] = "log_absent"
    value: tuple[str, ...]

    def judge(self, obs: Observation) -> list[Mismatch]:
        out = []
        for pattern in self.value:
            hit = next((line for line in obs.log if re.search(pattern, line)), None)
            if hit is not None:
                out.append(Mismatch(self.key, f"no log line matching {pattern!r}", repr(hit)))
        return out


@dataclass(frozen=True, slots=True)
class Delivery(Expectation):
    """smtpd's first delivery attempt (to `rcpt`, if given): its result and status text."""

    key: ClassVar[str] = "delivery"
    result: str | None = None
    stat: str | None = None  # a regular expression
    rcpt: str | None = None

    def _first(self, obs: Observation) -> DeliveryLine | None:
        return next((d for d in obs.deliveries if self.rcpt is None or d.rcpt == self.rcpt), None)

    def judge(self, obs: Observation) -> list[Mismatch]:
        first = self._first(obs)
        if first is None:
            what = f"a delivery attempt to {self.rcpt}" if self.rcpt else "a delivery attempt"
            return [Mismatch(self.key, what, "none logged")]
        out = []
        if self.result is not None and first.result != self.result:
            saw = f"{first.result} ({first.stat})"
            out.append(Mismatch("delivery.result", f"delivery result {self.result}", saw))
        if self.stat is not None and not re.search(self.stat, first.stat):
            out.append(Mismatch("delivery.stat", f"delivery stat matching {self.stat!r}", repr(first.stat)))
        return out

    def pending(self, obs: Observation) -> bool:
        return self._first(obs) is None


@dataclass(frozen=True, slots=True)
class Deferrals(Expectation):
    """smtpd deferred the relayed mail exactly `value` times (TempFail) before delivering it (Ok).

    smtpd would retry by itself minutes later; the case is about how often the provider defers,
    not about smtpd's back-off, so the run triggers each retry at once (`retries_due`).
    """

    key: ClassVar[str] = "deferrals"
    value: int

    def _attempts(self, obs: Observation) -> tuple[int, DeliveryLine | None]:
        """The TempFails before the first other result, and that result (None: not yet)."""
        seen = 0
        for line in obs.deliveries:
            if line.agent != "mta":
                continue
            if line.result != "TempFail":
                return seen, line
            seen += 1
        return seen, None

    def retries_due(self, obs: Observation) -> int:
        """How many retries the run should have triggered by now: one per deferral expected."""
        seen, final = self._attempts(obs)
        return min(seen, self.value) if final is None else 0

    def judge(self, obs: Observation) -> list[Mismatch]:
        seen, final = self._attempts(obs)
        wanted = f"{self.value} deferral(s) before delivery"
        if final is None and seen > self.value:
            return [Mismatch(self.key, wanted, f"smtpd deferred it more often ({seen} times)")]
        if final is None:
            return [Mismatch(self.key, wanted, f"no delivery after {seen} deferral(s)")]
        if final.result != "Ok":
            saw = f"{final.result} ({final.stat}) after {seen} deferral(s)"
            return [Mismatch(self.key, f"delivery after {self.value} deferral(s)", saw)]
        if seen != self.value:
            return [Mismatch(self.key, wanted, f"smtpd deferred it {seen} time(s)")]
        return []

    def pending(self, obs: Observation) -> bool:
        seen, final = self._attempts(obs)
        return final is None and seen <= self.value


@dataclass(frozen=True, slots=True)
class DeliveredOnce(Expectation):
    """Each recipient accepted exactly once by the upstream, and nothing left queued to come again.

    The observation reads the queue before the upstream's records: the upstream records a message
    before its 250 leaves, and smtpd drops the envelope only after that 250, so every delivery
    that emptied the queue is counted.
    """

    key: ClassVar[str] = "delivered_once"
    value: bool = True

    def judge(self, obs: Observation) -> list[Mismatch]:
        accepted = [r for m in obs.accepted_messages() for r in m.rcpt_to]
        wanted = sorted(obs.sent_recipients or set(accepted))
        counts = {r: accepted.count(r) for r in wanted}
        out = []
        if not wanted or any(n != 1 for n in counts.values()):
            saw = f"counts: {counts}" if wanted else "nothing accepted"
            out.append(Mismatch(self.key, "each recipient accepted exactly once by the upstream", saw))
        queued = [r for r in wanted if r in obs.queue]
        if queued:
            saw = f"smtpctl show queue: {obs.queue.strip()}"
            out.append(Mismatch(self.key, f"nothing left queued for {queued}", saw))
        return out

    def pending(self, obs: Observation) -> bool:
        return not any(d.agent == "mta" and d.result == "Ok" for d in obs.deliveries)


@dataclass(frozen=True, slots=True)
class Queue(Expectation):
    """Each text appears in `smtpctl show queue` (the mail is still queued)."""

    key: ClassVar[str] = "queue"
    value: tuple[str, ...]

    def judge(self, obs: Observation) -> list[Mismatch]:
        shown = obs.queue.strip() or "(empty)"
        return [
            Mismatch(self.key, f"the queue to show {t!r}", f"smtpctl show queue: {shown}")
            for t in self.value
            if t not in obs.queue
        ]


@dataclass(frozen=True, slots=True)
class Mbox(Expectation):
    """A local delivery to `user` logged, and the user's mbox containing `contains`."""

    key: ClassVar[str] = "mbox"
    user: str
    contains: str = ""
    what: ClassVar[str] = "local delivery"

    def _deliveries(self, obs: Observation) -> tuple[DeliveryLine, ...]:
        return tuple(d for d in obs.deliveries if d.agent == "mda")

    def _delivered(self, obs: Observation) -> bool:
        return any(d.user == self.user for d in self._deliveries(obs))

    def judge(self, obs: Observation) -> list[Mismatch]:
        out = []
        if not self._delivered(obs):
            out.append(Mismatch(self.key, f"a {self.what} to {self.user}", "none logged"))
        content = obs.mailbox(self.user)
        wanted = f"{self.user}'s mailbox to contain {self.contains or 'mail'!r}"
        if content is None:
            out.append(Mismatch(f"{self.key}.contains", wanted, "the mailbox was not looked at"))
        elif not content or self.contains not in content:
            saw = "an empty mailbox" if not content else "a mailbox without it"
            out.append(Mismatch(f"{self.key}.contains", wanted, saw))
        return out

    def pending(self, obs: Observation) -> bool:
        return not self._delivered(obs)


@dataclass(frozen=True, slots=True)
class Bounce(Mbox):
    """smtpd's own report (from the null sender <>) delivered to the local sender `user`."""

    key: ClassVar[str] = "bounce"
    what: ClassVar[str] = "bounce"

    def _deliveries(self, obs: Observation) -> tuple[DeliveryLine, ...]:
        return obs.bounces


@dataclass(frozen=True, slots=True)
class SubmissionRefused(Expectation):
    """The submitting program (sendmail, or an SMTP client) is refused, with this text."""

    key: ClassVar[str] = "submission_refused"
    value: str  # a regular expression

    def judge(self, obs: Observation) -> list[Mismatch]:
        refusals = obs.refusals()
        if any(re.search(self.value, r) for r in refusals):
            return []
        saw = "; ".join(refusals) if refusals else "every submission accepted"
        return [Mismatch(self.key, f"the submission refused with {self.value!r}", saw)]


@dataclass(frozen=True, slots=True)
class UpstreamReply(Expectation):
    key: ClassVar[str] = "upstream_reply"
    value: str  # a regular expression

    def judge(self, obs: Observation) -> list[Mismatch]:
        if self.pending(obs):
            last = list(obs.replies()[-5:])
            return [Mismatch(self.key, f"the upstream to reply {self.value!r}", f"replies {last}")]
        return []

    def pending(self, obs: Observation) -> bool:
        return not any(re.search(self.value, r) for r in obs.replies())


@dataclass(frozen=True, slots=True)
class ConfigError(Expectation):
    """`smtpd -n` refuses the config with this message (on this line, if given)."""

    key: ClassVar[str] = "config_error"
    message: str
    line: int | None = None

    def judge(self, obs: Observation) -> list[Mismatch]:
        check = obs.config
        wanted = f"smtpd -n to refuse the config with {self.message!r}"
        if check.ok:
            return [Mismatch(self.key, wanted, "smtpd -n accept it")]
        out = []
        if self.message not in (check.message or ""):
            out.append(Mismatch(self.key, wanted, repr(check.message)))
        if self.line is not None and check.line != self.line:
            saw = f"smtpd blamed line {check.line}"
            out.append(Mismatch("config_error_line", f"the error on line {self.line}", saw))
        return out

    def toml(self) -> str:
        text = f"{self.key} = {toml_value(self.message)}"
        return text if self.line is None else f"{text}, config_error_line = {self.line}"


@dataclass(frozen=True, slots=True)
class Expectations:
    """A case's expectations: each group or None (not expected), and how long to wait for them.

    Groups not given are not judged, with two implicit exceptions: without `config_error` smtpd
    must accept the config, and without `submission_refused` every submission must be accepted.
    """

    config_error: ConfigError | None = None
    submission_refused: SubmissionRefused | None = None
    relayed: Relayed | None = None
    tls: Tls | None = None
    auth: Auth | None = None
    auth_attempted: AuthAttempted | None = None
    mail_from: MailFrom | None = None
    rcpt_to: RcptTo | None = None
    log: Log | None = None
    log_absent: LogAbsent | None = None
    delivery: Delivery | None = None
    queue: Queue | None = None
    mbox: Mbox | None = None
    bounce: Bounce | None = None
    upstream_reply: UpstreamReply | None = None
    deferrals: Deferrals | None = None
    delivered_once: DeliveredOnce | None = None
    timeout: float | None = None  # seconds to wait for the pending groups; None: DEFAULT_TIMEOUT

    def groups(self) -> Iterator[Expectation]:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Expectation):
                yield value

    @property
    def wait_seconds(self) -> float:
        return DEFAULT_TIMEOUT if self.timeout is None else self.timeout

    @property
    def mailbox_users(self) -> frozenset[str]:
        return frozenset(box.user for box in (self.mbox, self.bounce) if box is not None)

    def pending(self, obs: Observation) -> bool:
        return any(group.pending(obs) for group in self.groups())

    def retries_due(self, obs: Observation) -> int:
        """Retries (`smtpctl schedule all`) the run should have triggered by now (see Deferrals)."""
        return self.deferrals.retries_due(obs) if self.deferrals is not None else 0

    def overridden_by(self, other: Expectations) -> Expectations:
        """These expectations with every group `other` gives replaced (a per-release override)."""
        given = {f.name: getattr(other, f.name) for f in dataclasses.fields(other)}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def toml(self) -> str:
        return ", ".join(group.toml() for group in self.groups())


def evaluate(expect: Expectations, obs: Observation) -> list[Mismatch]:
    """Every expectation the observation does not meet; empty when it meets them all. Never waits."""
    if expect.config_error is not None:
        return expect.config_error.judge(obs)
    if not obs.config.ok:
        saw = f"smtpd -n refuse it ({obs.config.message or obs.config.output})"
        return [Mismatch("config", "smtpd -n to accept the config", saw)]
    out: list[Mismatch] = []
    if expect.submission_refused is None:
        out.extend(Mismatch("send", "the submission accepted", r) for r in obs.refusals())
    for group in expect.groups():
        out.extend(group.judge(obs))
    return out
