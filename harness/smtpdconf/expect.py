"""What each relay action must do on the wire, derived from the config alone.

The fake upstream records what really arrived (TLS, AUTH, envelope sender);
these expectations are what those records are compared with.  The rules are
smtpd 6.8's: mta.c for the `tls` option, certificate checks and mail-from,
to.c for the URL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal as TypingLiteral

from harness.smtpdconf.parse import Action, Config, Literal, TableRef
from harness.smtpdconf.relayurl import RelayUrl, RelayUrlError, TlsMode, parse_relay_url

Via = TypingLiteral["smarthost", "mx", "table"]


@dataclass(frozen=True)
class RelayExpectation:
    """One route of one relay action.

    `via` is "smarthost" (a URL in the config), "mx" (no `host`: the
    recipient domain's MX) or "table" (`host <t>` whose contents are not in
    the config).  `failure` is smtpd's log line when the route cannot work at
    all; the mail then stays queued.
    """

    action: str
    line: int
    via: Via
    url: str | None = None
    relay: RelayUrl | None = None
    connect_host: str | None = None
    port: int = 25
    tls_mode: TlsMode = "starttls-optional"
    verify_certificate: bool = False
    auth: bool = False
    label: str | None = None
    auth_table: str | None = None
    mail_from: str | None = None
    helo: str | None = None
    failure: str | None = None

    def sender_for(self, sender: str) -> str:
        """The MAIL FROM the upstream should see for a message from `sender`."""
        return rewrite_sender(self.mail_from, sender)


def rewrite_sender(mail_from: str | None, sender: str) -> str:
    """mta.c's rewrite: the parts mail-from gives replace the sender's parts.

    text_to_mailaddr() splits mail-from at its last '@': "@example.org"
    replaces only the domain, "bob@example.org" both parts, and "example.org"
    (no '@') only the local part, so root@host becomes example.org@host.
    A null sender (bounces) and a sender without a local part are left alone.
    """
    if not mail_from or not sender:
        return sender
    user, at, domain = sender.rpartition("@")
    if not at:
        user, domain = sender, ""
    if not user:
        return sender
    new_user, at, new_domain = mail_from.rpartition("@")
    if not at:
        new_user, new_domain = mail_from, ""
    return f"{new_user or user}@{new_domain or domain}"


def relay_urls(config: Config, action: Action) -> list[str] | None:
    """The URLs in `host` (or `domain`, a per-domain map), or None when not in the config."""
    domain = action.operand("domain")
    if domain is not None:
        return _domain_urls(config, domain)
    host = action.host
    if host is None:
        return []
    if isinstance(host, Literal):
        return list(host.values)
    if isinstance(host, TableRef) and host.name in config.tables:
        table = config.tables[host.name]
        values = list(table.values) or [value for _, value in table.mapping]
        return values or None
    return None


def _domain_urls(config: Config, domain: TableRef | Literal) -> list[str] | None:
    """`domain <t>` maps recipient domains to URLs; only a table in the config shows them."""
    if isinstance(domain, TableRef) and domain.name in config.tables:
        return [url for _, url in config.tables[domain.name].mapping] or None
    return None


def expectations(config: Config) -> list[RelayExpectation]:
    """One expectation per relay URL (or MX route) of every relay action, in file order."""
    result: list[RelayExpectation] = []
    for action in config.relay_actions:
        urls = relay_urls(config, action)
        base = _base(action)
        if urls is None:
            result.append(replace(base, via="table"))
        elif not urls:
            result.append(_mx(action, base))
        else:
            result.extend(_smarthost(action, base, url) for url in urls)
    return result


def smarthosts(config: Config) -> tuple[str, ...]:
    """Every host smtpd dials for a relay URL (a name, or an address literal without its
    brackets), in file order: where a fake provider must answer for the config to run as written."""
    return tuple(dict.fromkeys(e.connect_host for e in expectations(config) if e.connect_host))


def _base(action: Action) -> RelayExpectation:
    auth = action.auth
    return RelayExpectation(
        action=action.name,
        line=action.line,
        via="mx",
        mail_from=action.mail_from,
        helo=action.helo,
        auth_table=auth.name if isinstance(auth, TableRef) else None,
    )


def _mx(action: Action, base: RelayExpectation) -> RelayExpectation:
    mode: TlsMode = "starttls-required" if action.tls_required else "starttls-optional"
    verify = action.tls_required and not action.tls_no_verify
    return replace(base, via="mx", tls_mode=mode, verify_certificate=verify)


def _smarthost(action: Action, base: RelayExpectation, url: str) -> RelayExpectation:
    try:
        relay = parse_relay_url(url)
    except RelayUrlError as exc:
        return replace(base, via="smarthost", url=url, failure=f"warn: {exc}")
    mode = relay.tls_mode
    if action.tls_required and mode == "starttls-optional":
        mode = "starttls-required"  # mta.c upgrades smtp:// when the action says `tls`
    failure = _failure(action, relay)
    return replace(
        base,
        via="smarthost",
        url=url,
        relay=relay,
        connect_host=relay.connect_host,
        port=relay.port,
        tls_mode=mode,
        verify_certificate=mode in ("starttls-required", "implicit") and not action.tls_no_verify,
        auth=relay.label is not None and action.auth is not None and failure is None,
        label=relay.label,
        failure=failure,
    )


def _failure(action: Action, relay: RelayUrl) -> str | None:
    """The checks mta_handle_envelope() makes before connecting, in its order."""
    if relay.label is not None and action.auth is None:
        return f'warn: No auth table on action "{action.name}" for relay {relay.text}'
    if action.tls_required and relay.tls_mode == "none":
        return f'warn: TLS required for action "{action.name}"'
    return None
