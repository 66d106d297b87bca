"""lka_session.c: one recipient through the ruleset and the alias and virtual tables, to the
deliveries it makes (or smtpd's refusal of it at RCPT).

A port of lka_expand(): addresses go through the ruleset; a local action looks the user up in its
alias (or virtual) table and expands what it finds, once per distinct node; a user that is no
alias must exist on the host (getpwnam) and gets its ~/.forward looked at. Program, file,
include and error entries are outside the model and declined when mail reaches them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from harness.targets.emulated.config import Dispatcher, Loaded, Rule
from harness.targets.emulated.decline import Declined
from harness.targets.emulated.host import EmulatedHost
from harness.targets.emulated.ruleset import RuleTempFail, Subject, match
from harness.targets.emulated.tables import (
    SUBADDRESS_DELIMITER,
    MailAddr,
    Service,
    expandnode_kind,
    split_alias_values,
)

EXPAND_DEPTH = 10
EXPANSION_PERMFAIL = "524 5.2.4 Mailing list expansion problem"
EXPANSION_TEMPFAIL = "424 4.2.4 Mailing list expansion problem"
STICKY_DIRS = frozenset({"/var/mail", "/tmp", "/var/tmp"})


@dataclass(frozen=True)
class Delivery:
    """One envelope lka hands to the queue: relayed (mta) or delivered here (mda)."""

    dispatcher: Dispatcher
    dest: MailAddr
    mda_user: str | None = None


@dataclass(eq=False)
class _Node:
    kind: str  # address, username
    value: str  # the user, or the address as text
    parent: _Node | None
    rule: Rule | None
    depth: int = 0
    sameuser: bool = False
    realuser: bool = False
    forwarded: bool = False

    @property
    def addr(self) -> MailAddr:
        return MailAddr.parse(self.value)

    def address_ancestor(self) -> _Node | None:
        node: _Node | None = self
        while node is not None and node.kind != "address":
            node = node.parent
        return node


class Refused(Exception):
    """The recipient is refused at RCPT: `reply` is what smtpd answers (without `: <rcpt>`)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass
class Expansion:
    loaded: Loaded
    host: EmulatedHost
    subject: Subject
    log: Callable[[str], None]
    nodes: list[_Node] = field(default_factory=list)
    queue: list[_Node] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)

    def run(self) -> list[Delivery]:
        self._insert(_Node("address", str(self.subject.dest), None, None), None, None)
        while self.queue:
            self._expand(self.queue.pop(0))
        if not self.deliveries:
            raise Refused(EXPANSION_PERMFAIL)
        return self.deliveries

    # expand.c expand_insert(): equal nodes (same kind, value, flags and address context) once.
    def _insert(self, node: _Node, parent: _Node | None, rule: Rule | None) -> None:
        node.parent, node.rule = parent, rule
        if node.kind == "username" and parent is not None and parent.kind == "username":
            node.sameuser = parent.value == node.value
        context = parent.address_ancestor() if parent is not None else None
        for other in self.nodes:
            other_context = other.parent.address_ancestor() if other.parent is not None else None
            same = (other.kind, other.sameuser, other.realuser, other.value) == (
                node.kind,
                node.sameuser,
                node.realuser,
                node.value,
            )
            if same and (other.parent is parent or other_context is context):
                return
        node.depth = parent.depth + 1 if parent is not None else 0
        self.nodes.append(node)
        self.queue.append(node)

    def _dispatcher(self, rule: Rule) -> Dispatcher:
        return self.loaded.dispatchers[rule.dispatcher or ""]

    def _expand(self, node: _Node) -> None:
        if node.depth >= EXPAND_DEPTH:
            raise Refused(EXPANSION_PERMFAIL)
        if node.kind == "address":
            self._address(node)
        else:
            self._username(node)

    def _address(self, node: _Node) -> None:
        subject = replace(self.subject, dest=node.addr, internal=node.parent is not None)
        try:
            rule = match(self.loaded.rules, subject, self.loaded.tables)
        except RuleTempFail:
            raise Refused("451 Temporary failure") from None
        if rule is None or rule.reject:
            raise Refused("550 Invalid recipient")
        dispatcher = self._dispatcher(rule)
        if not dispatcher.local:
            self.deliveries.append(Delivery(dispatcher, node.addr))
            return
        if dispatcher.virtual is not None:
            addr = node.addr
            if not self._virtual(node, rule, dispatcher.virtual, MailAddr(addr.user.lower(), addr.domain)):
                raise Refused(EXPANSION_PERMFAIL)
            return
        node.rule = rule
        self._insert(_Node("username", node.addr.user.lower(), None, None), node, rule)

    def _username(self, node: _Node) -> None:
        rule = node.rule
        assert rule is not None
        dispatcher = self._dispatcher(rule)
        if not node.sameuser:
            if dispatcher.alias is not None and self._aliases(node, rule, dispatcher.alias):
                return
            # a user name read as an address: the user, no domain (lka_expand's union)
            if dispatcher.virtual is not None and self._virtual(
                node, rule, dispatcher.virtual, MailAddr(node.value, "")
            ):
                return
        user = node.value.split(SUBADDRESS_DELIMITER, 1)[0]
        if user not in self.host.users:
            raise Refused("550 Invalid recipient")
        node.realuser = True
        if node.sameuser and node.parent is not None and node.parent.forwarded:
            self._submit(node, dispatcher, user)
            return
        node.forwarded = True
        self._forward(node, dispatcher, user)

    def _aliases(self, node: _Node, rule: Rule, table_name: str) -> int:
        """aliases_get(): the user (first with its +tag) in the alias table; nodes it expands to."""
        table = self.loaded.tables[table_name]
        user = node.value.lower()
        value = table.lookup(Service.ALIAS, user)
        if value is None and SUBADDRESS_DELIMITER in user:
            value = table.lookup(Service.ALIAS, user.split(SUBADDRESS_DELIMITER, 1)[0])
        if value is None:
            return 0
        return self._merge(node, rule, value, table_name)

    def _virtual(self, node: _Node, rule: Rule, table_name: str, addr: MailAddr) -> int:
        """aliases_virtual_get(): user+tag@domain, user@domain, user+tag, user, @domain, @."""
        table = self.loaded.tables[table_name]
        user, domain = addr.user.lower(), addr.domain.lower()
        user, _, tag = user.partition(SUBADDRESS_DELIMITER)
        keys = [f"{user}{SUBADDRESS_DELIMITER}{tag}@{domain}"] if tag else []
        keys.append(f"{user}@{domain}")
        if tag:
            keys.append(f"{user}{SUBADDRESS_DELIMITER}{tag}")
        keys.append(user)
        if domain:  # catch-alls only for an address with a domain
            keys += [f"@{domain}", "@"]
        for key in keys:
            value = table.lookup(Service.ALIAS, key)
            if value is not None:
                return self._merge(node, rule, value, table_name)
        return 0

    def _merge(self, node: _Node, rule: Rule, value: str, table_name: str) -> int:
        """The nodes one table value expands to, inserted below `node` (expand_line())."""
        values = split_alias_values(value)
        if values is None:
            raise Refused(EXPANSION_TEMPFAIL)
        count = 0
        for text in values:
            kind = expandnode_kind(text)
            if kind is None:
                raise Refused(EXPANSION_TEMPFAIL)
            if kind not in ("address", "username"):
                raise Declined(
                    f"an alias to a {kind} ({text!r}, in table {table_name})", self._dispatcher(rule).line
                )
            self._insert(_Node(kind, text, None, None), node, rule)
            count += 1
        return count

    def _forward(self, node: _Node, dispatcher: Dispatcher, user: str) -> None:
        """parent_forward_open(): a missing home is logged and mail is delivered as it is."""
        home = self.host.users[user]
        if home in STICKY_DIRS:
            raise Declined(f"delivery to {user}, whose home {home} is sticky", dispatcher.line)
        if not self.host.home_exists(user):
            self.log(f"warn: smtpd: parent_forward_open: {home}: No such file or directory")
        elif f"{home}/.forward" in self.host.files:
            raise Declined(f"{home}/.forward (forwarding by the user)", dispatcher.line)
        self._submit(node, dispatcher, user)

    def _submit(self, node: _Node, dispatcher: Dispatcher, user: str) -> None:
        ancestor = node.address_ancestor()
        assert ancestor is not None
        self.deliveries.append(Delivery(dispatcher, ancestor.addr, mda_user=user))


def expand(
    loaded: Loaded, host: EmulatedHost, subject: Subject, log: Callable[[str], None]
) -> list[Delivery]:
    """The deliveries for one recipient; Refused (with smtpd's reply) or Declined otherwise."""
    return Expansion(loaded, host, subject, log).run()
