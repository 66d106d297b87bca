"""`relay-harness check`: does this smtpd.conf relay as meant? Decided by the real smtpd.

The config is parsed only to know what to probe (tables to install, labels to give credentials,
alias keys to send to) and to attach lint findings as evidence; the verdict of each probe comes
from what the fake upstream received and what smtpd logged, on a real target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.bundle import TableInput, build_bundle, synthesize_secrets
from harness.errors import HarnessError
from harness.pki import TestPki
from harness.probes import ProbeResult, plan_probes, run_probes
from harness.redact import Redactor
from harness.relay import ConfigRejected, relay_run
from harness.smtpdconf import Config, ConfigSyntaxError, Finding, auth_tables, lint, parse_config
from harness.targets.base import Bundle, Target
from harness.upstream import Profile


class CheckUsageError(HarnessError):
    """Something the user must fix before a check can run (exit 2)."""


@dataclass
class CheckReport:
    config: str
    target: str
    verdict: str  # "pass", "fail", "refused"
    results: list[ProbeResult] = field(default_factory=list)
    refusal: str | None = None
    refusal_line: int | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"


@dataclass(frozen=True)
class CheckInput:
    config_path: Path
    config_text: str
    profile: Profile
    tables: dict[str, Path]


def parse_table_flags(values: list[str]) -> dict[str, Path]:
    tables: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CheckUsageError(f"--table {value!r}: expected NAME=FILE")
        if not Path(path).is_file():
            raise CheckUsageError(f"--table {name}={path}: no such file")
        tables[name] = Path(path)
    return tables


def check_bundle(config: Config | None, inp: CheckInput) -> tuple[Bundle, Profile, list[str], Redactor]:
    """The files the config names, from --table or synthesized (secrets only), and the users."""
    profile = inp.profile
    notes: list[str] = []
    redactor = Redactor((c.user, c.password) for c in profile.credentials)
    if config is None:
        if inp.tables:
            notes.append("--table ignored: the config could not be parsed")
        return Bundle(inp.config_text), profile, notes, redactor
    secret_labels = auth_tables(config)
    tables: dict[str, TableInput] = {}
    for name, path in inp.tables.items():
        if name not in config.tables and f"<{name}>" in inp.config_text:
            # Used but never declared: smtpd refuses the config for it, which is the verdict.
            notes.append(f"--table {name}: the config uses <{name}> but declares no such table")
            continue
        tables[name] = TableInput(read_table(name, path))
    for table in config.tables.values():
        if table.config is None or table.backend not in ("file", "db") or table.name in tables:
            continue
        if table.name in secret_labels:
            content, profile, creds = synthesize_secrets(secret_labels[table.name], profile)
            for cred in creds:
                redactor.add(cred.user, cred.password)
            labels = ", ".join(sorted(secret_labels[table.name]))
            notes.append(
                f"table {table.name}: not given, synthesized with generated credentials "
                f"for label(s) {labels} that the upstream accepts"
            )
            tables[table.name] = TableInput(content)
        elif f"<{table.name}>" not in inp.config_text:
            notes.append(
                f"table {table.name}: never used by the config; installed empty so smtpd can open it"
            )
            tables[table.name] = TableInput(b"")
        else:
            raise CheckUsageError(
                f"the config's table {table.name!r} (line {table.line}, {table.backend}:{table.config}) "
                f"needs content: pass --table {table.name}=FILE"
            )
    bundle = build_bundle(inp.config_text, config, tables)
    return bundle, profile, notes, redactor


def read_table(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckUsageError(f"--table {name}={path}: cannot read: {exc.strerror or exc}") from None


def run_check(target: Target, inp: CheckInput, pki: TestPki) -> CheckReport:
    started = time.monotonic()
    report = CheckReport(str(inp.config_path), target.name, "fail")
    config: Config | None
    try:
        config = parse_config(inp.config_text, str(inp.config_path))
        report.findings = lint(config)
    except ConfigSyntaxError as exc:
        config = None
        report.notes.append(f"relay-harness could not parse the config ({exc}); smtpd decides")
    bundle, profile, notes, redactor = check_bundle(config, inp)
    report.notes.extend(notes)
    probes, probe_notes = plan_probes(bundle, config)
    report.notes.extend(probe_notes)
    add = getattr(target, "redactor", None)
    if isinstance(add, Redactor):
        for cred in profile.credentials:
            add.add(cred.user, cred.password)
    try:
        with relay_run(target, bundle, profile, pki) as run:
            report.results.extend(run_probes(run, probes, profile, redactor))
    except ConfigRejected as refused:
        report.verdict = "refused"
        report.refusal = redactor(refused.check.message or refused.check.output)
        report.refusal_line = refused.check.line
        report.seconds = time.monotonic() - started
        return report
    report.verdict = "pass" if all(r.ok for r in report.results) else "fail"
    report.seconds = time.monotonic() - started
    return report
