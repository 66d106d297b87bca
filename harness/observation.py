"""What a scenario case saw, frozen: the evidence its expectations (and its twin's) are judged on.

Observing and judging are kept apart so that one run can be judged twice: by the case's own
expectations, and, for a broken twin, by its positive's (which must then fail somewhere, or the
pair proves nothing). A snapshot taken once and never re-read from the target makes both
judgements see the same facts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from harness.relay import DELIVERY
from harness.targets.base import ConfigCheck
from harness.upstream import AuthAttempt, MessageRecord, SessionRecord

_DELIVERY = re.compile(DELIVERY)


@dataclass(frozen=True, slots=True)
class DeliveryLine:
    """One `mta delivery` / `mda delivery` line of smtpd's log, split into its fields."""

    agent: str  # mta (relayed) or mda (local)
    sender: str  # "" for smtpd's own bounces (the null sender <>)
    rcpt: str
    user: str | None  # the local user an mda delivery went to
    result: str  # Ok | TempFail | PermFail
    stat: str
    line: str

    @classmethod
    def parse(cls, line: str) -> DeliveryLine | None:
        m = _DELIVERY.search(line)
        if m is None:
            return None
        return cls(m["agent"], m["sender"], m["rcpt"], m["user"], m["result"], m["stat"], line[m.start() :])


@dataclass(frozen=True, slots=True)
class Submission:
    """One message handed to smtpd, and whether the submitting program was refused."""

    sender: str
    recipients: tuple[str, ...]
    via: str
    refused: str | None = None  # what the target said when it refused; None: accepted


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything a case's expectations may look at, as it was when the case stopped waiting.

    `log` holds smtpd's lines from the case's first submission on; `mailboxes` the mbox of each
    user some expectation names (a user not in it was not looked at); `queue` is `smtpctl show
    queue` as printed. A config smtpd refused has only `config`: nothing was sent.
    """

    config: ConfigCheck
    submissions: tuple[Submission, ...] = ()
    sessions: tuple[SessionRecord, ...] = ()
    log: tuple[str, ...] = ()
    queue: str = ""
    mailboxes: Mapping[str, str] = field(default_factory=dict)
    smtpd_exited: bool = False
    deliveries: tuple[DeliveryLine, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mailboxes", MappingProxyType(dict(self.mailboxes)))
        found = (DeliveryLine.parse(line) for line in self.log)
        object.__setattr__(self, "deliveries", tuple(d for d in found if d is not None))

    @property
    def sent_recipients(self) -> frozenset[str]:
        """Recipients of the submitted mail that are addresses (not local names an alias expands)."""
        return frozenset(r for s in self.submissions if s.refused is None for r in s.recipients if "@" in r)

    def relayed_message(self) -> tuple[SessionRecord, MessageRecord] | None:
        """The first message the upstream accepted for the sent mail (any, when none was addressed)."""
        wanted = self.sent_recipients
        for session in self.sessions:
            for message in session.messages:
                if message.accepted and (not wanted or wanted & set(message.rcpt_to)):
                    return session, message
        return None

    def accepted_messages(self) -> list[MessageRecord]:
        return [m for s in self.sessions for m in s.messages if m.accepted]

    def relay_session(self) -> SessionRecord | None:
        """The session that relayed the mail, else the last one (where a failure was answered)."""
        relayed = self.relayed_message()
        if relayed is not None:
            return relayed[0]
        return self.sessions[-1] if self.sessions else None

    def auth_attempts(self) -> tuple[AuthAttempt, ...]:
        return tuple(a for s in self.sessions for a in s.auth)

    def replies(self) -> tuple[str, ...]:
        return tuple(r for s in self.sessions for r in s.replies)

    @property
    def bounces(self) -> tuple[DeliveryLine, ...]:
        """smtpd's own reports (from the null sender <>) delivered to a local user."""
        return tuple(d for d in self.deliveries if d.agent == "mda" and d.sender == "")

    def mailbox(self, user: str) -> str | None:
        """The user's mbox as text; None when this observation did not look at it."""
        return self.mailboxes.get(user)

    def refusals(self) -> list[str]:
        return [s.refused for s in self.submissions if s.refused is not None]
