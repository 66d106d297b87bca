"""A test host's network as the harness lays it out, for the lab's hosts and the emulated one.

Both must agree on it (the emulated target is a model of a lab test host), so the addresses and
what cannot be provided, with the words saying why, are here once; this module imports nothing
heavy, so the emulated target can use it without the SSH stack.
"""

from __future__ import annotations

import ipaddress
import re

DOMAIN = "relay-harness.test"
LAB_NETWORK = ipaddress.IPv4Network("198.51.100.0/24")
# Test addresses for the interfaces and host names a config listens on (TEST-NET-3, and IPv6's
# documentation prefix): never routed anywhere, and only ever inside a test host.
LISTEN_V4 = ipaddress.IPv4Network("203.0.113.0/24")
LISTEN_V6 = ipaddress.IPv6Network("2001:db8:113::/64")
CANNOT = "the test host cannot provide"


def interface_problem(base: str, name: str) -> str | None:
    """Why Linux has no interface `name` (`base`, or an address label `base:x`); None if it can."""
    if base in ("all", "default"):
        return (
            f"{CANNOT} interface {name}: Linux reserves the names all and default. "
            f"`listen on {name}` is an OpenBSD interface group; Debian's OpenSMTPD has no interface "
            f"groups and refuses it on Linux too (`invalid virtual ip or interface: {name}`): to listen "
            "on every address write `listen on 0.0.0.0` and `listen on ::`, or name the interfaces"
        )
    bad = not 0 < len(base) <= 15 or base in (".", "..") or re.search(r"[/\s:]", base)
    if bad or len(name) > 15:
        return (
            f"{CANNOT} interface {name}: a Linux interface name is 1-15 characters "
            "without '/', ':' or spaces (an address label is NAME:LABEL, 15 characters in all); "
            "listen on an address or a name Linux allows"
        )
    return None


def address_problem(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, use: str = "listen on"
) -> str | None:
    """Why a test host cannot have `address`; None if it can. `use`: what the config does with
    it (`listen on`, `send from` for a relay's src), for the advice."""
    if address.version == 4 and address in LAB_NETWORK:
        return (
            f"{CANNOT} address {address}: it is in the lab's own network "
            f"{LAB_NETWORK}, which joins test hosts to this machine; {use} another address"
        )
    return None


def egress_note(name: str) -> str:
    return (
        f"listen on {name}: an OpenBSD interface group; Debian's OpenSMTPD has no interface "
        f"groups and refuses this line on Linux (`invalid virtual ip or interface: {name}`)"
    )
