"""`relay-harness check`: does this smtpd.conf relay as meant? Decided by the real smtpd.

The config is parsed only to know what to probe (tables to install, labels to give credentials,
alias keys to send to) and to attach lint findings as evidence; the verdict of each probe comes
from what the fake upstream received and what smtpd logged, on a real target.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness.pki import TestPki
from harness.redact import Redactor
from harness.relay import DELIVERY, ConfigRejected, RelayRun, relay_run
from harness.smtpdconf import Config, ConfigSyntaxError, Finding, RelayUrlError, lint, parse_config
from harness.smtpdconf.parse import Literal
from harness.smtpdconf.relayurl import parse_relay_url
from harness.targets.base import Bundle, BundleFile, OutgoingMail, Target
from harness.upstream import Credential, MessageRecord, Profile, SessionRecord
from harness.waiting import wait_until

MAX_ALIAS_PROBES = 20
PROBE_TIMEOUT = 10.0
EXTERNAL_PROBE = "relay-harness-probe@example.com"

# smtpd log lines that settle a relayed probe as failed, each with what to change.
FAILURES: tuple[tuple[str, str], ...] = (
    (
        r"AUTH rejected|535 5\.7\.8",
        "the provider refused the credentials: check `user:password` of the URL's label in the secrets table",
    ),
    (
        r"Sender address rejected",
        'rewrite the sender to a domain the provider accepts: add mail-from "@DOMAIN" to the relay action',
    ),
    (
        r"[Ff]ailed to parse smarthost|Cannot parse smarthost",
        "the relay URL cannot be used: check "
        "scheme (smtp, smtp+tls, smtp+notls, smtps, lmtp), label (only with smtp+tls/smtps), host and port",
    ),
    (r"No auth table", "the URL has a label but the action has no `auth <secrets>`"),
    (
        r"credentials not found|Could not retrieve credentials",
        "the URL's label is missing from the secrets table: add a line `LABEL user:password`",
    ),
    (
        r"TLS required but not supported",
        "the provider does not offer STARTTLS on that port: use "
        "smtps:// for implicit TLS, or the provider's submission port",
    ),
    (
        r"SSL certificate check failed|certificate verify failed",
        "the provider's certificate does not verify: issued for another name than the URL's host "
        "(smtpd also logs `ssl_check_name: no match`), expired, or from a CA smtpd does not trust: "
        "use the name on the certificate, trust its CA with `ca NAME` + `relay ... ca NAME`, "
        "or have the provider fix its certificate",
    ),
    (r"Must issue a STARTTLS command first", "the provider requires STARTTLS: use smtp+tls://"),
    (
        r"Authentication required|AUTH not advertised",
        "the provider requires AUTH (or does not offer "
        "it here): use smtp+tls://LABEL@host with `auth <secrets>`",
    ),
    (r"TLS required for action", "the action says `tls` but the URL is plain: drop one of them"),
    (
        r"mta error reason=(?!.*Connection reset)",
        "smtpd could not talk to the provider; see the quoted reason",
    ),
)

# After a connection-level failure smtpd stops trying the provider for a while.
ROUTE_DISABLED = r"smtp-out: Disabling route .* for \d+s"

# Mail for a local alias reached the relay as KEY@host: it never met the `for local` rule.
UNEXPANDED_HINT = (
    "smtpd relayed mail for a local user without expanding the alias: a `match` above the "
    "`for local` one takes it (put `match from local for local action ...` first), or the local "
    "action has no `alias <table>`"
)


class CheckUsageError(Exception):
    """Something the user must fix before a check can run (exit 2)."""


@dataclass(frozen=True)
class Probe:
    name: str
    recipient: str
    expect: str  # "relay" or "local:USER"
    description: str


@dataclass(frozen=True)
class _Seen:
    """What settled a relayed probe: the upstream's record, or smtpd's failure line."""

    session: SessionRecord | None = None
    message: MessageRecord | None = None
    line: str | None = None
    hint: str | None = None
    context: tuple[str, ...] = ()  # lines that explain `line` (why a later probe is settled by it)


@dataclass
class ProbeResult:
    probe: Probe
    ok: bool
    expected: str
    observed: str
    evidence: list[str] = field(default_factory=list)
    hint: str | None = None
    seconds: float = 0.0


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


def build_bundle(config: Config | None, inp: CheckInput) -> tuple[Bundle, Profile, list[str], Redactor]:
    """The files the config names, from --table or synthesized (secrets only), and the users."""
    profile = inp.profile
    notes: list[str] = []
    files: list[BundleFile] = []
    users: set[str] = set()
    redactor = Redactor((c.user, c.password) for c in profile.credentials)
    if config is None:
        return Bundle(inp.config_text), profile, notes, redactor
    secret_labels = auth_tables(config)
    alias_names = alias_tables(config)
    for table in config.tables.values():
        if table.config is None or table.backend not in ("file", "db"):
            continue
        source = inp.tables.get(table.name)
        if source is not None:
            content = source.read_bytes()
        elif table.name in secret_labels:
            content, creds = _synthesize_secrets(secret_labels[table.name], profile)
            profile = dataclasses.replace(profile, credentials=profile.credentials + tuple(creds))
            for cred in creds:
                redactor.add(cred.user, cred.password)
            labels = ", ".join(sorted(secret_labels[table.name]))
            notes.append(
                f"table {table.name}: not given, synthesized with generated credentials "
                f"for label(s) {labels} that the upstream accepts"
            )
        elif not re.search(rf"<{re.escape(table.name)}>", inp.config_text):
            content = b""
            notes.append(
                f"table {table.name}: never used by the config; installed empty so smtpd can open it"
            )
        else:
            raise CheckUsageError(
                f"the config's table {table.name!r} (line {table.line}, {table.backend}:{table.config}) "
                f"needs content: pass --table {table.name}=FILE"
            )
        secret = table.name in secret_labels
        mode, group = (0o640, "_smtpd") if secret else (0o644, "root")
        if table.name in alias_names:
            users.update(local_users(parse_aliases(content)))
        if table.backend == "db":
            path = table.config[:-3] if table.config.endswith(".db") else table.config + ".txt"
            aliases = table.name in alias_names
            files.append(BundleFile(path, content, mode, "root", group, secret, table.config, aliases))
        else:
            files.append(BundleFile(table.config, content, mode, "root", group, secret))
    return Bundle(inp.config_text, tuple(files), tuple(sorted(users))), profile, notes, redactor


def auth_tables(config: Config) -> dict[str, set[str]]:
    """auth table name → labels the relay URLs ask it for."""
    out: dict[str, set[str]] = {}
    for action in config.relay_actions:
        auth = action.auth
        if auth is None or isinstance(auth, Literal):
            continue
        labels = out.setdefault(auth.name, set())
        host = action.host
        if isinstance(host, Literal):
            for text in host.values:
                try:
                    url = parse_relay_url(text)
                except RelayUrlError:
                    continue
                if url.label:
                    labels.add(url.label)
    return out


def alias_tables(config: Config) -> set[str]:
    names = set()
    for action in config.actions.values():
        alias = action.operand("alias")
        if alias is not None and not isinstance(alias, Literal):
            names.add(alias.name)
    return names


def _synthesize_secrets(labels: set[str], profile: Profile) -> tuple[bytes, list[Credential]]:
    domain = profile.sender_domains[0] if profile.sender_domains else "example.org"
    creds = [
        Credential(f"relay-harness-{label}@{domain}", secrets.token_urlsafe(12)) for label in sorted(labels)
    ]
    text = "".join(f"{label} {c.user}:{c.password}\n" for label, c in zip(sorted(labels), creds, strict=True))
    return text.encode(), creds


def parse_aliases(content: bytes) -> dict[str, list[str]]:
    """aliases(5): `key: value, value`; continuation lines start with white space."""
    aliases: dict[str, list[str]] = {}
    key = None
    for raw in content.decode("utf-8", "replace").splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t" and key is not None:
            aliases[key].extend(v.strip() for v in raw.split(",") if v.strip())
            continue
        name, sep, values = raw.partition(":")
        if not sep:
            continue
        key = name.strip()
        aliases[key] = [v.strip() for v in values.split(",") if v.strip()]
    return aliases


def _expand(aliases: dict[str, list[str]], key: str, depth: int = 0) -> list[str]:
    if depth > 8:
        return []
    out: list[str] = []
    for value in aliases.get(key, []):
        if value in aliases and value != key:
            out.extend(_expand(aliases, value, depth + 1))
        else:
            out.append(value)
    return out


def local_users(aliases: dict[str, list[str]]) -> set[str]:
    users = set()
    for key in aliases:
        for value in _expand(aliases, key):
            if "@" not in value and not value.startswith(("|", "/", ":include:")) and value != "root":
                users.add(value)
    return users


def plan_probes(bundle: Bundle, config: Config | None) -> tuple[list[Probe], list[str]]:
    probes = [
        Probe(
            "relay-external",
            EXTERNAL_PROBE,
            "relay",
            f"mail from root to {EXTERNAL_PROBE} is relayed to the upstream",
        )
    ]
    notes: list[str] = []
    if config is None:
        return probes, notes
    alias_paths = {t.config for name, t in config.tables.items() if name in alias_tables(config) and t.config}
    for f in bundle.files:
        source_of = {p[:-3] if p.endswith(".db") else p for p in alias_paths}
        if f.path not in alias_paths and f.path not in source_of and f.path + ".txt" not in alias_paths:
            continue
        aliases = parse_aliases(f.content)
        keys = sorted(aliases)
        if len(keys) > MAX_ALIAS_PROBES:
            notes.append(f"{f.path}: {len(keys)} aliases, probing the first {MAX_ALIAS_PROBES}")
        for key in keys[:MAX_ALIAS_PROBES]:
            targets = _expand(aliases, key)
            for value in targets:
                if value.startswith(("|", "/", ":include:")):
                    notes.append(f"alias {key}: {value!r} is not probed (program, file or include)")
                    continue
                if "@" in value:
                    probes.append(
                        Probe(
                            f"alias-{key}->{value}",
                            key,
                            f"relay:{value}",
                            f"mail to {key} is relayed to {value}",
                        )
                    )
                else:
                    probes.append(
                        Probe(
                            f"alias-{key}->{value}",
                            key,
                            f"local:{value}",
                            f"mail to {key} lands in {value}'s mailbox",
                        )
                    )
    return probes, notes


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
    bundle, profile, notes, redactor = build_bundle(config, inp)
    report.notes.extend(notes)
    probes, probe_notes = plan_probes(bundle, config)
    report.notes.extend(probe_notes)
    add = getattr(target, "redactor", None)
    if isinstance(add, Redactor):
        for cred in profile.credentials:
            add.add(cred.user, cred.password)
    try:
        with relay_run(target, bundle, profile, pki) as run:
            # All probes go out before any is awaited: smtpd then relays them in one session
            # instead of each waiting for its idle relay session's next 1 s hang-on tick.
            # Relaying is paused meanwhile so that the relayed probes leave together (smtpctl).
            run.target.control("pause", "mta")
            sent = [submit_probe(run, probe) for probe in probes]
            run.target.control("resume", "mta")
            report.results.extend(await_probe(run, s, profile, redactor) for s in sent)
    except ConfigRejected as refused:
        report.verdict = "refused"
        report.refusal = redactor(refused.check.message or refused.check.output)
        report.refusal_line = refused.check.line
        report.seconds = time.monotonic() - started
        return report
    report.verdict = "pass" if all(r.ok for r in report.results) else "fail"
    report.seconds = time.monotonic() - started
    return report


@dataclass(frozen=True)
class SentProbe:
    probe: Probe
    token: str  # in the subject: tells this probe's message from the others at the upstream
    mark: int  # smtpd's log position when it was submitted
    started: float


def submit_probe(run: RelayRun, probe: Probe) -> SentProbe:
    started = time.monotonic()
    token = secrets.token_hex(4)
    mail = OutgoingMail("root", (probe.recipient,), subject=f"relay-harness probe {probe.name} {token}")
    return SentProbe(probe, token, run.send(mail), started)


def await_probe(run: RelayRun, sent: SentProbe, profile: Profile, redactor: Redactor) -> ProbeResult:
    probe = sent.probe
    if probe.expect.startswith("local:"):
        result = _wait_local(run, probe, probe.expect[6:], sent.token, sent.mark)
    else:
        wanted = probe.expect[6:] if probe.expect.startswith("relay:") else probe.recipient
        result = _wait_relay(run, probe, wanted, sent.token, sent.mark, profile)
    result.evidence = [redactor(e) for e in result.evidence]
    result.observed = redactor(result.observed)
    result.seconds = time.monotonic() - sent.started
    return result


def run_probe(run: RelayRun, probe: Probe, profile: Profile, redactor: Redactor) -> ProbeResult:
    """One probe, submitted and awaited on its own."""
    return await_probe(run, submit_probe(run, probe), profile, redactor)


def _wait_relay(
    run: RelayRun, probe: Probe, rcpt: str, token: str, mark: int, profile: Profile
) -> ProbeResult:
    expected = f"arrives at {profile.host}:{profile.port} for {rcpt} over TLS={_tls_word(profile.tls)}" + (
        ", authenticated" if profile.auth == "required" else ""
    )
    recorder = run.upstream.recorder

    def decide() -> _Seen | None:
        mine = [(s, m) for s, m in recorder.messages() if m.accepted and token.encode() in m.body]
        for session, message in mine:
            if rcpt in message.rcpt_to:
                return _Seen(session=session, message=message)
        for _, message in mine:
            if probe.expect.startswith("relay:") and _unexpanded(message.rcpt_to, probe.recipient):
                return _Seen(
                    line=f"upstream: received it for <{', '.join(message.rcpt_to)}>, not <{rcpt}>",
                    hint=UNEXPANDED_HINT,
                )
        for line in run.log.lines[mark:]:
            m = re.search(DELIVERY, line)
            if m is not None:  # a delivery line speaks for its own recipient only
                if m.group("result") != "Ok" and m.group("rcpt") in (rcpt, probe.recipient):
                    return _Seen(line=line, hint=_hint_for(m.group("stat")))
                continue
            if line.startswith("debug: bounce:"):
                continue  # a bounce report repeats one envelope's delivery line, not the route's state
            for pattern, hint in FAILURES:  # route-level failures: every relayed probe shares them
                if re.search(pattern, line):
                    return _Seen(line=line, hint=hint)
        stuck = _route_disabled(run.log.lines) or _no_tls_on_implicit_port(run.log.lines, profile)
        if stuck is not None:
            return stuck
        return _Seen(line="smtpd exited") if run.log.closed else None

    seen = wait_until(decide, [recorder, run.log], PROBE_TIMEOUT)
    if seen is None:
        tail = run.log.lines[mark:][-8:]
        observed = f"nothing arrived within {PROBE_TIMEOUT:g}s"
        return ProbeResult(probe, False, expected, observed, _upstream_evidence(run) + tail)
    session, message = seen.session, seen.message
    if session is None or message is None:
        evidence = [seen.line or "", *seen.context, *_upstream_evidence(run)]
        return ProbeResult(probe, False, expected, "smtpd reported a failure", evidence, seen.hint)
    problems = []
    wanted_tls = {"starttls-required": "starttls", "implicit": "implicit", "none": "none"}.get(profile.tls)
    if wanted_tls and session.tls != wanted_tls:
        problems.append(f"TLS was {session.tls}, the provider demands {wanted_tls}")
    if profile.auth == "required" and session.authenticated_user is None:
        problems.append("not authenticated")
    observed = (
        f"arrived over TLS={session.tls}"
        + (f" ({session.tls_version})" if session.tls_version else "")
        + f", AUTH as {session.authenticated_user or 'nobody'}, MAIL FROM <{message.mail_from}>"
    )
    evidence = [f"upstream: {message.reply}"]
    return ProbeResult(
        probe,
        not problems,
        expected,
        observed + ("; " + "; ".join(problems) if problems else ""),
        evidence,
        None,
    )


def _route_disabled(lines: list[str]) -> _Seen | None:
    """smtpd gave up on the provider for a while after a failure (AUTH, TLS, certificate).

    It logs `smtp-out: Disabling route ... for 15s` once; mail queued after that (the next
    probes) waits longer than PROBE_TIMEOUT and smtpd logs nothing new about it, so the
    failure that disabled the route is what settles those probes too.
    """
    for i, line in enumerate(lines):
        if re.search(ROUTE_DISABLED, line):
            for earlier in reversed(lines[:i]):
                for pattern, hint in FAILURES:
                    if re.search(pattern, earlier):
                        return _Seen(line=earlier, hint=hint, context=(line,))
            return _Seen(line=line)
    return None


def _no_tls_on_implicit_port(lines: list[str], profile: Profile) -> _Seen | None:
    """A plain connection (smtp+tls://, smtp://, ...) to an implicit-TLS port never ends by itself.

    smtpd waits for the greeting, the provider for a TLS ClientHello; smtpd logs only
    `mta connecting address=smtp+tls://...` and `mta connected`, then nothing until its own
    timeout minutes later.
    """
    if profile.tls != "implicit":
        return None
    for i, line in enumerate(lines):
        m = re.search(r"^(\S+) mta connecting address=(?!smtps://)([a-z+]+)://", line)
        if m is None:
            continue
        connected = next((x for x in lines[i + 1 :] if x.startswith(f"{m.group(1)} mta connected")), None)
        if connected is not None:
            return _Seen(
                line=line,
                hint=f"the provider speaks TLS from the first byte on port {profile.port} (implicit TLS) but "
                f"smtpd connected with {m.group(2)}:// and waits for a greeting that never comes "
                "(it logs nothing more until its own timeout, minutes later): use smtps://LABEL@HOST",
                context=(connected,),
            )
    return None


def _wait_local(run: RelayRun, probe: Probe, user: str, token: str, mark: int) -> ProbeResult:
    expected = f"delivered to {user}'s mailbox"

    def decide() -> tuple[str, str] | None:
        for line in run.log.lines[mark:]:
            m = re.search(DELIVERY, line)
            if not m or m.group("rcpt").partition("@")[0] != probe.recipient.partition("@")[0]:
                continue  # another probe's delivery, logged after this one was sent
            if m.group("sender") == "":
                continue  # a bounce (of a relayed probe the provider refused) to root, not this probe
            if m.group("agent") == "mda":
                return ("ok" if m.group("result") == "Ok" else "failed"), line
            return "relayed", line
        return ("exited", "smtpd exited") if run.log.closed else None

    decided = wait_until(decide, [run.log], PROBE_TIMEOUT)
    if decided is None:
        return ProbeResult(
            probe, False, expected, f"no delivery within {PROBE_TIMEOUT:g}s", run.log.lines[mark:][-8:]
        )
    kind, line = decided
    m = re.search(DELIVERY, line)
    delivered_to = m.group("user") if m else None
    if kind == "ok" and delivered_to == user and token.encode() in run.target.mailbox(user):
        return ProbeResult(probe, True, expected, f"in {user}'s mailbox", [line])
    observed = f"delivered as {delivered_to}" if kind == "ok" else f"{kind}"
    hint = f"check the aliases entry for {probe.recipient}; a db: table needs newaliases/makemap after edits"
    if kind == "relayed":
        hint = UNEXPANDED_HINT
    return ProbeResult(probe, False, expected, observed, [line], hint)


def _unexpanded(rcpts: tuple[str, ...], key: str) -> bool:
    """The alias key itself was relayed (KEY@this-host), instead of what it expands to."""
    return any(r.partition("@")[0] == key and r.partition("@")[2] != "" for r in rcpts)


def _upstream_evidence(run: RelayRun) -> list[str]:
    out = []
    for session in run.upstream.recorder.sessions:
        bad = [r for r in session.replies if r[:1] in ("4", "5")]
        if bad or session.tls_error:
            out.append(
                f"upstream session #{session.id} (tls={session.tls}): "
                + "; ".join(bad + ([f"TLS error: {session.tls_error}"] if session.tls_error else []))
            )
    return out


def _hint_for(stat: str) -> str | None:
    for pattern, hint in FAILURES:
        if re.search(pattern, stat):
            return hint
    return None


def _tls_word(tls: str) -> str:
    return {"starttls-required": "starttls", "starttls-optional": "starttls if offered"}.get(tls, tls)


@contextmanager
def lab_target(pki: TestPki) -> Iterator[Target]:
    from harness.targets.lab import Lab

    with Lab(pki.ca_pem) as lab:
        host = lab.create_host()
        assert host.target is not None
        yield host.target
