"""The config's own TLS listeners: does smtpd complete a handshake with the key and certificate
the config gives each one?

smtpd 6.8 loads a `pki`'s certificate and key without comparing them (`smtpd -n` and its start
both accept a key of another certificate); the first TLS client then gets `tlsv1 alert internal
error` and smtpd logs `missing private key` and `smtp disconnected reason="io-error: ... EVP lib"`.
So a real handshake with every address of every `smtps`, `tls` and `tls-require` listener, from
inside the test host, is the only way to know; one report row per address and port.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass

from harness.probes import Probe, ProbeResult
from harness.redact import Redactor
from harness.relay import RelayRun
from harness.smtpdconf import Config, TlsListener, tls_listeners
from harness.smtpdconf.needs import listen_kind
from harness.targets.base import Bundle, Handshake, TargetError
from harness.targets.testnet import CANNOT
from harness.waiting import wait_until

LOG_TIMEOUT = 5.0  # smtpd logs a session's end as the client closes: this only bounds a lost line

# OpenSMTPD 6.8 built with OpenSSL 3 (Debian 12's 6.8.0p2) fails every server handshake, whatever
# the key: its privsep signing sees a cached copy of the key without the private half and logs
# `missing private key` (OpenSMTPD issues #1171, #1239; fixed in 7.x by pull request #1208).
SMTPD_TLS_DEFECT = r"missing private key"


class ListenerUntestable(TargetError):
    """The test host's smtpd serves no TLS handshake at all, with any key: not the config's fault
    (its key and certificate belong together), so no verdict on the listener can be given here."""


@dataclass(frozen=True)
class _Session:
    """What smtpd logged for one handshake's connection, from `smtp connected` to its end."""

    lines: tuple[str, ...]

    @property
    def ended(self) -> bool:
        return any(" smtp disconnected " in line for line in self.lines)


def probe_listeners(
    run: RelayRun, config: Config | None, bundle: Bundle, redactor: Redactor
) -> tuple[list[ProbeResult], list[str]]:
    """One result per address and port of each TLS listener; notes for what was not tested."""
    listeners = tls_listeners(config) if config is not None else []
    if not listeners:
        return [], []
    started = time.monotonic()
    mark = run.log.mark()
    wanted = [(t.word, listen_kind(t.word), t.port, t.mode) for t in listeners]
    shakes = run.target.tls_handshakes(wanted)
    if shakes is None:
        return [], [
            f"listener {t.word}:{t.port} {t.option} (line {t.line}): TLS handshake not tested: "
            f"{run.target.name} cannot make one"
            for t in listeners
        ]
    notes = [
        f"listener {t.word}:{t.port} {t.option} (line {t.line}): not tested: "
        f"{t.word} has no address in the test host"
        for t in listeners
        if not any(_belongs(s, t) for s in shakes)
    ]
    sessions = _sessions(run, mark, len(shakes)) if not all(s.ok for s in shakes) else []
    seconds = (time.monotonic() - started) / max(len(shakes), 1)
    results = []
    untestable: list[str] = []
    for i, shake in enumerate(shakes):
        listener = next(t for t in listeners if _belongs(shake, t))
        session = sessions[i] if i < len(sessions) else _Session(())
        defect = _smtpd_defect(shake, listener, session, config, bundle)
        if defect is not None:
            untestable.append(redactor(defect))
            continue
        result = _result(shake, listener, session, config, bundle)
        result.evidence = [redactor(e) for e in result.evidence]
        result.observed = redactor(result.observed)
        result.seconds = seconds
        results.append(result)
    if untestable and all(r.ok for r in results):
        raise ListenerUntestable(f"{run.target.name}: {untestable[0]}")
    return results, notes + [f"not a verdict: {u}" for u in untestable]


def _smtpd_defect(
    shake: Handshake, listener: TlsListener, session: _Session, config: Config | None, bundle: Bundle
) -> str | None:
    """Why no handshake can succeed on this smtpd, when the key does belong to its certificate."""
    line = next((x for x in session.lines if re.search(SMTPD_TLS_DEFECT, x)), None)
    if shake.ok or line is None:
        return None
    entry = config.pkis.get(listener.pki) if config is not None and listener.pki else None
    files = {f.path: f.content for f in bundle.files}
    if entry is None or _key_mismatch(files.get(entry.cert or ""), files.get(entry.key or "")) is not False:
        return None
    where = f"listener {_hostport(shake.address, shake.port)} {listener.option} (line {listener.line})"
    return (
        f"{CANNOT} a TLS handshake on {where}: its smtpd fails every server handshake whatever the "
        f"key (smtpd: `{line}`; the client: {shake.error}), a defect of OpenSMTPD 6.8 built with "
        f"OpenSSL 3 (OpenSMTPD issues #1171 and #1239, fixed in 7.x); the key and certificate of "
        f"pki {entry.name} do belong together. A host running this smtpd serves no TLS there either: "
        "check on OpenSMTPD 7 with --target lab:trixie"
    )


def _belongs(shake: Handshake, listener: TlsListener) -> bool:
    return (shake.word, shake.port, shake.mode) == (listener.word, listener.port, listener.mode)


def _sessions(run: RelayRun, mark: int, count: int) -> list[_Session]:
    """smtpd's lines for each handshake's connection, once each has ended (or smtpd exited)."""

    def ended() -> list[_Session] | None:
        found = _split(run.log.lines[mark:])
        done = len(found) >= count and all(s.ended for s in found[:count])
        return found if done or run.log.closed else None

    return wait_until(ended, [run.log], LOG_TIMEOUT) or _split(run.log.lines[mark:])


def _split(lines: list[str]) -> list[_Session]:
    """The client connects one listener after the other, so the n-th `smtp connected` is the n-th
    handshake's; the lines up to the next one are its (debug lines carry no session id)."""
    sessions: list[list[str]] = []
    for line in lines:
        if re.match(r"^\S+ smtp connected ", line):
            sessions.append([line])
        elif sessions:
            sessions[-1].append(line)
    return [_Session(tuple(s)) for s in sessions]


def _result(
    shake: Handshake, listener: TlsListener, session: _Session, config: Config | None, bundle: Bundle
) -> ProbeResult:
    how = "TLS from the first byte" if shake.mode == "smtps" else "EHLO, then STARTTLS"
    name = f"listener {_hostport(shake.address, shake.port)} {listener.option}"
    pki = f"pki {listener.pki}" if listener.pki else "the listener's default pki"
    expected = f"a TLS handshake completes ({how}), served with the certificate of {pki}"
    if shake.ok:
        served = f"served {_subject(shake.certificate)}"
        probe = Probe(name, "", "tls-handshake", f"TLS handshake ({how}), {served}")
        return ProbeResult(probe, True, expected, f"handshake completed, {served}", [])
    probe = Probe(name, "", "tls-handshake", f"TLS handshake ({how})")
    smtpd_said = [line for line in session.lines if _tls_line(line)]
    evidence = [f"client: {shake.error}", *(f"smtpd: {line}" for line in smtpd_said)]
    observed = f"the handshake failed: {shake.error}"
    return ProbeResult(probe, False, expected, observed, evidence, _fix(listener, config, bundle))


def _tls_line(line: str) -> bool:
    return bool(re.search(r"SSL|TLS|ssl|tls| smtp disconnected ", line))


def _fix(listener: TlsListener, config: Config | None, bundle: Bundle) -> str:
    """What to change: named precisely when the pki's key is not the certificate's."""
    entry = config.pkis.get(listener.pki) if config is not None and listener.pki else None
    if entry is None or entry.cert is None or entry.key is None:
        return (
            f"line {listener.line}: smtpd could not complete TLS on this listener: give it "
            "`pki NAME` with a `pki NAME cert` and `pki NAME key` that belong together"
        )
    files = {f.path: f.content for f in bundle.files}
    mismatch = _key_mismatch(files.get(entry.cert), files.get(entry.key))
    if mismatch is True:
        return (
            f"the key and certificate of pki {entry.name} do not belong together: {entry.key} is not "
            f"the private key of the certificate in {entry.cert} (smtpd does not compare them when it "
            "loads them; every TLS client fails): install the key the certificate was issued for "
            f"(`openssl x509 -noout -pubkey -in {entry.cert}` and `openssl pkey -pubout -in {entry.key}` "
            "must print the same)"
        )
    return (
        f"smtpd could not complete TLS with pki {entry.name} (line {listener.line}): check that the cert "
        f"file {entry.cert} holds the PEM certificate (then its chain) and {entry.key} its PEM private "
        "key; see smtpd's line"
    )


def _key_mismatch(cert_pem: bytes | None, key_pem: bytes | None) -> bool | None:
    """True when the key is not the certificate's; None when either cannot be read."""
    if cert_pem is None or key_pem is None:
        return None
    # here, not at the top: cryptography costs a check of a config without TLS listeners (the
    # emulated one, which declines those, above all) a good part of its start-up
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki))


def _subject(der: bytes | None) -> str:
    if not der:
        return "(none sent)"
    from cryptography import x509  # (see _key_mismatch)

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "(unreadable)"
    names: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = alt.get_values_for_type(x509.DNSName)
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    return f"subject {subject}" + (f", names {', '.join(names)}" if names else "")


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
