"""What a host name is, once for every place one comes from: profiles, certificates, SSH URLs.

A name the harness puts into /etc/hosts, a certificate, a file name under --certs or an SSH
connection must be a plain DNS name (RFC 1123 labels): anything else would be written where it
must not go (`../x` as a certificate file name), or fail later with a traceback far from where
it was typed.
"""

from __future__ import annotations

import ipaddress
import re

MAX_NAME = 253
MAX_LABEL = 63
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def dns_name_problem(name: str, allow_ip: bool = True) -> str | None:
    """Why `name` is not a DNS host name (or an IP address, if allowed); None when it is one."""
    if allow_ip:
        try:
            ipaddress.ip_address(name)
            return None
        except ValueError:
            pass
    if not name:
        return "is empty"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return f"{name!r} contains a control character: not a DNS name"
    if not name.isascii():
        return f"{name!r} is not ASCII: write an internationalized name in its xn-- (IDNA) form"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters long: a DNS name has at most {MAX_NAME}"
    for label in name.split("."):
        if not label:
            return f"{name!r} has an empty label (a leading, trailing or double dot): not a DNS name"
        if len(label) > MAX_LABEL:
            return f"has a label of {len(label)} characters: a DNS label has at most {MAX_LABEL}"
        if not _LABEL.fullmatch(label):
            return (
                f"{name!r} is not a DNS name: label {label!r} may hold only letters, digits and inner hyphens"
            )
    return None
