"""Test PKI made with trustme: one CA the test hosts trust, and leaves good or broken on purpose.

The broken kinds exist because certificate failures are among the documented ways a relay
breaks (`SSL certificate check failed`); each kind must be a real certificate that a real TLS
stack rejects for the named reason, not a flag the harness pretends about.

trustme (and cryptography under it) is imported only when something is issued: a CA and leaves
kept in a directory (`load_or_create`) are loaded and checked with `ssl` alone, which is what
lets the emulated check, whose certificates are kept that way, start in a fraction of the time.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from harness.names import dns_name_problem
from harness.userfiles import UserFileError, read_bytes

if TYPE_CHECKING:
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
        with _pem_file(self.chain_pem + self.key_pem) as path:
            ctx.load_cert_chain(path)
        return ctx


class TestPki:
    """The harness's CA. Everything it signs is trusted only where the harness installs `ca_pem`."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        ca: trustme.CA | None = None,
        directory: Path | None = None,
        kept: tuple[bytes, bytes] | None = None,
    ) -> None:
        """`kept` is a CA's certificate and key (PEM) loaded from `directory`: turned into a
        trustme CA only when it has to sign something."""
        self._ca = ca
        self._kept = kept
        self._other_ca: trustme.CA | None = None
        self.directory = directory
        if ca is None and kept is None:
            self._ca = _new_ca("relay-harness test CA")

    @property
    def ca(self) -> trustme.CA:
        if self._ca is None:
            import trustme

            assert self._kept is not None
            self._ca = trustme.CA.from_pem(*self._kept)
        return self._ca

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
        with _locked(directory):
            if cert.exists() or key.exists():
                return cls(directory=directory, kept=_load_ca(cert, key))
            ca = _new_ca("relay-harness test CA")
            _write_new({key: ca.private_key_pem.bytes(), cert: ca.cert_pem.bytes()})
        return cls(ca, directory)

    @property
    def other_ca(self) -> trustme.CA:
        """A second CA, not trusted by test hosts: it signs the `untrusted` kind, and a config
        can be made to trust it explicitly (`ca NAME cert FILE` + `relay ... ca NAME`)."""
        if self._other_ca is None:
            self._other_ca = _new_ca("some other CA")
        return self._other_ca

    @property
    def ca_pem(self) -> bytes:
        if self._ca is None and self._kept is not None:
            return self._kept[0]
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
            other = _new_ca(host)
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
        with _locked(self.directory):
            if not (chain.exists() or key.exists()):
                leaf = self.ca.issue_cert(host)
                _write_new(
                    {
                        key: leaf.private_key_pem.bytes(),
                        chain: b"".join(b.bytes() for b in leaf.cert_chain_pems),
                    }
                )
        both = f"{chain} and {key}"
        if not (chain.exists() and key.exists()):
            raise UserFileError(
                chain if not chain.exists() else key,
                f"missing (of {both}): remove both to have them issued again",
            )
        served = ServerCert("good", read_bytes(chain), read_bytes(key))
        try:
            _handshake(served.server_context(), self.ca_pem, host)
        except (ssl.SSLError, ValueError) as exc:
            raise UserFileError(
                chain,
                f"not a certificate and key for {host} issued by {self.directory / 'ca.pem'} ({exc}): "
                f"remove {both} to have them issued again",
            ) from None
        return served


KEPT_ENV = "RELAY_HARNESS_PKI_CACHE"  # where kept_pki keeps its CA, instead of the user's cache


def kept_pki() -> TestPki:
    """The user's own kept test CA and leaves (made on first use, mode 700; $RELAY_HARNESS_PKI_CACHE
    or ~/.cache/relay-harness/pki), or a fresh one where no such directory can be made.

    For the emulated check: its certificates are trusted only inside this process, so keeping
    them costs nothing in isolation and saves importing and running trustme and cryptography
    on every run (about 0.1 s of CPU, a third of the check). A lab host never trusts this CA.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = Path(os.environ.get(KEPT_ENV) or os.path.join(base, "relay-harness", "pki"))
    try:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
    except OSError:
        return TestPki()
    return TestPki.load_or_create(directory)


def _new_ca(organization: str) -> trustme.CA:
    import trustme

    return trustme.CA(organization_name=organization)


def _load_ca(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The CA kept in a directory, checked with ssl: a PEM certificate and the key that belongs
    to it (a CA whose key does not sign its certificate would issue leaves nobody trusts)."""
    for path, other in ((cert, key), (key, cert)):
        if not path.exists():
            raise UserFileError(
                path, f"missing, but {other.name} is there: restore it, or remove {other} to create a new CA"
            )
    cert_pem, key_pem = read_bytes(cert, "--certs"), read_bytes(key, "--certs")
    try:
        ssl.create_default_context(cadata=cert_pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise UserFileError(
            cert, "not a PEM certificate: restore it, or remove it and ca.key to create a new CA"
        ) from None
    with _pem_file(key_pem) as key_path:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key_path, password=b"")
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise UserFileError(
                    key, f"does not match {cert.name}: not the key of that CA certificate"
                ) from None
            raise UserFileError(key, f"not an unencrypted PEM private key ({exc.reason or exc})") from None
    return cert_pem, key_pem


def _handshake(server: ssl.SSLContext, ca_pem: bytes, host: str) -> None:
    """A TLS handshake in memory between `server` and a client that trusts only `ca_pem` and
    wants `host`: the proof, with ssl alone, that a kept leaf is one this CA issued for it."""
    client = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [
        (client.wrap_bio(c_in, c_out, server_hostname=host), c_out, s_in),
        (server.wrap_bio(s_in, s_out, server_side=True), s_out, c_in),
    ]
    done: set[int] = set()
    for _ in range(10):  # TLS 1.2 needs 4 flights, 1.3 three
        for i, (end, out, peer) in enumerate(ends):
            if i not in done:
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
                    done.add(i)
            peer.write(out.read())
        if len(done) == 2:
            return
    raise ssl.SSLError("the TLS handshake did not complete")


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """PEM in a private temporary file, for ssl's loaders that take only paths."""
    with tempfile.NamedTemporaryFile(prefix="relay-harness-", suffix=".pem") as fh:
        fh.write(data)
        fh.flush()
        yield fh.name


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """The directory's own lock (flock on it) while its files are looked at and written: two
    runs that share it (parallel CI jobs, the emulated check's kept certificates) never see or
    make half a CA or half a leaf."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
