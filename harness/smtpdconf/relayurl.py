"""Relay URLs (`relay host URL`) read exactly the way OpenSMTPD 6.8 reads them.

smtpd does not look at the URL when it loads the config (`smtpd -n` says
"configuration OK" for `host "foo://x"`); it parses it in the mta process for
each envelope with `text_to_relayhost()` (usr.sbin/smtpd/to.c) and, when that
fails, logs `warn: Failed to parse smarthost <url>` and leaves the mail queued
("Cannot parse smarthost").  This module reproduces that function so such a URL
is caught before it ships, with smtpd's own wording.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

TlsMode = Literal["starttls-required", "starttls-optional", "implicit", "none"]

# to.c's table, in to.c's order.  There is no lmtp+tls, lmtps or smtp+ssl in 6.8.
_SCHEMES: tuple[tuple[str, TlsMode, int | None], ...] = (
    ("smtp", "starttls-optional", 25),
    ("smtp+tls", "starttls-required", 25),
    ("smtp+notls", "none", 25),
    ("lmtp", "none", None),  # lmtp needs an explicit port
    ("smtps", "implicit", 465),
)
SCHEMES: tuple[str, ...] = tuple(name for name, _, _ in _SCHEMES)

# Sizes of the buffers to.c copies into; on Linux HOST_NAME_MAX is 64, so a
# longer smarthost name does not fit and the URL is refused.
_BUFFER_SIZE = 1024
_HOST_NAME_MAX = 64
_LABEL_MAX = 4096
_MAX_DOMAIN = 255
_HOST_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")
_STRTONUM = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+")


class RelayUrlError(ValueError):
    """A relay URL that smtpd's mta would refuse.

    `str()` is smtpd's own log text so it can be compared with a real log;
    `reason` says which of to.c's checks failed.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Failed to parse smarthost {url}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class RelayUrl:
    """What smtpd's mta takes from a relay URL.

    `host` is kept as smtpd keeps it (an address literal keeps its brackets,
    which is what appears in its logs); `connect_host` is the thing to dial.
    """

    text: str
    scheme: str
    tls_mode: TlsMode
    label: str | None
    host: str
    port: int
    explicit_scheme: bool
    explicit_port: bool

    @property
    def auth_possible(self) -> bool:
        """smtpd only sends credentials inside TLS, so only these schemes may carry a label."""
        return self.tls_mode in ("starttls-required", "implicit")

    @property
    def wants_auth(self) -> bool:
        """A label is what makes smtpd look up credentials and send AUTH."""
        return self.label is not None

    @property
    def lmtp(self) -> bool:
        return self.scheme == "lmtp"

    @property
    def connect_host(self) -> str:
        """The name or address to connect to, without smtpd's brackets."""
        if not self.host.startswith("["):
            return self.host
        inner = self.host[1:-1]
        return inner[5:] if inner.lower().startswith("ipv6:") else inner


def parse_relay_url(text: str) -> RelayUrl:
    """Parse like to.c's text_to_relayhost(); raise RelayUrlError where it returns 0."""
    if len(text.encode()) >= _BUFFER_SIZE:
        raise RelayUrlError(text, "longer than smtpd's 1023-byte buffer")
    scheme, tls_mode, default_port, rest = _split_scheme(text)
    label, rest = _split_label(text, rest)
    host, rest = _split_host(text, rest)
    port = default_port
    if rest.startswith(":"):
        port = _parse_port(text, rest[1:])
    # Anything else after the host (a path, say) is silently ignored by to.c.
    _check_host(text, host)
    if port is None:
        raise RelayUrlError(text, "lmtp:// needs an explicit port")
    if label is not None and tls_mode not in ("starttls-required", "implicit"):
        raise RelayUrlError(text, f"a label (AUTH) needs smtp+tls:// or smtps://, not {scheme}://")
    return RelayUrl(
        text=text,
        scheme=scheme,
        tls_mode=tls_mode,
        label=label,
        host=host,
        port=port,
        explicit_scheme="://" in text,
        explicit_port=rest.startswith(":"),
    )


def _split_scheme(text: str) -> tuple[str, TlsMode, int | None, str]:
    """Case-insensitive prefix match; an unknown `xxx://` anywhere is an error."""
    lowered = text.lower()
    for name, tls_mode, port in _SCHEMES:
        if lowered.startswith(name + "://"):
            return name, tls_mode, port, text[len(name) + 3 :]
    if "://" in text:
        raise RelayUrlError(text, f"unknown scheme (known: {', '.join(SCHEMES)})")
    return "smtp", "starttls-optional", 25, text


def _split_label(text: str, rest: str) -> tuple[str | None, str]:
    """Everything before the first '@' is the label; an empty label means none."""
    if "@" not in rest:
        return None, rest
    label, rest = rest.split("@", 1)
    if len(label.encode()) >= _LABEL_MAX:
        raise RelayUrlError(text, "label too long")
    return (label or None), rest


def _split_host(text: str, rest: str) -> tuple[str, str]:
    """A bracketed literal up to ']', else the longest run of host characters."""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise RelayUrlError(text, "no closing ']' after the address")
        host = rest[: end + 1]
    else:
        match = _HOST_CHARS.match(rest)
        host = match.group(0) if match else ""
    if len(host.encode()) >= _HOST_NAME_MAX + 1:
        raise RelayUrlError(text, f"host name longer than {_HOST_NAME_MAX} characters")
    return host, rest[len(host) :]


def _parse_port(text: str, digits: str) -> int:
    """strtonum(3) with 1..65535: the whole rest must be the number."""
    if not _STRTONUM.fullmatch(digits):
        raise RelayUrlError(text, f"port {digits!r} is not a number")
    port = int(digits)
    if not 1 <= port <= 65535:
        raise RelayUrlError(text, f"port {port} out of range 1..65535")
    return port


def _check_host(text: str, host: str) -> None:
    """util.c valid_domainpart() with glibc's res_hnok(), as linked on Debian."""
    if host.startswith("["):
        inner = host[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        try:
            if "%" in inner:  # inet_pton() knows no zone index
                raise ValueError(inner)
            ipaddress.ip_address(inner)
        except ValueError:
            raise RelayUrlError(text, f"{host} is not an IPv4 or IPv6 address") from None
        return
    if not host:
        raise RelayUrlError(text, "no host")
    if host.endswith(".") or len(host) >= _MAX_DOMAIN:
        raise RelayUrlError(text, f"{host!r} is not a valid host name")
    labels = host.split(".")
    if any(not part or len(part) > 63 for part in labels) or host.startswith("-"):
        raise RelayUrlError(text, f"{host!r} is not a valid host name")
