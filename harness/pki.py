"""Test PKI made with trustme: one CA the test hosts trust, and leaves good or broken on purpose.

The broken kinds exist because certificate failures are among the documented ways a relay
breaks (`SSL certificate check failed`); each kind must be a real certificate that a real TLS
stack rejects for the named reason, not a flag the harness pretends about.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import trustme

CertKind = Literal["good", "wrong-host", "expired", "untrusted", "self-signed"]
CERT_KINDS: tuple[str, ...] = get_args(CertKind)


@dataclass(frozen=True)
class ServerCert:
    """A leaf a server presents: chain (leaf first) and key, both PEM."""

    kind: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting this certificate (TLS 1.2 and up, like providers)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        blob = trustme.Blob(self.chain_pem + self.key_pem)
        with blob.tempfile() as path:
            ctx.load_cert_chain(path)
        return ctx


class TestPki:
    """The harness's CA. Everything it signs is trusted only where the harness installs `ca_pem`."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, ca: trustme.CA | None = None, directory: Path | None = None) -> None:
        self.ca = ca or trustme.CA(organization_name="relay-harness test CA")
        self._other_ca: trustme.CA | None = None
        self.directory = directory

    @classmethod
    def load_or_create(cls, directory: Path) -> TestPki:
        """Reuse DIR/ca.pem + DIR/ca.key when present so clients configured once keep working."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "ca.pem", directory / "ca.key"
        if cert.exists() and key.exists():
            ca = trustme.CA.from_pem(cert.read_bytes(), key.read_bytes())
        else:
            ca = trustme.CA(organization_name="relay-harness test CA")
            key.touch(mode=0o600)
            key.write_bytes(ca.private_key_pem.bytes())
            cert.write_bytes(ca.cert_pem.bytes())
        return cls(ca, directory)

    @property
    def other_ca(self) -> trustme.CA:
        """A second CA, not trusted by test hosts: it signs the `untrusted` kind, and a config
        can be made to trust it explicitly (`ca NAME cert FILE` + `relay ... ca NAME`)."""
        if self._other_ca is None:
            self._other_ca = trustme.CA(organization_name="some other CA")
        return self._other_ca

    @property
    def ca_pem(self) -> bytes:
        return bytes(self.ca.cert_pem.bytes())

    def server_cert(self, host: str, kind: str = "good") -> ServerCert:
        """A leaf for `host` that fails (or passes) verification for exactly the reason `kind` names."""
        if kind == "good":
            return self._good_leaf(host)
        if kind == "wrong-host":
            leaf = self.ca.issue_cert(f"wrong-host.{host}.invalid")
        elif kind == "expired":
            past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
            leaf = self.ca.issue_cert(host, not_before=past - datetime.timedelta(days=365), not_after=past)
        elif kind == "untrusted":
            leaf = self.other_ca.issue_cert(host)
        elif kind == "self-signed":
            other = trustme.CA(organization_name=host)
            return ServerCert(kind, other.cert_pem.bytes(), other.private_key_pem.bytes())
        else:
            raise ValueError(f"unknown certificate kind {kind!r}; one of {', '.join(CERT_KINDS)}")
        return _server_cert(kind, leaf)

    def _good_leaf(self, host: str) -> ServerCert:
        if self.directory is None:
            return _server_cert("good", self.ca.issue_cert(host))
        chain, key = self.directory / f"{host}.pem", self.directory / f"{host}.key"
        if not (chain.exists() and key.exists()):
            leaf = self.ca.issue_cert(host)
            key.touch(mode=0o600)
            key.write_bytes(leaf.private_key_pem.bytes())
            chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        return ServerCert("good", chain.read_bytes(), key.read_bytes())


def _server_cert(kind: str, leaf: trustme.LeafCert) -> ServerCert:
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return ServerCert(kind, chain, leaf.private_key_pem.bytes())
