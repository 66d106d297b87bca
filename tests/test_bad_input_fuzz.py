"""Bad input, generated: mutated files and hostile arguments for every command, from one seed.

Each case is derived from `random.Random(f"{SEED}-{index}")` alone, so case N is the same input on
every run and machine (RH_FUZZ_SEED picks another set, RH_FUZZ_CASES how many; both are printed
in a failure). Files start from the inputs that are right (a profile, smtpd.conf, an aliases
table, a scenario, a baseline) and get a few mutations: bytes flipped, inserted (NUL, 0xff,
CR, non-ASCII), spans deleted or repeated thousands of times, values replaced by values of
another type, nesting thousands deep, huge numbers, CRLF line ends, a BOM. Arguments are drawn
from a pool of hostile values (special files, ports in other scripts' digits, URLs, long and
empty strings) for every flag of every command.

What must hold whatever the input (the oracle): no Python traceback anywhere, the command ends
by itself within its timeout and leaves no process, and its exit code means what the README
says: 0 or 1 (a verdict: the input was usable), 2 with exactly one `relay-harness` line on stderr
and nothing changed in the workspace, or the input went on to build a test host (the fork
server stops the command there: accepted input, not a failure). Names never resolve (the fork
server answers every lookup "unknown"), so no fuzzed host name becomes a DNS query.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bad_input_helpers import (
    GOOD_ALIASES,
    GOOD_CONF,
    GOOD_PROFILE,
    GOOD_SCENARIO,
    GOOD_SECRETS,
    TRACEBACK,
    Workspace,
    changes,
    closed_port,
    snapshot,
    workspace,
)
from cli_runner import LAB_BUILT, CliRunner, Outcome

SEED = int(os.environ.get("RH_FUZZ_SEED", "15"))
COUNT = int(os.environ.get("RH_FUZZ_CASES", "400"))
TIMEOUT = 15.0  # per case; every one of them is refused or accepted within a second here
RUNNING = r"relay-harness upstream: listening on"
GOOD_BASELINE = {
    "format": 1,
    "host": "root@127.0.0.1",
    "smtpd": {"path": "/usr/sbin/smtpd", "version": "6.8.0p2"},
    "config": {"path": "/etc/smtpd.conf", "sha256": "0" * 64},
    "routes": {
        "outbound#0": {"url": "smtp+tls://perso@smtp.example.net:587", "port": 587, "tls": "starttls"}
    },
    "tables": {"secrets": {"backend": "file", "path": "/etc/mail/secrets", "exists": True, "mode": "640"}},
    "listens": ["socket"],
    "service": "systemd",
    "relay": {"way": "relay not checked", "probes": {}},
}


# -- mutations ------------------------------------------------------------------------------------
NASTY_BYTES = [
    b"\0",
    b"\xff",
    b"\xfe\xff",
    b"\r",
    b"\r\n",
    b"\n",
    b"\t",
    b"\x1b[2J",
    b"\xc3",
    b"\xe2\x80\xae",
    b"'",
    b'"',
    b"\\",
]
NASTY_TEXT = [
    "",
    " ",
    "\n",
    "\0",
    "\r\n",
    "é",
    "\u202e",
    "\U0001f4e7",
    "../../x",
    "a" * 5000,
    "${HOME}",
    "$(id)",
    "%s%n",
]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 2 else 7)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 65536, 587])
    if kind == 1:
        return rng.choice([0.0, -0.5, 1e308, math.inf, -math.inf, math.nan, 2.5])
    if kind == 2:
        return rng.choice([True, False])
    if kind in (3, 4, 5, 6):
        return rng.choice([*NASTY_TEXT, "smtp.example.net", "root", "alice@example.org", "starttls-required"])
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["user", "host", "x", "result", "to", ""]): _random_value(rng, depth + 1) for _ in range(2)
    }


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _retype(rng: random.Random, data: Any) -> Any:
    """One value somewhere in the tree replaced by a value of some other type (or a new key)."""
    paths = list(_paths(data))
    if not paths or rng.random() < 0.15:
        if isinstance(data, dict):
            data[rng.choice(["extra", "host", "case", "port", "format"])] = _random_value(rng)
        return data
    path = rng.choice(paths)
    node = data
    for key in path[:-1]:
        node = node[key]
    if rng.random() < 0.2 and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = _random_value(rng)
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(data: dict[str, Any]) -> str:
    """A tiny TOML writer (stdlib reads TOML, writes none): every top-level key on its own line."""
    return "".join(f"{json.dumps(str(k))} = {_toml_value(v)}\n" for k, v in data.items())


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A few byte-level mutations of `data`."""
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(9)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
        elif op == 1:
            data = data[:at] + rng.choice(NASTY_BYTES) + data[at:]
        elif op == 2:  # delete a span
            data = data[:at] + data[at + rng.randrange(1, 40) :]
        elif op == 3:  # repeat a line many times: a huge input
            lines = data.splitlines(keepends=True) or [b"x\n"]
            line = rng.choice(lines)
            data = data[:at] + line * rng.choice([100, 5000, 50_000]) + data[at:]
        elif op == 4:
            data = data[:at]  # truncated
        elif op == 5:
            data = data.replace(b"\n", b"\r\n")
        elif op == 6:
            data = b"\xef\xbb\xbf" + data  # a BOM
        elif op == 7:  # nesting thousands deep
            depth = rng.choice([100, 3000, 100_000])
            data = data + b"\nx = " + b"[" * depth + b"]" * depth + b"\n"
        else:  # a huge number
            data = data[:at] + b"9" * rng.choice([20, 400, 5000]) + data[at:]
    return data


def mutate_toml(rng: random.Random, text: str) -> bytes:
    if rng.random() < 0.5:
        return to_toml(_retype(rng, tomllib.loads(text))).encode()
    return mutate_bytes(rng, text.encode())


# -- cases ------------------------------------------------------------------------------------------
Build = Callable[[Workspace, random.Random], list[str]]
GENERATORS: dict[str, Build] = {}


def generator(name: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        GENERATORS[name] = build
        return build

    return register


def _tables(w: Workspace, aliases: bytes | str = GOOD_ALIASES) -> list[str]:
    return [
        "--table",
        f"aliases={w.file('aliases', aliases)}",
        "--table",
        f"secrets={w.file('secrets', GOOD_SECRETS)}",
    ]


@generator("profile")
def _(w: Workspace, rng: random.Random) -> list[str]:
    profile = w.profile(mutate_toml(rng, GOOD_PROFILE))
    command = rng.choice(["check", "upstream", "accept"])
    if command == "check":
        return ["check", w.config(), "--upstream", profile, *_tables(w)]
    if command == "upstream":
        return ["upstream", "--profile", profile, "--listen", "127.0.0.1:0", "--certs", w.dir("certs")]
    return ["accept", f"ssh://root@127.0.0.1:{closed_port()}", "--upstream", profile]


@generator("config")
def _(w: Workspace, rng: random.Random) -> list[str]:
    return ["check", w.config(mutate_bytes(rng, GOOD_CONF.encode())), "--upstream", w.profile(), *_tables(w)]


@generator("aliases")
def _(w: Workspace, rng: random.Random) -> list[str]:
    aliases = mutate_bytes(rng, GOOD_ALIASES.encode())
    return ["check", w.config(), "--upstream", w.profile(), *_tables(w, aliases)]


@generator("scenario")
def _(w: Workspace, rng: random.Random) -> list[str]:
    return w.scenario(mutate_toml(rng, GOOD_SCENARIO))


@generator("baseline")
def _(w: Workspace, rng: random.Random) -> list[str]:
    if rng.random() < 0.5:
        data = json.dumps(_retype(rng, json.loads(json.dumps(GOOD_BASELINE)))).encode()
    else:
        data = mutate_bytes(rng, json.dumps(GOOD_BASELINE, indent=2).encode())
    return ["accept", f"ssh://root@127.0.0.1:{closed_port()}", "--baseline", w.file("baseline.json", data)]


DIGITS = [
    "0",
    "-1",
    "65536",
    "99999999999999999999",
    "1e3",
    "0x19",
    "\u00b2",  # superscript two: isdigit(), but int() refuses it
    "\u0662\u0665",  # Arabic-Indic 25
    "\uff12\uff15",  # fullwidth 25: str.isdigit() says yes
    "25 ",
    " 25",
    "",
    "nan",
]


def _hostile_path(w: Workspace, rng: random.Random) -> str:
    choice = rng.randrange(12)
    if choice == 0:
        return w.dir(f"d{rng.randrange(1000)}")
    if choice == 1:
        return w.fifo(f"f{rng.randrange(1000)}")
    if choice == 2:
        return rng.choice(
            ["/proc/self/mem", "/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/proc/self/status"]
        )
    if choice == 3:
        return str(w.path("no/such/dir/x"))
    if choice == 4:
        return w.file(
            f"bin{rng.randrange(1000)}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        )
    if choice == 5:
        return rng.choice(["", " ", "-", "--", "\t", "a" * 5000, "é", "../../x"])
    if choice == 6:
        return w.sparse(f"big{rng.randrange(1000)}")
    if choice == 7:
        return w.locked(f"locked{rng.randrange(1000)}", b"x")
    return str(w.path(f"out{rng.randrange(1000)}"))  # a new file: fine for outputs


def _hostile_url(rng: random.Random) -> str:
    port = closed_port()
    return rng.choice(
        [
            f"ssh://root@127.0.0.1:{port}",
            f"ssh://root@[::1]:{port}",
            "ssh://",
            f"ssh://root@127.0.0.1:{rng.choice(DIGITS)}",
            f"ssh://r%00t@127.0.0.1:{port}",
            f"ssh://root@{rng.choice(NASTY_TEXT)}:{port}",
            f"ssh://{rng.choice(NASTY_TEXT)}@127.0.0.1:{port}",
            f"ssh://root@127.0.0.1:{port}/{rng.choice(NASTY_TEXT)}",
            f"ssh://root@[{rng.choice(NASTY_TEXT)}]:{port}",
            f"http://root@127.0.0.1:{port}",
            rng.choice(NASTY_TEXT),
        ]
    )


@generator("arguments")
def _(w: Workspace, rng: random.Random) -> list[str]:
    """A command line with one to three flags given hostile values (the rest right)."""
    command = rng.choice(["check", "upstream", "accept", "certs", "scenarios", "lab"])
    args: dict[str, Callable[[], str]]
    if command == "check":
        base = ["check", w.config(), "--upstream", w.profile(), *_tables(w)]
        args = {
            "config": lambda: _hostile_path(w, rng),
            "--upstream": lambda: _hostile_path(w, rng),
            "--table": lambda: rng.choice(
                [
                    "",
                    "=",
                    "secrets",
                    "secrets=",
                    "a=b=c",
                    f"secrets={_hostile_path(w, rng)}",
                    f"{rng.choice(NASTY_TEXT)}={w.file('t', 'x')}",
                ]
            ),
            "--target": lambda: rng.choice(["lab", "", "docker", _hostile_url(rng)]),
            "--report-json": lambda: _hostile_path(w, rng),
            "--junit": lambda: _hostile_path(w, rng),
            "--identity": lambda: _hostile_path(w, rng),
        }
    elif command == "upstream":
        base = [
            "upstream",
            "--profile",
            w.profile(),
            "--listen",
            "127.0.0.1:0",
            "--certs",
            w.dir("pki/certs"),
        ]
        args = {
            "--profile": lambda: _hostile_path(w, rng),
            "--listen": lambda: rng.choice(
                [
                    f"127.0.0.1:{rng.choice(DIGITS)}",
                    f"{rng.choice(NASTY_TEXT)}:0",
                    "[::1]:0",
                    ":",
                    "::1:0",
                    "[::1",
                    "192.0.2.1:0",
                    rng.choice(DIGITS),
                ]
            ),
            "--certs": lambda: _hostile_path(w, rng),
            "--record": lambda: _hostile_path(w, rng),
        }
    elif command == "accept":
        base = ["accept", f"ssh://root@127.0.0.1:{closed_port()}", "--no-relay"]
        args = {
            "url": lambda: _hostile_url(rng),
            "--identity": lambda: _hostile_path(w, rng),
            "--known-hosts": lambda: _hostile_path(w, rng),
            "--upstream": lambda: _hostile_path(w, rng),
            "--baseline": lambda: _hostile_path(w, rng),
            "--save-baseline": lambda: _hostile_path(w, rng),
            "--report-json": lambda: _hostile_path(w, rng),
            "--junit": lambda: _hostile_path(w, rng),
            "--config": lambda: rng.choice(["/etc/smtpd.conf", "", "relative", "/a\nb", "/" + "a" * 5000]),
            "--mail-log": lambda: rng.choice(["/var/log/mail.log", "", "relative", "/a\tb"]),
            "--relay-mode": lambda: rng.choice(["auto", "sandbox", "lab", "", "x"]),
            "--connect-timeout": lambda: rng.choice([*DIGITS, "0.5", "inf", "-inf", "1e-9"]),
        }
    elif command == "certs":
        base = ["certs", "--certs", w.dir("pki/certs")]
        args = {
            "--certs": lambda: _hostile_path(w, rng),
            "host": lambda: rng.choice([*NASTY_TEXT, "smtp.example.net", "a" * 64, "-x", "1.2.3.4", "::1"]),
        }
    elif command == "scenarios":
        base = ["scenarios", w.dir("lib")]
        args = {"directory": lambda: _hostile_path(w, rng)}
    else:
        base = ["lab", "clean"]
        args = {"extra": lambda: rng.choice(["now", "--force", "", "-h" if rng.random() < 0.1 else "x"])}
    argv = list(base)
    for flag in rng.sample(sorted(args), k=min(len(args), rng.randrange(1, 4))):
        value = args[flag]()
        if flag in ("config", "url", "directory"):
            position = 1 if command != "lab" else 2
            argv[position] = value
        elif flag in ("host", "extra"):
            argv.append(value)
        elif flag in argv and flag != "--table":
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def cases() -> list[tuple[int, str]]:
    """(index, generator) for every case: the generator is the index's first draw."""
    names = sorted(GENERATORS)
    return [(i, random.Random(f"{SEED}-{i}").choice(names)) for i in range(COUNT)]


def verdict(outcome: Outcome, changed: list[str]) -> list[str]:
    """What is wrong with this run whatever its input (empty: nothing)."""
    out = []
    if outcome.timed_out:
        out.append(f"did not end within {TIMEOUT:g}s")
    if TRACEBACK.search(outcome.output):
        out.append("a Python traceback was printed")
    if outcome.left_running:
        out.append("processes were left running")
    accepted_for_lab = outcome.rc == 99 and outcome.stderr.strip() == LAB_BUILT
    if outcome.rc not in (0, 1, 2) and not accepted_for_lab:
        out.append(f"exit {outcome.rc}")
    if outcome.rc == 99 and not accepted_for_lab:
        out.append("stderr besides the test host being built: " + outcome.stderr[:300])
    if outcome.rc == 2:
        lines = outcome.stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith("relay-harness"):
            out.append(f"exit 2 with {len(lines)} stderr lines, not one `relay-harness: ...` line")
        out.extend(changed)
    return out


@pytest.fixture(scope="module")
def runner() -> Iterator[CliRunner]:
    r = CliRunner()
    yield r
    r.close()


@pytest.mark.parametrize(("index", "kind"), cases(), ids=[f"{k}-{i}" for i, k in cases()])
def test_fuzzed_input_gets_a_verdict_or_one_clear_line(
    index: int, kind: str, runner: CliRunner, tmp_path: Path
) -> None:
    rng = random.Random(f"{SEED}-{index}")
    rng.choice(sorted(GENERATORS))  # the draw that picked `kind`
    with workspace(tmp_path) as w:
        argv = GENERATORS[kind](w, rng)
        before = snapshot(tmp_path)
        outcome = runner.run(argv, tmp_path, TIMEOUT, until=RUNNING)
        after = snapshot(tmp_path)
    found = verdict(outcome, changes(before, after))
    shown = " ".join(
        repr(a) if not re.fullmatch(rf"[{re.escape(string.printable.strip())}]*", a) else a for a in argv
    )
    assert not found, (
        f"fuzz case {index} ({kind}, RH_FUZZ_SEED={SEED}): "
        + "; ".join(found)
        + f"\n  argv: {shown[:3000]}\n"
        + outcome.describe()
    )


COLLECTED = 60  # fuzzed scenario files collected by one pytest run


def test_fuzzed_scenarios_are_collected_or_one_collection_error_each(tmp_path: Path) -> None:
    """The pytest plugin's path for the fuzzed scenarios: each file collects, or is one
    `malformed scenario: FILE:LINE: field: ...` collection error; no traceback of the harness."""
    import subprocess
    import sys

    lib = tmp_path / "scenarios"
    lib.mkdir()
    names = []
    for i in range(COLLECTED):
        rng = random.Random(f"{SEED}-collect-{i}")
        (lib / f"fuzz{i}.toml").write_bytes(mutate_toml(rng, GOOD_SCENARIO))
        names.append(f"fuzz{i}.toml")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(lib)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert not TRACEBACK.search(out), out[-5000:]
    assert not re.search(r"harness/\w+\.py:\d+: in ", out), f"a traceback through the harness:\n{out[-5000:]}"
    unexplained = [
        n
        for n in names
        if f"{n}::" not in out and not re.search(rf"malformed scenario: \S*{re.escape(n)}(:\d+|:\?)?: ", out)
    ]
    assert not unexplained, f"neither collected nor a malformed-scenario error: {unexplained}\n{out[-5000:]}"
