"""smtpd's table semantics as the emulation reads them (table_static.c, makemap.c, util.c)."""

from __future__ import annotations

import pytest

from harness.targets.emulated.tables import (
    MailAddr,
    Service,
    TableLoadError,
    credentials,
    expandnode_kind,
    hostname_match,
    load_makemap,
    load_static,
    mailaddr_match,
    split_alias_values,
)


def test_a_file_table_is_a_map_when_its_first_entry_has_a_separator() -> None:
    table = load_static("t", b"# comment\nRoot:  alice, bob\nlabel user@example.org:pass:word\n", "/t")
    assert table.kind == "hash"
    assert table.lookup(Service.ALIAS, "ROOT") == "alice, bob"  # keys are lowered
    assert table.lookup(Service.CREDENTIALS, "label") == "user@example.org:pass:word"
    assert credentials("user@example.org:pass:word", "label") == ("user@example.org", "pass:word")


def test_a_file_table_without_separators_is_a_list() -> None:
    table = load_static("t", b"example.org\n*.example.net\n", "/t")
    assert table.kind == "list"
    assert table.match(Service.DOMAIN, "mail.example.net") and table.match(Service.DOMAIN, "EXAMPLE.ORG")
    assert not table.match(Service.DOMAIN, "example.com")


def test_a_key_without_value_in_a_map_is_smtpds_error_line() -> None:
    with pytest.raises(TableLoadError) as error:
        load_static("t", b"root: alice\njustakey\n", "/etc/mail/aliases")
    assert str(error.value) == "/etc/mail/aliases: invalid map entry line 2"


def test_an_empty_file_is_a_map() -> None:
    assert load_static("t", b"", "/t").kind == "hash"


def test_an_aliases5_continuation_line_breaks_a_file_table() -> None:
    """table_static.c reads line by line: `  bob` is a key without a value (smtpd -n refuses)."""
    with pytest.raises(TableLoadError) as error:
        load_static("t", b"team: alice,\n  bob\n", "/etc/mail/aliases")
    assert str(error.value) == "/etc/mail/aliases: invalid map entry line 2"


def test_makemap_joins_backslash_continuations_and_refuses_bad_aliases() -> None:
    table = load_makemap("t", b"team: alice, \\\n bob # comment\n", "/src", aliases=True)
    assert table.lookup(Service.ALIAS, "team") == "alice,  bob "
    with pytest.raises(TableLoadError) as error:
        load_makemap("t", b"x: a b\n", "/src", aliases=True)
    assert str(error.value) == "makemap: /src:1: invalid entry"


@pytest.mark.parametrize(
    ("host", "pattern", "matches"),
    [
        ("mail.example.org", "*.example.org", True),
        ("example.org", "*.example.org", False),
        ("a.b.example.org", "*.example.org", False),  # util.c's `*` does not backtrack
        ("MAIL.example.org", "mail.EXAMPLE.org", True),
        ("anything", "*", True),
        ("", "*", False),
    ],
)
def test_hostname_match(host: str, pattern: str, matches: bool) -> None:
    assert hostname_match(host, pattern) is matches


@pytest.mark.parametrize(
    ("addr", "pattern", "matches"),
    [
        ("bob@example.org", "@example.org", True),
        ("bob+tag@example.org", "bob@example.org", True),  # a tag is ignored unless the table has one
        ("bob+tag@example.org", "bob+other@example.org", False),
        ("bob@example.org", "bob", True),
        ("bob@example.org", "@", True),
        ("alice@example.org", "bob@example.org", False),
    ],
)
def test_mailaddr_match(addr: str, pattern: str, matches: bool) -> None:
    assert mailaddr_match(MailAddr.parse(addr), MailAddr.parse(pattern)) is matches


def test_network_tables_match_addresses_and_the_socket() -> None:
    table = load_static("t", b"127.0.0.0/8\nlocal\n", "/t")
    assert table.match(Service.NETADDR, "127.0.0.1") and table.match(Service.NETADDR, "local")
    assert not table.match(Service.NETADDR, "198.51.100.2")


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("alice", "username"),
        ("carol@example.com", "address"),
        ("/var/mail/archive", "filename"),
        ('"|/usr/bin/procmail"', "filter"),
        (":include:/etc/mail/list", "include"),
        ("error:550 no such user", "error"),
        ("not valid", None),
    ],
)
def test_alias_values_are_typed_as_smtpd_types_them(value: str, kind: str | None) -> None:
    assert expandnode_kind(value) == kind


def test_alias_lists_split_at_commas_outside_quotes() -> None:
    assert split_alias_values('alice, "|cmd a,b", bob') == ["alice", '"|cmd a,b"', "bob"]
    assert split_alias_values('"unterminated') is None
