"""The config as the emulated smtpd loads it: `smtpd -n`'s verdict in its own words, and the
tables, dispatchers, rules and listeners mail is then handled by.

The walk follows parse.y in file order, as smtpd reads it: a statement whose checks fail is
reported (`FILE:LINE: message`) and dropped, and reading goes on; a fatal error (an unknown
interface, a table declared twice) stops there; after the last line come the rules count and the
pki and CA files. The text of every message is smtpd 6.8's. Anything this walk does not model is
collected as a decline, and a refusal is only reported when nothing unmodelled comes before it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from harness.smtpdconf.parse import (
    Action,
    Ca,
    Condition,
    Config,
    ConfigSyntaxError,
    Include,
    Listen,
    Literal,
    Match,
    Operand,
    Pki,
    RawStatement,
    TableRef,
    TrailingSyntaxError,
    parse_config,
)
from harness.targets.base import ConfigCheck
from harness.targets.emulated.decline import Declined
from harness.targets.emulated.host import EmulatedHost
from harness.targets.emulated.tables import Table, TableLoadError, load_static

# Raw statements the model knows to have no effect on relaying, and what smtpd logs for them.
KNOWN_RAW: dict[tuple[str, ...], str | None] = {("queue", "compression"): "queue: queue compression enabled"}
# Local delivery methods and options modelled; everything else in an action is declined.
LOCAL_METHODS = frozenset({"mbox"})
LOCAL_OPTIONS = frozenset({"alias", "virtual", "user"})
REMOTE_OPTIONS = frozenset({"host", "auth", "mail-from", "helo", "ca", "tls"})
LISTEN_OPTIONS = frozenset({"port"})


@dataclass(frozen=True)
class Dispatcher:
    name: str
    line: int
    local: bool
    alias: str | None = None
    virtual: str | None = None
    smarthost: str | None = None  # the relay URL, as written
    auth: str | None = None
    mail_from: str | None = None
    helo: str | None = None
    ca: str | None = None
    tls_required: bool = False
    tls_noverify: bool = False


@dataclass(frozen=True)
class Rule:
    """parse.y's `struct rule`: each flag is 0 (absent), 1 or -1 (negated)."""

    line: int
    dispatcher: str | None
    reject: bool
    flag_from: int = 1
    table_from: str | None = "<localhost>"
    from_socket: bool = False
    from_regex: bool = False
    flag_for: int = 1
    table_for: str = "<localnames>"
    for_regex: bool = False
    flag_mail_from: int = 0
    table_mail_from: str | None = None
    mail_from_regex: bool = False
    flag_rcpt_to: int = 0
    table_rcpt_to: str | None = None
    rcpt_to_regex: bool = False
    flag_auth: int = 0
    table_auth: str | None = None
    auth_regex: bool = False
    flag_tls: int = 0


@dataclass(frozen=True)
class Listener:
    """One listening socket: `local` is smtpd's flag for the socket and loopback addresses."""

    address: str  # "local" for the socket
    port: int
    line: int

    @property
    def local(self) -> bool:
        return self.address == "local" or ipaddress.ip_address(self.address).is_loopback


@dataclass
class Loaded:
    """What smtpd holds after loading the config (only meaningful when `check.ok`)."""

    check: ConfigCheck
    tables: dict[str, Table] = field(default_factory=dict)
    dispatchers: dict[str, Dispatcher] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    cas: dict[str, bytes] = field(default_factory=dict)
    startup_log: list[str] = field(default_factory=list)


class _Fatal(Exception):
    """smtpd stops reading the config (errx/fatalx): the line is its last output."""


class _Refused(Exception):
    """yyerror(): the statement is dropped; the message goes out with the statement's line."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message, self.line = message, line


def load(text: str, path: str, host: EmulatedHost) -> Loaded:
    """`smtpd -n -f PATH` on the host, and the loaded config; Declined where it cannot tell."""
    errors: list[ConfigSyntaxError] = []
    config = parse_config(text, path, errors=errors)
    walk = _Walk(config, path, host)
    return walk.run(errors)


class _Walk:
    def __init__(self, config: Config, path: str, host: EmulatedHost) -> None:
        self.config = config
        self.path = path
        self.host = host
        self.out: list[str] = []
        self.first_error_line: int | None = None
        self.declines: list[Declined] = []
        self.loaded = Loaded(ConfigCheck(True, "configuration OK"))
        self.socket_line: int | None = None
        self.pkis: dict[str, Pki] = {}
        self.anonymous = 0
        self._default_tables()

    # -- the walk -----------------------------------------------------------------------------
    def run(self, syntax: list[ConfigSyntaxError]) -> Loaded:
        items: list[tuple[int, object]] = [(s.line, s) for s in self.config.statements]
        items += [(e.line, e) for e in syntax]
        items.sort(key=lambda pair: pair[0])
        refused_statements: set[int] = set()
        try:
            for line, item in items:
                if isinstance(item, ConfigSyntaxError):
                    if not (
                        isinstance(item, TrailingSyntaxError) and id(item.statement) in refused_statements
                    ):
                        self._error(item.message, line)
                    continue
                try:
                    self._statement(item)
                except _Refused as refused:
                    refused_statements.add(id(item))
                    first, last = _span(item)
                    if last > first and not refused.message.startswith("no such dispatcher"):
                        # yacc blames the line of the token it had read ahead: not modelled
                        self._decline(
                            f"the line smtpd blames in a statement over lines {first}-{last}", first
                        )
                    self._error(refused.message, refused.line)
            self._finish()
        except _Fatal as fatal:
            self.out.append(str(fatal))
            self._fail()
        return self.loaded

    def _error(self, message: str, line: int) -> None:
        self.out.append(f"{self.path}:{line}: {message}")
        if self.first_error_line is None:
            self.first_error_line = line

    def _fail(self) -> None:
        """The config is refused: reliable only when nothing declined came before the error."""
        limit = self.first_error_line
        early = [d for d in self.declines if limit is None or (d.line or 0) <= limit]
        if early:
            raise early[0]
        output = "\n".join(self.out)
        self.loaded.check = ConfigCheck.from_output(1, output, self.path)

    def _finish(self) -> None:
        if not self.loaded.rules:  # parse_config(): counted as an error, after the others
            self.out.append("warn: no rules, nothing to do")
            if self.first_error_line is None:
                self.first_error_line = 10**9
        if self.first_error_line is not None:
            self._fail()
            return
        if self.declines:
            raise self.declines[0]
        self._pki_files()
        self.loaded.check = ConfigCheck(True, "configuration OK")

    def _pki_files(self) -> None:
        """load_pki_tree() and load_pki_keys() after the config parsed cleanly."""
        for name in sorted(self.pkis):
            pki = self.pkis[name]
            if pki.cert is None:
                raise _Fatal("smtpd: load_pki_tree: missing certificate file")
            if pki.key is None:
                raise _Fatal("smtpd: load_pki_tree: missing key file")
            if not _has_pem(self.host.read(pki.cert), b"CERTIFICATE"):
                raise _Fatal("smtpd: load_pki_tree: failed to load certificate file")
        for name in sorted(self.config.cas):
            ca = self.config.cas[name]
            pem = self.host.read(ca.cert or "")
            if not _has_pem(pem, b"CERTIFICATE"):
                raise _Fatal("smtpd: load_pki_tree: failed to load CA file")
            self.loaded.cas[name] = pem or b""
            self.loaded.startup_log.append(f"info: loading CA information for {name}")
        for name in sorted(self.pkis):
            if not _has_pem(self.host.read(self.pkis[name].key or ""), b"PRIVATE KEY"):
                raise _Fatal("smtpd: load_pki_keys: failed to load key file")

    def _decline(self, construct: str, line: int) -> None:
        self.declines.append(Declined(construct, line))

    def _statement(self, statement: object) -> None:
        if isinstance(statement, Listen):
            self._listen(statement)
        elif isinstance(statement, Action):
            self._action(statement)
        elif isinstance(statement, Match):
            self._match(statement)
        elif isinstance(statement, Pki):
            self.pkis[statement.name] = statement
        elif isinstance(statement, Ca):
            pass  # loaded at the end, from the merged declarations
        elif isinstance(statement, Include):
            self._decline("`include` (another file)", statement.line)
        elif isinstance(statement, RawStatement):
            self._raw(statement)
        else:
            self._table(statement)

    # -- tables -------------------------------------------------------------------------------
    def _default_tables(self) -> None:
        """config.c: <localhost>, <anyhost>, <localnames>, <anydestination>, <getpwnam>."""
        host = self.host
        tables = self.loaded.tables
        localhost = Table("<localhost>", "static", kind="list")
        localnames = Table("<localnames>", "static", kind="list")
        localnames.entries.update({"localhost": None, host.hostname.lower(): None})
        localhost.entries["local"] = None
        for address in host.addresses:
            localhost.entries[address] = None
            localnames.entries[address] = None
            localnames.entries[f"[{address}]"] = None
            if ":" in address:
                localnames.entries[f"[ipv6:{address}]"] = None
        anyhost = Table("<anyhost>", "static", {"local": None, "0.0.0.0/0": None, "::/0": None}, "list")
        anydestination = Table("<anydestination>", "static", {"*": None}, "list")
        short = host.hostname.split(".")[0]
        if short != host.hostname:
            anydestination.entries[short.lower()] = None
        for table in (localhost, anyhost, localnames, anydestination):
            tables[table.name] = table

    def _table(self, statement: object) -> None:
        from harness.smtpdconf.parse import Table as Declared

        assert isinstance(statement, Declared)
        tables = self.loaded.tables
        if statement.name in tables:
            raise _Fatal(f'smtpd: table_create: table "{statement.name}" already defined')
        if statement.config is None:  # `table NAME { ... }`
            tables[statement.name] = _inline(statement.name, statement.values, statement.mapping)
            return
        if statement.backend not in ("file", "db", "static"):
            self._decline(f"table backend {statement.backend}:", statement.line)
            tables[statement.name] = Table(statement.name, statement.backend, kind="dynamic")
            return
        path = statement.config
        content = self.host.read(path)
        try:
            if statement.backend == "db":
                built = self.host.databases.get(path)
                if built is None:
                    raise TableLoadError("")
                table = replace(built, name=statement.name)
            elif content is None:
                self.out.append(f"{path}: fopen: No such file or directory")
                raise TableLoadError("")
            else:
                table = load_static(statement.name, content, path)
        except TableLoadError as exc:
            if str(exc):
                self.out.append(str(exc))
            # a db is dynamic whatever it holds; a file smtpd could not read is of no type at all
            kind = "dynamic" if statement.backend == "db" else "none"
            tables[statement.name] = Table(statement.name, statement.backend, kind=kind)
            raise _Refused(
                f"invalid configuration file {path} for table {statement.name}", statement.line
            ) from None
        tables[statement.name] = table

    def _operand(self, operand: Operand, line: int) -> Table:
        """parse.y `tables`: a reference must exist; a literal becomes an anonymous table."""
        if isinstance(operand, TableRef):
            table = self.loaded.tables.get(operand.name)
            if table is None:
                raise _Refused(f"no such table: {operand.name}", operand.line)
            return table
        name = f"<dynamic:{self.anonymous}>"
        self.anonymous += 1
        table = _inline(name, operand.values, ())
        self.loaded.tables[name] = table
        return table

    # -- listeners ----------------------------------------------------------------------------
    def _listen(self, listen: Listen) -> None:
        if "pki" in listen.options[:-1]:
            # checked as the listener is made, whatever else the model declines about it: a pki
            # needs TLS; one named (case-insensitively) that is not declared above is fatal
            # (log_warnx + fatalx(NULL), hence the bare `smtpd`); nothing after it is read
            if not {"tls", "tls-require", "smtps"} & set(listen.options):
                raise _Fatal("smtpd: invalid listen option: pki requires tls/smtps")
            name = listen.options[listen.options.index("pki") + 1]
            if name.lower() not in self.pkis:
                raise _Fatal(f"pki name not found: {name}\nsmtpd")
        unmodelled = [o for o in listen.options if o not in LISTEN_OPTIONS and not o.isdigit()]
        if unmodelled:
            self._decline(f"listen option `{unmodelled[0]}`", listen.line)
            return
        port = 25
        if "port" in listen.options:
            value = listen.options[listen.options.index("port") + 1]
            if not value.isdigit() or not 0 < int(value) < 65536:
                self._decline(f"listen port {value!r}", listen.line)
                return
            port = int(value)
        if listen.is_socket:
            if self.socket_line is not None:
                raise _Refused("socket listener already configured", listen.line)
            self.socket_line = listen.line
            return
        addresses = self._interface(listen.interface)
        if not addresses:
            raise _Fatal(f"smtpd: invalid virtual ip or interface: {listen.interface}")
        self.loaded.listeners.extend(Listener(a, port, listen.line) for a in addresses)

    def _interface(self, name: str) -> tuple[str, ...]:
        """interface(), host_v4(), host_v6(), host_dns() in that order."""
        if name in self.host.interfaces:
            return self.host.interfaces[name]
        try:
            return (str(ipaddress.ip_address(name)),)
        except ValueError:
            return self.host.resolve(name)

    # -- actions ------------------------------------------------------------------------------
    def _action(self, action: Action) -> None:
        dispatchers = self.loaded.dispatchers
        if action.name in dispatchers:
            raise _Refused(f"dispatcher already declared with that name: {action.name}", action.line)
        dispatcher = self._remote(action) if action.is_relay else self._local(action)
        if dispatcher is not None:
            dispatchers[action.name] = dispatcher

    def _local(self, action: Action) -> Dispatcher | None:
        if action.method not in LOCAL_METHODS:
            self._decline(f"local delivery `{action.method}`", action.line)
            return Dispatcher(action.name, action.line, True)
        alias = virtual = None
        for option in action.options:
            if option.name not in LOCAL_OPTIONS:
                self._decline(f"action option `{option.name}`", option.line)
                continue
            if option.name == "user":
                raise _Refused("user may not be specified for this dispatcher", option.line)
            assert isinstance(option.value, TableRef | Literal)
            if alias is not None or virtual is not None:
                which = "alias" if alias is not None else "virtual"
                raise _Refused(f"{which} mapping already specified for this dispatcher", option.line)
            table = self._operand(option.value, option.line)
            if not table.usable_as("hash"):
                raise _Refused(f'table "{table.name}" may not be used for {option.name} lookups', option.line)
            if option.name == "alias":
                alias = table.name
            else:
                virtual = table.name
        return Dispatcher(action.name, action.line, True, alias=alias, virtual=virtual)

    def _remote(self, action: Action) -> Dispatcher | None:
        values: dict[str, str | None] = {}
        tls_required = tls_noverify = False
        for option in action.options:
            name = option.name
            if name not in REMOTE_OPTIONS:
                self._decline(f"relay option `{name}`", option.line)
                continue
            if name == "tls":
                if tls_required:
                    raise _Refused("tls already specified for this dispatcher", option.line)
                tls_required, tls_noverify = True, "no-verify" in option.extra
                continue
            if name in values:
                raise _Refused(_DUPLICATE[name], option.line)
            if name == "auth" and "host" not in values:
                raise _Refused("auth may not be specified without host on a dispatcher", option.line)
            if name in ("host", "auth"):
                assert isinstance(option.value, TableRef | Literal)
                table = self._operand(option.value, option.line)
                values[name] = self._relay_table(name, table, option.value, option.line)
            else:
                assert isinstance(option.value, str)
                values[name] = option.value
        if "host" not in values:
            self._decline("relaying without `host` (delivery by MX lookup)", action.line)
        elif _address_literal(values["host"] or ""):
            # the lab serves the provider at the literal; the model has only its 198.51.100.1
            self._decline("relaying to an address literal", action.line)
        return Dispatcher(
            action.name,
            action.line,
            False,
            smarthost=values.get("host"),
            auth=values.get("auth"),
            mail_from=values.get("mail-from"),
            helo=values.get("helo"),
            ca=values.get("ca"),
            tls_required=tls_required,
            tls_noverify=tls_noverify,
        )

    def _relay_table(self, name: str, table: Table, operand: Operand, line: int) -> str | None:
        if name == "auth":
            if not table.usable_as("hash"):
                raise _Refused(f'table "{table.name}" may not be used for auth lookups', line)
            return table.name
        if isinstance(operand, Literal) and len(operand.values) == 1:
            return operand.values[0]
        self._decline("a relay `host` given as a table or list", line)
        return None

    # -- rules --------------------------------------------------------------------------------
    def _match(self, match: Match) -> None:
        rule: dict[str, object] = {}
        for condition in match.conditions:
            self._condition(condition, rule)
        if not match.reject:
            name = match.action or ""
            if name not in self.loaded.dispatchers:
                raise _Refused(f"no such dispatcher: {name}", match.action_line)
        self.loaded.rules.append(Rule(match.line, match.action, match.reject, **rule))  # type: ignore[arg-type]

    def _condition(self, c: Condition, rule: dict[str, object]) -> None:
        flag = -1 if c.negated else 1
        what = (c.kind, c.qualifier)
        if what == ("from", "rdns") or c.kind in ("tag", "helo"):
            self._decline(f"match condition `{' '.join(w for w in what if w)}`", c.line)
            return
        table = None
        if c.operand is not None:
            found = self._operand(c.operand, c.line)
            if not found.usable_as("list"):
                raise _Refused(f'table "{found.name}" may not be used for {_LOOKUP[what]} lookups', c.line)
            table = found.name
        if c.kind == "tls":
            rule["flag_tls"] = flag
        elif c.kind == "auth" or what == ("from", "auth"):
            if c.kind == "from":
                rule.update(flag_from=1, table_from="<anyhost>")
            rule.update(flag_auth=flag, table_auth=table, auth_regex=c.regex)
        elif c.kind == "from":
            if c.qualifier == "socket":
                rule.update(flag_from=flag, table_from=None, from_socket=True)
            elif c.qualifier == "mail-from":
                rule.update(flag_from=1, table_from="<anyhost>", flag_mail_from=flag, table_mail_from=table)
                rule["mail_from_regex"] = c.regex
            else:
                default = {"local": "<localhost>", "any": "<anyhost>"}.get(c.qualifier or "")
                rule.update(flag_from=flag, table_from=default or table, from_regex=c.regex)
        elif c.kind == "for":
            if c.qualifier == "rcpt-to":
                rule.update(flag_for=1, table_for="<anydestination>", flag_rcpt_to=flag, table_rcpt_to=table)
                rule["rcpt_to_regex"] = c.regex
            else:
                default = {"local": "<localnames>", "any": "<anydestination>"}.get(c.qualifier or "")
                rule.update(flag_for=flag, table_for=default or table, for_regex=c.regex)
        elif c.kind == "mail-from":
            rule.update(flag_mail_from=flag, table_mail_from=table, mail_from_regex=c.regex)
        elif c.kind == "rcpt-to":
            rule.update(flag_rcpt_to=flag, table_rcpt_to=table, rcpt_to_regex=c.regex)

    # -- the rest -----------------------------------------------------------------------------
    def _raw(self, raw: RawStatement) -> None:
        if raw.kind != "other":
            raise _Refused("syntax error", raw.line)
        key = raw.words
        if key in KNOWN_RAW:
            line = KNOWN_RAW[key]
            if line:
                self.loaded.startup_log.append(line)
            return
        self._decline(f"`{' '.join(key)}`", raw.line)


# What parse.y calls a condition's lookups when its table is no list.
_LOOKUP: dict[tuple[str, str | None], str] = {
    ("from", "src"): "from",
    ("from", "auth"): "from",
    ("from", "mail-from"): "from",
    ("for", "domain"): "'for'",
    ("for", "rcpt-to"): "for",
    ("auth", None): "auth",
    ("mail-from", None): "mail-from",
    ("rcpt-to", None): "rcpt-to",
}
_DUPLICATE = {
    "host": "host mapping already specified for this dispatcher",
    "auth": "auth mapping already specified for this dispatcher",
    "mail-from": "mail-from already specified for this dispatcher",
    "helo": "helo already specified for this dispatcher",
    "ca": "ca already specified for this dispatcher",
}


def _span(statement: object) -> tuple[int, int]:
    """The first and last line a statement's modelled parts are on (a `\\` continues a line)."""
    lines = [getattr(statement, "line", 0)]
    if isinstance(statement, Action):
        for option in statement.options:
            lines.append(option.line)
            if isinstance(option.value, TableRef | Literal):
                lines.append(option.value.line)
    elif isinstance(statement, Match):
        lines.append(statement.action_line)
        for c in statement.conditions:
            lines.append(c.line)
            if c.operand is not None:
                lines.append(c.operand.line)
    return min(lines), max(lines)


def _inline(name: str, values: tuple[str, ...], mapping: tuple[tuple[str, str], ...]) -> Table:
    if mapping:
        return Table(name, "static", {k.lower(): v for k, v in mapping}, "hash")
    return Table(name, "static", {v.lower(): None for v in values}, "list")


def _has_pem(content: bytes | None, kind: bytes) -> bool:
    return content is not None and b"-----BEGIN " in content and kind in content


def _address_literal(url: str) -> bool:
    from harness.smtpdconf.relayurl import RelayUrlError, parse_relay_url

    try:
        ipaddress.ip_address(parse_relay_url(url).connect_host)
    except (RelayUrlError, ValueError):
        return False
    return True
