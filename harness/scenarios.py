"""Scenario files (TOML) → scenario objects; running a case: send, wait, observe, judge.

A scenario is what a sysadmin writes to pin a behaviour or reproduce a documented error: a
config, its tables, the provider, mail to send and what must be seen. Cases in one file share
the config and may override parts of it; a broken twin is just a case whose override breaks
the config and whose expectations say how. A twin must also fail its positive's expectations
(judged on the twin's own observation): a twin that meets them all proves nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bundle import BundleError, TableInput, build_bundle, declared_tables
from harness.errors import HarnessError
from harness.expectations import Expectations, Mismatch, evaluate
from harness.expectations_parse import Fail, parse_expectations, validate
from harness.observation import Observation, Submission
from harness.pki import TestPki
from harness.redact import Redactor
from harness.relay import ConfigRejected, RelayRun, relay_run
from harness.smtpdconf import ConfigSyntaxError, parse_config
from harness.smtpdconf.parse import WIDEST_GRAMMAR
from harness.targets.base import Bundle, BundleFile, OutgoingMail, Target, TargetError
from harness.targets.images import RELEASE_NAME
from harness.upstream import Profile, ProfileError, profile_from_data
from harness.userfiles import MAX_CONFIG_BYTES, UserFileError, read_text
from harness.waiting import wait_until

MAX_MESSAGES = 20  # a case's mail is bounded: scenarios must stop by themselves
MARKERS = {
    "tls": "TLS mode on the wire (STARTTLS, implicit, plain) and certificate checks",
    "auth": "AUTH to the smarthost: success, failure, credentials",
    "mail_from": "envelope sender rewriting (mail-from)",
    "aliases": "alias expansion and local delivery",
    "documented_error": "an error case documented in the seed article or smtpd's behaviour",
    "faults": "provider misbehaviour smtpd must survive",
    "grammar": "smtpd.conf grammar across OpenBSD 6.4, 6.6, 6.7 and OpenSMTPD 7.x",
    "lmtp": "LMTP relaying",
    "matching": "match rules: first match wins, from/for variants, negation, reject",
    "upgrade": "what changes for a config from OpenSMTPD 6.8 (Debian 12) to 7.6 (Debian 13)",
}

_TOP = {
    "description",
    "markers",
    "config",
    "config_file",
    "tables",
    "upstream",
    "case",
    "secret_tables",
    "ca_files",
}
# A CA certificate a config can trust with `ca NAME cert FILE`: the harness's own, or the other
# CA that signs the provider's certificate under `faults.cert = "untrusted"`.
CA_SOURCES = ("test", "other")
_CASE = {
    "name",
    "description",
    "markers",
    "twin_of",
    "no_twin",
    "stale_tables",
    "send",
    "config_replace",
    "upstream",
    "tables",
    "expect",
}
_SEND = {"from", "to", "subject", "user", "via", "address", "port"}


class ScenarioError(HarnessError):
    """A malformed scenario; str() is `FILE:LINE: field: message`."""

    def __init__(self, path: str, line: int | None, fieldname: str, message: str) -> None:
        self.path, self.line, self.field, self.message = path, line, fieldname, message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {fieldname}: {message}")


@dataclass(frozen=True)
class Mail:
    sender: str
    recipients: tuple[str, ...]
    subject: str
    user: str = "root"
    via: str = "sendmail"  # or "smtp": to a listener of the target, from inside the target
    address: str = "127.0.0.1"
    port: int = 25


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    markers: tuple[str, ...]
    twin_of: str | None
    config: str
    tables: dict[str, str]
    stale_tables: dict[str, str]  # db: tables built from this older text, then the text edited
    ca_files: dict[str, str]  # path on the target → which CA's certificate (CA_SOURCES)
    profile: Profile
    mails: tuple[Mail, ...]
    expect: Expectations
    line: int | None
    no_twin: str | None = None  # why this positive cannot have a broken twin (rarely true)
    # `[case.expect.release.NAME]`: what differs on that Debian release's smtpd (laid over expect)
    releases: Mapping[str, Expectations] = field(default_factory=dict)

    def expect_on(self, release: str | None) -> Expectations:
        """The expectations on a target of `release` (None: unknown, the case's own)."""
        over = self.releases.get(release) if release else None
        return self.expect if over is None else release_expectations(self.expect, over)


def release_expectations(base: Expectations, over: Expectations) -> Expectations:
    """A release's override laid over the case's expectations.

    Groups the override gives replace the case's; refusal is all or nothing: an override that
    expects `config_error` is the whole expectation (a refused config sends nothing), and one
    that expects anything else on a config the case expects refused drops that refusal.
    """
    if over.config_error is not None:
        return over
    merged = base.overridden_by(over)
    return dataclasses.replace(merged, config_error=None) if base.config_error is not None else merged


@dataclass(frozen=True)
class Scenario:
    path: Path
    description: str
    cases: tuple[Case, ...]
    secret_tables: tuple[str, ...] = ()

    def case(self, name: str) -> Case:
        return next(c for c in self.cases if c.name == name)


@dataclass(frozen=True)
class CaseOutcome:
    """What a case saw, what of its expectations that missed (redacted), and evidence to show."""

    observation: Observation
    mismatches: tuple[Mismatch, ...]
    evidence: tuple[str, ...]
    redactor: Redactor

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def failures(self) -> tuple[str, ...]:
        """The mismatches as a person reads them, passwords redacted."""
        return tuple(self.redactor(str(m)) for m in self.mismatches)

    def explain(self) -> str:
        return "\n".join([*self.failures, "", *(self.redactor(e) for e in self.evidence)]).rstrip()


class _Locator:
    """Line numbers for fields: tomllib gives none, so find `key =` in the source text."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = str(path)
        self.lines = text.splitlines()
        self.case_starts = [i for i, s in enumerate(self.lines) if re.match(r"^\s*\[\[\s*case\s*\]\]", s)]

    def line(self, key: str, case: int | None = None) -> int | None:
        """The line of `key` (dotted: `expect.mbox.user`) in the case's block, or the file's head.

        Each enclosing `[table]` header found moves the search past it (so `expect.tls` is the
        `tls =` under `[case.expect]`, not another one above); a key that is absent (a missing
        field) is located at its nearest enclosing key.
        """
        start, end = 0, len(self.lines)
        if case is not None and case < len(self.case_starts):
            start = self.case_starts[case]
            end = self.case_starts[case + 1] if case + 1 < len(self.case_starts) else len(self.lines)
        elif self.case_starts:
            end = self.case_starts[0]
        parts = [p.partition("[")[0] for p in key.split(".")]
        for part in parts[:-1]:
            header = re.compile(rf"^\s*\[+\s*([\w.\"']+\.)?[\"']?{re.escape(part)}[\"']?\s*\]")
            start = next((i for i in range(start, end) if header.search(self.lines[i])), start)
        for leaf in reversed(parts):
            pattern = re.compile(
                rf"^\s*(\[+\s*)?([\w.]*\.)?[\"']?{re.escape(leaf)}[\"']?\s*(=|\])|\b{re.escape(leaf)}\s*="
            )
            hit = next((i + 1 for i in range(start, end) if pattern.search(self.lines[i])), None)
            if hit is not None:
                return hit
        return start + 1 if case is not None else None

    def error(self, key: str, message: str, case: int | None = None) -> ScenarioError:
        return ScenarioError(self.path, self.line(key, case), key, message)


def load_scenario(path: Path) -> Scenario:
    try:
        text = read_text(path).removeprefix("\ufeff")  # a BOM some editors write
    except UserFileError as exc:
        raise ScenarioError(str(path), exc.line, "file", exc.message) from None
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ScenarioError(str(path), None, "toml", "arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise ScenarioError(str(path), int(m.group(1)) if m else None, "toml", str(exc)) from None
    loc = _Locator(path, text)
    _known(data, _TOP, "", loc)
    config = _config_text(data, path, loc)
    tables = _tables(data.get("tables", {}), "tables", loc, None)
    markers = _markers(data.get("markers", []), "markers", loc, None)
    upstream = data.get("upstream", {})
    if not isinstance(upstream, dict):
        raise loc.error("upstream", "must be a table: [upstream]")
    raw_cases = data.get("case")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise loc.error("case", "a scenario needs at least one [[case]]")
    ca_files = _ca_files(data.get("ca_files", {}), loc)
    cases = tuple(
        _case(raw, i, config, tables, upstream, markers, loc, ca_files) for i, raw in enumerate(raw_cases)
    )
    names = [c.name for c in cases]
    for i, case in enumerate(cases):
        if case.name in names[:i]:
            raise loc.error("name", f"case name {case.name!r} is used twice", i)
        if case.twin_of is not None and case.twin_of not in names:
            raise loc.error("twin_of", f"no case named {case.twin_of!r} in this file", i)
        if case.twin_of == case.name:
            raise loc.error("twin_of", "a case cannot be its own twin: name the positive it breaks", i)
    secret = data.get("secret_tables", ["secrets"])
    if not isinstance(secret, list) or not all(isinstance(t, str) for t in secret):
        raise loc.error("secret_tables", "must be a list of table names")
    if "secret_tables" in data:
        try:
            declared = declared_tables(parse_config(config, "/etc/smtpd.conf"))
        except ConfigSyntaxError:
            declared = None  # smtpd's refusal is the case's verdict
        unknown = [name for name in secret if declared is not None and name not in declared]
        if unknown:
            known = ", ".join(sorted(declared or ())) or "none"
            raise loc.error(
                "secret_tables", f"the config declares no table {unknown[0]!r} (its tables: {known})"
            )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise loc.error("description", "must be a string")
    _check_every_positive_has_a_twin(cases, loc)  # last: a field's own error is the one to see first
    return Scenario(path, description, cases, tuple(secret))


def _check_every_positive_has_a_twin(cases: tuple[Case, ...], loc: _Locator) -> None:
    """The project's rule, at load time: a case that passes must be shown to fail when broken.

    Every case that is not itself a twin needs a case with `twin_of` naming it, or an explicit
    `no_twin` reason; an exemption whose case has a twin after all is stale and refused too.
    """
    twinned = {c.twin_of for c in cases if c.twin_of is not None}
    for i, case in enumerate(cases):
        if case.no_twin is not None and case.name in twinned:
            twins = ", ".join(c.name for c in cases if c.twin_of == case.name)
            raise loc.error("no_twin", f"{case.name} has a broken twin ({twins}): remove no_twin", i)
    lacking = [
        i for i, c in enumerate(cases) if c.twin_of is None and c.no_twin is None and c.name not in twinned
    ]
    if lacking:
        names = ", ".join(cases[i].name for i in lacking)
        raise ScenarioError(
            loc.path,
            loc.line("name", lacking[0]),
            "twin_of",
            f'no broken twin for {names}: add a case with twin_of = "NAME" whose override breaks what '
            "NAME pins and whose expectations say how it breaks (or, if it truly cannot have one, "
            'no_twin = "why")',
        )


def _known(
    data: dict[str, Any], known: set[str], prefix: str, loc: _Locator, case: int | None = None
) -> None:
    for key in data:
        if key not in known:
            raise loc.error(f"{prefix}{key}", f"unknown field; known: {', '.join(sorted(known))}", case)


def _config_text(data: dict[str, Any], path: Path, loc: _Locator) -> str:
    if ("config" in data) == ("config_file" in data):
        raise loc.error("config", "give exactly one of config (inline text) or config_file (a path)")
    if "config" in data:
        if not isinstance(data["config"], str):
            raise loc.error("config", 'must be a string (use a """multi-line string""")')
        return str(data["config"])
    target = path.parent / str(data["config_file"])
    try:
        return read_text(target, limit=MAX_CONFIG_BYTES)
    except UserFileError as exc:
        raise loc.error("config_file", str(exc)) from None


def _tables(raw: Any, key: str, loc: _Locator, case: int | None) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise loc.error(key, "must map table names to their content (strings)", case)
    return dict(raw)


def _markers(raw: Any, key: str, loc: _Locator, case: int | None) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise loc.error(key, "must be a list of marker names", case)
    for marker in raw:
        if marker not in MARKERS:
            raise loc.error(key, f"unknown marker {marker!r}; known: {', '.join(sorted(MARKERS))}", case)
    return tuple(raw)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _ca_files(raw: Any, loc: _Locator) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and k.startswith("/") and v in CA_SOURCES for k, v in raw.items()
    ):
        raise loc.error("ca_files", f"must map absolute paths to one of {', '.join(CA_SOURCES)}")
    return dict(raw)


def _case(
    raw: Any,
    index: int,
    config: str,
    tables: dict[str, str],
    upstream: dict[str, Any],
    markers: tuple[str, ...],
    loc: _Locator,
    ca_files: dict[str, str],
) -> Case:
    if not isinstance(raw, dict):
        raise loc.error("case", "each [[case]] must be a table", index)
    _known(raw, _CASE, "case.", loc, index)
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name):
        raise loc.error("name", "each case needs a name (letters, digits, _ . + -)", index)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise loc.error("description", "must be a string", index)
    twin_of = raw.get("twin_of")
    if twin_of is not None and not isinstance(twin_of, str):
        raise loc.error("twin_of", "must name another case of this file (the positive it breaks)", index)
    no_twin = raw.get("no_twin")
    if no_twin is not None and (not isinstance(no_twin, str) or not no_twin.strip()):
        raise loc.error("no_twin", "must say why this case cannot have a broken twin (a string)", index)
    if no_twin is not None and twin_of is not None:
        raise loc.error("no_twin", "a twin needs no twin of its own: remove no_twin", index)
    replacements = raw.get("config_replace", [])
    pairs_ok = isinstance(replacements, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)
        for pair in replacements
    )
    if not pairs_ok:
        raise loc.error("config_replace", 'must be a list of ["old", "new"] pairs of strings', index)
    for old, new in replacements:
        if old not in config:
            raise loc.error("config_replace", f"{old!r} does not occur in the config", index)
        config = config.replace(old, new)
    case_tables = _tables(raw.get("tables", {}), "tables", loc, index)
    stale_tables = _tables(raw.get("stale_tables", {}), "stale_tables", loc, index)
    _check_tables(config, tables, case_tables, stale_tables, loc, index)
    case_upstream = raw.get("upstream", {})
    if not isinstance(case_upstream, dict):
        raise loc.error("upstream", "must be a table", index)
    try:
        profile = profile_from_data(_merge(upstream, case_upstream), loc.path)
    except ProfileError as exc:
        in_case = exc.field in case_upstream or exc.field.split(".")[0] in case_upstream
        raise loc.error(f"upstream.{exc.field}", exc.message, index if in_case else None) from None
    raw_expect = raw.get("expect", {})
    if not isinstance(raw_expect, dict) or not raw_expect:
        raise loc.error("expect", "each case needs an [case.expect] table saying what must be seen", index)

    def fail(key: str, message: str) -> ScenarioError:
        return loc.error(key, message, index)

    releases = raw_expect.get("release", {})
    raw_expect = {k: v for k, v in raw_expect.items() if k != "release"}
    if not raw_expect:
        raise fail("expect", "each case needs expectations of its own besides [case.expect.release.*]")
    expect = parse_expectations(raw_expect, fail)
    validate(expect, fail)
    overrides = _release_overrides(releases, expect, fail)
    return Case(
        name=name,
        description=description,
        markers=tuple(dict.fromkeys(markers + _markers(raw.get("markers", []), "markers", loc, index))),
        twin_of=twin_of,
        config=config,
        tables={**tables, **case_tables},
        stale_tables=stale_tables,
        ca_files=ca_files,
        profile=profile,
        mails=_mails(raw.get("send"), loc, index),
        expect=expect,
        line=loc.line("name", index),
        no_twin=no_twin,
        releases=overrides,
    )


def _release_overrides(raw: Any, base: Expectations, fail: Fail) -> dict[str, Expectations]:
    """`[case.expect.release.NAME]` tables: each parsed like [case.expect], checked merged."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise fail("expect.release", "must be tables: [case.expect.release.trixie]")
    out = {}
    for name, table in raw.items():
        prefix = f"expect.release.{name}"
        if not RELEASE_NAME.match(name):
            raise fail(prefix, f"{name!r} is not a Debian release name (e.g. trixie)")
        if not table:
            raise fail(prefix, "say what differs on this release (or leave the table out)")
        over = parse_expectations(table, fail, prefix)
        validate(release_expectations(base, over), fail, prefix)
        out[name] = over
    return out


def _check_tables(
    config_text: str,
    shared: dict[str, str],
    own: dict[str, str],
    stale: dict[str, str],
    loc: _Locator,
    index: int,
) -> None:
    """At load time, what the bundle builder would refuse at run time: tables the config lacks."""
    try:
        config = parse_config(config_text, "/etc/smtpd.conf", WIDEST_GRAMMAR)
    except ConfigSyntaxError:
        config = None
    declared = declared_tables(config) if config is not None else {}
    for name in {**shared, **own}:
        if name not in declared:
            where = index if name in own else None
            raise loc.error(f"tables.{name}", str(BundleError(name, declared)), where)
    for name in stale:
        if config is None or name not in {**shared, **own} or config.tables[name].backend != "db":
            raise loc.error(
                f"stale_tables.{name}",
                "must name a db: table of the config that tables gives (its current text)",
                index,
            )


def _control(text: str) -> bool:
    """A character no address, user or host name has; sshd drops a command line with a NUL."""
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _mails(raw: Any, loc: _Locator, index: int) -> tuple[Mail, ...]:
    if raw is None:
        raw = [{}]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_MESSAGES:
        raise loc.error("send", f"must be a table or a list of 1 to {MAX_MESSAGES} tables", index)
    mails = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise loc.error("send", "each message must be a table { from = ..., to = [...] }", index)
        _known(item, _SEND, "send.", loc, index)
        to = item.get("to", ["bob@example.com"])
        if isinstance(to, str):
            to = [to]
        if not isinstance(to, list) or not to or not all(isinstance(t, str) for t in to):
            raise loc.error("send.to", "must be a list of recipient addresses", index)
        if any(_control(t) for t in to):
            raise loc.error("send.to", "an address with a control character (newline, NUL, ...)", index)
        via = item.get("via", "sendmail")
        if via not in ("sendmail", "smtp"):
            raise loc.error("send.via", "must be sendmail (local submission) or smtp (to a listener)", index)
        port = item.get("port", 25)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise loc.error("send.port", "must be a port number", index)
        texts = {"from": "root", "subject": f"relay-harness scenario message {i + 1}"}
        texts |= {"user": "root", "address": "127.0.0.1"}
        for key, default in texts.items():
            value = texts[key] = item.get(key, default)
            if not isinstance(value, str) or not value:
                raise loc.error(f"send.{key}", f"must be a non-empty string, not {value!r}", index)
            if key != "subject" and _control(value):
                raise loc.error(f"send.{key}", "contains a control character (newline, NUL, ...)", index)
        mails.append(
            Mail(
                sender=texts["from"],
                recipients=tuple(to),
                subject=texts["subject"],
                user=texts["user"],
                via=via,
                address=texts["address"],
                port=port,
            )
        )
    return tuple(mails)


def _case_bundle(case: Case, secret_tables: tuple[str, ...], pki: TestPki) -> Bundle:
    """The case's config with its tables at the paths the config names (db: tables via makemap).

    Every table was checked against the config when the file loaded (`_check_tables`), so the
    bundle builder's own refusal cannot happen here.
    """
    try:
        config = parse_config(case.config, "/etc/smtpd.conf", WIDEST_GRAMMAR)
    except ConfigSyntaxError:
        config = None
    tables = {}
    for name, content in case.tables.items():
        stale = case.stale_tables.get(name)
        tables[name] = TableInput(content.encode(), built_from=stale.encode() if stale is not None else None)
    extra = []
    for ca_path, source in case.ca_files.items():
        ca = pki.ca if source == "test" else pki.other_ca
        extra.append(BundleFile(ca_path, ca.cert_pem.bytes()))
    mbox = case.expect.mbox.user if case.expect.mbox else None
    return build_bundle(
        case.config,
        config,
        tables,
        secret_tables=secret_tables,
        extra_files=extra,
        extra_users=[mbox] if mbox else [],
    )


def run_case(
    target: Target, scenario: Scenario, case: Case, pki: TestPki, release: str | None = None
) -> CaseOutcome:
    """Run one case on a target: send its mail, wait for what it expects, observe, then judge.

    `release` is the target's Debian release when known (lab hosts): its overrides apply. A
    twin's observation also holds what its positive's expectations look at (their mailboxes),
    so that `judge_twin` can judge it by them without another run.
    """
    bundle = _case_bundle(case, scenario.secret_tables, pki)
    expect = case.expect_on(release)
    judged = [expect]
    if case.twin_of is not None:
        judged.append(scenario.case(case.twin_of).expect_on(release))
    users = frozenset(u for e in judged for u in e.mailbox_users)
    try:
        with relay_run(target, bundle, case.profile, pki) as run:
            if expect.config_error is not None:  # smtpd was meant to refuse it: send nothing
                observation = Observation(run.check)
                evidence = [f"smtpd -n accepted the config: {run.check.output or '(no output)'}"]
            else:
                observation = _observe(run, case, expect, users)
                evidence = _evidence(run, observation)
    except ConfigRejected as refused:
        observation = Observation(refused.check)
        evidence = [f"smtpd -n: {refused.check.output}"]
    mismatches = tuple(evaluate(expect, observation))
    return CaseOutcome(observation, mismatches, tuple(evidence), _redactor(scenario, case))


def _redactor(scenario: Scenario, case: Case) -> Redactor:
    """Passwords of the case's provider and of its positive's: a twin's report quotes both."""
    cases = [case] if case.twin_of is None else [case, scenario.case(case.twin_of)]
    return Redactor((c.user, c.password) for k in cases for c in k.profile.credentials)


def _observe(run: RelayRun, case: Case, expect: Expectations, users: frozenset[str]) -> Observation:
    """Submit the case's mail, wait (on events) until nothing it expects is pending, snapshot."""
    mark = run.log.mark()
    submissions = tuple(_submit(run, mail) for mail in case.mails)
    retried = 0

    def snapshot(final: bool) -> Observation:
        # The target's state first, then the streams: what emptied the queue is then recorded.
        queue = run.target.queue() if final and not run.log.closed else ""
        mailboxes = {u: run.target.mailbox(u).decode("utf-8", "replace") for u in users} if final else {}
        return Observation(
            config=run.check,
            submissions=submissions,
            sessions=run.upstream.recorder.sessions,
            log=tuple(run.log.lines[mark:]),
            queue=queue,
            mailboxes=mailboxes,
            smtpd_exited=run.log.closed,
        )

    def settled() -> bool | None:
        nonlocal retried
        live = snapshot(final=False)
        for _ in range(expect.retries_due(live) - retried):  # retry deferred mail at once
            run.target.control("schedule", "all")
            retried += 1
        return True if run.log.closed or not expect.pending(live) else None

    wait_until(settled, [run.log, run.upstream.recorder], expect.wait_seconds)
    return snapshot(final=True)


def _submit(run: RelayRun, mail: Mail) -> Submission:
    out = OutgoingMail(
        mail.sender,
        mail.recipients,
        mail.subject,
        via=mail.via,
        user=mail.user,
        smtp_address=mail.address,
        smtp_port=mail.port,
    )
    try:
        run.send(out)
    except TargetError as exc:
        return Submission(mail.sender, mail.recipients, mail.via, str(exc))
    return Submission(mail.sender, mail.recipients, mail.via)


def _evidence(run: RelayRun, obs: Observation) -> list[str]:
    out = [f"upstream: {run.upstream.recorder.summary()}"]
    if obs.smtpd_exited:
        out.append("smtpd exited during the case")
    interesting = [line for line in obs.log if not line.startswith("debug:")]
    out.append("smtpd log (since the first message, debug lines left out):")
    out.extend(f"  {line}" for line in interesting[-25:])
    if obs.queue.strip():
        out.append(f"smtpctl show queue: {obs.queue.strip()}")
    return out


@dataclass(frozen=True)
class TwinVerdict:
    """A twin judged by its positive's expectations: which of them its outcome fails."""

    positive: str
    discriminators: tuple[Mismatch, ...]

    @property
    def proves(self) -> bool:
        return bool(self.discriminators)

    def explain(self) -> str:
        if not self.proves:
            return f"this pair proves nothing: the twin satisfies every expectation of {self.positive}"
        why = "; ".join(
            f"{m.field} (positive wants {m.wanted}, twin saw {m.saw})" for m in self.discriminators
        )
        return f"twin discriminated by: {why}"


def judge_twin(positive: Case, twin_observation: Observation, release: str | None = None) -> TwinVerdict:
    """The positive's expectations (on `release`) judged on the twin's outcome: one must fail."""
    return TwinVerdict(positive.name, tuple(evaluate(positive.expect_on(release), twin_observation)))


INDEX_HEAD = """# Scenario library

Each `*.toml` here is collected by pytest (`pytest scenarios/`, or `-k NAME`, `-m MARKER` with
markers tls, auth, mail_from, aliases, documented_error, faults, grammar, lmtp, matching, upgrade)
and runs against the real OpenSMTPD on a lab test host with the fake upstream (`--relay-target
lab:trixie`: Debian 13's OpenSMTPD 7.6 from an image; `--relay-target emulated`: the emulated
smtpd). A case marked *twin of X* is X's broken
twin: the same config broken in one place, and what must then be seen instead.

Format (see `harness/scenarios.py`): top-level `config` (inline) or `config_file`, `[tables]`
(content of each `table NAME`), `[upstream]` (a provider profile), `ca_files`, and `[[case]]`s
with overrides (`config_replace`, `upstream`, `tables`, `stale_tables`), `send` (sendmail or smtp), and
`[case.expect]` (see `harness/expectations.py`; each value's type is checked when the file loads):

- `relayed` (true/false): the upstream accepted the mail sent / accepted nothing
- `tls` (starttls, implicit, none), `mail_from`, `rcpt_to`: the session that relayed it
- `auth` ({ mechanism, user, success }): the last AUTH attempt; `auth_attempted` (true/false)
- `log`, `log_absent` (regular expressions): smtpd's log from the first message on
- `delivery` ({ result = Ok, TempFail or PermFail, stat = regex, rcpt }): smtpd's first delivery attempt
- `queue` (texts `smtpctl show queue` shows), `mbox` and `bounce` ({ user, contains }: a local
  delivery, or smtpd's bounce from <>, and the mailbox's content)
- `submission_refused` (regex: the submitting program is refused), `upstream_reply` (regex)
- `config_error` (smtpd -n's message), `config_error_line`: smtpd refuses the config
- `deferrals` (smtpd's TempFails before the delivery, each retry triggered at once with
  `smtpctl schedule all`), `delivered_once` (each recipient accepted once, nothing left queued)
- `timeout` (seconds, default 10)

`[case.expect.release.NAME]` says what differs on Debian release NAME's smtpd (a lab test host
of that release): its groups replace the case's, and a `config_error` there replaces all of them
(a refused config sends nothing); the case's own expectations are this machine's release (6.8 on
bookworm). Shown below as "on NAME".

A case waits (on smtpd's log and the upstream's records, never a sleep) until what it expects to
happen has happened, or the timeout; then what was seen is judged. Without `config_error` smtpd
must accept the config, without `submission_refused` every submission must be accepted. A twin
must also fail at least one expectation of its positive, judged on the twin's outcome (the report
says which: `twin discriminated by: ...`); a twin that meets them all fails: the pair proves nothing.
Every case that is not a twin has at least one (a file where one lacks it does not load); a case
that cannot have one says why in `no_twin`, shown here.

This index is generated: `relay-harness scenarios scenarios/ > scenarios/README.md`.
"""


def index_markdown(root: Path) -> str:
    """scenarios/README.md: one line a case, what it shows (kept equal to the files by a test)."""
    if not root.is_dir():
        why = "no such directory" if not root.exists() else "not a directory"
        raise ScenarioError(str(root), None, "scenarios", f"{why} (give the scenario library's directory)")
    paths = sorted(root.rglob("*.toml"))
    if not paths:
        raise ScenarioError(str(root), None, "scenarios", "no *.toml scenario files in this directory")
    out = [INDEX_HEAD]
    for path in paths:
        scenario = load_scenario(path)
        out.append(f"## {path.relative_to(root).as_posix()}: {scenario.description}\n")
        for case in scenario.cases:
            what = case.description or case.expect.toml()
            twin = f" *(twin of {case.twin_of})*" if case.twin_of else ""
            twin += f" *(no twin: {case.no_twin})*" if case.no_twin else ""
            out.append(f"- `{case.name}`{twin}: {what}")
            out.extend(f"  - on {name}: {over.toml()}" for name, over in sorted(case.releases.items()))
        out.append("")
    return "\n".join(out)
