"""The machine the emulated smtpd runs on: its name, interfaces, users, files and /etc/hosts.

It is a lab test host as smtpd sees it (targets/lab.py builds the real one): a name
`hostN.relay-harness.test`; `lo` (127.0.0.1, ::1), `lo0` (127.0.0.1, for OpenBSD configs) and
`eth0` on TEST-NET-2 (the lab's unused slot 0); whatever else a config's `listen on` lines name,
made with test addresses when the bundle is installed, as the lab makes it (or refused with the
lab's words); Debian's system users plus the bundle's users (each with its home directory, as
the lab makes them); the files the bundle installs. Nothing here touches this machine.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field

from harness.smtpdconf import ListenNeeds
from harness.targets.base import TargetError
from harness.targets.emulated.tables import Table
from harness.targets.testnet import (
    DOMAIN,
    LAB_NETWORK,
    LISTEN_V4,
    LISTEN_V6,
    address_problem,
    egress_note,
    interface_problem,
)

HARNESS_ADDRESS = str(LAB_NETWORK.network_address + 1)  # where the provider is, for the host
ETH0_ADDRESS = str(LAB_NETWORK.network_address + 2)
# Debian bookworm's base-passwd users, the opensmtpd package's two, and their homes.
SYSTEM_USERS: dict[str, str] = {
    "root": "/root",
    "daemon": "/usr/sbin",
    "bin": "/bin",
    "sys": "/dev",
    "sync": "/bin",
    "games": "/usr/games",
    "man": "/var/cache/man",
    "lp": "/var/spool/lpd",
    "mail": "/var/mail",
    "news": "/var/spool/news",
    "uucp": "/var/spool/uucp",
    "proxy": "/bin",
    "www-data": "/var/www",
    "backup": "/var/backups",
    "list": "/var/list",
    "irc": "/run/ircd",
    "_apt": "/nonexistent",
    "nobody": "/nonexistent",
    "opensmtpd": "/var/spool/smtpd",
    "opensmtpq": "/var/spool/smtpd",
}
# Directories that exist on the test host (a user's ~/.forward is looked up in the home).
EXISTING_DIRS = frozenset(
    {"/root", "/usr/sbin", "/bin", "/dev", "/usr/games", "/var/mail", "/var/spool/smtpd"}
)

_numbers = itertools.count(1)


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    mode: int
    owner: str
    group: str


@dataclass
class EmulatedHost:
    hostname: str = field(default_factory=lambda: f"host{next(_numbers)}.{DOMAIN}")
    users: dict[str, str] = field(default_factory=lambda: dict(SYSTEM_USERS))
    directories: set[str] = field(default_factory=lambda: set(EXISTING_DIRS))
    files: dict[str, StoredFile] = field(default_factory=dict)
    databases: dict[str, Table] = field(default_factory=dict)  # what makemap built, by db path
    hosts: dict[str, str] = field(default_factory=dict)  # /etc/hosts beyond localhost and self
    trusted_ca: bytes = b""  # /etc/ssl/certs/ca-certificates.crt
    interfaces: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"lo": ("127.0.0.1", "::1"), "lo0": ("127.0.0.1",), "eth0": (ETH0_ADDRESS,)}
    )
    _test_addresses: itertools.count[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def provide(self, needs: ListenNeeds) -> list[str]:
        """What the config's `listen on` lines name, made as LabHost.provide makes it; the notes."""
        notes: list[str] = []
        for name in needs.interfaces:
            base, colon, _ = name.partition(":")
            if name in self.interfaces:
                continue
            problem = interface_problem(base, name)
            if problem is not None:
                raise TargetError(problem)
            v4, v6 = self._test_address(4), self._test_address(6)
            if colon:
                self.interfaces[name] = (v4,)
                what, extra = f"an address labelled {name} on {base}", ""
            else:
                self.interfaces[name] = (v4, v6)
                what, extra = f"an interface {name} (emulated)", f" and {v6}"
            notes.append(f"listen on {name}: the test host has {what} with {v4}{extra} (test addresses)")
            if name == "egress":
                notes.append(egress_note(name))
        for text in needs.addresses:
            address = ipaddress.ip_address(text)
            if address.is_unspecified or address.is_loopback or str(address) in self.addresses:
                continue
            problem = address_problem(address)
            if problem is not None:
                raise TargetError(problem)
            self.interfaces["eth0"] = (*self.interfaces["eth0"], str(address))
            notes.append(f"listen on {address}: assigned to the test host's eth0")
        for name in needs.hostnames:
            if self.resolve(name):
                continue
            v4 = self._test_address(4)
            self.interfaces["eth0"] = (*self.interfaces["eth0"], v4)
            self.hosts[name] = v4
            notes.append(
                f"listen on {name}: the name resolves to {v4} (a test address on eth0) in /etc/hosts"
            )
        return notes

    def _test_address(self, version: int) -> str:
        network = LISTEN_V4 if version == 4 else LISTEN_V6
        while True:
            candidate = str(network.network_address + next(self._test_addresses))
            if candidate not in self.addresses:
                return candidate

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for addrs in self.interfaces.values() for a in addrs)

    def add_user(self, name: str) -> None:
        """A bundle's user, and its home as the lab makes it (smtpd.py's MAKE_HOMES: whatever
        home passwd gives a user the bundle names, unless it is `/`)."""
        home = self.users.setdefault(name, f"/home/{name}")
        if home not in ("", "/"):
            self.directories.add(home)

    def home_exists(self, user: str) -> bool:
        return self.users.get(user) in self.directories

    def resolve(self, name: str) -> tuple[str, ...]:
        """getaddrinfo() with `hosts: files`: /etc/hosts only (the lab's resolv.conf sends no query)."""
        if name == "localhost":
            return ("127.0.0.1", "::1")
        if name in (self.hostname, self.hostname.split(".")[0]):
            return (ETH0_ADDRESS,)
        return (self.hosts[name],) if name in self.hosts else ()

    def read(self, path: str) -> bytes | None:
        stored = self.files.get(path)
        return None if stored is None else stored.content
