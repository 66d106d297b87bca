"""What a config needs from the host it runs on: what it listens on, the programs it runs.

smtpd (parse.y, create_if_listener) takes the word after `listen on` as, in this order: an
interface name (OpenBSD: also an interface group such as `all` or `egress`; Linux has no
groups), an IPv4 or IPv6 literal, or a name it resolves (getaddrinfo: /etc/hosts first). A test
host must have each of these for the config to run as written; what exists already (lo, lo0,
eth0, 127.0.0.0/8, ::1, localhost) is the test host's business, not this module's. Likewise the
programs an `mda` action or a `proc`/`proc-exec` filter runs must be on the host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from harness.smtpdconf.parse import KEYWORDS, Config, Literal

# An interface name with a VLAN suffix (eth0.100) has a dot but is not a host name.
_VLAN = re.compile(r"[A-Za-z][\w-]*\.\d+")


@dataclass(frozen=True)
class ListenNeeds:
    interfaces: tuple[str, ...] = ()  # as written: eth0, wg0, lo0, docker0, eth0:1 (an address label)
    addresses: tuple[str, ...] = ()  # IPv4/IPv6 literals, normalised (`[::1]` → `::1`)
    hostnames: tuple[str, ...] = ()  # names smtpd resolves: localhost, mail.example.org


def listen_needs(config: Config) -> ListenNeeds:
    """Each `listen on` word, classified the way smtpd tries it; `socket` and keywords (a syntax
    error for smtpd itself: the config's fault, nothing to provide) are left out."""
    found: dict[str, list[str]] = {"interface": [], "address": [], "hostname": []}
    for listen in config.listens:
        word = listen.interface
        if listen.is_socket or word in KEYWORDS or not word:
            continue
        kind = listen_kind(word)
        found[kind].append(str(ipaddress.ip_address(word.strip("[]"))) if kind == "address" else word)
    return ListenNeeds(_unique(found["interface"]), _unique(found["address"]), _unique(found["hostname"]))


def listen_kind(word: str) -> str:
    """How smtpd takes the word after `listen on`: "address" (an IPv4/IPv6 literal, `[::1]`
    too), "hostname" (a name it resolves: localhost, mail.example.org) or "interface"."""
    try:
        ipaddress.ip_address(word.strip("[]"))
    except ValueError:
        pass
    else:
        return "address"
    if word == "localhost" or ("." in word and not _VLAN.fullmatch(word)):
        return "hostname"
    return "interface"


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# smtpd's PATH_LIBEXEC (Debian: /usr/libexec/opensmtpd): where a `proc`/`proc-exec` command that
# is not an absolute path is run from (smtpd.c fork_filter_process: `exec PATH_LIBEXEC/COMMAND`),
# and where the opensmtpd-extras table backends live.
LIBEXEC = "/usr/libexec/opensmtpd"
# The filters Debian packages (bookworm), each installing LIBEXEC/filter-NAME.
FILTER_PACKAGES = {
    f"filter-{name}": f"opensmtpd-filter-{name}" for name in ("dkimsign", "rspamd", "senderscore")
}


@dataclass(frozen=True)
class Program:
    """A program the config makes smtpd run: `what` says which line (mda of an action, a filter)."""

    what: str
    line: int
    command: str
    # An mda's command runs through /bin/sh (PATH lookup); a `proc`/`proc-exec` one from LIBEXEC.
    in_libexec: bool = False

    @property
    def executable(self) -> str | None:
        """The program's path, or for an mda its name as the shell will look it up; None when smtpd
        fills it in per message (`%{user.directory}/bin/x`) and it cannot be known beforehand."""
        first = self.command.split()[0] if self.command.split() else ""
        if not first or "%{" in first or first.startswith("~"):
            return None
        if self.in_libexec and not first.startswith("/"):
            return f"{LIBEXEC}/{first}"
        return first

    @property
    def package(self) -> str | None:
        """The Debian package that installs it, where one is known (the filters Debian ships)."""
        exe = self.executable or ""
        return FILTER_PACKAGES.get(exe.rsplit("/", 1)[-1]) if exe.startswith(f"{LIBEXEC}/") else None


def programs(config: Config) -> tuple[Program, ...]:
    """`mda "COMMAND"` of every action, `proc NAME "COMMAND"` and `filter NAME proc-exec "COMMAND"`."""
    found = [
        Program(f'mda of action "{a.name}"', a.line, a.method_arg)
        for a in config.actions.values()
        if a.method == "mda" and a.method_arg
    ]
    for raw in config.raw:
        words = raw.words
        if raw.keyword == "proc" and len(words) >= 3:
            found.append(Program(f"proc {words[1]}", raw.line, words[2], in_libexec=True))
        elif raw.keyword == "filter" and len(words) >= 4 and words[2] == "proc-exec":
            found.append(Program(f"filter {words[1]}", raw.line, words[3], in_libexec=True))
    return tuple(sorted(found, key=lambda p: p.line))


# Table backends smtpd 6.8 has built in; any other runs as a program, /usr/libexec/opensmtpd/table-NAME.
BUILTIN_BACKENDS = frozenset({"static", "file", "db", "getpwnam", "proc"})
# The ones Debian packages (opensmtpd-extras 6.7.1: table-ldap, -mysql, -passwd, -postgres,
# -redis, -socketmap, -sqlite), with the package that installs them.
EXTRAS_BACKENDS = {
    name: "opensmtpd-extras"
    for name in ("ldap", "mysql", "passwd", "postgres", "redis", "socketmap", "sqlite")
}
BACKEND_DIR = LIBEXEC


@dataclass(frozen=True)
class Backend:
    """A table whose backend smtpd runs as a program (sqlite:, postgres:, ...)."""

    table: str
    line: int
    backend: str

    @property
    def program(self) -> str:
        return f"{BACKEND_DIR}/table-{self.backend}"

    @property
    def package(self) -> str | None:
        return EXTRAS_BACKENDS.get(self.backend)


def backends(config: Config) -> tuple[Backend, ...]:
    """The tables whose backend is a program of its own (Debian: opensmtpd-extras), file order."""
    return tuple(
        Backend(t.name, t.line, t.backend)
        for t in sorted(config.tables.values(), key=lambda t: t.line)
        if t.backend not in BUILTIN_BACKENDS
    )


@dataclass(frozen=True)
class LmtpServer:
    """Where an `lmtp` action delivers: a Unix socket (dovecot's /run/dovecot/lmtp) or host:port.
    Another service of the host, which a test host does not run."""

    action: str
    line: int
    destination: str

    @property
    def socket(self) -> str | None:
        return self.destination if self.destination.startswith("/") else None

    @property
    def port(self) -> int | None:
        """The TCP port of `host:port` (`[::1]:24`), None for a socket or a malformed one."""
        _, sep, port = self.destination.rpartition(":")
        return int(port) if sep and port.isdigit() else None


def lmtp_servers(config: Config) -> tuple[LmtpServer, ...]:
    """The LMTP servers the config's `lmtp` actions deliver to, file order; a destination the
    config's own listeners serve (an LMTP port of this smtpd: it speaks SMTP there, smtpd judges
    that) and one with `%{...}` filled in per message are left out."""
    own_ports = {_listen_port(listen.options) for listen in config.listens}
    found = []
    for action in sorted(config.actions.values(), key=lambda a: a.line):
        dest = action.method_arg
        if action.method != "lmtp" or not dest or "%{" in dest:
            continue
        server = LmtpServer(action.name, action.line, dest)
        if server.socket is None and (server.port is None or server.port in own_ports):
            continue
        found.append(server)
    return tuple(found)


def _listen_port(options: tuple[str, ...]) -> int:
    """A listener's port: `port N`, else smtpd's default (465 for `smtps`, 25 otherwise)."""
    words = list(options)
    if "port" in words[:-1] and words[words.index("port") + 1].isdigit():
        return int(words[words.index("port") + 1])
    return 465 if "smtps" in words else 25


@dataclass(frozen=True)
class Account:
    """A user (and group) smtpd runs something as: an action's `user vmail`, a filter's
    `user _dkimsign group _dkimsign`. The host the config ships to has it (the filter's
    package or the admin made it); smtpd exits at start-up, or fails each delivery, without it."""

    what: str
    line: int
    user: str | None
    group: str | None = None


def accounts(config: Config) -> tuple[Account, ...]:
    """Every `user`/`group` of an action, a `proc` or a `filter ... proc-exec`, file order."""
    found = [
        Account(f'action "{a.name}"', a.line, user)
        for a in config.actions.values()
        if (user := a.string("user")) is not None
    ]
    for raw in config.raw:
        words = list(raw.words)
        if raw.keyword == "proc" and len(words) >= 3:
            rest, what = words[3:], f"proc {words[1]}"
        elif raw.keyword == "filter" and len(words) >= 4 and words[2] == "proc-exec":
            rest, what = words[4:], f"filter {words[1]}"
        else:
            continue
        named = dict(zip(rest[::2], rest[1::2], strict=False))
        if "user" in named or "group" in named:
            found.append(Account(what, raw.line, named.get("user"), named.get("group")))
    return tuple(sorted(found, key=lambda a: a.line))


@dataclass(frozen=True)
class TlsListener:
    """A `listen on` line that offers TLS: `smtps` (TLS from the first byte, port 465 unless
    `port N`), `tls` or `tls-require` (STARTTLS after EHLO, port 25 unless `port N`); `pki`
    names the certificate smtpd serves there (none: the one named after the host)."""

    word: str  # the interface, address or name after `listen on`
    line: int
    mode: str  # "smtps" or "starttls"
    port: int
    pki: str | None
    option: str  # as written: smtps, tls, tls-require


def tls_listeners(config: Config) -> list[TlsListener]:
    """The TLS listeners a handshake can test, in config order (sockets and keywords left out)."""
    out = []
    for listen in config.listens:
        opts = listen.options
        option = next((o for o in opts if o in ("smtps", "tls", "tls-require")), None)
        if option is None or listen.is_socket or listen.interface in KEYWORDS or not listen.interface:
            continue
        port = 465 if option == "smtps" else 25
        pki = None
        for i, word in enumerate(opts[:-1]):
            if word == "port" and opts[i + 1].isdigit():
                port = int(opts[i + 1])
            elif word == "pki":
                pki = opts[i + 1].lower()  # smtpd lowercases pki names
        mode = "smtps" if option == "smtps" else "starttls"
        out.append(TlsListener(listen.interface, listen.line, mode, port, pki, option))
    return out


@dataclass(frozen=True)
class RelaySource:
    """An address a relay action sends from (`src 203.0.113.10`, `src <table>`): smtpd binds its
    connections there (mta_session.c), so the host the config ships to has it on an interface,
    as it has its listen addresses; a host without it gets `Cannot assign requested address`."""

    action: str
    line: int
    address: str  # normalised (`[::1]` → `::1`)


def relay_sources(config: Config, files: Mapping[str, bytes] | None = None) -> tuple[RelaySource, ...]:
    """Every address a relay action's `src` names, inline or in a table (inline, or a `file:`
    table whose content `files` holds by path), file order. smtpd reads a source table's
    values as addresses; a value that is none (a name, a typo) is left to smtpd to judge."""
    files = files or {}
    found: list[RelaySource] = []
    for action in sorted(config.actions.values(), key=lambda a: a.line):
        operand = action.operand("src") if action.is_relay else None
        if operand is None:
            continue
        if isinstance(operand, Literal):
            words: tuple[str, ...] = operand.values
        else:
            table = config.tables.get(operand.name)
            if table is None:
                continue  # smtpd -n: no such table
            words = table.values or tuple(k for k, _ in table.mapping)
            content = files.get(table.config or "") if table.backend == "file" else None
            if content is not None:
                words = _list_values(content)
        for word in words:
            try:
                address = ipaddress.ip_address(word.strip("[]"))
            except ValueError:
                continue
            found.append(RelaySource(action.name, action.line, str(address)))
    return tuple(dict.fromkeys(found))


def _list_values(content: bytes) -> tuple[str, ...]:
    """A list table's values as smtpd's file backend reads them: a line's first word, `#`
    comments and blank lines skipped."""
    values = []
    for line in content.decode("utf-8", "replace").splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            values.append(words[0])
    return tuple(values)


def queue_key_prompt(config: Config) -> int | None:
    """The line of a `queue encryption` whose key smtpd asks for when it starts (smtpd.c: no key,
    getpass(3) from the terminal; `stdin`, a line of its standard input), None if there is none:
    a host's admin types or pipes it at boot, a test host has no one to, and smtpd waits."""
    for raw in config.raw:
        words = [w.lower() for w in raw.words]
        if raw.keyword == "queue" and words[1:2] == ["encryption"] and words[2:] in ([], ["stdin"]):
            return raw.line
    return None
