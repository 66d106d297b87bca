"""The emulated host's network: TEST-NET-2 addresses as on a lab host, carried over loopback.

The host is 198.51.100.2 and the harness's side (where `point` sends the provider's name)
198.51.100.1, so smtpd's log reads as on a lab host (`relay="198.51.100.1 (smtp.example.net)"`).
A connection to the address and port the provider is served on is a real TCP connection on
127.0.0.1 whose far end is handed to the fake upstream in-process (its serve_socket): the
upstream has no listener, so no other local user can reach it and try a password; the pair's
own listener lives for one accept() and serves only the socket that made it. Anything else is
refused or unreachable, as on the lab's network. No packet ever leaves loopback.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

from harness.targets.emulated.host import ETH0_ADDRESS, HARNESS_ADDRESS, EmulatedHost


class Network:
    def __init__(self, host: EmulatedHost) -> None:
        self.host = host
        self.source = ETH0_ADDRESS  # getsockname() of a relay connection
        self._endpoints: dict[tuple[str, int], Callable[[socket.socket, str], None]] = {}

    def serve(self, address: str, port: int, serve: Callable[[socket.socket, str], None]) -> None:
        """Connections to address:port are handed to `serve` (the upstream's serve_socket)."""
        self._endpoints[(address, port)] = serve

    def resolve(self, name: str) -> tuple[str, ...]:
        """smtpd's resolver with `lookup file`: /etc/hosts, and address literals as they are."""
        if name.startswith("["):
            return (name.strip("[]").removeprefix("IPv6:").removeprefix("ipv6:"),)
        return self.host.resolve(name)

    def reverse(self, address: str) -> str | None:
        """getnameinfo() through /etc/hosts: the first name for the address."""
        if address in ("127.0.0.1", "::1"):
            return "localhost"
        if address == ETH0_ADDRESS:
            return self.host.hostname
        return next((name for name, a in self.host.hosts.items() if a == address), None)

    async def connect(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        address: str,
        port: int,
    ) -> None:
        """A TCP connection as the host's stack makes it; OSError as the host would fail it.

        The lab host routes only its own /30 and loopback: another address is unreachable at
        connect() time (smtpd: `Connection failed: ...`); a served address refuses a port
        nobody listens on once the SYN is answered (smtpd: `IO Error: Connection refused`).
        """
        serve = self._endpoints.get((address, port))
        if serve is None:
            if address != HARNESS_ADDRESS and address not in self.host.addresses:
                raise Unreachable(errno.ENETUNREACH, "Network is unreachable")
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        ours, theirs = await loop.run_in_executor(None, tcp_pair)
        try:
            await loop.run_in_executor(None, serve, theirs, "{}:{}".format(*ours.getsockname()))
        except Exception as exc:  # the upstream is gone (the run is ending): nobody answers
            ours.close()
            theirs.close()
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused") from exc
        await loop.create_connection(factory, sock=ours)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1 and no listener left: its listener accepts once, and
    only the connection this function made (another local user's is closed unanswered)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        ours = socket.create_connection(listener.getsockname(), timeout=10)
        while True:
            theirs, peer = listener.accept()
            if peer == ours.getsockname():
                break
            theirs.close()
    # TCP_NODELAY, as on the lab's upstream (asyncio sets it only on sockets made with proto
    # IPPROTO_TCP, which these are not): else a reply written in pieces (EHLO's) waits 40 ms for
    # a delayed ACK (Nagle), twice a session.
    for end in (ours, theirs):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ours.settimeout(None)
    ours.setblocking(False)
    return ours, theirs


class Unreachable(OSError):
    """connect() failed at once (no route): smtpd reports it as `Connection failed`."""
