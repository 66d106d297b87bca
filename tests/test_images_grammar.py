"""The harness's two grammars against the two real smtpds: 6.8 (this machine) and 7.6 (trixie image).

Each construct 7.x added is run through both `smtpd -n`s and both grammars of the parser: the
parser must refuse exactly where that release's smtpd refuses, on the line it blames, and accept
where it accepts. The 7.6 smtpd runs chrooted into the image with a private /tmp mounted in a
mount namespace of its own, so the shared image is never written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from smtpd_helpers import smtpd_n

from harness.smtpdconf import ConfigSyntaxError, parse_config
from harness.smtpdconf.parse import grammar_for
from harness.targets.images import Image, use_image

RELAY = 'action "r" relay\nmatch from local for any action "r"\n'
CASES = {
    # name: (config, line 6.8's smtpd blames or None for OK, same for 7.6)
    "relay-protocols": (
        'listen on lo\naction "r" relay host smtp+tls://smtp.example.net:587 protocols "tlsv1.2"\n'
        'match from local for any action "r"\n',
        2,
        None,
    ),
    "relay-ciphers": (
        'listen on lo\naction "r" relay host smtp+tls://smtp.example.net:587 ciphers "HIGH"\n'
        'match from local for any action "r"\n',
        2,
        None,
    ),
    "socket-no-dsn": ("listen on socket no-dsn\n" + RELAY, 1, None),
    "socket-mask-src": ("listen on socket mask-src\n" + RELAY, None, None),
    "socket-tls": ("listen on socket tls\n" + RELAY, 1, 1),
    "list-after-comma": (
        'table t { "a@example.org",\n  "b@example.org" }\nlisten on lo\n'
        'action "r" relay\nmatch from local mail-from <t> for any action "r"\n',
        1,
        None,
    ),
    "list-after-brace": (
        'table t {\n  "a@example.org" "b@example.org"\n}\nlisten on lo\n'
        'action "r" relay\nmatch from local mail-from <t> for any action "r"\n',
        1,
        None,
    ),
    "list-newline-separated": (
        'table t { "a@example.org"\n  "b@example.org" }\nlisten on lo\n'
        'action "r" relay\nmatch from local mail-from <t> for any action "r"\n',
        None,
        None,
    ),
}


def _needs(path: str, why: str) -> None:
    if os.geteuid() != 0 or not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"cannot run under CI: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="module")
def trixie() -> Iterator[Image]:
    _needs("/usr/sbin/smtpd", "needs root and OpenSMTPD")
    if shutil.which("debootstrap") is None:
        _needs("/nonexistent", "debootstrap is not installed: apt-get install debootstrap")
    lease = use_image("trixie")
    try:
        yield lease.image
    finally:
        lease.close()


def _parser_line(text: str, grammar: str) -> int | None:
    try:
        parse_config(text, "/tmp/smtpd.conf", grammar=grammar)
    except ConfigSyntaxError as exc:
        return exc.line
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_grammars_agree_with_both_smtpds(name: str, trixie: Image, tmp_path: Path) -> None:
    text, line_68, line_76 = CASES[name]
    for grammar, root, line in (("6.8", None, line_68), ("7.6", trixie.root, line_76)):
        rc, output = smtpd_n(text, tmp_path, root)
        assert (rc == 0) == (line is None), f"{grammar} smtpd: {output}"
        if line is not None:
            assert f"smtpd.conf:{line}: syntax error" in output, f"{grammar} smtpd: {output}"
        assert _parser_line(text, grammar) == line, f"parser ({grammar} grammar) vs smtpd {output!r}"


def test_listen_tls_settings_are_options_in_7_6_and_unknown_in_6_8(trixie: Image, tmp_path: Path) -> None:
    """The listen parser is lenient by design (the linter names unknown options): 6.8's smtpd
    refuses `protocols` on a listener, and the 6.8 grammar leaves both words unknown."""
    text = 'listen on lo protocols "tlsv1.3" ciphers "HIGH"\n' + RELAY
    rc, output = smtpd_n(text, tmp_path)
    assert rc == 1 and "smtpd.conf:1: syntax error" in output
    assert smtpd_n(text, tmp_path, trixie.root) == (0, "configuration OK\n")
    old = parse_config(text, grammar="6.8").listens[0]
    new = parse_config(text, grammar="7.6").listens[0]
    assert old.unknown_options == ("protocols", "tlsv1.3", "ciphers", "HIGH")
    assert new.unknown_options == () and new.options == ("protocols", "tlsv1.3", "ciphers", "HIGH")


def test_listen_tls_without_pki_is_a_7_6_refusal_that_the_parser_leaves_to_smtpd(
    trixie: Image, tmp_path: Path
) -> None:
    """Not grammar but a check after parsing: 7.6 names no line, and the parser accepts both."""
    text = "listen on lo tls\n" + RELAY
    assert smtpd_n(text, tmp_path) == (0, "configuration OK\n")
    rc, output = smtpd_n(text, tmp_path, trixie.root)
    assert rc == 1 and "invalid listen option: pki required for tls/smtps" in output
    assert _parser_line(text, "6.8") is None and _parser_line(text, "7.6") is None


@pytest.mark.parametrize(
    ("version", "grammar"),
    [
        ("OpenSMTPD 6.8.0-portable", "6.8"),
        ("OpenSMTPD 7.6.0-portable", "7.6"),
        ("7.6.0p1-1", "7.6"),
        ("OpenSMTPD 7.8.0-portable", "7.6"),
        ("OpenSMTPD 6.6.4", "6.8"),
        ("", "6.8"),
    ],
)
def test_grammar_for_a_version(version: str, grammar: str) -> None:
    assert grammar_for(version) == grammar


def test_unknown_grammar_is_refused() -> None:
    with pytest.raises(ValueError, match=r"grammar '7\.0': one of 6\.8, 7\.6"):
        parse_config(RELAY, grammar="7.0")


# As 7.6 printed them here: the dispatcher gave up, then the others noticed (in either order).
PROTOCOLS_FAILURE = [
    "queue: queue compression enabled",  # log_info() of `queue compression`, before the failure
    "setup_done: lka[21617] done",
    "mta_postfork: r",
    'dispatcher: failed to parse protocols "tlsv1.9"',
    "setup_done: dispatcher[21618] done",
    "smtpd: setup done",
    "smtpd: process control socket closed",
]
CIPHERS_FAILURE = [
    "queue: done loading queue into scheduler",
    "dispatcher: no ciphers for 'NOSUCH'",
    "warn: parent -> dispatcher: imsg_read: Connection reset by peer",
    "smtpd: exiting: Connection reset by peer",
]
NO_REASON = ["smtpd: setup done", "smtpd: process lka socket closed", "warn: parent -> lka: imsg_read: x"]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (PROTOCOLS_FAILURE, 'dispatcher: failed to parse protocols "tlsv1.9"'),
        (CIPHERS_FAILURE, "dispatcher: no ciphers for 'NOSUCH'"),
        (NO_REASON, None),
    ],
)
def test_why_smtpd_exited_while_starting(lines: list[str], reason: str | None) -> None:
    from harness.targets.smtpd import start_failure

    assert start_failure(lines) == reason
