"""Bad input, hand-written: every command refuses it with one clear line, exit 2, no traceback.

Each case is one hostile or malformed input to one command, with everything else right: what
must be named in the error (the file, line, field or host, and the cause). The verdict is in
`bad_input_helpers.problems`: exit 2, one line on stderr, nothing on stdout, no traceback, no
test host built (these are all refused before any work starts), nothing left running, nothing
in the workspace created or changed. Commands run through a fork server (`cli_runner`), a fresh
process each, about 20 ms a case.

The classes (issue 15, section 1): files that are not text or cannot be read, profile hosts that
are not DNS names, output paths that cannot be written, `--table` mistakes and hostile tables,
`accept` against peers that do not speak SSH, malformed scenarios, and argument values.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_input_helpers import (
    GOOD_CONF,
    GOOD_PROFILE,
    GOOD_SCENARIO,
    PEER_KINDS,
    TRACEBACK,
    NotSshPeers,
    Workspace,
    changes,
    closed_port,
    edit,
    problems,
    snapshot,
    workspace,
)
from cli_runner import CliRunner

RUNNING = r"relay-harness upstream: listening on"  # a server that started: stopped, and a failure
ACCEPT_TIMEOUT = 2  # --connect-timeout of the accept cases against peers that never answer


@dataclass(frozen=True)
class Case:
    kind: str  # the class of bad input (the list), for counting
    name: str
    build: Callable[[Workspace], list[str]]
    expect: tuple[str, ...]  # regexes the one error line must match
    timeout: float = 8.0
    env: tuple[tuple[str, str], ...] = ()


CASES: list[Case] = []


def case(kind: str, name: str, *expect: str, timeout: float = 8.0, **env: str) -> Callable[..., object]:
    def register(build: Callable[[Workspace], list[str]]) -> Callable[[Workspace], list[str]]:
        CASES.append(Case(kind, name, build, expect, timeout, tuple(env.items())))
        return build

    return register


NOT_UTF8 = b'host = "smtp.example.net"\n# caf\xe9 \xff\xfe\n'
BINARY = bytes(range(256)) * 8
NUL_TEXT = "listen on socket\n\0\0\0\n"
PROC_MEM = "/proc/self/mem"  # a regular file by stat, whose read fails (EIO)
SECRET_LINE = "perso u:p\n"
DOMAIN_LINE = "example.org\n"
FIRST_LINE = "# first\n"


# == 1. files that are not text, or cannot be read =================================================
# Each place a file is read: profile (check, upstream, accept), smtpd.conf, tables, scenario and
# its config_file, --baseline, --identity, --known-hosts.
def _profile_argvs(w: Workspace, profile: str) -> dict[str, list[str]]:
    return {
        "check": w.check(profile=profile),
        "upstream": ["upstream", "--profile", profile, "--listen", "127.0.0.1:0", "--certs", w.dir("certs")],
        "accept": ["accept", f"ssh://root@127.0.0.1:{closed_port()}", "--upstream", profile],
    }


for command in ("check", "upstream", "accept"):

    def _with(content: bytes, command: str = command) -> Callable[[Workspace], list[str]]:
        return lambda w: _profile_argvs(w, w.profile(content))[command]

    case("unreadable", f"{command}-profile-not-utf8", r"provider\.toml:2", "UTF-8")(_with(NOT_UTF8))
    case("unreadable", f"{command}-profile-binary", r"provider\.toml", "UTF-8|NUL|binary")(_with(BINARY))
    case("unreadable", f"{command}-profile-nul", r"provider\.toml:2", "NUL")(_with(b"port = 587\n\0 = 1\n"))
    case("unreadable", f"{command}-profile-directory", r"profile\.d", "directory")(
        lambda w, command=command: _profile_argvs(w, w.dir("profile.d"))[command]
    )
    case("unreadable", f"{command}-profile-fifo", r"profile\.fifo", "not a regular file|FIFO")(
        lambda w, command=command: _profile_argvs(w, w.fifo("profile.fifo"))[command]
    )
    case("unreadable", f"{command}-profile-proc-mem", re.escape(PROC_MEM), "cannot read")(
        lambda w, command=command: _profile_argvs(w, PROC_MEM)[command]
    )
    case("unreadable", f"{command}-profile-huge", r"huge\.toml", "too large")(
        lambda w, command=command: _profile_argvs(w, w.sparse("huge.toml"))[command]
    )


@case("unreadable", "config-not-utf8", r"smtpd\.conf:3", "UTF-8")
def _(w: Workspace) -> list[str]:
    return w.check(config=w.config(b"listen on socket\n#\n# \xe9t\xe9\n"))


@case("unreadable", "config-binary", r"smtpd\.conf", "UTF-8|NUL|binary")
def _(w: Workspace) -> list[str]:
    return w.check(config=w.config(BINARY))


@case("unreadable", "config-nul", r"smtpd\.conf:2", "NUL")
def _(w: Workspace) -> list[str]:
    return w.check(config=w.config(NUL_TEXT))


@case("unreadable", "config-directory", r"conf\.d", "directory")
def _(w: Workspace) -> list[str]:
    return w.check(config=w.dir("conf.d"))


@case("unreadable", "config-fifo", r"smtpd\.fifo", "not a regular file|FIFO")
def _(w: Workspace) -> list[str]:
    return w.check(config=w.fifo("smtpd.fifo"))


@case("unreadable", "config-proc-mem", re.escape(PROC_MEM), "cannot read")
def _(w: Workspace) -> list[str]:
    return w.check(config=PROC_MEM)


@case("unreadable", "config-huge", r"huge\.conf", "too large")
def _(w: Workspace) -> list[str]:
    return w.check(config=w.sparse("huge.conf"))


@case("unreadable", "config-missing", r"nope\.conf", "No such file")
def _(w: Workspace) -> list[str]:
    return w.check(config=str(w.path("nope.conf")))


for table in ("aliases", "secrets"):

    def _table(make: Callable[[Workspace], str], table: str = table) -> Callable[[Workspace], list[str]]:
        def build(w: Workspace) -> list[str]:
            other = "secrets" if table == "aliases" else "aliases"
            good = w.file(f"good-{other}", "root: alice\n" if other == "aliases" else "perso u:p\n")
            return w.check("--table", f"{table}={make(w)}", "--table", f"{other}={good}")

        return build

    case("unreadable", f"table-{table}-not-utf8", rf"{table}\.bad:2", "UTF-8")(
        _table(lambda w, t=table: w.file(f"{t}.bad", b"# ok\nroot: \xe9lise\n"))
    )
    case("unreadable", f"table-{table}-nul", rf"{table}\.bad:1", "NUL")(
        _table(lambda w, t=table: w.file(f"{t}.bad", b"root\0: alice\n"))
    )
    case("unreadable", f"table-{table}-binary", rf"{table}\.bad", "UTF-8|NUL|binary")(
        _table(lambda w, t=table: w.file(f"{t}.bad", BINARY))
    )
    case("unreadable", f"table-{table}-directory", rf"{table}\.d", "directory")(
        _table(lambda w, t=table: w.dir(f"{t}.d"))
    )
    case("unreadable", f"table-{table}-fifo", rf"{table}\.fifo", "not a regular file|FIFO")(
        _table(lambda w, t=table: w.fifo(f"{t}.fifo"))
    )
    case("unreadable", f"table-{table}-proc-mem", re.escape(PROC_MEM), "cannot read")(
        _table(lambda w: PROC_MEM)
    )
    case("unreadable", f"table-{table}-huge", rf"{table}\.huge", "too large")(
        _table(lambda w, t=table: w.sparse(f"{t}.huge"))
    )
    case("unreadable", f"table-{table}-missing", rf"{table}\.nope", "No such file")(
        _table(lambda w, t=table: str(w.path(f"{t}.nope")))
    )


@case("unreadable", "scenario-not-utf8", r"bad\.toml:2", "UTF-8")
def _(w: Workspace) -> list[str]:
    return w.scenario(b'description = "x"\n# \xe9\n')


@case("unreadable", "scenario-binary", r"bad\.toml", "UTF-8|NUL|binary")
def _(w: Workspace) -> list[str]:
    return w.scenario(BINARY)


@case("unreadable", "scenario-nul", r"bad\.toml:1", "NUL")
def _(w: Workspace) -> list[str]:
    return w.scenario('description = "a\0b"\n' + GOOD_SCENARIO.split("\n", 1)[1])


@case("unreadable", "scenario-huge", r"bad\.toml", "too large")
def _(w: Workspace) -> list[str]:
    w.dir("lib")
    w.sparse("lib/bad.toml")
    return ["scenarios", str(w.path("lib"))]


@case("unreadable", "scenario-fifo", r"bad\.toml", "not a regular file|FIFO")
def _(w: Workspace) -> list[str]:
    w.dir("lib")
    w.fifo("lib/bad.toml")
    return ["scenarios", str(w.path("lib"))]


def _config_file(target: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    def build(w: Workspace) -> list[str]:
        path = target(w)
        text = GOOD_SCENARIO.split("\n", 1)[1]
        start, end = text.index("config = '''"), text.index("'''\n", text.index("config = '''") + 12) + 4
        return w.scenario(text[:start] + f"config_file = {json.dumps(path)}\n" + text[end:])

    return build


case("unreadable", "scenario-config-file-not-utf8", r"bad\.conf:2", "UTF-8")(
    _config_file(lambda w: w.file("bad.conf", b"listen on socket\n# \xe9\n"))
)
case("unreadable", "scenario-config-file-nul", r"bad\.conf:1", "NUL")(
    _config_file(lambda w: w.file("bad.conf", b"listen\0 on socket\n"))
)
case("unreadable", "scenario-config-file-directory", r"bad\.toml:\d+: config_file", "directory")(
    _config_file(lambda w: w.dir("conf.d"))
)
case("unreadable", "scenario-config-file-fifo", r"bad\.toml:\d+: config_file", "not a regular file|FIFO")(
    _config_file(lambda w: w.fifo("conf.fifo"))
)
case("unreadable", "scenario-config-file-proc-mem", r"config_file", "cannot read")(
    _config_file(lambda w: PROC_MEM)
)
case("unreadable", "scenario-config-file-huge", r"config_file", "too large")(
    _config_file(lambda w: w.sparse("huge.conf"))
)


def _accept(w: Workspace, *extra: str) -> list[str]:
    """accept against a port nothing listens on: only input checked before connecting passes it."""
    return ["accept", f"ssh://root@127.0.0.1:{closed_port()}", *extra]


for label, content, says in (
    ("not-utf8", b'{"format": 1, "host": "caf\xe9"}\n', ("baseline\\.json", "UTF-8")),
    ("binary", BINARY, ("baseline\\.json", "UTF-8|NUL|binary")),
    ("not-json", b"format = 1\n", ("baseline\\.json:1", "not JSON")),
    ("json-list", b"[1, 2]\n", ("baseline\\.json", "not a relay-harness baseline")),
    ("deeply-nested", b"[" * 200_000 + b"]" * 200_000, ("baseline\\.json", "not JSON|nested|baseline")),
    ("huge-number", b'{"format": 1' + b"0" * 5000 + b"}", ("baseline\\.json", "not JSON|baseline")),
):
    case("unreadable", f"accept-baseline-{label}", *says)(
        lambda w, c=content: _accept(w, "--baseline", w.file("baseline.json", c))
    )
case("unreadable", "accept-baseline-directory", r"baseline\.d", "directory")(
    lambda w: _accept(w, "--baseline", w.dir("baseline.d"))
)
case("unreadable", "accept-baseline-fifo", r"baseline\.fifo", "not a regular file|FIFO")(
    lambda w: _accept(w, "--baseline", w.fifo("baseline.fifo"))
)
case("unreadable", "accept-baseline-proc-mem", re.escape(PROC_MEM), "cannot read")(
    lambda w: _accept(w, "--baseline", PROC_MEM)
)
case("unreadable", "accept-baseline-huge", r"baseline\.huge", "too large")(
    lambda w: _accept(w, "--baseline", w.sparse("baseline.huge"))
)

for label, content in (
    ("not-utf8", b"-----BEGIN OPENSSH PRIVATE KEY-----\n\xe9\xff\n-----END OPENSSH PRIVATE KEY-----\n"),
    ("binary", BINARY),
    ("empty", b""),
    ("public-key", b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3bMm9+1lpcLCgV3pQeSJB4k0pPzaUcd5LS0Xcq0ZSk x@y\n"),
    ("pem-garbage", b"-----BEGIN RSA PRIVATE KEY-----\nnot base64 at all\n-----END RSA PRIVATE KEY-----\n"),
):
    case("unreadable", f"accept-identity-{label}", r"--identity .*id_key", "private key")(
        lambda w, c=content: _accept(w, "--identity", w.file("id_key", c))
    )
case("unreadable", "accept-identity-directory", r"--identity .*id\.d", "directory")(
    lambda w: _accept(w, "--identity", w.dir("id.d"))
)
case("unreadable", "accept-identity-fifo", r"--identity .*id\.fifo", "not a regular file|FIFO")(
    lambda w: _accept(w, "--identity", w.fifo("id.fifo"))
)
case("unreadable", "accept-identity-proc-mem", re.escape(PROC_MEM), "cannot read")(
    lambda w: _accept(w, "--identity", PROC_MEM)
)
case("unreadable", "accept-known-hosts-not-utf8", r"known_hosts", "UTF-8")(
    lambda w: _accept(w, "--known-hosts", w.file("known_hosts", b"127.0.0.1 ssh-ed25519 \xe9\xff\n"))
)
case("unreadable", "accept-known-hosts-directory", r"known\.d", "directory")(
    lambda w: _accept(w, "--known-hosts", w.dir("known.d"))
)
case("unreadable", "accept-known-hosts-fifo", r"known\.fifo", "not a regular file|FIFO")(
    lambda w: _accept(w, "--known-hosts", w.fifo("known.fifo"))
)


# == 2. a profile host that is not a DNS name =========================================================
BAD_HOSTS = {
    "space": "smtp example.net",
    "empty-label": "smtp..example.net",
    "leading-dot": ".example.net",
    "leading-hyphen": "-smtp.example.net",
    "long-name": ".".join(["a" * 60] * 5),  # 304 characters
    "long-label": "a" * 64 + ".example.net",
    "newline": "smtp.example.net\nevil",
    "nul": "smtp\u0000example.net",
    "non-ascii": "smtp.exämple.net",
    "slash": "../../escape",
    "url": "smtp://smtp.example.net",
    "port": "smtp.example.net:587",
}
for label, host in BAD_HOSTS.items():
    text = edit(GOOD_PROFILE, 'host = "smtp.example.net"', f"host = {json.dumps(host)}")
    for command in ("check", "upstream", "accept"):
        case(
            "dns-name", f"{command}-profile-host-{label}", r"provider\.toml:\d+: host", "DNS name|host name"
        )(lambda w, t=text, c=command: _profile_argvs(w, w.profile(t))[c])
    case(
        "dns-name", f"scenario-upstream-host-{label}", r"bad\.toml:\d+: upstream\.host", "DNS name|host name"
    )(
        lambda w, h=host: w.scenario(
            edit(GOOD_SCENARIO, 'host = "smtp.example.net"', f"host = {json.dumps(h)}")
        )
    )
for label, host in (("slash", "../escape"), ("space", "a b"), ("empty", ""), ("nul", "a\0b")):
    case("dns-name", f"certs-host-{label}", "host|DNS name")(
        lambda w, h=host: ["certs", "--certs", w.dir("pki/certs"), h]
    )
case("dns-name", "profile-sender-domain-space", r"provider\.toml:\d+: sender_domains", "DNS name|domain")(
    lambda w: w.check(profile=w.profile(edit(GOOD_PROFILE, '["example.org"]', '["example org"]')))
)
case("dns-name", "profile-sender-domain-at", r"provider\.toml:\d+: sender_domains", "DNS name|domain")(
    lambda w: w.check(profile=w.profile(edit(GOOD_PROFILE, '["example.org"]', '["@example.org"]')))
)


# == 3. output paths that cannot be written ===========================================================
OUTPUTS: dict[str, Callable[[Workspace], str]] = {
    "missing-dir": lambda w: str(w.path("no/such/dir/out")),
    "directory": lambda w: w.dir("out.d"),
    "locked-file": lambda w: w.locked("out.locked", b"keep me\n"),
    "locked-dir": lambda w: str(Path(w.locked("locked/")) / "out"),
    "fifo-no-reader": lambda w: w.fifo("out.fifo"),
    "empty": lambda w: "",
}
for flag in ("--report-json", "--junit"):
    for label, make in OUTPUTS.items():
        case(
            "output",
            f"check{flag}-{label}",
            re.escape(flag),
            "directory|not writable|No such|FIFO|Permission",
        )(lambda w, f=flag, m=make: w.check(f, m(w)))
    case("output", f"check{flag}-is-the-config", re.escape(flag), "smtpd\\.conf", "input")(
        lambda w, f=flag: w.check(f, w.config())
    )
    case("output", f"check{flag}-is-a-table", re.escape(flag), "aliases", "input")(
        lambda w, f=flag: [*w.check(), f, str(w.path("aliases"))]
    )
case("output", "check-report-json-and-junit-same-file", "--junit|--report-json", "same file")(
    lambda w: w.check("--report-json", str(w.path("r.out")), "--junit", str(w.path("r.out")))
)
for flag in ("--report-json", "--junit", "--save-baseline"):
    for label, make in OUTPUTS.items():
        case(
            "output",
            f"accept{flag}-{label}",
            re.escape(flag),
            "directory|not writable|No such|FIFO|Permission",
        )(lambda w, f=flag, m=make: _accept(w, f, m(w)))
case("output", "accept-save-baseline-is-the-baseline", "--save-baseline", "input|--baseline")(
    lambda w: _accept(w, "--baseline", w.file("b.json", "{}"), "--save-baseline", str(w.path("b.json")))
)


def _upstream(w: Workspace, *extra: str, certs: str | None = None) -> list[str]:
    return [
        "upstream",
        "--profile",
        w.profile(),
        "--listen",
        "127.0.0.1:0",
        "--certs",
        certs or w.dir("pki/certs"),
        *extra,
    ]


for label, make in OUTPUTS.items():
    case("output", f"upstream-record-{label}", "--record", "directory|not writable|No such|FIFO|Permission")(
        lambda w, m=make: _upstream(w, "--record", m(w))
    )
case("output", "upstream-record-is-the-profile", "--record", "input")(
    lambda w: _upstream(w, "--record", str(w.path("provider.toml")))
)

CA_PEM_GARBAGE = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
for command in ("upstream", "certs"):

    def _certs(
        prepare: Callable[[Workspace], str], command: str = command
    ) -> Callable[[Workspace], list[str]]:
        def build(w: Workspace) -> list[str]:
            certs = prepare(w)
            if command == "upstream":
                return _upstream(w, certs=certs)
            return ["certs", "--certs", certs, "smtp.example.net"]

        return build

    def _ca(pem: bytes | None, key: bytes | None) -> Callable[[Workspace], str]:
        def prepare(w: Workspace) -> str:
            d = w.dir("pki/certs")
            if pem is not None:
                w.file("pki/certs/ca.pem", pem)
            if key is not None:
                w.file("pki/certs/ca.key", key)
            return d

        return prepare

    case("output", f"{command}-certs-is-a-file", "--certs", "not a directory")(
        _certs(lambda w: w.file("certs", "x"))
    )
    case("output", f"{command}-certs-parent-missing", "--certs", "does not exist")(
        _certs(lambda w: str(w.path("no/such/certs")))
    )
    case("output", f"{command}-certs-locked", "--certs", "not writable|not permitted|Permission")(
        _certs(lambda w: str(Path(w.locked("locked/")) / "certs"))
    )
    case("output", f"{command}-certs-ca-garbage", r"ca\.pem", "certificate|PEM")(
        _certs(_ca(CA_PEM_GARBAGE, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
    )
    case("output", f"{command}-certs-ca-binary", r"ca\.pem", "certificate|PEM")(_certs(_ca(BINARY, BINARY)))
    case("output", f"{command}-certs-ca-without-key", r"ca\.key", "missing|without")(
        _certs(_ca(b"pem", None))
    )
    case("output", f"{command}-certs-key-without-ca", r"ca\.pem", "missing|without")(
        _certs(_ca(None, b"key"))
    )


def _other_ca(w: Workspace) -> str:
    """A real CA certificate with another CA's key: both parse, they do not belong together."""
    import trustme

    one, two = trustme.CA(), trustme.CA()
    w.file("pki/certs/ca.pem", one.cert_pem.bytes())
    w.file("pki/certs/ca.key", two.private_key_pem.bytes())
    return str(w.path("pki/certs"))


case("output", "upstream-certs-ca-key-mismatch", r"ca\.key", "does not match|not the key")(
    lambda w: _upstream(w, certs=_other_ca(w))
)
case("output", "certs-certs-ca-key-mismatch", r"ca\.key", "does not match|not the key")(
    lambda w: ["certs", "--certs", _other_ca(w), "smtp.example.net"]
)


def _corrupt_leaf(w: Workspace) -> str:
    import trustme

    ca = trustme.CA()
    w.file("pki/certs/ca.pem", ca.cert_pem.bytes())
    w.file("pki/certs/ca.key", ca.private_key_pem.bytes())
    w.file("pki/certs/smtp.example.net.pem", b"garbage")
    w.file("pki/certs/smtp.example.net.key", b"garbage")
    return str(w.path("pki/certs"))


case("output", "upstream-certs-leaf-garbage", r"smtp\.example\.net\.(pem|key)", "certificate|PEM|key")(
    lambda w: _upstream(w, certs=_corrupt_leaf(w))
)


# == 4. --table mistakes and hostile tables ===========================================================
@case("table", "table-name-not-declared", "secret", "declares|declared", "aliases, secrets")
def _(w: Workspace) -> list[str]:
    return w.check("--table", f"secret={w.file('secrets', SECRET_LINE)}")


@case("table", "table-name-not-declared-besides-good", "secretz", "aliases, secrets")
def _(w: Workspace) -> list[str]:
    return w.check(*w.tables(), "--table", f"secretz={w.file('x', SECRET_LINE)}")


@case("table", "table-given-twice", "secrets", "twice")
def _(w: Workspace) -> list[str]:
    return w.check(*w.tables(), "--table", f"secrets={w.file('s2', SECRET_LINE)}")


@case("table", "table-inline-in-config", "mydomains", "inline|file:|not a file")
def _(w: Workspace) -> list[str]:
    config = w.config(GOOD_CONF + "table mydomains { example.org }\n")
    return w.check(*w.tables(), "--table", f"mydomains={w.file('d', DOMAIN_LINE)}", config=config)


@case("table", "table-flag-without-name", "--table", "NAME=FILE")
def _(w: Workspace) -> list[str]:
    return w.check("--table", f"={w.file('s', 'x')}")


@case("table", "table-flag-without-file", "--table", "NAME=FILE")
def _(w: Workspace) -> list[str]:
    return w.check("--table", "secrets=")


@case("table", "table-name-with-newline", "--table", "NAME|name")
def _(w: Workspace) -> list[str]:
    return w.check("--table", f"sec\nrets={w.file('s', 'x')}")


for label, line, key, at in (
    ("space", "bad key: alice\n", "bad key", 2),
    ("angle", "<root>: alice\n", "<root>", 2),
    ("quote", '"root": alice\n', '"root"', 2),
    ("empty", ": alice\n", "key mail is sent to", 2),
    ("control", "ro\x01ot: alice\n", "ro", 2),
    ("two-ats", "a@b@c: alice\n", "a@b@c", 2),
    ("value-space", "root: alice smith\n", "alice smith", 2),
    ("value-continued", "root: alice,\n  bad user\n", "bad user", 3),
):
    case("table", f"aliases-key-{label}", rf"aliases\.bad:{at}:", re.escape(key), "not a valid|address|key")(
        lambda w, body=line: w.check(
            "--table",
            f"aliases={w.file('aliases.bad', FIRST_LINE + body)}",
            "--table",
            f"secrets={w.file('secrets', SECRET_LINE)}",
        )
    )


# == 5. accept against peers that do not speak SSH, and bad URLs ======================================
for kind, cause in (
    ("garbage", "not an SSH server|SSH banner|protocol banner"),
    ("http", "not an SSH server|SSH banner|protocol banner"),
    ("banner-then-garbage", "SSH"),
    ("closes", "closed|not an SSH server|banner"),
    ("reset", "reset|closed|not an SSH server"),
    ("endless", "not an SSH server|SSH banner|protocol banner"),
    ("ssh1", "SSH|version"),
):
    case("not-ssh", f"accept-peer-{kind}", r"127\.0\.0\.1:\d+", cause, timeout=40)(
        lambda w, k=kind: ["accept", f"ssh://root@127.0.0.1:{w.peers[k]}", "--no-relay"]
    )
case("not-ssh", "accept-peer-silent", r"127\.0\.0\.1:\d+", rf"within {ACCEPT_TIMEOUT}s", timeout=20)(
    lambda w: [
        "accept",
        f"ssh://root@127.0.0.1:{w.peers['silent']}",
        "--no-relay",
        "--connect-timeout",
        str(ACCEPT_TIMEOUT),
    ]
)
case("not-ssh", "accept-closed-port", r"127\.0\.0\.1:\d+", "unreachable|refused")(
    lambda w: ["accept", f"ssh://root@127.0.0.1:{closed_port()}", "--no-relay"]
)
for label, url, says in (
    ("empty", "", "ssh://USER@HOST"),
    ("no-user", "ssh://127.0.0.1", "ssh://USER@HOST"),
    ("no-host", "ssh://root@", "ssh://USER@HOST"),
    ("http-scheme", "http://root@127.0.0.1", "ssh://USER@HOST"),
    ("path", "ssh://root@127.0.0.1/etc", "ssh://USER@HOST"),
    ("port-too-big", "ssh://root@127.0.0.1:99999", "port"),
    ("port-text", "ssh://root@127.0.0.1:ssh", "port"),
    ("port-zero", "ssh://root@127.0.0.1:0", "port"),
    ("bad-bracket", "ssh://root@[::1", "ssh://|IPv6|URL"),
    ("host-space", "ssh://root@host name", "host|DNS name"),
    ("host-long-label", f"ssh://root@{'a' * 64}.example", "host|DNS name"),
    ("host-long", f"ssh://root@{'.'.join(['a' * 60] * 5)}", "host|DNS name"),
    ("host-newline", "ssh://root@host\nname", "host|DNS name|ssh://"),
    ("user-newline", "ssh://ro\not@127.0.0.1", "user|ssh://"),
):
    case("url", f"accept-url-{label}", says)(lambda w, u=url: ["accept", u, "--no-relay"])
for flag, value in (
    ("--config", "etc/smtpd.conf"),
    ("--config", "/etc/smtpd\n.conf"),
    ("--mail-log", "mail.log"),
):
    case("url", f"accept{flag}-{value.replace(chr(10), 'NL')}", re.escape(flag), "absolute|control")(
        lambda w, f=flag, v=value: _accept(w, f, v)
    )
for value in ("0", "-1", "nan", "inf", "x", "100000"):
    case("url", f"accept-connect-timeout-{value}", "--connect-timeout")(
        lambda w, v=value: _accept(w, "--connect-timeout", v)
    )


# == 6. scenarios: fields of the wrong type, names the config lacks ===================================
SCENARIO_EDITS: dict[str, tuple[str, str, str]] = {
    # name: (old text, new text, the field the error must name)
    "config-replace-int": (
        "[case.expect]\nrelayed",
        "config_replace = 5\n[case.expect]\nrelayed",
        "config_replace",
    ),
    "config-replace-list-of-int": ("send = {", "config_replace = [5]\nsend = {", "config_replace"),
    "config-replace-short-pair": ("send = {", 'config_replace = [["listen"]]\nsend = {', "config_replace"),
    "mbox-without-user": ("relayed = true", 'mbox = { contains = "x" }', "expect.mbox"),
    "mbox-user-int": ("relayed = true", "mbox = { user = 5 }", "expect.mbox.user"),
    "mbox-not-table": ("relayed = true", 'mbox = "alice"', "expect.mbox"),
    "bounce-without-user": ("relayed = true", 'bounce = { contains = "x" }', "expect.bounce"),
    "delivery-result-int": ("relayed = true", "delivery = { result = 5 }", "expect.delivery.result"),
    "delivery-result-unknown": ("relayed = true", 'delivery = { result = "Sent" }', "expect.delivery.result"),
    "delivery-stat-int": ("relayed = true", "delivery = { stat = 5 }", "expect.delivery.stat"),
    "delivery-stat-bad-regex": ("relayed = true", 'delivery = { stat = "(" }', "expect.delivery.stat"),
    "delivery-rcpt-list": ("relayed = true", 'delivery = { rcpt = ["a"] }', "expect.delivery.rcpt"),
    "table-not-in-config": ('aliases = "root: alice\\n"', 'aliasez = "root: alice\\n"', "tables.aliasez"),
    "case-table-not-in-config": ("send = {", 'tables = { nosuch = "x" }\nsend = {', "tables.nosuch"),
    "stale-table-not-in-config": (
        "send = {",
        'stale_tables = { nosuch = "x" }\nsend = {',
        "stale_tables.nosuch",
    ),
    "stale-table-not-db": ("send = {", 'stale_tables = { aliases = "x" }\nsend = {', "stale_tables.aliases"),
    "expect-tls-int": ("relayed = true", "tls = 5", "expect.tls"),
    "expect-tls-unknown": ("relayed = true", 'tls = "starttls-required"', "expect.tls"),
    "expect-relayed-string": ("relayed = true", 'relayed = "yes"', "expect.relayed"),
    "expect-auth-success-string": ("relayed = true", 'auth = { success = "yes" }', "expect.auth.success"),
    "expect-auth-user-int": ("relayed = true", "auth = { user = 5 }", "expect.auth.user"),
    "expect-auth-attempted-string": ("relayed = true", 'auth_attempted = "no"', "expect.auth_attempted"),
    "expect-mail-from-int": ('mail_from = "root@example.org"', "mail_from = 5", "expect.mail_from"),
    "expect-config-error-int": (
        'relayed = true\nmail_from = "root@example.org"',
        "config_error = 5",
        "expect.config_error",
    ),
    "expect-config-error-line-string": (
        'relayed = true\nmail_from = "root@example.org"',
        'config_error = "x"\nconfig_error_line = "3"',
        "expect.config_error_line",
    ),
    "expect-upstream-reply-int": (
        "relayed = true",
        "relayed = true\nupstream_reply = 5",
        "expect.upstream_reply",
    ),
    "expect-timeout-bool": ("relayed = true", "relayed = true\ntimeout = true", "expect.timeout"),
    "send-from-int": (
        'send = { to = ["bob@example.com"] }',
        'send = { to = ["bob@example.com"], from = 5 }',
        "send.from",
    ),
    "send-user-int": (
        'send = { to = ["bob@example.com"] }',
        'send = { to = ["bob@example.com"], user = 5 }',
        "send.user",
    ),
    "send-subject-list": (
        'send = { to = ["bob@example.com"] }',
        'send = { to = ["b@x"], subject = [1] }',
        "send.subject",
    ),
    "send-to-newline": (
        'send = { to = ["bob@example.com"] }',
        'send = { to = ["bob@exa\\nmple.com"] }',
        "send.to",
    ),
    "send-from-nul": (
        'send = { to = ["bob@example.com"] }',
        'send = { to = ["b@x"], from = "a\\u0000b" }',
        "send.from",
    ),
    "send-port-bool": (
        'send = { to = ["bob@example.com"] }',
        'send = { to = ["b@x"], via = "smtp", port = true }',
        "send.port",
    ),
    "send-address-int": (
        'send = { to = ["bob@example.com"] }',
        'send = { to = ["b@x"], via = "smtp", address = 5 }',
        "send.address",
    ),
    "twin-of-int": ("send = {", "twin_of = 5\nsend = {", "twin_of"),
    "description-int": (GOOD_SCENARIO.split("\n", 1)[0], "description = 5", "description"),
    "secret-tables-int": ("[tables]", "secret_tables = 5\n[tables]", "secret_tables"),
    "secret-tables-unknown": ("[tables]", 'secret_tables = ["nosuch"]\n[tables]', "secret_tables"),
    "case-not-table": (GOOD_SCENARIO[GOOD_SCENARIO.index("[[case]]") :], "case = [5]\n", "case"),
    "case-description-int": ("send = {", "description = 7\nsend = {", "description"),
    "upstream-not-table": (  # top-level `upstream = 5` (and its [upstream] table gone)
        GOOD_SCENARIO[GOOD_SCENARIO.index("[tables]") : GOOD_SCENARIO.index("[[case]]")],
        "upstream = 5\n" + GOOD_SCENARIO[GOOD_SCENARIO.index("[tables]") : GOOD_SCENARIO.index("[upstream]")],
        "upstream",
    ),
    "upstream-port-string": ('sender_domains = ["example.org"]', 'port = "587"', "upstream.port"),
}
for label, (old, new, fieldname) in SCENARIO_EDITS.items():
    case("scenario", f"scenario-{label}", rf"bad\.toml:\d+: {re.escape(fieldname)}")(
        lambda w, o=old, n=new: w.scenario(edit(GOOD_SCENARIO, o, n))
    )
case("scenario", "scenarios-dir-missing", "nope", "(?i)no such|not a directory|missing")(
    lambda w: ["scenarios", str(w.path("nope"))]
)
case("scenario", "scenarios-dir-is-a-file", "lib\\.toml", "not a directory")(
    lambda w: ["scenarios", w.file("lib.toml", GOOD_SCENARIO)]
)
case("scenario", "scenarios-dir-empty", "empty", "no scenario|\\*\\.toml")(
    lambda w: ["scenarios", w.dir("empty")]
)
case("scenario", "scenario-toml-syntax", r"bad\.toml:1: toml")(lambda w: w.scenario("description = \n"))


# == 7. argument values ================================================================================
for label, value in (
    ("port-too-big", "127.0.0.1:65536"),
    ("port-negative", "127.0.0.1:-1"),
    ("no-port", "127.0.0.1"),
    ("empty", ""),
    ("colon-only", ":"),
    ("not-an-address", "999.1.1.1:2525"),
    ("unresolvable", "no-such-host.invalid:2525"),
    ("space", "127.0.0.1 :2525"),
    ("ipv6-unbracketed", "::1::2525x"),
):
    case("argument", f"upstream-listen-{label}", "--listen|listen|HOST:PORT|address")(
        lambda w, v=value: [
            "upstream",
            "--profile",
            w.profile(),
            "--certs",
            w.dir("pki/certs"),
            f"--listen={v}",
        ]
    )
case("argument", "check-target-unknown", "--target", "lab")(lambda w: w.check("--target", "docker"))
case("argument", "check-target-ssh-no-user", "--target", "ssh://USER@HOST")(
    lambda w: w.check("--target", "ssh://x")
)
case("argument", "check-target-ssh-bad-host", "--target", "DNS name")(
    lambda w: w.check("--target", "ssh://root@a..b")
)
case("argument", "check-identity-garbage", "--identity", "private key")(
    lambda w: w.check("--target", f"ssh://root@127.0.0.1:{closed_port()}", "--identity", w.file("k", BINARY))
)
case("argument", "check-unknown-flag", "--bogus|unrecognized")(lambda w: w.check("--bogus"))
case("argument", "no-command", "command|required")(lambda w: [])
case("argument", "unknown-command", "bogus", "invalid choice")(lambda w: ["bogus"])
case("argument", "lab-without-subcommand", "lab_command|required|clean")(lambda w: ["lab"])
case("argument", "lab-clean-extra-argument", "unrecognized|extra")(lambda w: ["lab", "clean", "now"])
case("argument", "check-missing-upstream", "--upstream")(lambda w: ["check", w.config()])
case("argument", "profile-crlf-is-fine-but-port-bad", r"provider\.toml:\d+: port")(
    lambda w: w.check(profile=w.profile(GOOD_PROFILE.replace("port = 587", "port = 0").replace("\n", "\r\n")))
)
case(
    "argument", "profile-password-with-nul", r"provider\.toml:\d+: credentials\[0\]\.password", "control|NUL"
)(lambda w: w.check(profile=w.profile(edit(GOOD_PROFILE, 'password = "Right', 'password = "\\u0000Right'))))
case(
    "argument", "profile-user-with-newline", r"provider\.toml:\d+: credentials\[0\]\.user", "control|newline"
)(lambda w: w.check(profile=w.profile(edit(GOOD_PROFILE, 'user = "perso', 'user = "\\nperso'))))
case("argument", "profile-deeply-nested", r"provider\.toml", "toml|nested")(
    lambda w: w.check(profile=w.profile("x = " + "[" * 100_000 + "]" * 100_000 + "\n"))
)
case(
    "argument", "profile-password-env-unset", r"provider\.toml:\d+: credentials\[0\]\.password_env", "not set"
)(
    lambda w: w.check(
        profile=w.profile(edit(GOOD_PROFILE, 'password = "Right-Pass-4f7c"', 'password_env = "RH_NOPE"'))
    )
)


# == the test ============================================================================================
@pytest.fixture(scope="module")
def runner() -> Iterator[CliRunner]:
    r = CliRunner()
    yield r
    r.close()


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, int]]:
    servers = NotSshPeers()
    yield servers.ports
    servers.close()


@pytest.mark.parametrize(
    "bad",
    CASES,
    ids=[c.name for c in CASES],
)
def test_bad_input_is_one_clear_line_exit_2(
    bad: Case, runner: CliRunner, peers: dict[str, int], tmp_path: Path
) -> None:
    with workspace(tmp_path, peers) as w:
        argv = bad.build(w)
        before = snapshot(tmp_path)
        outcome = runner.run(argv, tmp_path, bad.timeout, dict(bad.env), until=RUNNING)
        after = snapshot(tmp_path)
    found = problems(outcome, bad.expect, changes(before, after))
    assert not found, f"{bad.kind}/{bad.name}: " + "; ".join(found) + "\n" + outcome.describe()


def test_case_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


def test_every_command_is_fed_bad_input(tmp_path: Path) -> None:
    """Each subcommand gets cases (a new one must get its own)."""
    from harness.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(sub.choices or ())
    fed = set()
    for n, bad in enumerate(CASES):
        with workspace(tmp_path / str(n), dict.fromkeys(PEER_KINDS, 1)) as w:
            w.root.mkdir()
            argv = bad.build(w)
        fed.add(argv[0] if argv else "")
    assert commands <= fed, f"no bad input for {commands - fed}"


def test_malformed_scenarios_are_pytest_collection_errors(tmp_path: Path) -> None:
    """The pytest plugin's path: each malformed scenario is one collection error naming its file,
    line and field, never a traceback of the harness (one pytest run for all of them)."""
    lib = tmp_path / "scenarios"
    lib.mkdir()
    for label, (old, new, _) in SCENARIO_EDITS.items():
        (lib / f"{label}.toml").write_text(edit(GOOD_SCENARIO, old, new))
    (lib / "not-utf8.toml").write_bytes(b'description = "x"\n# \xe9\n')
    (lib / "good.toml").write_text(GOOD_SCENARIO)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(lib)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert not TRACEBACK.search(out), out
    assert not re.search(r"harness/\w+\.py:\d+: in ", out), f"a traceback through the harness:\n{out}"
    missing = []
    for label, (_, _, fieldname) in SCENARIO_EDITS.items():
        if not re.search(rf"malformed scenario: \S*{label}\.toml:\d+: {re.escape(fieldname)}", out):
            missing.append(label)
    if not re.search(r"malformed scenario: \S*not-utf8\.toml:2: .*UTF-8", out):
        missing.append("not-utf8")
    assert not missing, f"no collection error naming file, line and field for {missing}:\n{out}"
    assert "good.toml::relayed" in out, out


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("docker", "expected lab, lab:RELEASE (e.g. lab:trixie), emulated or ssh://"),
        ("ssh://x", "ssh://USER@HOST"),
        ("ssh://root@a..b", "DNS name"),
    ],
)
def test_a_bad_relay_target_is_one_pytest_usage_error(tmp_path: Path, spec: str, says: str) -> None:
    """pytest's --relay-target is refused at configure time, naming the option, no traceback."""
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "good.toml").write_text(GOOD_SCENARIO)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--relay-target",
            spec,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out  # pytest's usage error
    assert not TRACEBACK.search(out), out
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "--relay-target" in errors[0] and says in errors[0], out


# == with the lab: inputs that are right but hostile in size or form, through a real check ============
@pytest.fixture
def lab_ok() -> None:
    """The lab can run here (root, OpenSMTPD); skipped on a developer machine, failed under CI."""
    from harness.targets.lab import LabError, check_environment

    try:
        check_environment()
    except LabError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the lab cannot run under CI: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.mark.lab
def test_an_aliases_table_of_100k_local_users_is_checked_not_crashed(
    runner: CliRunner, tmp_path: Path
) -> None:
    """100k keys to 100k local users, and one list alias of all of them: the users are created in
    batches (not one giant SSH command), the first 20 keys are probed, the list is not (smtpd
    would deliver the probe 100k times), and the verdict is smtpd's."""
    users = [f"u{i}" for i in range(100_000)]
    aliases = "root: alice\neveryone: " + ", ".join(users) + "\n" + "".join(f"{u}: {u}\n" for u in users)
    with workspace(tmp_path) as w:
        argv = w.check(*w.tables(aliases=aliases), "--report-json", str(w.path("report.json")))
        outcome = runner.run(argv, tmp_path, timeout=300, forbid_lab=False)
    assert not TRACEBACK.search(outcome.output), outcome.describe()
    assert outcome.rc == 0, outcome.describe()
    report = json.loads((tmp_path / "report.json").read_text())
    probes = {p["name"]: p["ok"] for p in report["probes"]}
    assert probes.get("alias-root->alice") is True, probes
    assert probes.get("alias-u0->u0") is True, probes
    assert not any(name.startswith("alias-everyone") for name in probes), probes
    assert any("alias everyone: not probed: it expands to 100000 targets" in n for n in report["notes"]), (
        report
    )
    assert any("100002 aliases, probing the first 20" in n for n in report["notes"]), report["notes"]


@pytest.mark.lab
@pytest.mark.usefixtures("lab_ok")
def test_a_crlf_config_is_smtpds_to_refuse_exit_1_no_traceback(runner: CliRunner, tmp_path: Path) -> None:
    """CRLF line ends are not bad input for the harness: smtpd itself refuses such a config
    (`syntax error` on the first statement), so it is the config's fault, exit 1, with its line."""
    with workspace(tmp_path) as w:
        argv = w.check(config=w.config(GOOD_CONF.replace("\n", "\r\n")))
        outcome = runner.run(argv, tmp_path, timeout=120, forbid_lab=False)
    assert not TRACEBACK.search(outcome.output), outcome.describe()
    assert outcome.rc == 1, outcome.describe()
    assert "REFUSED  smtpd -n" in outcome.stdout and "syntax error" in outcome.stdout, outcome.describe()
