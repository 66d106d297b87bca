"""What a config's `listen on` lines need from the host: interfaces, addresses, host names.

smtpd (parse.y, create_if_listener) takes the word after `listen on` as, in this order: an
interface name (OpenBSD: also an interface group such as `all` or `egress`; Linux has no
groups), an IPv4 or IPv6 literal, or a name it resolves (getaddrinfo: /etc/hosts first). A test
host must have each of these for the config to run as written; what exists already (lo, lo0,
eth0, 127.0.0.0/8, ::1, localhost) is the test host's business, not this module's.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from harness.smtpdconf.parse import KEYWORDS, Config

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
    interfaces: list[str] = []
    addresses: list[str] = []
    hostnames: list[str] = []
    for listen in config.listens:
        word = listen.interface
        if listen.is_socket or word in KEYWORDS or not word:
            continue
        try:
            address = ipaddress.ip_address(word.strip("[]"))
        except ValueError:
            pass
        else:
            addresses.append(str(address))
            continue
        if word == "localhost" or ("." in word and not _VLAN.fullmatch(word)):
            hostnames.append(word)
        else:
            interfaces.append(word)
    return ListenNeeds(_unique(interfaces), _unique(addresses), _unique(hostnames))


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
