"""smtpd.conf → model, and agreement with the real `smtpd -n` on what is a syntax error."""

from __future__ import annotations

from pathlib import Path

import pytest
from smtpd_helpers import ARTICLE, needs_smtpd, smtpd_check

from harness.smtpdconf import auth_tables
from harness.smtpdconf.parse import (
    Action,
    ConfigSyntaxError,
    Literal,
    Match,
    TableRef,
    newer_grammar_line,
    parse_config,
    parse_file,
)

# -- the article's config ---------------------------------------------------


def test_article_actions_and_matches() -> None:
    config = parse_file(ARTICLE)
    assert set(config.actions) == {"local_mail", "unbound"}
    relay = config.actions["unbound"]
    assert relay.line == 18 and relay.is_relay
    assert relay.host == Literal(("smtp+tls://identifiant@server",), 18)
    assert relay.auth == TableRef("secrets", 18)
    assert relay.mail_from == "@your-domain.tld"
    assert config.actions["local_mail"].operand("alias") == TableRef("aliases", 17)
    assert [(m.line, m.action) for m in config.matches] == [
        (26, "local_mail"),
        (27, "outbound"),
    ]
    assert {name: t.line for name, t in config.tables.items()} == {"aliases": 6, "secrets": 7}
    assert config.tables["secrets"].backend == "file"
    assert config.tables["secrets"].config == "/etc/mail/secrets"
    assert [(listen.interface, listen.line) for listen in config.listens] == [
        ("socket", 13),
        ("lo0", 15),
    ]
    assert [(r.kind, r.keyword, r.line) for r in config.raw] == [("other", "queue", 9)]


def test_match_defaults_are_from_local_for_local() -> None:
    (match,) = parse_config('action "l" mbox\nmatch action "l"\n').matches
    assert (match.source.qualifier, match.destination.qualifier) == ("local", "local")


# -- lexer ------------------------------------------------------------------


def test_quoted_names_keep_their_value_without_quotes() -> None:
    config = parse_config("action 'my relay' relay\nmatch for any action \"my relay\"\n")
    assert list(config.actions) == ["my relay"]
    assert config.matches[0].action == "my relay"


def test_comments_and_blank_lines() -> None:
    text = '# comment\n\naction "r" relay # trailing\n   # indented\nmatch for any action "r"\n'
    config = parse_config(text)
    assert config.actions["r"].line == 3
    assert config.matches[0].line == 5


def test_macros_are_expanded_outside_quotes() -> None:
    text = (
        'relay_url = "smtp+tls://perso@mail.example.org:587"\n'
        'dom = "example.org"\n'
        'action "r" relay host $relay_url mail-from "@$dom"\n'
        'match for any action "r"\n'
    )
    config = parse_config(text)
    action = config.actions["r"]
    assert action.host == Literal(("smtp+tls://perso@mail.example.org:587",), 3)
    assert action.mail_from == "@$dom"  # quotes stop expansion, as in smtpd
    assert config.macros["dom"] == "example.org"


def test_a_keyword_cannot_name_a_macro() -> None:
    with pytest.raises(ConfigSyntaxError):
        parse_config('domain = "example.org"\n')


def test_undefined_macro_is_an_error_in_smtpds_words() -> None:
    with pytest.raises(ConfigSyntaxError) as info:
        parse_config('action "r" relay host $nope\n', "x.conf")
    assert str(info.value) == "x.conf:1: macro 'nope' not defined"


def test_line_continuation_keeps_token_lines() -> None:
    text = 'action "r" relay\nmatch for any \\\naction \\\n"r"\naction "s" relay\n'
    config = parse_config(text)
    (match,) = config.matches
    assert (match.line, match.action_line) == (2, 4)
    assert config.actions["s"].line == 5


def test_quoted_string_may_span_lines() -> None:
    config = parse_config('action "a\nb" relay\nmatch for any action "ab"\n')
    assert list(config.actions) == ["ab"]
    assert config.matches[0].line == 3


def test_unterminated_quote() -> None:
    with pytest.raises(ConfigSyntaxError) as info:
        parse_config('action "r relay\n')
    assert "end of file" in info.value.message


# -- statements -------------------------------------------------------------


def test_table_forms() -> None:
    text = (
        "table a file:/etc/mail/aliases\n"
        'table b "/etc/mail/static"\n'
        "table c db:/etc/mail/c.db\n"
        "table d { one, two\n three }\n"
        "table e { k1 = v1, k2 => v2 }\n"
        "table f getpwnam\n"
    )
    tables = parse_config(text).tables
    assert (tables["a"].backend, tables["a"].config) == ("file", "/etc/mail/aliases")
    assert (tables["b"].backend, tables["b"].config) == ("static", "/etc/mail/static")
    assert (tables["c"].backend, tables["c"].config) == ("db", "/etc/mail/c.db")
    assert tables["d"].values == ("one", "two", "three") and tables["d"].line == 4
    assert tables["e"].mapping == (("k1", "v1"), ("k2", "v2"))
    assert (tables["f"].backend, tables["f"].config) == ("getpwnam", None)


def test_relative_table_path_is_refused_like_smtpd() -> None:
    with pytest.raises(ConfigSyntaxError) as info:
        parse_config("table t file:relative\n", "x.conf")
    assert str(info.value) == "x.conf:1: invalid backend parameter for table: t"


def test_pki_lines_merge_and_ca() -> None:
    text = (
        'pki MX.example.org cert "/etc/ssl/mx.crt"\n'
        'pki mx.example.org key "/etc/ssl/private/mx.key"\n'
        'ca upstream cert "/etc/ssl/upstream-ca.pem"\n'
    )
    config = parse_config(text)
    pki = config.pkis["mx.example.org"]
    assert (pki.line, pki.cert, pki.key) == (1, "/etc/ssl/mx.crt", "/etc/ssl/private/mx.key")
    assert config.cas["upstream"].cert == "/etc/ssl/upstream-ca.pem"


def test_listen_options_and_table_refs() -> None:
    text = "listen on eth0 port 587 tls-require pki mx auth <creds> senders <users> masquerade tag SUBMIT\n"
    (listen,) = parse_config(text).listens
    assert listen.interface == "eth0"
    assert [r.name for r in listen.table_refs] == ["creds", "users"]
    assert listen.unknown_options == ()
    assert "tls-require" in listen.options


def test_local_methods() -> None:
    text = (
        'action "a" maildir "~/Maildir" junk alias <aliases>\n'
        'action "b" lmtp "/var/run/dovecot/lmtp" rcpt-to virtual <v>\n'
        'action "c" mda "/usr/bin/procmail -f -" user nobody\n'
        'action "d" forward-only\n'
        'action "e" expand-only ttl 4h\n'
        'action "f" mbox userbase <users>\n'
    )
    actions = parse_config(text).actions
    assert (actions["a"].method, actions["a"].method_arg, actions["a"].method_extra) == (
        "maildir",
        "~/Maildir",
        ("junk",),
    )
    assert actions["b"].method_extra == ("rcpt-to",)
    assert actions["c"].string("user") == "nobody"
    assert actions["d"].method == "forward-only"
    assert actions["e"].string("ttl") == "4h"
    assert actions["f"].operand("userbase") == TableRef("users", 6)


def test_relay_options_in_order() -> None:
    text = (
        'action "r" relay host smtps://l@mx.example.org auth <s> helo mx.local '
        'tls no-verify pki mx.example.org ca up src <ips> mail-from "@example.org"\n'
    )
    action = parse_config(text).actions["r"]
    assert [o.name for o in action.options] == [
        "host",
        "auth",
        "helo",
        "tls",
        "pki",
        "ca",
        "src",
        "mail-from",
    ]
    assert action.tls_required and action.tls_no_verify and action.helo == "mx.local"


def test_relay_host_as_table_and_inline_list() -> None:
    text = 'action "r" relay host { "smtp://a", "smtp://b" }\naction "s" relay host <hosts>\n'
    actions = parse_config(text).actions
    assert actions["r"].host == Literal(("smtp://a", "smtp://b"), 1)
    assert actions["s"].host == TableRef("hosts", 2)


def test_auth_labels_come_from_every_url_smtpd_may_dial_a_host_table_too() -> None:
    """A label in `host <table>` is asked of the auth table like one in `host URL`: a secrets
    table synthesized without it fails with `credentials not found for secrets:LABEL`."""
    text = (
        "table secrets file:/etc/mail/secrets\n"
        'table relays { "smtp+tls://perso@smtp.example.net:587", "smtps://backup@mx2.example.net" }\n'
        'action "t" relay host <relays> auth <secrets>\n'
        'action "u" relay host smtp+tls://direct@smtp.example.net:587 auth <secrets>\n'
    )
    assert auth_tables(parse_config(text)) == {"secrets": {"perso", "backup", "direct"}}


def test_an_included_file_given_is_read_where_the_include_stands() -> None:
    """smtpd reads an included file in place: its tables and actions are the config's, its
    errors name it; a file not given is recorded only, and a file including itself ends."""
    files = {
        "/etc/smtpd/site.conf": 'table secrets file:/etc/smtpd/secrets\ninclude "/etc/smtpd/site.conf"\n',
        "/etc/smtpd/bad.conf": "\n\nlisten on any\n",
    }
    text = 'include "/etc/smtpd/site.conf"\ninclude "/etc/smtpd/other.conf"\naction "r" relay\n'
    config = parse_config(text, include=files.get)
    assert config.tables["secrets"].line == 1
    assert [i.path for i in config.includes][:3] == ["/etc/smtpd/site.conf"] * 3
    assert "/etc/smtpd/other.conf" in [i.path for i in config.includes]
    assert "secrets" not in parse_config(text).tables
    with pytest.raises(ConfigSyntaxError, match=r"^/etc/smtpd/bad.conf:3: syntax error"):
        parse_config('include "/etc/smtpd/bad.conf"\n', include=files.get)


def test_newer_grammar_line_is_a_line_only_7x_accepts() -> None:
    relay = 'action "r" relay host smtp+tls://smtp.example.net:587'
    text = f'listen on lo\n{relay} \\\n  protocols "tlsv1.3"\nmatch for any action "r"\n'
    assert newer_grammar_line(text) == 3  # the line of the word 6.8 refuses, as smtpd says it
    assert newer_grammar_line(f"listen on lo\n{relay}\n") is None
    assert newer_grammar_line(text + "listen on any\n") is None  # 7.x refuses it too


def test_backup_and_domain() -> None:
    text = 'action "b" relay backup mx "mx2.example.org"\naction "d" relay domain <routes>\n'
    actions = parse_config(text).actions
    assert actions["b"].string("backup") == "mx2.example.org"
    assert actions["d"].operand("domain") == TableRef("routes", 2)


def test_match_conditions() -> None:
    text = (
        'match ! from src <bad> for domain regex "^ex.*" tls auth <users> '
        'mail-from "@x.org" action "r"\n'
        "match from any for rcpt-to <rcpts> reject\n"
        'match from auth for any action "r"\n'
        'match from rdns for any action "r"\n'
    )
    first, second, third, fourth = parse_config(text).matches
    assert first.source.negated and first.source.qualifier == "src"
    assert first.source.operand == TableRef("bad", 1)
    assert first.destination.regex and first.destination.operand == Literal(("^ex.*",), 1)
    assert [c.kind for c in first.extra_conditions] == ["tls", "auth", "mail-from"]
    assert second.reject and second.action is None
    assert third.source.qualifier == "auth" and third.source.operand is None
    assert fourth.source.qualifier == "rdns"


def test_repeated_condition_is_smtpds_error() -> None:
    with pytest.raises(ConfigSyntaxError) as info:
        parse_config('match from any from local for any action "r"\n', "x.conf")
    assert str(info.value) == "x.conf:1: from already specified for this rule"


def test_statements_keep_file_order_and_duplicates() -> None:
    config = parse_config('action "r" relay\naction "r" mbox\nmatch for any action "r"\n')
    assert config.actions["r"].method == "relay"  # the first wins, as in smtpd
    kinds = [type(s).__name__ for s in config.statements]
    assert kinds == ["Action", "Action", "Match"]
    assert isinstance(config.statements[1], Action)
    assert isinstance(config.statements[2], Match)


def test_parse_file_keeps_carriage_returns(tmp_path: Path) -> None:
    conf = tmp_path / "crlf.conf"
    conf.write_bytes(b'action "r" relay\r\nmatch for any action "r"\r\n')
    with pytest.raises(ConfigSyntaxError) as info:
        parse_file(conf)
    assert str(info.value) == f"{conf}:1: syntax error"


def test_include_is_recorded() -> None:
    (include,) = parse_config('include "/etc/mail/extra.conf"\n').includes
    assert (include.path, include.line) == ("/etc/mail/extra.conf", 1)


def test_pre_64_grammar_is_kept_raw_and_marked() -> None:
    text = (
        "listen on lo0\n"
        "accept from local for any relay via smtp+tls://perso@mx.example.org auth <s>\n"
        "accept for local deliver to mbox\n"
        "reject from any for any\n"
        "expire 4d\n"
        'pki mx certificate "/etc/ssl/mx.crt"\n'
    )
    raw = parse_config(text).raw
    assert [(r.kind, r.keyword, r.line) for r in raw] == [
        ("pre-6.4", "accept", 2),
        ("pre-6.4", "accept", 3),
        ("pre-6.4", "reject", 4),
        ("pre-6.4", "expire", 5),
        ("pre-6.4", "pki", 6),
    ]


def test_unknown_and_other_statements_do_not_crash() -> None:
    config = parse_config("frobnicate all the things\nsmtp limit max-mails 1000\n")
    assert [(r.kind, r.keyword, r.line) for r in config.raw] == [
        ("unknown", "frobnicate", 1),
        ("other", "smtp", 2),
    ]


def test_error_str_is_smtpds_format() -> None:
    with pytest.raises(ConfigSyntaxError) as info:
        parse_config("action relay relay\n", "/etc/mail/smtpd.conf")
    assert str(info.value) == "/etc/mail/smtpd.conf:1: syntax error"
    assert (info.value.path, info.value.line, info.value.message) == (
        "/etc/mail/smtpd.conf",
        1,
        "syntax error",
    )


# -- agreement with smtpd -n on syntax ------------------------------------

GOOD_TAIL = 'action "r" relay\nmatch for any action "r"\n'

SYNTAX_CASES: list[tuple[str, str, int | None]] = [
    # (name, config, line of smtpd's "syntax error" or None when smtpd accepts it)
    ("keyword as action name", "action relay relay\nmatch for any action relay\n", 1),
    ("capitalised keyword is a string", "action Relay relay\nmatch for any action Relay\n", None),
    ("match without action", 'action "r" relay\nmatch from any for any\n', 2),
    ("newline right after {", "table t {\n a, b }\n" + GOOD_TAIL, 1),
    ("newline after comma", "table t { a,\n b }\n" + GOOD_TAIL, 1),
    ("newline before }", "table t { a, b\n}\n" + GOOD_TAIL, 2),
    ("newlines as separators", "table t { a\n\n b }\n" + GOOD_TAIL, None),
    ("continued }", "table t { a, b \\\n}\n" + GOOD_TAIL, None),
    ("trailing comma", "table t { a, }\n" + GOOD_TAIL, 1),
    ("mixed list and map", "table t { a = b, c }\n" + GOOD_TAIL, 1),
    ("space separated list", "table t { a b c }\n" + GOOD_TAIL, None),
    ("pre-6.4 accept", "accept from local for any relay via smtp://x\n" + GOOD_TAIL, 1),
    ("pre-6.4 certificate", 'pki mx certificate "/x"\n' + GOOD_TAIL, 1),
    ("unquoted path", "table t /etc/x\n" + GOOD_TAIL, 1),
    ("CRLF line ends", 'action "r" relay\r\nmatch for any action "r"\r\n', 1),
    ("keyword as pki name", 'pki mx cert "/x"\n' + GOOD_TAIL, 1),
    ("keyword as macro name", 'domain = "x"\n' + GOOD_TAIL, 1),
    ("macro", 'u = "smtp+tls://x"\naction "r" relay host $u\nmatch for any action "r"\n', None),
    ("unterminated quote", 'action "r" relay host "x\nmatch for any action "r"\n', 2),
    ("from twice", 'action "r" relay\nmatch from any from local for any action "r"\n', 2),
    ("local option on relay", 'action "r" relay alias <a>\nmatch for any action "r"\n', 1),
    ("relay option on mbox", 'action "r" mbox host "smtp://x"\nmatch for any action "r"\n', 1),
]


def _first_syntax_error_line(text: str) -> int | None:
    """Where we say smtpd stops: a raised error, or old/unknown grammar kept raw."""
    try:
        config = parse_config(text, "smtpd.conf")
    except ConfigSyntaxError as exc:
        return exc.line
    raw = [r.line for r in config.raw if r.kind != "other"]
    return raw[0] if raw else None


@needs_smtpd
@pytest.mark.parametrize(("name", "text", "line"), SYNTAX_CASES, ids=[c[0] for c in SYNTAX_CASES])
def test_syntax_agrees_with_smtpd(tmp_path: Path, name: str, text: str, line: int | None) -> None:
    rc, output = smtpd_check(tmp_path, text)
    mine = _first_syntax_error_line(text)
    errors = [out for out in output if out.startswith("smtpd.conf:")]
    if line is None:
        assert (rc, output) == (0, ["configuration OK"])
    else:
        assert rc == 1
        assert errors[0].startswith(f"smtpd.conf:{line}: ")
    assert mine == line
