"""Relay URLs as smtpd 6.8's to.c text_to_relayhost() reads them.

smtpd only parses these at delivery time (there is no `smtpd -n` check to pin
them against), so the cases below are taken from reading to.c and util.c.
"""

from __future__ import annotations

import pytest

from harness.smtpdconf.relayurl import SCHEMES, RelayUrl, RelayUrlError, parse_relay_url


def test_scheme_table_is_exactly_to_c() -> None:
    assert SCHEMES == ("smtp", "smtp+tls", "smtp+notls", "lmtp", "smtps")


@pytest.mark.parametrize(
    ("url", "scheme", "tls_mode", "port"),
    [
        ("smtp://mx.example.org", "smtp", "starttls-optional", 25),
        ("smtp+tls://mx.example.org", "smtp+tls", "starttls-required", 25),
        ("smtp+notls://mx.example.org", "smtp+notls", "none", 25),
        ("smtps://mx.example.org", "smtps", "implicit", 465),
        ("lmtp://mx.example.org:24", "lmtp", "none", 24),
        ("mx.example.org", "smtp", "starttls-optional", 25),
        ("SMTPS://mx.example.org", "smtps", "implicit", 465),
    ],
)
def test_schemes_and_default_ports(url: str, scheme: str, tls_mode: str, port: int) -> None:
    relay = parse_relay_url(url)
    assert (relay.scheme, relay.tls_mode, relay.port) == (scheme, tls_mode, port)
    assert relay.host == "mx.example.org"
    assert relay.label is None


def test_smtp_tls_defaults_to_port_25_not_587() -> None:
    assert parse_relay_url("smtp+tls://perso@mail.example.org").port == 25


def test_label_port_and_fields() -> None:
    relay = parse_relay_url("smtp+tls://perso@mail.example.org:587")
    assert relay == RelayUrl(
        text="smtp+tls://perso@mail.example.org:587",
        scheme="smtp+tls",
        tls_mode="starttls-required",
        label="perso",
        host="mail.example.org",
        port=587,
        explicit_scheme=True,
        explicit_port=True,
    )
    assert relay.auth_possible and relay.wants_auth


def test_label_on_smtps_is_allowed() -> None:
    relay = parse_relay_url("smtps://perso@mail.example.org")
    assert (relay.label, relay.port, relay.auth_possible) == ("perso", 465, True)


@pytest.mark.parametrize(
    "url",
    [
        "smtp://perso@mail.example.org",  # STARTTLS only if offered: no credentials
        "smtp+notls://perso@mail.example.org",
        "perso@mail.example.org",  # no scheme = smtp://
        "lmtp://perso@mail.example.org:24",
    ],
)
def test_label_needs_a_tls_scheme(url: str) -> None:
    with pytest.raises(RelayUrlError) as info:
        parse_relay_url(url)
    assert str(info.value) == f"Failed to parse smarthost {url}"
    assert "label" in info.value.reason


def test_auth_possible_follows_the_scheme() -> None:
    assert not parse_relay_url("smtp://mx.example.org").auth_possible
    assert not parse_relay_url("smtp+notls://mx.example.org").auth_possible
    assert parse_relay_url("smtp+tls://mx.example.org").auth_possible


@pytest.mark.parametrize(
    ("url", "reason_part"),
    [
        ("foo://mx.example.org", "unknown scheme"),
        ("smtp+ssl://mx.example.org", "unknown scheme"),
        ("lmtp+tls://mx.example.org:24", "unknown scheme"),
        ("mx.example.org/x://", "unknown scheme"),  # '://' anywhere, unknown prefix
        ("lmtp://mx.example.org", "needs an explicit port"),
        ("smtp://mx.example.org:0", "out of range"),
        ("smtp://mx.example.org:65536", "out of range"),
        ("smtp://mx.example.org:25/", "not a number"),
        ("smtp://mx.example.org:smtp", "not a number"),
        ("smtp://", "no host"),
        ("smtp+tls://perso@", "no host"),
        ("smtp://:25", "no host"),
        ("smtp://mx.example.org.", "not a valid host name"),
        ("smtp://a..b", "not a valid host name"),
        ("smtp://-mx.example.org", "not a valid host name"),
        ("smtp://[::1", "closing"),
        ("smtp://[not-an-address]", "not an IPv4 or IPv6"),
        ("smtp://" + "a" * 65, "longer than 64"),
        ("smtp://x" + "y" * 1100, "1023-byte"),
    ],
)
def test_invalid_urls(url: str, reason_part: str) -> None:
    with pytest.raises(RelayUrlError) as info:
        parse_relay_url(url)
    assert str(info.value) == f"Failed to parse smarthost {url}"
    assert reason_part in info.value.reason


def test_port_bounds() -> None:
    assert parse_relay_url("smtp://mx:1").port == 1
    assert parse_relay_url("smtp://mx:65535").port == 65535


@pytest.mark.parametrize(
    ("url", "host", "connect", "port"),
    [
        ("smtp://[::1]:2525", "[::1]", "::1", 2525),
        ("smtps://[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]", "2001:db8::1", 465),
        ("smtp+tls://[192.0.2.1]", "[192.0.2.1]", "192.0.2.1", 25),
        ("smtp://192.0.2.1:2525", "192.0.2.1", "192.0.2.1", 2525),
    ],
)
def test_address_literals(url: str, host: str, connect: str, port: int) -> None:
    relay = parse_relay_url(url)
    assert (relay.host, relay.connect_host, relay.port) == (host, connect, port)


def test_text_after_the_host_is_ignored_like_to_c() -> None:
    relay = parse_relay_url("smtp+tls://mx.example.org/whatever")
    assert (relay.host, relay.port) == ("mx.example.org", 25)


def test_empty_label_is_no_label() -> None:
    relay = parse_relay_url("smtp://@mx.example.org")
    assert relay.label is None and relay.host == "mx.example.org"


def test_label_ends_at_first_at_sign() -> None:
    relay = parse_relay_url("smtp+tls://a@b@mx.example.org")
    assert relay.label == "a"
    assert relay.host == "b"  # the rest stops at the second '@', as in to.c
