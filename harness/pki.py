"""Test PKI made with trustme: one CA the test hosts trust, and leaves good or broken on purpose.

The broken kinds exist because certificate failures are among the documented ways a relay
breaks (`SSL certificate check failed`); each kind must be a real certificate that a real TLS
stack rejects for the named reason, not a flag the harness pretends about.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import trustme
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from harness.names import dns_name_problem
from harness.userfiles import UserFileError, read_bytes

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
        """Reuse DIR/ca.pem + DIR/ca.key when present so clients configured once keep working.

        DIR may be new (its parent must exist); a CA half there (one file of the two), unreadable
        or not matching its key is an error (UserFileError), never replaced: clients may trust it.
        """
        if directory.exists() and not directory.is_dir():
            raise UserFileError(directory, "not a directory", flag="--certs")
        if not directory.exists():
            if not directory.parent.is_dir():
                raise UserFileError(directory, f"directory {directory.parent} does not exist", flag="--certs")
            try:
                directory.mkdir()
            except OSError as exc:
                raise UserFileError(directory, f"cannot create: {exc.strerror}", flag="--certs") from None
        cert, key = directory / "ca.pem", directory / "ca.key"
        if cert.exists() or key.exists():
            return cls(_load_ca(cert, key), directory)
        ca = trustme.CA(organization_name="relay-harness test CA")
        _write_new({key: ca.private_key_pem.bytes(), cert: ca.cert_pem.bytes()})
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
        problem = dns_name_problem(host)
        if problem is not None:  # it names files in the directory: `../x` must not escape it
            raise ValueError(f"host {problem}")
        chain, key = self.directory / f"{host}.pem", self.directory / f"{host}.key"
        if not (chain.exists() or key.exists()):
            leaf = self.ca.issue_cert(host)
            _write_new(
                {key: leaf.private_key_pem.bytes(), chain: b"".join(b.bytes() for b in leaf.cert_chain_pems)}
            )
        both = f"{chain} and {key}"
        if not (chain.exists() and key.exists()):
            raise UserFileError(
                chain if not chain.exists() else key,
                f"missing (of {both}): remove both to have them issued again",
            )
        served = ServerCert("good", read_bytes(chain), read_bytes(key))
        try:
            served.server_context()
            issued = x509.load_pem_x509_certificate(served.chain_pem)
            issued.verify_directly_issued_by(x509.load_pem_x509_certificate(self.ca_pem))
        except (ssl.SSLError, ValueError, TypeError, InvalidSignature) as exc:
            raise UserFileError(
                chain,
                f"not a certificate and key for {host} issued by {self.directory / 'ca.pem'} ({exc}): "
                f"remove {both} to have them issued again",
            ) from None
        return served


def _load_ca(cert: Path, key: Path) -> trustme.CA:
    for path, other in ((cert, key), (key, cert)):
        if not path.exists():
            raise UserFileError(
                path, f"missing, but {other.name} is there: restore it, or remove {other} to create a new CA"
            )
    cert_pem, key_pem = read_bytes(cert, "--certs"), read_bytes(key, "--certs")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise UserFileError(
            cert, "not a PEM certificate: restore it, or remove it and ca.key to create a new CA"
        ) from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UserFileError(key, f"not an unencrypted PEM private key ({exc})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ) != private_key.public_key().public_bytes(serialization.Encoding.PEM, public):
        raise UserFileError(key, f"does not match {cert.name}: not the key of that CA certificate")
    ca = trustme.CA.from_pem(cert_pem, key_pem)
    return ca


def _write_new(files: dict[Path, bytes]) -> None:
    """Create each file (mode 600: keys are among them), all or none: a half CA is never left."""
    done: list[Path] = []
    try:
        for path, data in files.items():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            done.append(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    except OSError as exc:
        for path in done:
            with contextlib.suppress(OSError):
                path.unlink()
        raise UserFileError(path, f"cannot write: {exc.strerror}", flag="--certs") from None


def _server_cert(kind: str, leaf: trustme.LeafCert) -> ServerCert:
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return ServerCert(kind, chain, leaf.private_key_pem.bytes())
