"""The corpus: configs in the shapes people write, through the real `relay-harness check`.

tests/data/corpus/cases.toml lists each config with the verdict a correct gate gives (exit 0, 1
the config's fault, 2 what the test host lacks) and the words the report must hold, beside its
twin one edit away with another verdict: a gate that passed everything, failed everything or
blamed the config for the test host would fail here. One test per pair; the pair's two checks
run side by side. Every run must also leave a JSON and a JUnit report, exit 2 included, and
leave this machine's copy of every path the config names as it was: the test host is sealed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lab

CORPUS = Path(__file__).parent / "data" / "corpus"
RUN_TIMEOUT = 120.0


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    config: str  # the text, after the twin's edit
    profile: str
    args: tuple[str, ...]
    exit: int
    says: tuple[str, ...]
    lacks: tuple[str, ...] = ()  # text the report must not hold (a wrong reason)
    sqlite: str | None = None
    twin_of: str | None = None


def _cases() -> dict[str, Case]:
    raw: list[dict[str, Any]] = tomllib.loads((CORPUS / "cases.toml").read_text())["case"]
    by_name = {c["name"]: c for c in raw}
    cases: dict[str, Case] = {}
    for c in raw:
        base = by_name[c["twin_of"]] if "twin_of" in c else c
        config = (CORPUS / base["config"]).read_text()
        if "edit" in c:
            old, new = c["edit"]
            assert config.count(old) == 1, (
                f"{c['name']}: the edit {old!r} must occur once in {base['config']}"
            )
            config = config.replace(old, new)
        if c.get("crlf", False):  # the file as a Windows editor saves it
            config = config.replace("\n", "\r\n")
        cases[c["name"]] = Case(
            c["name"],
            c["about"],
            config,
            c.get("profile", base["profile"]),
            tuple(c.get("args", base.get("args", ()))),
            c["exit"],
            tuple(c["says"]),
            tuple(c.get("lacks", ())),
            c.get("sqlite", base.get("sqlite")),
            c.get("twin_of"),
        )
    return cases


CASES = _cases()
PAIRS = [(c.twin_of, c.name) for c in CASES.values() if c.twin_of is not None]


# Paths in a config (`file:/srv/x`, `"/etc/ssl/x.crt"`, NixOS's `file://run/keys/x`), cut at a
# per-message `%{...}`.
_PATH = re.compile(r"(?:file:|db:|[\s\"])(/[\w.+-][\w./+-]*)")


def _named_paths(config: str) -> list[Path]:
    """Each path the config names, with its parent and grandparent: where a leaking test host
    would have written (a table, a certificate, the directories made for it)."""
    out: set[Path] = set()
    for word in _PATH.findall(config.replace("file://", "file:/")):
        path = Path(word.split("%{")[0].rstrip("/") or "/")
        out.update(p for p in (path, *path.parents)[:3] if len(p.parts) > 2)
    return sorted(out)


def _state(paths: list[Path]) -> dict[Path, str | None]:
    """A file's hash, "dir", or None for nothing there (not a directory's entries: other work on
    this machine may add some to /usr/bin meanwhile; a leak writes the named path itself)."""
    seen: dict[Path, str | None] = {}
    for path in paths:
        if path.is_file():
            seen[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            seen[path] = "dir" if path.is_dir() else None
    return seen


@dataclass(frozen=True)
class Run:
    case: Case
    rc: int
    output: str
    report: dict[str, Any]
    junit: ET.Element

    def explain(self) -> str:
        return f"{self.case.name} ({self.case.about}): exit {self.rc}\n{self.output}"


def _run(case: Case, out: Path, env: dict[str, str]) -> Run:
    """One check; `env` copied in the test's own thread (os.environ changes under a copy taken
    in a worker thread while pytest sets PYTEST_CURRENT_TEST: KeyError)."""
    out.mkdir(parents=True)
    (out / "smtpd.conf").write_text(case.config)
    db = out / "db.sqlite"
    if case.sqlite:
        with sqlite3.connect(db) as conn:
            conn.executescript((CORPUS / case.sqlite).read_text())
    args = [a.replace("{corpus}", str(CORPUS)).replace("{db}", str(db)) for a in case.args]
    command = [str(Path(sys.executable).with_name("relay-harness")), "check", str(out / "smtpd.conf")]
    command += ["--upstream", str(CORPUS / case.profile), *args]
    command += ["--report-json", str(out / "report.json"), "--junit", str(out / "junit.xml")]
    named = _named_paths(case.config)
    before = _state(named)
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        check=False,
    )
    output = proc.stdout + proc.stderr
    after = _state(named)
    changed = {str(p): (before[p], after[p]) for p in named if before[p] != after[p]}
    assert not changed, f"{case.name}: wrote outside the test host: {changed}\n{output}"
    assert (out / "report.json").exists() and (out / "junit.xml").exists(), (
        f"{case.name}: no report\n{output}"
    )
    report = json.loads((out / "report.json").read_text())
    return Run(case, proc.returncode, output, report, ET.parse(out / "junit.xml").getroot())


def test_every_twin_differs_from_its_positive_in_verdict() -> None:
    assert len(PAIRS) >= 12
    for positive, twin in PAIRS:
        assert positive in CASES, twin
        assert CASES[positive].exit != CASES[twin].exit, (positive, twin)


@pytest.mark.parametrize(("positive", "twin"), PAIRS, ids=[t for _, t in PAIRS])
def test_the_gate_gives_each_config_its_verdict(tmp_path: Path, positive: str, twin: str) -> None:
    with ThreadPoolExecutor(2) as pool:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        runs = list(pool.map(lambda name: _run(CASES[name], tmp_path / name, env), (positive, twin)))
    for run in runs:
        assert run.rc == run.case.exit, run.explain()
        for words in run.case.says:
            assert words in run.output, f"{words!r} not in the report\n{run.explain()}"
        for words in run.case.lacks:
            assert words not in run.output, f"{words!r} in the report\n{run.explain()}"
        assert "Traceback" not in run.output, run.explain()
        verdict = {0: "pass", 1: ("fail", "refused"), 2: "error"}[run.case.exit]
        assert run.report["verdict"] in verdict, run.explain()
        if run.report["verdict"] == "refused":  # the JSON says at which stage, as the text does
            assert f"REFUSED  {run.report['refusal_stage']}: " in run.output, run.explain()
        failing = run.junit.findall(".//failure") + run.junit.findall(".//error")
        assert bool(failing) == (run.case.exit != 0), run.explain()
