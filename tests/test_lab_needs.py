"""What a config runs besides smtpd, and where its relay URL points, as the test host provides it.

A table backend Debian ships apart (opensmtpd-extras), an mda's or a filter's program: when the
test host lacks one, installing the bundle says so (exit 2 through the CLI) instead of letting
smtpd fail and the config be blamed. A relay URL's address literal: the fake upstream answers
there, inside the host only. The same shapes through the real command: test_check_corpus.py.
"""

from __future__ import annotations

import subprocess

import pytest

from harness.pki import TestPki
from harness.smtpdconf import (
    accounts,
    alias_files,
    lmtp_servers,
    parse_config,
    programs,
    queue_key_prompt,
    relay_sources,
)
from harness.targets.base import Bundle, BundleFile
from harness.targets.lab import UPSTREAM_LINK, LabError, LabHost
from harness.upstream import UpstreamServer, parse_profile

pytestmark = pytest.mark.lab

SQLITE = (
    "table secrets sqlite:/etc/mail/sqlite.conf\nlisten on socket\n"
    'action "relay" relay host smtp+tls://p@smtp.example.net:587 auth <secrets>\n'
    'match from local for any action "relay"\n'
)
SQLITE_CONF = BundleFile("/etc/mail/sqlite.conf", b"dbpath /var/lib/smtpd/x.db\n", 0o640, "root", "_smtpd")
FILTERS = (
    'filter scan proc-exec "/usr/local/bin/scan-mail --strict"\n'
    'proc rspamd "/usr/bin/filter-rspamd"\n'
    "filter spam proc rspamd\n"
    "listen on socket filter scan\n"
    'action "local" mda "%{user.directory}/bin/deliver"\n'
    'match from local for local action "local"\n'
)


def test_programs_names_every_mda_and_filter_command() -> None:
    found = [(p.what, p.line, p.executable) for p in programs(parse_config(FILTERS))]
    assert found == [
        ("filter scan", 1, "/usr/local/bin/scan-mail"),
        ("proc rspamd", 2, "/usr/bin/filter-rspamd"),
        ('mda of action "local"', 5, None),  # filled in per user by smtpd: cannot be checked
    ]


def test_a_filter_named_without_a_path_is_the_one_in_smtpds_libexec_with_its_package() -> None:
    # smtpd.c fork_filter_process: `exec PATH_LIBEXEC/COMMAND`; an mda's goes through /bin/sh
    config = parse_config(
        'filter "dkim" proc-exec "filter-dkimsign -d example.org"\nlisten on socket filter "dkim"\n'
        'action "local" mda "procmail -f -"\nmatch from local for local action "local"\n'
    )
    found = [(p.executable, p.package) for p in programs(config)]
    assert found == [
        ("/usr/libexec/opensmtpd/filter-dkimsign", "opensmtpd-filter-dkimsign"),
        ("procmail", None),
    ]


def test_lmtp_servers_are_the_sockets_and_ports_no_listener_of_the_config_serves() -> None:
    config = parse_config(
        "listen on lo port 2424\n"
        'action "dovecot" lmtp "/run/dovecot/lmtp" rcpt-to\n'
        'action "cyrus" lmtp "localhost:24"\n'
        'action "self" lmtp "127.0.0.1:2424"\n'
        'match from local for local action "dovecot"\n'
    )
    assert [(s.action, s.destination) for s in lmtp_servers(config)] == [
        ("dovecot", "/run/dovecot/lmtp"),
        ("cyrus", "localhost:24"),
    ]


def test_accounts_are_the_users_and_groups_actions_and_filters_run_as() -> None:
    config = parse_config(
        'filter "dkim" proc-exec "filter-dkimsign -d x" user _dkimsign group _dkimsign\n'
        'proc "p" "/usr/bin/x" group mail\nlisten on socket filter "dkim"\n'
        'action "v" maildir "/var/vmail/%{dest.user}" user vmail\nmatch from local for local action "v"\n'
    )
    assert [(a.what, a.line, a.user, a.group) for a in accounts(config)] == [
        ("filter dkim", 1, "_dkimsign", "_dkimsign"),
        ("proc p", 2, None, "mail"),
        ('action "v"', 4, "vmail", None),
    ]


def test_only_file_and_db_alias_tables_hold_an_aliases_file() -> None:
    config = parse_config(
        "table a file:/etc/aliases\ntable l ldap:/etc/mail/ldap.conf\n"
        'action "x" mbox alias <a>\naction "y" mbox alias <l>\n'
        'match from local for local action "x"\nmatch from any for local action "y"\n'
    )
    assert alias_files(config) == {"a"}


def test_a_missing_lmtp_server_is_the_test_hosts_lack(lab_host: LabHost) -> None:
    target = lab_host.target
    assert target is not None
    config = (
        'listen on socket\naction "local" lmtp "/run/dovecot/lmtp"\n'
        'match from local for local action "local"\n'
    )
    with pytest.raises(
        LabError, match=r"cannot provide the LMTP server at /run/dovecot/lmtp, where action \"local\""
    ):
        target.install(Bundle(config))


def test_a_missing_extras_backend_is_the_test_hosts_lack_naming_the_package(lab_host: LabHost) -> None:
    target = lab_host.target
    assert target is not None
    target.install(Bundle(SQLITE, (SQLITE_CONF,)))  # installed here (ci/setup.sh): accepted
    target.check("rm /usr/libexec/opensmtpd/table-sqlite")  # inside the host only (its own /usr)
    with pytest.raises(LabError, match=r"table backend sqlite \(table secrets, line 1\).*opensmtpd-extras"):
        target.install(Bundle(SQLITE, (SQLITE_CONF,)))
    assert subprocess.run(["test", "-x", "/usr/libexec/opensmtpd/table-sqlite"], check=False).returncode == 0


def test_a_missing_filter_program_is_named_with_its_line(lab_host: LabHost) -> None:
    target = lab_host.target
    assert target is not None
    with pytest.raises(
        LabError, match=r"cannot provide /usr/local/bin/scan-mail, the program of filter scan"
    ):
        target.install(Bundle(FILTERS))
    script = BundleFile("/usr/local/bin/scan-mail", b"#!/bin/sh\ncat\n", 0o755)
    with pytest.raises(LabError, match=r"cannot provide /usr/bin/filter-rspamd, the program of proc rspamd"):
        target.install(Bundle(FILTERS, (script,)))


SOURCES = (
    "table secrets file:/etc/mail/secrets\ntable out file:/etc/mail/out\n"
    'table v6 { "2001:db8:25::25", not-an-address }\nlisten on lo\n'
    'action "a" relay host smtp+tls://p@smtp.example.net:587 auth <secrets> src 192.0.2.40\n'
    'action "b" relay host smtp+tls://p@smtp.example.net:587 auth <secrets> src <out>\n'
    'action "c" relay src <v6>\naction "d" mbox\n'
    'match from local for any action "a"\n'
)


def test_relay_sources_are_every_src_address_inline_or_in_a_table() -> None:
    files = {"/etc/mail/out": b"# leaves from\n203.0.113.25  # mail.example.org\n\n203.0.113.26\n"}
    found = [(s.action, s.line, s.address) for s in relay_sources(parse_config(SOURCES), files)]
    assert found == [
        ("a", 5, "192.0.2.40"),
        ("b", 6, "203.0.113.25"),
        ("b", 6, "203.0.113.26"),
        ("c", 7, "2001:db8:25::25"),
    ]
    # a file table not given has no addresses to know; smtpd judges the rest
    assert [s.action for s in relay_sources(parse_config(SOURCES))] == ["a", "c"]


def test_a_queue_key_smtpd_asks_for_at_start_is_found() -> None:
    head = "listen on lo\nqueue compression\n"
    assert queue_key_prompt(parse_config(head + "queue encryption\n")) == 3
    assert queue_key_prompt(parse_config(head + "queue encryption stdin\n")) == 3
    assert queue_key_prompt(parse_config(head + "queue encryption 3f4a9c1e07b2d6a85e1f0c9b\n")) is None
    assert queue_key_prompt(parse_config(head)) is None


def test_a_relay_src_is_the_hosts_and_the_upstream_answers_it_inside(
    lab_host: LabHost, relay_pki: TestPki
) -> None:
    """smtpd binds its relay connections to `src`: the host has the address, and the fake
    upstream answers the relay names inside the host, where a connection from it can return."""
    target = lab_host.target
    assert target is not None
    profile = parse_profile('host = "smtp.example.net"\nport = 587\n', "p.toml")
    config = (
        'listen on lo\naction "r" relay host smtp+tls://smtp.example.net:587 src 192.0.2.40\n'
        'match from local for any action "r"\n'
    )
    with UpstreamServer(profile, relay_pki, lab_host.upstream_address, 587, listen=False) as upstream:
        target.attach_upstream(upstream)
        target.install(Bundle(config))
        inside = target.upstream_address()
        assert inside != lab_host.upstream_address
        assert "192.0.2.40/32" in target.check("ip -o addr show dev eth0").stdout
        connect = (
            "import socket; s = socket.create_connection"
            f'(("{inside}", 587), 5, source_address=("192.0.2.40", 0)); print(s.recv(100).decode())'
        )
        assert target.check(f"python3 -c '{connect}'").stdout.startswith("220 smtp.example.net")
        assert [s.peer.startswith("192.0.2.40:") for s in upstream.recorder.sessions] == [True]
        target.install(Bundle(config.replace(" src 192.0.2.40", "")))
        assert target.upstream_address() == lab_host.upstream_address
        with pytest.raises(LabError, match=r"address 198\.51\.100\.50: .*; send from another address$"):
            target.install(Bundle(config.replace("192.0.2.40", "198.51.100.50")))


def test_a_relay_urls_address_is_served_inside_the_host_only(lab_host: LabHost, relay_pki: TestPki) -> None:
    target = lab_host.target
    assert target is not None
    profile = parse_profile(
        'host = "hub.example.net"\nport = 2525\ntls = "none"\nauth = "none"\n', "hub.toml"
    )
    config = (
        'listen on lo\naction "r" relay host smtp+notls://192.0.2.25:2525\n'
        'match from local for any action "r"\n'
    )
    with UpstreamServer(profile, relay_pki, lab_host.upstream_address, 2525, listen=False) as upstream:
        target.attach_upstream(upstream)
        target.install(Bundle(config))
        connect = 'import socket; print(socket.create_connection(("192.0.2.25", 2525), 5).recv(100).decode())'
        banner = target.check(f"python3 -c '{connect}'").stdout
        assert banner.startswith("220 hub.example.net"), banner
        inside = target.check(f"ip -o addr show dev {UPSTREAM_LINK}").stdout
        assert "192.0.2.25/32" in inside and "192.0.2.25" not in target.check("ip -o addr show dev lo").stdout
        machine = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
        assert "192.0.2.25:2525" not in machine  # the socket lives in the host's namespace
        assert [s.peer.startswith("192.0.2.25:") for s in upstream.recorder.sessions] == [True]
