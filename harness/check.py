"""`relay-harness check`: does this smtpd.conf relay as meant? Decided by the real smtpd.

The config is parsed only to know what to probe (tables to install, labels to give credentials,
alias keys to send to) and to attach lint findings as evidence; the verdict of each probe comes
from what the fake upstream received and what smtpd logged, on a real target.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.bundle import (
    TableInput,
    build_bundle,
    declared_tables,
    host_file_mode,
    synthesize_secrets,
    tls_files,
)
from harness.errors import HarnessError
from harness.listener_probes import probe_listeners
from harness.pki import TestPki
from harness.probes import ProbeResult, plan_probes, run_probes
from harness.redact import Redactor
from harness.relay import ConfigRejected, relay_run
from harness.smtpdconf import (
    EXTRAS_BACKENDS,
    Config,
    ConfigSyntaxError,
    Finding,
    alias_files,
    alias_problem,
    alias_tables,
    auth_tables,
    line_ending_findings,
    lint,
    parse_aliases,
    parse_config,
    queue_key_prompt,
)
from harness.smtpdconf.parse import WIDEST_GRAMMAR, newer_grammar_line
from harness.targets.base import Bundle, BundleFile, Target
from harness.targets.testnet import CANNOT
from harness.upstream import Profile
from harness.userfiles import read_bytes, read_text


class CheckUsageError(HarnessError):
    """Something the user must fix before a check can run (exit 2)."""


@dataclass
class CheckReport:
    config: str
    target: str
    verdict: str  # "pass", "fail", "refused", "error" (the check could not run: `error` says why)
    results: list[ProbeResult] = field(default_factory=list)
    error: str | None = None
    refusal: str | None = None
    refusal_line: int | None = None
    refusal_stage: str = "smtpd -n"  # or "smtpd start": -n accepted it, smtpd exited starting with it
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
    # The tables' content, read before any work (read_tables); one missing here is read from its
    # path when the bundle is built.
    table_content: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # --file PATH=LOCAL: host path → local file


def parse_table_flags(values: list[str]) -> dict[str, Path]:
    tables: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CheckUsageError(f"--table {value!r}: expected NAME=FILE")
        if not re.fullmatch(r"[^\s<>{}\x00-\x1f\x7f]+", name):
            raise CheckUsageError(f"--table {name!r}: not a table NAME (as in the config's `table NAME`)")
        if name in tables:
            raise CheckUsageError(f"--table {name}: given twice ({tables[name]} and {path})")
        tables[name] = Path(path)
    return tables


def parse_file_flags(values: list[str]) -> dict[str, Path]:
    """--file PATH=LOCAL: any file of the host (a certificate, a key, a database, an mda's program)."""
    files: dict[str, Path] = {}
    for value in values:
        path, sep, local = value.partition("=")
        if not sep or not path.startswith("/") or not local:
            raise CheckUsageError(f"--file {value!r}: expected PATH=LOCAL with an absolute PATH on the host")
        files[path] = Path(local)
    return files


def read_tables(tables: dict[str, Path]) -> dict[str, bytes]:
    """Each --table file as text (UTF-8, no NUL), read before any work; UserFileError names it."""
    return {name: read_text(path, flag=f"--table {name}=").encode() for name, path in tables.items()}


def _included(inp: CheckInput) -> Callable[[str], str | None]:
    """A file an `include` line names, read from its --file (None: not given)."""

    def included(path: str) -> str | None:
        local = inp.files.get(path)
        return None if local is None else read_text(local, flag=f"--file {path}=")

    return included


def parse_check_config(inp: CheckInput, errors: list[ConfigSyntaxError] | None = None) -> Config:
    """The config as smtpd reads it: a file an `include` line names is read from its --file."""
    return parse_config(inp.config_text, str(inp.config_path), WIDEST_GRAMMAR, errors, _included(inp))


def check_input(inp: CheckInput) -> None:
    """What can be known wrong before a test host is built (CheckUsageError, exit 2).

    A --table the config does not declare (a typo: `secret=` for `secrets=`) would otherwise be
    ignored and the check pass on synthesized credentials; an aliases line a test host cannot
    have (a key that is no address, a local user that is no user name) fails far from its line.
    A config the harness cannot parse is smtpd's to judge: nothing is checked then.
    """
    try:
        config = parse_check_config(inp)
    except ConfigSyntaxError:
        return
    prompt = queue_key_prompt(config)
    if prompt is not None:
        raise CheckUsageError(
            f"{CANNOT} the queue key smtpd asks for when it starts ({inp.config_path}:{prompt}: "
            "`queue encryption` without a key reads it from the terminal, `queue encryption stdin` "
            "from its input): a test host has no one to type it, and smtpd would wait; check a copy "
            "with a key of its own (`queue encryption KEY`, KEY from `openssl rand -hex 16`)"
        )
    for include in config.includes:
        if include.path.startswith("/") and include.path not in inp.files:
            raise CheckUsageError(
                f"{CANNOT} {include.path}, the file {inp.config_path} includes (line {include.line}): "
                f"it is part of the config, on the host it ships to; give it with "
                f"--file {include.path}=LOCAL"
            )
    usable = declared_tables(config)
    for name in inp.tables:
        table = config.tables.get(name)
        if table is None:
            if f"<{name}>" in inp.config_text:
                continue  # used but never declared: smtpd refuses the config for it, the verdict
            declared = ", ".join(sorted(config.tables)) or "none"
            raise CheckUsageError(
                f"--table {name}: {inp.config_path} declares no table {name!r} (its tables: {declared})"
            )
        if name not in usable:
            raise CheckUsageError(
                f"--table {name}: table {name} ({inp.config_path}:{table.line}) is {table.backend}, "
                "not a file:, db: or opensmtpd-extras table: its content is in the config, not in a file"
            )
    for name in sorted(alias_files(config) & set(inp.table_content)):
        problem = alias_problem(inp.table_content[name])
        if problem is not None:
            line, why = problem
            raise CheckUsageError(f"--table {name}={inp.tables[name]}:{line}: {why}")


def check_bundle(
    config: Config | None, inp: CheckInput, pki: TestPki | None = None, partial: bool = False
) -> tuple[Bundle, Profile, list[str], Redactor]:
    """The files the config names (from --table, --file, synthesized secrets, certificates issued
    from the test CA for its `pki` and `ca` lines) and the users.

    `partial`: `config` is what could be read of a config smtpd will refuse; its files are still
    installed, so smtpd names the config's own error rather than a file the user did give."""
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
        if partial and name not in declared_tables(config):
            notes.append(f"--table {name}: not installed: its `table` line is one smtpd refuses")
            continue
        if name not in config.tables and f"<{name}>" in inp.config_text:
            # Used but never declared: smtpd refuses the config for it, which is the verdict.
            notes.append(f"--table {name}: the config uses <{name}> but declares no such table")
            continue
        content = inp.table_content.get(name)
        tables[name] = TableInput(content if content is not None else read_bytes(path, f"--table {name}="))
    for table in config.tables.values():
        installable = table.backend in ("file", "db") or table.backend in EXTRAS_BACKENDS
        if table.config is None or not installable or table.name in tables:
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
        elif partial:  # empty, so smtpd names the config's own error, not this missing file
            notes.append(f"table {table.name}: not given; installed empty: smtpd refuses the config")
            tables[table.name] = TableInput(b"")
        else:
            raise CheckUsageError(
                f"the config's table {table.name!r} (line {table.line}, {table.backend}:{table.config}) "
                f"needs content: pass --table {table.name}=FILE"
            )
    extra = [
        BundleFile(path, read_bytes(local, f"--file {path}="), *given_mode(path, local))
        for path, local in inp.files.items()
    ]
    if pki is not None:
        issued, issued_notes = tls_files(config, pki, inp.files)
        extra += issued
        notes += issued_notes
    bundle = build_bundle(inp.config_text, config, tables, extra_files=extra)
    return bundle, profile, notes, redactor


def given_mode(path: str, local: Path) -> tuple[int, str, str]:
    """As a real host would have it (host_file_mode); a program stays executable."""
    mode, owner, group = host_file_mode(path)
    with contextlib.suppress(OSError):
        if local.stat().st_mode & 0o111:
            mode |= 0o111 if mode & 0o044 else 0o100
    return mode, owner, group


def given_aliases(config: Config | None, inp: CheckInput) -> list[str]:
    """Tables given with --table that read as an aliases file (named so, or at an aliases path,
    with `key: value` lines) but that no action applies: the user's intent, probed as such."""
    if config is None:
        return []
    out = []
    for name in inp.tables:
        table = config.tables.get(name)
        if table is None or name in alias_tables(config) or table.backend not in ("file", "db"):
            continue
        if "alias" not in f"{name} {table.config}".lower():
            continue
        if parse_aliases(inp.table_content.get(name, b"")):
            out.append(name)
    return out


def run_check(target: Target, inp: CheckInput, pki: TestPki) -> CheckReport:
    started = time.monotonic()
    report = CheckReport(str(inp.config_path), target.name, "fail")
    config: Config | None
    try:
        config = parse_check_config(inp)
        report.findings = lint(config)
    except ConfigSyntaxError as exc:
        config = None
        report.findings = line_ending_findings(inp.config_text)
        report.notes.append(f"relay-harness could not parse the config ({exc}); smtpd decides")
    if config is None:  # what can be read of it: its files still go where it names them
        readable = parse_check_config(inp, errors=[])
        bundle, profile, notes, redactor = check_bundle(readable, inp, pki, partial=True)
    else:
        # a statement of no grammar (`host ...` after a continuation lost to a trailing blank) is
        # smtpd's syntax error: what the rest names is installed, what it lost is not asked for
        unknown = any(raw.kind == "unknown" for raw in config.raw)
        bundle, profile, notes, redactor = check_bundle(config, inp, pki, partial=unknown)
    report.notes.extend(notes)
    probes, probe_notes = plan_probes(bundle, config, given_aliases(config, inp))
    report.notes.extend(probe_notes)
    add = getattr(target, "redactor", None)
    if isinstance(add, Redactor):
        for cred in profile.credentials:
            add.add(cred.user, cred.password)
    try:
        with relay_run(target, bundle, profile, pki) as run:
            listened, listen_notes = probe_listeners(run, config, bundle, redactor)
            report.results.extend(listened)
            report.notes.extend(listen_notes)
            report.results.extend(run_probes(run, probes, profile, redactor))
    except ConfigRejected as refused:
        report.verdict = "refused"
        report.refusal = redactor(refused.check.message or refused.check.output)
        report.refusal_line = refused.check.line
        report.refusal_stage = refused.stage
        line = refused.check.line
        newer = newer_grammar_line(inp.config_text, str(inp.config_path), _included(inp))
        if line is not None and line == newer and "syntax error" in (refused.check.message or ""):
            report.notes.append(
                f"line {line} is OpenSMTPD 7.x grammar, which the smtpd of {target.name} refuses: "
                "if the host the config ships to runs 7.x, check it on 7.x (--target lab:trixie, "
                "OpenSMTPD 7.6)"
            )
        report.seconds = time.monotonic() - started
        return report
    report.verdict = "pass" if all(r.ok for r in report.results) else "fail"
    report.seconds = time.monotonic() - started
    return report
