"""The emulated `smtpd -n`: the same output, line for line, as the real one on the same configs.

Each case pins smtpd 6.8's whole output (as printed by Debian's 6.8.0p2 here), so the
emulation is checked where no smtpd is installed; where it is, the real `smtpd -n` is run on the
same files and must print the pinned lines too, so a pin cannot drift from the real smtpd.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from smtpd_helpers import needs_smtpd, smtpd_check

from harness.targets.emulated import Declined
from harness.targets.emulated.config import load
from harness.targets.emulated.host import EmulatedHost, StoredFile

HEAD = "table aliases file:@DIR@/aliases\ntable secrets file:@DIR@/secrets\nlisten on 127.0.0.1\n"
LOCAL = 'action "local_mail" mbox alias <aliases>\n'
RELAY = (
    'action "outbound" relay host smtp+tls://perso@smtp.example.org:587 auth <secrets> '
    'mail-from "@example.org"\n'
)
MATCHES = 'match from local for local action "local_mail"\nmatch from local for any action "outbound"\n'
CLEAN = HEAD + LOCAL + RELAY + MATCHES
OK = ["configuration OK"]
FILES = {
    "aliases": b"root: alice\n",
    "secrets": b"perso alice@example.org:pw\n",
    "badmap": b"root: alice\njustakey\n",
    "empty": b"",
    "continued": b"team: alice,\n  bob\n",
    "ca.pem": b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
}

# name -> (config, smtpd -n's output with the temp dir as DIR and the config as smtpd.conf)
CASES: dict[str, tuple[str, list[str]]] = {
    "clean": (CLEAN, OK),
    "undefined-action": (
        HEAD + LOCAL + RELAY.replace('"outbound"', '"unbound"') + MATCHES,
        ["smtpd.conf:7: no such dispatcher: outbound"],
    ),
    "undefined-table": (
        HEAD.replace("table aliases file:@DIR@/aliases\n", "") + LOCAL + RELAY + MATCHES,
        ["smtpd.conf:3: no such table: aliases", "smtpd.conf:5: no such dispatcher: local_mail"],
    ),
    "table-after-use": (
        HEAD.replace("table aliases file:@DIR@/aliases\n", "")
        + LOCAL
        + "table aliases file:@DIR@/aliases\n"
        + RELAY
        + MATCHES,
        ["smtpd.conf:3: no such table: aliases", "smtpd.conf:6: no such dispatcher: local_mail"],
    ),
    "auth-before-host": (
        HEAD
        + LOCAL
        + 'action "outbound" relay auth <secrets> host smtp+tls://perso@smtp.example.org:587\n'
        + MATCHES,
        [
            "smtpd.conf:5: auth may not be specified without host on a dispatcher",
            "smtpd.conf:7: no such dispatcher: outbound",
        ],
    ),
    "duplicate-action": (
        HEAD + LOCAL + RELAY + 'action "outbound" relay\n' + MATCHES,
        ["smtpd.conf:6: dispatcher already declared with that name: outbound"],
    ),
    "duplicate-table": (
        HEAD + "table aliases file:@DIR@/aliases\n" + LOCAL + RELAY + MATCHES,
        ['smtpd: table_create: table "aliases" already defined'],
    ),
    "missing-file": (
        "table nope file:@DIR@/nope\n" + CLEAN,
        [
            "DIR/nope: fopen: No such file or directory",
            "smtpd.conf:1: invalid configuration file DIR/nope for table nope",
        ],
    ),
    "missing-db": (
        "table nope db:@DIR@/nope.db\n" + CLEAN,
        ["smtpd.conf:1: invalid configuration file DIR/nope.db for table nope"],
    ),
    "invalid-map-entry": (
        "table bad file:@DIR@/badmap\n" + CLEAN,
        [
            "DIR/badmap: invalid map entry line 2",
            "smtpd.conf:1: invalid configuration file DIR/badmap for table bad",
        ],
    ),
    "no-rules": (HEAD + LOCAL + RELAY, ["warn: no rules, nothing to do"]),
    "aliases-with-a-continuation-line": (
        "table cont file:@DIR@/continued\n"
        + HEAD
        + 'action "local_mail" mbox alias <cont>\n'
        + RELAY
        + MATCHES,
        [
            "DIR/continued: invalid map entry line 2",
            "smtpd.conf:1: invalid configuration file DIR/continued for table cont",
            'smtpd.conf:5: table "cont" may not be used for alias lookups',
            "smtpd.conf:7: no such dispatcher: local_mail",
        ],
    ),
    "ca-missing": ('ca p cert "@DIR@/nope.pem"\n' + CLEAN, ["smtpd: load_pki_tree: failed to load CA file"]),
    "ca-present": ('ca p cert "@DIR@/ca.pem"\n' + CLEAN, OK),
    "pki-missing": (
        'pki p cert "@DIR@/nope.pem"\npki p key "@DIR@/nope.key"\n' + CLEAN,
        ["smtpd: load_pki_tree: failed to load certificate file"],
    ),
    "duplicate-mail-from": (
        HEAD + LOCAL + RELAY.replace('mail-from "@example.org"', 'mail-from "@a" mail-from "@b"') + MATCHES,
        [
            "smtpd.conf:5: mail-from already specified for this dispatcher",
            "smtpd.conf:7: no such dispatcher: outbound",
        ],
    ),
    "duplicate-tls": (
        HEAD + LOCAL + RELAY.replace("mail-from", "tls tls mail-from") + MATCHES,
        [
            "smtpd.conf:5: tls already specified for this dispatcher",
            "smtpd.conf:7: no such dispatcher: outbound",
        ],
    ),
    "duplicate-helo": (
        HEAD + LOCAL + RELAY.replace("mail-from", "helo a helo b mail-from") + MATCHES,
        [
            "smtpd.conf:5: helo already specified for this dispatcher",
            "smtpd.conf:7: no such dispatcher: outbound",
        ],
    ),
    "syntax-then-semantic": (
        HEAD + LOCAL + RELAY + 'foo bar\nmatch from local for any action "nope"\n' + MATCHES,
        ["smtpd.conf:6: syntax error", "smtpd.conf:7: no such dispatcher: nope"],
    ),
    "socket-twice": (
        "listen on socket\n" + HEAD + "listen on socket\n" + LOCAL + RELAY + MATCHES,
        ["smtpd.conf:5: socket listener already configured"],
    ),
    "user-on-mbox": (
        HEAD + 'action "local_mail" mbox alias <aliases> user nobody\n' + RELAY + MATCHES,
        [
            "smtpd.conf:4: user may not be specified for this dispatcher",
            "smtpd.conf:6: no such dispatcher: local_mail",
        ],
    ),
    "alias-table-is-a-list": (
        HEAD + "table lst { a, b }\n" + 'action "local_mail" mbox alias <lst>\n' + RELAY + MATCHES,
        [
            'smtpd.conf:5: table "lst" may not be used for alias lookups',
            "smtpd.conf:7: no such dispatcher: local_mail",
        ],
    ),
    "auth-table-is-a-list": (
        HEAD + "table lst { a, b }\n" + LOCAL + RELAY.replace("<secrets>", "<lst>") + MATCHES,
        [
            'smtpd.conf:6: table "lst" may not be used for auth lookups',
            "smtpd.conf:8: no such dispatcher: outbound",
        ],
    ),
    "for-domain-table-is-a-map": (
        HEAD + LOCAL + RELAY + 'match from local for domain <aliases> action "outbound"\n' + MATCHES,
        ["smtpd.conf:6: table \"aliases\" may not be used for 'for' lookups"],
    ),
    "alias-and-virtual": (
        HEAD + 'action "local_mail" mbox alias <aliases> virtual <aliases>\n' + RELAY + MATCHES,
        [
            "smtpd.conf:4: alias mapping already specified for this dispatcher",
            "smtpd.conf:6: no such dispatcher: local_mail",
        ],
    ),
    "macro-undefined": (
        HEAD + LOCAL + RELAY.replace("smtp+tls://perso@smtp.example.org:587", "$nope") + MATCHES,
        [
            "smtpd.conf:5: macro 'nope' not defined",
            "smtpd.conf:5: syntax error",
            "smtpd.conf:7: no such dispatcher: outbound",  # line 6 went with the error's recovery
            "warn: no rules, nothing to do",
        ],
    ),
    "pre-6.4-accept": (
        HEAD
        + LOCAL
        + RELAY
        + "accept from local for any relay via smtp+tls://perso@smtp.example.org:587\n"
        + MATCHES,
        ["smtpd.conf:6: syntax error"],
    ),
    "from-twice": (
        HEAD + LOCAL + RELAY + 'match from local from any for any action "outbound"\n' + MATCHES,
        ["smtpd.conf:6: from already specified for this rule"],
    ),
    "unknown-statement": ("frobnicate on\n" + CLEAN, ["smtpd.conf:1: syntax error"]),
    "relative-table-path": (
        "table x file:relative\n" + CLEAN,
        ["smtpd.conf:1: invalid backend parameter for table: x"],
    ),
    # A syntax error after tokens that already make a statement: yacc has reduced it (the
    # action declared, the rule added, the table made) before it reads the token that cannot
    # follow, so later lines that use it are no error; a statement cut short is not made.
    "token-after-a-whole-action": (
        HEAD + LOCAL + RELAY.replace("\n", " bogus\n") + MATCHES,
        ["smtpd.conf:5: syntax error"],
    ),
    "token-inside-a-relay-action": (
        HEAD + LOCAL + RELAY.replace(" auth <secrets>", " bogus auth <secrets>") + MATCHES,
        ["smtpd.conf:5: syntax error"],
    ),
    "token-after-an-action-declared-again": (
        HEAD + LOCAL.replace("\n", " bogus\n") + LOCAL + RELAY + MATCHES,
        [
            "smtpd.conf:4: syntax error",
            "smtpd.conf:5: dispatcher already declared with that name: local_mail",
        ],
    ),
    "alias-without-its-table": (
        HEAD + 'action "local_mail" mbox alias\n' + RELAY + MATCHES,
        ["smtpd.conf:4: syntax error", "smtpd.conf:6: no such dispatcher: local_mail"],
    ),
    "token-after-the-only-match": (
        HEAD + LOCAL + 'match from local for local action "local_mail" bogus\n',
        ["smtpd.conf:5: syntax error"],
    ),
    "token-inside-the-only-match": (
        HEAD + LOCAL + 'match from local bogus for local action "local_mail"\n',
        ["smtpd.conf:5: syntax error", "warn: no rules, nothing to do"],
    ),
    "token-after-an-undefined-action": (
        HEAD + LOCAL + RELAY + 'match from local for any action "nosuch" bogus\n' + MATCHES,
        ["smtpd.conf:6: no such dispatcher: nosuch"],
    ),
    "list-broken-after-a-comma": (
        HEAD.replace("listen", "table domains { example.com,\n  example.net }\nlisten")
        + LOCAL
        + RELAY
        + 'match from local for domain <domains> action "outbound"\n'
        + MATCHES,
        ["smtpd.conf:3: syntax error"],
    ),
    # A keyword is no interface name; quoted, it is one (that the host does not have):
    "listen-on-any": (
        HEAD.replace("listen on 127.0.0.1", "listen on any") + LOCAL + RELAY + MATCHES,
        ["smtpd.conf:3: syntax error"],
    ),
    "listen-on-local": (
        HEAD.replace("listen on 127.0.0.1", "listen on local") + LOCAL + RELAY + MATCHES,
        ["smtpd.conf:3: syntax error"],
    ),
    "listen-on-quoted-any": (
        HEAD.replace("listen on 127.0.0.1", 'listen on "any"') + LOCAL + RELAY + MATCHES,
        ["smtpd: invalid virtual ip or interface: any"],
    ),
    # A listener's pki, checked as the listener is made (before anything else is read):
    "listen-pki-not-declared": (
        HEAD.replace("listen on 127.0.0.1", "listen on 127.0.0.1 tls pki Mail.Example.Org")
        + LOCAL
        + RELAY
        + MATCHES,
        ["pki name not found: Mail.Example.Org", "smtpd"],
    ),
    "listen-pki-declared-below": (
        HEAD.replace("listen on 127.0.0.1", "listen on 127.0.0.1 tls pki mail.example.org")
        + "pki mail.example.org cert /nonexistent.pem\nbogus\n"
        + LOCAL
        + RELAY
        + MATCHES,
        ["pki name not found: mail.example.org", "smtpd"],
    ),
    "listen-pki-without-tls": (
        HEAD.replace("listen on 127.0.0.1", "listen on 127.0.0.1 pki mail.example.org")
        + LOCAL
        + RELAY
        + MATCHES,
        ["smtpd: invalid listen option: pki requires tls/smtps"],
    ),
    # Accepted by smtpd -n, with what they mean decided later (at start, or per message):
    "match-tls": (HEAD + LOCAL + RELAY + 'match from local tls for any action "outbound"\n' + MATCHES, OK),
    "listen-on-an-address": (HEAD + "listen on 192.0.2.1\n" + LOCAL + RELAY + MATCHES, OK),
    "queue-compression": ("queue compression\n" + CLEAN, OK),
    "empty-alias-file": (
        "table empty file:@DIR@/empty\n"
        + HEAD
        + 'action "local_mail" mbox alias <empty>\n'
        + RELAY
        + MATCHES,
        OK,
    ),
    "reject": (HEAD + LOCAL + RELAY + 'match from any for domain "spam.example" reject\n' + MATCHES, OK),
    "label-on-smtp": (CLEAN.replace("smtp+tls://perso@", "smtp://perso@"), OK),
}


def emulated_output(tmp_path: Path, text: str) -> list[str]:
    host = EmulatedHost()
    for name, content in FILES.items():
        host.files[f"{tmp_path}/{name}"] = StoredFile(content, 0o644, "root", "root")
    loaded = load(text.replace("@DIR@", str(tmp_path)), f"{tmp_path}/smtpd.conf", host)
    output = loaded.check.output.replace(f"{tmp_path}/smtpd.conf", "smtpd.conf").replace(str(tmp_path), "DIR")
    return output.splitlines()


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_smtpd_n_prints_what_smtpd_prints(tmp_path: Path, name: str) -> None:
    text, expected = CASES[name]
    assert emulated_output(tmp_path, text) == expected


@needs_smtpd
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_pinned_output_is_the_real_smtpds(tmp_path: Path, name: str) -> None:
    text, expected = CASES[name]
    for file, content in FILES.items():
        (tmp_path / file).write_bytes(content)
    rc, output = smtpd_check(tmp_path, text)
    assert [line.replace(str(tmp_path), "DIR") for line in output] == expected
    assert (rc == 0) == (expected == OK)


def test_the_refusal_names_line_and_message_as_the_check_reads_them(tmp_path: Path) -> None:
    host = EmulatedHost()
    for name, content in FILES.items():
        host.files[f"{tmp_path}/{name}"] = StoredFile(content, 0o644, "root", "root")
    text, _ = CASES["auth-before-host"]
    check = load(text.replace("@DIR@", str(tmp_path)), "/etc/smtpd.conf", host).check
    assert (check.ok, check.line, check.message) == (
        False,
        5,
        "auth may not be specified without host on a dispatcher",
    )


# The interfaces are a lab test host's (lo, lo0, eth0), not this machine's. Installing a bundle
# makes what its listen lines name (EmulatedHost.provide, as LabHost.provide); `smtpd -n` on a
# host without an interface refuses it.
@pytest.mark.parametrize(
    ("interface", "expected"),
    [
        ("lo0", OK),
        ("lo", OK),
        ("eth0", OK),
        ("localhost", OK),
        ("::1", OK),
        ("eth9", ["smtpd: invalid virtual ip or interface: eth9"]),
    ],
)
def test_listen_on_the_test_hosts_interfaces(tmp_path: Path, interface: str, expected: list[str]) -> None:
    assert (
        emulated_output(tmp_path, CLEAN.replace("listen on 127.0.0.1", f"listen on {interface}")) == expected
    )


@pytest.mark.parametrize(
    ("text", "construct", "line"),
    [
        ("table x sqlite:@DIR@/x.conf\n" + CLEAN, "table backend sqlite:", 1),
        ('include "@DIR@/more.conf"\n' + CLEAN, "`include` (another file)", 1),
        (CLEAN.replace("mbox alias <aliases>", 'mda "/usr/bin/procmail"'), "local delivery `mda`", 4),
        (CLEAN.replace("mbox alias <aliases>", "maildir"), "local delivery `maildir`", 4),
        (CLEAN.replace('mail-from "@example.org"', "srs"), "relay option `srs`", 5),
        (CLEAN.replace("listen on 127.0.0.1", "listen on 127.0.0.1 tls"), "listen option `tls`", 3),
        (CLEAN.replace(" host smtp+tls://perso@smtp.example.org:587 auth <secrets>", ""), "relaying", 5),
        ("smtp limit max-mails 10\n" + CLEAN, "`smtp limit max-mails 10`", 1),
        (CLEAN.replace("match from local for local", "match from rdns for local"), "match condition", 6),
    ],
)
def test_what_the_model_lacks_is_declined_with_its_line(
    tmp_path: Path, text: str, construct: str, line: int
) -> None:
    with pytest.raises(Declined) as declined:
        emulated_output(tmp_path, text)
    assert construct in declined.value.construct and declined.value.line == line
    assert str(declined.value).startswith("emulated target cannot model ")
    assert str(declined.value).endswith(f" at line {line}: use --target lab")


def test_a_refusal_before_anything_unmodelled_is_still_reported(tmp_path: Path) -> None:
    text = HEAD + LOCAL + RELAY.replace('"outbound"', '"unbound"') + MATCHES + "smtp limit max-mails 10\n"
    assert emulated_output(tmp_path, text) == ["smtpd.conf:7: no such dispatcher: outbound"]
