"""Scenario files (TOML) → scenario objects, and the checks of their expectations.

A scenario is what a sysadmin writes to pin a behaviour or reproduce a documented error: a
config, its tables, the provider, mail to send and what must be seen. Cases in one file share
the config and may override parts of it; a broken twin is just a case whose override breaks
the config and whose expectations say how.
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bundle import BundleError, TableInput
from harness.bundle import build_bundle as build_bundle_of
from harness.errors import HarnessError
from harness.pki import TestPki
from harness.redact import Redactor
from harness.relay import DELIVERY, ConfigRejected, RelayRun, relay_run
from harness.smtpdconf import ConfigSyntaxError, parse_config
from harness.targets.base import Bundle, BundleFile, OutgoingMail, Target, TargetError
from harness.upstream import Profile, ProfileError, SessionRecord, profile_from_data

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0
MAX_MESSAGES = 20  # a case's mail is bounded: scenarios must stop by themselves
MAX_DEFERRALS = 10  # expect.deferrals: retries the harness triggers, bounded like everything else
MARKERS = {
    "tls": "TLS mode on the wire (STARTTLS, implicit, plain) and certificate checks",
    "auth": "AUTH to the smarthost: success, failure, credentials",
    "mail_from": "envelope sender rewriting (mail-from)",
    "aliases": "alias expansion and local delivery",
    "documented_error": "an error case documented in the seed article or smtpd's behaviour",
    "faults": "provider misbehaviour smtpd must survive",
    "grammar": "smtpd.conf grammar across OpenBSD 6.4, 6.6, 6.7",
    "lmtp": "LMTP relaying",
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
    "stale_tables",
    "send",
    "config_replace",
    "upstream",
    "tables",
    "expect",
}
_SEND = {"from", "to", "subject", "user", "via", "address", "port"}
_EXPECT = {
    "config_error",
    "config_error_line",
    "relayed",
    "tls",
    "auth",
    "auth_attempted",
    "mail_from",
    "rcpt_to",
    "log",
    "log_absent",
    "delivery",
    "queue",
    "mbox",
    "bounce",
    "submission_refused",
    "upstream_reply",
    "deferrals",
    "delivered_once",
    "timeout",
}
_AUTH = {"mechanism", "user", "success"}
_DELIVERY = {"result", "stat", "rcpt"}
_MBOX = {"user", "contains"}


class ScenarioError(HarnessError):
    """A malformed scenario; str() is `FILE:LINE: field: message`."""

    def __init__(self, path: str, line: int | None, fieldname: str, message: str) -> None:
        self.path, self.line, self.field, self.message = path, line, fieldname, message
        super().__init__(f"{path}:{line or '?'}: {fieldname}: {message}")


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
    expect: dict[str, Any]
    line: int | None


@dataclass(frozen=True)
class Scenario:
    path: Path
    description: str
    cases: tuple[Case, ...]
    secret_tables: tuple[str, ...] = ()


@dataclass
class CaseOutcome:
    ok: bool
    failures: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)

    def explain(self) -> str:
        return "\n".join([*(f"expected {f}" for f in self.failures), "", *self.evidence]).rstrip()


class _Locator:
    """Line numbers for fields: tomllib gives none, so find `key =` in the source text."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = str(path)
        self.lines = text.splitlines()
        self.case_starts = [i for i, s in enumerate(self.lines) if re.match(r"^\s*\[\[\s*case\s*\]\]", s)]

    def line(self, key: str, case: int | None = None) -> int | None:
        start, end = 0, len(self.lines)
        if case is not None and case < len(self.case_starts):
            start = self.case_starts[case]
            end = self.case_starts[case + 1] if case + 1 < len(self.case_starts) else len(self.lines)
        elif self.case_starts:
            end = self.case_starts[0]
        leaf = key.rpartition(".")[2].partition("[")[0]
        pattern = re.compile(
            rf"^\s*(\[+\s*)?([\w.]*\.)?[\"']?{re.escape(leaf)}[\"']?\s*(=|\])|\b{re.escape(leaf)}\s*="
        )
        hit = next((i + 1 for i in range(start, end) if pattern.search(self.lines[i])), None)
        return hit or (start + 1 if case is not None else None)

    def error(self, key: str, message: str, case: int | None = None) -> ScenarioError:
        return ScenarioError(self.path, self.line(key, case), key, message)


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(str(path), None, "file", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
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
    secret = data.get("secret_tables", ["secrets"])
    return Scenario(path, str(data.get("description", "")), cases, tuple(secret))


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
        return target.read_text(encoding="utf-8")
    except OSError as exc:
        raise loc.error("config_file", f"{target}: {exc.strerror}") from None


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
    for pair in raw.get("config_replace", []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise loc.error("config_replace", 'must be a list of ["old", "new"] pairs', index)
        if pair[0] not in config:
            raise loc.error("config_replace", f"{pair[0]!r} does not occur in the config", index)
        config = config.replace(pair[0], pair[1])
    case_upstream = raw.get("upstream", {})
    if not isinstance(case_upstream, dict):
        raise loc.error("upstream", "must be a table", index)
    try:
        profile = profile_from_data(_merge(upstream, case_upstream), loc.path)
    except ProfileError as exc:
        in_case = exc.field in case_upstream or exc.field.split(".")[0] in case_upstream
        raise loc.error(f"upstream.{exc.field}", exc.message, index if in_case else None) from None
    expect = raw.get("expect", {})
    if not isinstance(expect, dict) or not expect:
        raise loc.error("expect", "each case needs an [case.expect] table saying what must be seen", index)
    _check_expect(expect, loc, index)
    return Case(
        name=name,
        description=str(raw.get("description", "")),
        markers=tuple(dict.fromkeys(markers + _markers(raw.get("markers", []), "markers", loc, index))),
        twin_of=raw.get("twin_of"),
        config=config,
        tables={**tables, **_tables(raw.get("tables", {}), "tables", loc, index)},
        stale_tables=_tables(raw.get("stale_tables", {}), "stale_tables", loc, index),
        ca_files=ca_files,
        profile=profile,
        mails=_mails(raw.get("send"), loc, index),
        expect=expect,
        line=loc.line("name", index),
    )


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
        via = item.get("via", "sendmail")
        if via not in ("sendmail", "smtp"):
            raise loc.error("send.via", "must be sendmail (local submission) or smtp (to a listener)", index)
        port = item.get("port", 25)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise loc.error("send.port", "must be a port number", index)
        mails.append(
            Mail(
                sender=str(item.get("from", "root")),
                recipients=tuple(to),
                subject=str(item.get("subject", f"relay-harness scenario message {i + 1}")),
                user=str(item.get("user", "root")),
                via=via,
                address=str(item.get("address", "127.0.0.1")),
                port=port,
            )
        )
    return tuple(mails)


def _check_expect(expect: dict[str, Any], loc: _Locator, index: int) -> None:
    _known(expect, _EXPECT, "expect.", loc, index)
    for key, known in (("auth", _AUTH), ("delivery", _DELIVERY), ("mbox", _MBOX), ("bounce", _MBOX)):
        if key in expect:
            if not isinstance(expect[key], dict):
                raise loc.error(f"expect.{key}", "must be a table", index)
            _known(expect[key], known, f"expect.{key}.", loc, index)
    for key in ("log", "log_absent", "queue", "rcpt_to"):
        value = expect.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise loc.error(f"expect.{key}", "must be a list of strings", index)
    for key in ("log", "log_absent"):
        for pattern in expect.get(key, []):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise loc.error(
                    f"expect.{key}", f"bad regular expression {pattern!r}: {exc}", index
                ) from None
    timeout = expect.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT:
        raise loc.error("expect.timeout", f"must be seconds between 0 and {MAX_TIMEOUT:g}", index)
    if "submission_refused" in expect:
        try:
            re.compile(expect["submission_refused"])
        except (re.error, TypeError) as exc:
            raise loc.error(
                "expect.submission_refused", f"must be a regular expression: {exc}", index
            ) from None
    waits = ("log", "delivery", "submission_refused")
    if expect.get("relayed") is False and not any(expect.get(k) for k in waits):
        raise loc.error(
            "expect.relayed",
            "relayed = false needs a log, delivery or submission_refused expectation to wait on",
            index,
        )
    deferrals = expect.get("deferrals", 0)
    if not isinstance(deferrals, int) or isinstance(deferrals, bool) or not 0 <= deferrals <= MAX_DEFERRALS:
        raise loc.error("expect.deferrals", f"must be a whole number from 0 to {MAX_DEFERRALS}", index)
    if "delivered_once" in expect and not isinstance(expect["delivered_once"], bool):
        raise loc.error("expect.delivered_once", "must be true or false", index)
    for key in ("deferrals", "delivered_once"):
        if key in expect and expect.get("relayed") is not True:
            raise loc.error(f"expect.{key}", "needs relayed = true (it counts a relayed message)", index)
    if "config_error" in expect and len(set(expect) - {"config_error", "config_error_line"}) > 0:
        raise loc.error("expect.config_error", "a refused config sends nothing: expect nothing else", index)


def build_bundle(case: Case, secret_tables: tuple[str, ...], path: str, pki: TestPki | None = None) -> Bundle:
    """The case's config with its tables at the paths the config names (db: tables via makemap)."""
    try:
        config = parse_config(case.config, "/etc/smtpd.conf")
    except ConfigSyntaxError:
        config = None
    tables = {}
    for name, content in case.tables.items():
        stale = case.stale_tables.get(name)
        tables[name] = TableInput(content.encode(), built_from=stale.encode() if stale is not None else None)
    extra = []
    for ca_path, source in case.ca_files.items():
        if pki is None:
            raise ScenarioError(path, case.line, "ca_files", "needs the harness's PKI to write CA files")
        ca = pki.ca if source == "test" else pki.other_ca
        extra.append(BundleFile(ca_path, ca.cert_pem.bytes()))
    mbox = case.expect.get("mbox", {}).get("user")
    try:
        return build_bundle_of(
            case.config,
            config,
            tables,
            secret_tables=secret_tables,
            extra_files=extra,
            extra_users=[mbox] if mbox else [],
        )
    except BundleError as exc:
        raise ScenarioError(path, case.line, f"tables.{exc.name}", str(exc)) from None


def run_case(target: Target, scenario: Scenario, case: Case, pki: TestPki) -> CaseOutcome:
    """Run one case on a target and compare what was seen with what it expects."""
    bundle = build_bundle(case, scenario.secret_tables, str(scenario.path), pki)
    redactor = Redactor((c.user, c.password) for c in case.profile.credentials)
    expect = case.expect
    timeout = float(expect.get("timeout", DEFAULT_TIMEOUT))
    outcome = CaseOutcome(True)
    try:
        with relay_run(target, bundle, case.profile, pki) as run:
            if "config_error" in expect:
                outcome.failures.append(
                    f"smtpd to refuse the config with {expect['config_error']!r}, but it accepted it"
                )
            else:
                mark = run.log.mark()
                _send_all(run, case, expect, outcome)
                _check_run(run, case, expect, timeout, mark, outcome)
                outcome.evidence.extend(_evidence(run, mark))
    except ConfigRejected as refused:
        check = refused.check
        wanted = expect.get("config_error")
        if wanted is None:
            outcome.failures.append(f"smtpd to accept the config, but it said: {check.output}")
        else:
            if wanted not in (check.message or ""):
                outcome.failures.append(f"config error {wanted!r}, got {check.message!r}")
            line = expect.get("config_error_line")
            if line is not None and check.line != line:
                outcome.failures.append(f"the error on line {line}, smtpd blamed line {check.line}")
        outcome.evidence.append(f"smtpd -n: {check.output}")
    outcome.ok = not outcome.failures
    outcome.failures = [redactor(f) for f in outcome.failures]
    outcome.evidence = [redactor(e) for e in outcome.evidence]
    return outcome


def _send_all(run: RelayRun, case: Case, expect: dict[str, Any], outcome: CaseOutcome) -> None:
    """Submit the case's mail; a refused submission is a failure unless the case expects it."""
    wanted = expect.get("submission_refused")
    refusals = []
    for mail in case.mails:
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
            refusals.append(str(exc))
    if wanted is None:
        outcome.failures.extend(f"the submission to be accepted: {r}" for r in refusals)
    elif not any(re.search(wanted, r) for r in refusals):
        outcome.failures.append(
            f"the submission to be refused with {wanted!r}, got: {refusals or 'accepted'}"
        )


def _check_run(
    run: RelayRun, case: Case, expect: dict[str, Any], timeout: float, mark: int, outcome: CaseOutcome
) -> None:
    fail = outcome.failures.append
    for pattern in expect.get("log", []):
        try:
            run.log.wait_for(pattern, timeout, since=mark)
        except TimeoutError:
            fail(f"a log line matching {pattern!r} within {timeout:g}s")
    delivery = expect.get("delivery")
    if delivery:
        _check_delivery(run, delivery, timeout, mark, fail)
    for key, sender in (("mbox", ".*"), ("bounce", "")):
        # A bounce is smtpd's own message, from the null sender <>, delivered to the local sender.
        box = expect.get(key)
        if not box:
            continue
        user = box["user"]
        what = "bounce" if key == "bounce" else "local delivery"
        try:
            run.log.wait_for(
                rf"mda delivery evpid=\S+ from=<{sender}> .* user={re.escape(user)} ", timeout, mark
            )
        except TimeoutError:
            fail(f"a {what} to {user} within {timeout:g}s")
        content = run.target.mailbox(user).decode("utf-8", "replace")
        if box.get("contains", "") not in content or not content:
            fail(f"{user}'s mailbox to contain {box.get('contains', 'mail')!r}")
    if "deferrals" in expect:
        _retry_deferred(run, expect["deferrals"], timeout, mark, fail)
    session = _check_relayed(run, case, expect, timeout, fail)
    if expect.get("delivered_once"):
        _check_delivered_once(run, case, expect, fail)
    _check_session(run, session, expect, fail)
    for pattern in expect.get("log_absent", []):
        hits = run.log.matching(pattern, since=mark)
        if hits:
            fail(f"no log line matching {pattern!r}, got {hits[0]!r}")
    for text in expect.get("queue", []):
        queue = run.target.queue()
        if text not in queue:
            fail(f"the queue to show {text!r}; smtpctl show queue: {queue.strip() or '(empty)'}")
    reply = expect.get("upstream_reply")
    if reply is not None:
        replies = [r for s in run.upstream.recorder.sessions for r in s.replies]
        if not any(re.search(reply, r) for r in replies):
            fail(f"the upstream to reply {reply!r}; it replied {replies[-5:]}")


def _check_delivery(run: RelayRun, delivery: dict[str, Any], timeout: float, mark: int, fail: Any) -> None:
    rcpt = delivery.get("rcpt")
    pattern = (
        DELIVERY
        if rcpt is None
        else DELIVERY.replace(r"to=<(?P<rcpt>[^>]*)>", f"to=<(?P<rcpt>{re.escape(rcpt)})>")
    )
    try:
        m = run.log.wait_for(pattern, timeout, since=mark)
    except TimeoutError:
        fail(f"a delivery attempt{f' to {rcpt}' if rcpt else ''} within {timeout:g}s")
        return
    if "result" in delivery and m.group("result") != delivery["result"]:
        fail(f"delivery result {delivery['result']}, got {m.group('result')} ({m.group('stat')})")
    if "stat" in delivery and not re.search(delivery["stat"], m.group("stat")):
        fail(f"delivery stat matching {delivery['stat']!r}, got {m.group('stat')!r}")


def _retry_deferred(run: RelayRun, wanted: int, timeout: float, mark: int, fail: Any) -> None:
    """Count smtpd's TempFails until the Ok, triggering each retry at once (`smtpctl schedule all`).

    smtpd would retry by itself minutes later; the case is about how often the provider defers,
    not about smtpd's back-off. Stops at the first Ok, or once one more deferral than expected
    is seen.
    """
    seen = 0
    while True:
        try:
            m = run.log.wait_for(DELIVERY, timeout, since=mark)
        except TimeoutError:
            fail(f"a delivery attempt within {timeout:g}s after {seen} deferral(s)")
            return
        result = m.group("result")
        if result != "TempFail":
            if result != "Ok":
                fail(f"delivery after {wanted} deferral(s), got {result} ({m.group('stat')})")
            elif seen != wanted:
                fail(f"{wanted} deferral(s) before delivery, smtpd deferred it {seen} time(s)")
            return
        seen += 1
        if seen > wanted:
            fail(f"{wanted} deferral(s) before delivery, smtpd deferred it more often ({m.group('stat')})")
            return
        mark = run.log.mark()  # before the retry: its attempt is logged after this
        run.target.control("schedule", "all")


def _check_delivered_once(run: RelayRun, case: Case, expect: dict[str, Any], fail: Any) -> None:
    """Each recipient accepted exactly once, and nothing left in smtpd's queue to come again.

    The queue is read first: the upstream records a message before its 250 leaves, and smtpd
    drops the envelope only after that 250, so every delivery that emptied the queue is counted.
    """
    wanted = set(expect.get("rcpt_to", [])) or {r for m in case.mails for r in m.recipients if "@" in r}
    queue = run.target.queue()
    accepted = [r for _, m in run.upstream.recorder.messages() if m.accepted for r in m.rcpt_to]
    counts = {r: accepted.count(r) for r in sorted(wanted)}
    if any(n != 1 for n in counts.values()):
        fail(f"each recipient accepted exactly once by the upstream, counts: {counts}")
    if any(r in queue for r in wanted):
        fail(f"nothing left queued for {sorted(wanted)}; smtpctl show queue: {queue.strip()}")


def _check_relayed(
    run: RelayRun, case: Case, expect: dict[str, Any], timeout: float, fail: Any
) -> SessionRecord | None:
    relayed = expect.get("relayed")
    wanted = set(expect.get("rcpt_to", [])) or {r for m in case.mails for r in m.recipients if "@" in r}
    if relayed is True:
        try:
            session, _ = run.wait_relayed(timeout, lambda s, m: bool(wanted & set(m.rcpt_to)) or not wanted)
            return session
        except TimeoutError:
            fail(f"the upstream to accept a message within {timeout:g}s")
            return None
    if relayed is False:
        accepted = [m for _, m in run.upstream.recorder.messages() if m.accepted]
        if accepted:
            fail(f"nothing accepted by the upstream, but it accepted mail from {accepted[0].mail_from}")
    sessions = run.upstream.recorder.sessions
    return sessions[-1] if sessions else None


def _check_session(run: RelayRun, session: SessionRecord | None, expect: dict[str, Any], fail: Any) -> None:
    needs_session = {"tls", "auth", "mail_from", "rcpt_to"} & set(expect) or expect.get("auth_attempted")
    if session is None:
        if needs_session:
            fail("a session at the upstream, but none was recorded")
        return
    if "tls" in expect and session.tls != expect["tls"]:
        fail(f"TLS {expect['tls']}, the upstream saw {session.tls}")
    attempts = [a for s in run.upstream.recorder.sessions for a in s.auth]
    if "auth_attempted" in expect and bool(attempts) != expect["auth_attempted"]:
        fail(f"AUTH {'attempted' if expect['auth_attempted'] else 'not attempted'}; attempts: {attempts}")
    auth = expect.get("auth")
    if auth is not None:
        if not attempts:
            fail(f"an AUTH attempt {auth}, none was made")
        else:
            last = attempts[-1]
            for key in ("mechanism", "user", "success"):
                if key in auth and getattr(last, key) != auth[key]:
                    fail(f"AUTH {key} {auth[key]!r}, got {getattr(last, key)!r}")
    messages = [m for m in session.messages if m.accepted] or list(session.messages)
    if "mail_from" in expect:
        senders = [m.mail_from for m in messages]
        if expect["mail_from"] not in senders:
            fail(f"MAIL FROM <{expect['mail_from']}>, the upstream saw {senders}")
    if "rcpt_to" in expect:
        rcpts = sorted({r for m in messages for r in m.rcpt_to})
        if sorted(expect["rcpt_to"]) != rcpts:
            fail(f"RCPT TO {sorted(expect['rcpt_to'])}, the upstream saw {rcpts}")


def _evidence(run: RelayRun, mark: int) -> list[str]:
    out = [f"upstream: {run.upstream.recorder.summary()}"]
    interesting = [line for line in run.log.lines[mark:] if not line.startswith("debug:")]
    out.append("smtpd log (since the first message, debug lines left out):")
    out.extend(f"  {line}" for line in interesting[-25:])
    return out


INDEX_HEAD = """# Scenario library

Each `*.toml` here is collected by pytest (`pytest scenarios/`, or `-k NAME`, `-m MARKER` with
markers tls, auth, mail_from, aliases, documented_error, faults, grammar, lmtp) and runs against the
real OpenSMTPD on a lab test host with the fake upstream. A case marked *twin of X* is X's broken
twin: the same config broken in one place, and what must then be seen instead.

Format (see `harness/scenarios.py`): top-level `config` (inline) or `config_file`, `[tables]`
(content of each `table NAME`), `[upstream]` (a provider profile), `ca_files`, and `[[case]]`s
with overrides (`config_replace`, `upstream`, `tables`, `stale_tables`), `send` (sendmail or smtp), and
`[case.expect]`: `relayed`, `tls`, `auth`, `auth_attempted`, `mail_from`, `rcpt_to`, `log`,
`log_absent`, `delivery`, `queue`, `mbox`, `bounce`, `submission_refused`, `upstream_reply`, `config_error`,
`config_error_line`, `deferrals` (smtpd's TempFails before delivery, each retried at once with
`smtpctl schedule all`), `delivered_once`.

This index is generated: `relay-harness scenarios scenarios/ > scenarios/README.md`.
"""


def index_markdown(root: Path) -> str:
    """scenarios/README.md: one line a case, what it shows (kept equal to the files by a test)."""
    out = [INDEX_HEAD]
    for path in sorted(root.rglob("*.toml")):
        scenario = load_scenario(path)
        out.append(f"## {path.relative_to(root).as_posix()}: {scenario.description}\n")
        for case in scenario.cases:
            shown = {k: v for k, v in case.expect.items() if k != "timeout"}
            what = case.description or ", ".join(f"{k} = {v!r}" for k, v in shown.items())
            twin = f" *(twin of {case.twin_of})*" if case.twin_of else ""
            out.append(f"- `{case.name}`{twin}: {what}")
        out.append("")
    return "\n".join(out)
