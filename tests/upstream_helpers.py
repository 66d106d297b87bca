"""Shared pieces of the fake-upstream tests: real smtplib clients that dial loopback only.

The clients connect to 127.0.0.1 whatever host name they are given, and keep that name for TLS
(SNI and the certificate check), so a test verifies the provider's name without any DNS.
"""

from __future__ import annotations

import dataclasses
import smtplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness.pki import TestPki
from harness.upstream import Credential, Faults, Profile, SessionRecord, UpstreamServer

HOST = "smtp.example.net"
USER = "alice@example.org"
PASSWORD = "Tr0ub4dor&3-not-in-any-log"
SENDER = "alice@example.org"
RCPT = "bob@example.com"
TIMEOUT = 5.0
MESSAGE = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: hello\r\n\r\nhello world\r\n"


def profile(**changes: Any) -> Profile:
    """The usual provider (STARTTLS and AUTH required, one account), with `changes` applied.

    Fault fields may be given directly (`tempfail="rcpt"`); they go into `Faults`.
    """
    fault_names = {f.name for f in dataclasses.fields(Faults)}
    faults = {k: changes.pop(k) for k in list(changes) if k in fault_names}
    base = Profile(host=HOST, credentials=(Credential(USER, PASSWORD),), faults=Faults(**faults))
    return dataclasses.replace(base, **changes)


@contextmanager
def serve(pki: TestPki, prof: Profile) -> Iterator[UpstreamServer]:
    with UpstreamServer(prof, pki, host="127.0.0.1", port=0) as server:
        yield server


def client_context(pki: TestPki | None) -> ssl.SSLContext:
    """A client context that verifies against the test CA (or nothing at all when pki is None)."""
    if pki is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cadata=pki.ca_pem.decode("ascii"))


class _Loopback:
    source_address: Any

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout, self.source_address)


class Client(_Loopback, smtplib.SMTP):
    """smtplib.SMTP that dials 127.0.0.1 but checks the certificate for the name it was given."""


class LmtpClient(_Loopback, smtplib.LMTP):
    """smtplib.LMTP over TCP to 127.0.0.1."""


class SslClient(smtplib.SMTP_SSL):
    """Implicit TLS (smtps) to 127.0.0.1, verifying the name it was given."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self._host)  # type: ignore[attr-defined]


def connect(server: UpstreamServer) -> Client:
    return Client(server.profile.host, server.port, local_hostname="client.example.org", timeout=TIMEOUT)


def closed(server: UpstreamServer, timeout: float = TIMEOUT) -> SessionRecord:
    """The one session the test made, once the server has seen it end."""
    return server.recorder.wait_for(lambda s: s.closed, timeout)


def features(smtp: smtplib.SMTP) -> set[str]:
    return set(smtp.esmtp_features)
