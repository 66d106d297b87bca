"""Provider profiles: what parses, and errors that name the file, the line and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.upstream import Credential, Faults, Profile, ProfileError, load_profile, parse_profile

SECRET = "hunter2-correct-horse"

FULL = """\
host = "mail.provider.test"
port = 465
tls = "implicit"
auth = "optional"
protocol = "lmtp"
sender_domains = ["example.org", "example.net"]

[[credentials]]
user = "alice@example.org"
password = "hunter2-correct-horse"

[[credentials]]
user = "bob@example.org"
password = "another-one"

[faults]
tempfail = "rcpt"
drop = "after-data"
starttls_refused = true
auth_advertised = false
banner_delay = 1.5
cert = "expired"
"""


def _error(text: str, source: str = "provider.toml") -> ProfileError:
    with pytest.raises(ProfileError) as err:
        parse_profile(textwrap.dedent(text), source)
    return err.value


def test_full_profile_parses() -> None:
    p = parse_profile(FULL, "full.toml")
    assert (p.host, p.port, p.tls, p.auth, p.protocol) == (
        "mail.provider.test",
        465,
        "implicit",
        "optional",
        "lmtp",
    )
    assert p.sender_domains == ("example.org", "example.net")
    assert p.credentials == (
        Credential("alice@example.org", SECRET),
        Credential("bob@example.org", "another-one"),
    )
    assert p.faults == Faults(
        tempfail="rcpt",
        drop="after-data",
        starttls_refused=True,
        auth_advertised=False,
        banner_delay=1.5,
        cert="expired",
    )
    assert p.check_password("alice@example.org", SECRET)
    assert not p.check_password("alice@example.org", "another-one")
    assert not p.check_password("carol@example.org", SECRET)
    assert set(p.secrets()) == {SECRET, "another-one"}


def test_empty_profile_is_the_default_provider() -> None:
    p = parse_profile("", "empty.toml")
    assert p == Profile()
    assert (p.tls, p.auth, p.protocol, p.port, p.faults) == (
        "starttls-required",
        "required",
        "smtp",
        587,
        Faults(),
    )


@pytest.mark.parametrize(
    ("text", "times", "seconds"),
    [
        ('[faults]\ntempfail = "rcpt"\ntimes = 2\n', 2, None),
        ('[faults]\ndrop = "after-data"\nfor_seconds = 20\n', None, 20.0),
        ('[faults]\ntempfail = "data"\ndrop = "after-ehlo"\nfor_seconds = 0.5\n', None, 0.5),
        ('[faults]\ntempfail = "rcpt"\n', None, None),
    ],
)
def test_faults_that_heal_parse(text: str, times: int | None, seconds: float | None) -> None:
    faults = parse_profile(text).faults
    assert (faults.times, faults.for_seconds) == (times, seconds)


@pytest.mark.parametrize(
    ("domains", "sender", "allowed"),
    [
        ((), "anyone@anywhere.test", True),
        (("example.org",), "a@example.org", True),
        (("example.org",), "a@EXAMPLE.org", True),
        (("Example.Org",), "a@example.org", True),
        (("example.org",), "a@sub.example.org", False),
        (("example.org",), "a@example.org.evil.test", False),
        (("example.org",), "", False),
    ],
)
def test_sender_allowed(domains: tuple[str, ...], sender: str, allowed: bool) -> None:
    assert Profile(sender_domains=domains).sender_allowed(sender) is allowed


# Each case: the profile text, the field the error must name, its line, a fragment of the message.
ERRORS = [
    ('host = ""\n', "host", 1, "must not be empty"),
    ("host = 5\n", "host", 1, "must be of type str"),
    ('host = "a"\nport = 70000\n', "port", 2, "not a port number"),
    ('host = "a"\nport = 0\n', "port", 2, "not a port number"),
    ('port = "587"\n', "port", 1, "must be of type int"),
    ("port = true\n", "port", 1, "must be of type int"),
    ('\ntls = "starttls"\n', "tls", 2, "is not one of starttls-required, starttls-optional, implicit, none"),
    ('auth = "yes"\n', "auth", 1, "is not one of required, optional, none"),
    ('protocol = "esmtp"\n', "protocol", 1, "is not one of smtp, lmtp"),
    ('sender_domains = "example.org"\n', "sender_domains", 1, "must be of type list"),
    ('sender_domains = ["example.org", ""]\n', "sender_domains", 1, "list of domain names"),
    ('hots = "typo"\n', "hots", 1, "unknown field; known: auth, credentials, faults, host"),
    ('host = "a"\n[fautls]\ncert = "good"\n', "fautls", 2, "unknown field"),
    ("credentials = 5\n", "credentials", 1, "must be an array of tables"),
    ('[[credentials]]\npassword = "x"\n', "credentials[0].user", 1, "a user name is required"),
    ('[[credentials]]\nuser = ""\npassword = "x"\n', "credentials[0].user", 2, "a user name is required"),
    ('[[credentials]]\nuser = "u"\n', "credentials[0].password", 1, "password (or password_env) is required"),
    ('[[credentials]]\nuser = "u"\npassword = 42\n', "credentials[0].password", 3, "is required"),
    (
        '[[credentials]]\nuser = "u"\npassword = "x"\npassword_env = "X"\n',
        "credentials[0].password",
        3,
        "not both",
    ),
    ('[[credentials]]\nuser = "u"\npasword = "x"\n', "credentials[0].pasword", 3, "unknown field"),
    ("faults = 3\n", "faults", 1, "must be a table"),
    (
        '[faults]\ntempfail = "helo"\n',
        "faults.tempfail",
        2,
        "is not one of connect, ehlo, auth, mail, rcpt, data",
    ),
    ('[faults]\ndrop = "after-rcpt"\n', "faults.drop", 2, "is not one of after-ehlo, after-data"),
    ('[faults]\ncert = "revoked"\n', "faults.cert", 2, "is not one of good, wrong-host, expired"),
    ('[faults]\nstarttls_refused = "yes"\n', "faults.starttls_refused", 2, "must be of type bool"),
    ("[faults]\nauth_advertised = 0\n", "faults.auth_advertised", 2, "must be of type bool"),
    ("[faults]\nbanner_delay = -1\n", "faults.banner_delay", 2, "must be between 0 and 60"),
    ("[faults]\nbanner_delay = 600\n", "faults.banner_delay", 2, "must be between 0 and 60"),
    ('[faults]\nbanner_delay = "slow"\n', "faults.banner_delay", 2, "must be a number of seconds"),
    ("[faults]\nbanner_delay = true\n", "faults.banner_delay", 2, "must be a number of seconds"),
    ("[faults]\nslow = true\n", "faults.slow", 2, "unknown field"),
    ('tls = "none"\nfaults = { tempfail = "never" }\n', "faults.tempfail", 2, "is not one of"),
    ('tls = "none"\nfaults.tempfail = "never"\n', "faults.tempfail", 2, "is not one of"),
    ('[faults]\ntempfail = "rcpt"\ntimes = 0\n', "faults.times", 3, "between 1 and 100000"),
    ('[faults]\ntempfail = "rcpt"\ntimes = 2.5\n', "faults.times", 3, "whole number of times"),
    ('[faults]\ntempfail = "rcpt"\ntimes = true\n', "faults.times", 3, "whole number of times"),
    ('[faults]\ndrop = "after-data"\nfor_seconds = 0\n', "faults.for_seconds", 3, "more than 0"),
    ('[faults]\ndrop = "after-data"\nfor_seconds = 7200\n', "faults.for_seconds", 3, "at most 3600"),
    ('[faults]\ndrop = "after-data"\nfor_seconds = "20s"\n', "faults.for_seconds", 3, "number of seconds"),
    ('[faults]\ntempfail = "rcpt"\ntimes = 2\nfor_seconds = 5\n', "faults.for_seconds", 4, "not both"),
    ('[faults]\ncert = "good"\ntimes = 2\n', "faults.times", 3, "neither is set"),
    ("\n[faults]\nfor_seconds = 20\n", "faults.for_seconds", 3, "neither is set"),
    ('host = "a"\nport = 587\nport = 588\n', "toml", 3, ""),
    ('host = "a\n', "toml", 1, ""),
]


@pytest.mark.parametrize(
    ("text", "field", "line", "fragment"), ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_error_names_file_line_and_field(text: str, field: str, line: int, fragment: str) -> None:
    err = _error(text, "conf/provider.toml")
    assert (err.source, err.line, err.field) == ("conf/provider.toml", line, field)
    assert fragment in err.message
    assert str(err) == f"conf/provider.toml:{line}: {field}: {err.message}"
    assert "\n" not in str(err)


def test_error_points_into_the_right_table() -> None:
    """Same key names in several tables: the line is the one in the table the field belongs to."""
    text = """\
        [faults]
        cert = "good"

        [[credentials]]
        user = "alice@example.org"
        password = "one"

        [[credentials]]
        user = "bob@example.org"
        cert = "not a credential field"
        """
    err = _error(text)
    assert (err.field, err.line) == ("credentials[1].cert", 10)
    missing = _error(text.replace('cert = "not a credential field"', "").replace('password = "one"', ""))
    assert (missing.field, missing.line) == ("credentials[0].password", 4)  # its [[credentials]] header
    second = _error('[[credentials]]\nuser = "a"\npassword = "x"\n[[credentials]]\nuser = "b"\n')
    assert (second.field, second.line) == ("credentials[1].password", 4)


def test_load_profile_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "provider.toml"
    path.write_text('host = "a"\n\n[faults]\ndrop = "sometimes"\n', encoding="utf-8")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(err.value).startswith(f"{path}:4: faults.drop: ")


def test_load_profile_good_file(tmp_path: Path) -> None:
    path = tmp_path / "provider.toml"
    path.write_text(FULL, encoding="utf-8")
    assert load_profile(path) == parse_profile(FULL)


def test_unreadable_profile_is_a_profile_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ProfileError) as err:
        load_profile(missing)
    assert (err.value.line, err.value.field) == (None, "profile")
    assert str(err.value) == f"{missing}: profile: cannot read: No such file or directory"


# --- password_env and secrecy ------------------------------------------------------------------

ENV_PROFILE = '[[credentials]]\nuser = "alice@example.org"\npassword_env = "RH_TEST_SMARTHOST_PW"\n'


def test_password_env_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RH_TEST_SMARTHOST_PW", SECRET)
    p = parse_profile(ENV_PROFILE)
    assert p.credentials == (Credential("alice@example.org", SECRET),)
    assert p.check_password("alice@example.org", SECRET)


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_password_env_unset_or_empty_is_an_error(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("RH_TEST_SMARTHOST_PW", raising=False)
    else:
        monkeypatch.setenv("RH_TEST_SMARTHOST_PW", value)
    err = _error(ENV_PROFILE, "p.toml")
    assert (err.line, err.field) == (3, "credentials[0].password_env")
    assert "'RH_TEST_SMARTHOST_PW'" in err.message


def test_password_env_must_name_a_variable() -> None:
    err = _error('[[credentials]]\nuser = "u"\npassword_env = 7\n')
    assert (err.line, err.field) == (3, "credentials[0].password_env")


def test_passwords_never_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RH_TEST_SMARTHOST_PW", "from-the-env-" + SECRET)
    for p in (parse_profile(FULL), parse_profile(ENV_PROFILE)):
        for text in (repr(p), str(p), repr(p.credentials), str(p.credentials[0]), f"{p.credentials[0]!r}"):
            assert SECRET not in text
            assert "another-one" not in text
            assert "alice@example.org" in text  # the user name is not a secret


@pytest.mark.parametrize(
    "text",
    [
        f'[[credentials]]\nuser = "u"\npassword = "{SECRET}"\nbogus = 1\n',
        f'[[credentials]]\nuser = ""\npassword = "{SECRET}"\n',
        f'[[credentials]]\nuser = "u"\npassword = "{SECRET}"\npassword_env = "X"\n',
        f'[[credentials]]\nuser = "u"\npassword = "{SECRET}\n',  # unterminated string: a TOML error
        f'[[credentials]]\nuser = "u"\npassword = ["{SECRET}"]\n',
        f'[[credentials]]\nuser = "u"\npassword = "{SECRET}"\n[faults]\ncert = "{SECRET}"\n'.replace(
            f'cert = "{SECRET}"', 'cert = "bad"'
        ),
    ],
)
def test_errors_never_quote_a_password(text: str) -> None:
    err = _error(text)
    assert SECRET not in str(err)
