"""The provider's certificate as smtpd checks it after the TLS handshake (never during it).

smtpd completes every handshake without verifying, then asks its CA process to verify the peer's
certificate against the trusted CA file (X509_verify_cert: signature by a trusted certificate,
validity dates) and, if that passes, matches the relay's host name against the subjectAltName
DNS entries, else the CN (ssl_verify.c ssl_check_name). Only the leaf is available here (Python
3.11's ssl exposes no peer chain), so the leaf must be signed directly by a trusted certificate
or be one: what every certificate the harness's PKI issues is.
"""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID


def load_cas(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def chain_ok(leaf_der: bytes, trusted: list[x509.Certificate], now: datetime.datetime | None = None) -> bool:
    """X509_verify_cert() for a chain of the leaf and one trusted certificate."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        return False
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return False
    for ca in trusted:
        if ca == leaf:
            return True
        if ca.subject != leaf.issuer:
            continue
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            continue
        try:
            leaf.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return True
    return False


def _match_name(cert_name: str, name: str) -> bool:
    """tls_match_name(): exact (case-insensitive), or `*.domain` against one leftmost label."""
    if cert_name.lower() == name.lower():
        return True
    if not cert_name.startswith("*"):
        return False
    domain = cert_name[1:]
    if not domain.startswith(".") or domain[1:2] == "." or "." not in domain[1:]:
        return False
    nxt = domain[1:].index(".") + 1
    if domain[nxt + 1 : nxt + 2] == ".":
        return False
    if name.startswith("."):
        return False
    dot = name.find(".")
    if dot < 0 or len(name) - dot == 1:
        return False
    return domain.lower() == name[dot:].lower()


def name_ok(leaf_der: bytes, name: str) -> bool:
    """ssl_check_name(): SAN DNS (or IP) entries; the CN only when the cert has no SAN names."""
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        return False
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        dns = san.get_values_for_type(x509.DNSName)
        ips = san.get_values_for_type(x509.IPAddress)
        if address is not None:
            if address in ips:
                return True
        elif any(_match_name(entry, name) for entry in dns):
            return True
        if dns or ips:
            return False
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        return False
    cn = str(cns[0].value)
    return cn == name if address is not None else _match_name(cn, name)
