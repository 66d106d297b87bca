"""Probes: which mail to send for a config, how to wait for each, and the documented failures.

A probe is one message whose fate says something about the config: relayed to the provider as
the profile demands, or delivered where an alias sends it. Its verdict comes from what the fake
upstream recorded and what smtpd logged, waited on as events with one deadline; a failure is
settled the moment smtpd logs it, and quoted with what to change (`FAILURES`, the one table of
documented failures: check, accept and scenario reports all read it).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from harness.redact import Redactor
from harness.relay import DELIVERY, RelayRun
from harness.smtpdconf import Config, alias_files, alias_tables, db_source, expand, parse_aliases
from harness.smtpdconf.tables import ALIAS_KEY
from harness.targets.base import Bundle, MailRefused, OutgoingMail
from harness.upstream import MessageRecord, Profile, SessionRecord
from harness.waiting import wait_until

MAX_TARGETS_PER_ALIAS = 10  # a list of 100k users is not probed: smtpd would deliver 100k copies
MAX_ALIAS_PROBES = 20
PROBE_TIMEOUT = 10.0
EXTERNAL_PROBE = "relay-harness-probe@example.com"


@dataclass(frozen=True)
class Failure:
    """A failure smtpd logs, in its own words, with what to change. `documented`: one the seed
    article and OPENSMTPD-FACTS.md name, looked for in an existing host's mail log by `accept`."""

    name: str
    pattern: str
    hint: str
    documented: bool = False


# smtpd log lines that settle a relayed probe as failed (first match wins), each with what to change.
FAILURES: tuple[Failure, ...] = (
    Failure(
        "authentication failed",
        r"AUTH rejected|535 5\.7\.8|[Aa]uthentication failed",
        "the provider refused the credentials: check `user:password` of the URL's label in the secrets table",
        documented=True,
    ),
    Failure(
        "sender rejected",
        r"Sender address rejected",
        'rewrite the sender to a domain the provider accepts: add mail-from "@DOMAIN" to the relay action',
        documented=True,
    ),
    Failure(
        "cannot parse smarthost",
        r"[Ff]ailed to parse smarthost|Cannot parse smarthost",
        "the relay URL cannot be used: check "
        "scheme (smtp, smtp+tls, smtp+notls, smtps, lmtp), label (only with smtp+tls/smtps), host and port",
        documented=True,
    ),
    Failure("no auth table", r"No auth table", "the URL has a label but the action has no `auth <secrets>`"),
    Failure(
        "credentials not found",
        r"credentials not found|Could not retrieve credentials",
        "the URL's label is missing from the secrets table: add a line `LABEL user:password`",
        documented=True,
    ),
    Failure(
        "STARTTLS not offered",
        r"TLS required but not supported",
        "the provider does not offer STARTTLS on that port: use "
        "smtps:// for implicit TLS, or the provider's submission port",
    ),
    Failure(
        "certificate check failed",
        # 6.8: `SSL certificate check failed` (after the handshake); 7.x (libtls): the handshake
        # fails with `certificate verification failed: REASON` or `name `HOST' not present in ...`.
        r"SSL certificate check failed|certificate verif(?:y|ication) failed"
        r"|not present in server certificate",
        "the provider's certificate does not verify: issued for another name than the URL's host "
        "(smtpd 6.8 also logs `ssl_check_name: no match`), expired, or from a CA smtpd does not trust: "
        "use the name on the certificate, trust its CA with `ca NAME` + `relay ... ca NAME`, "
        "or have the provider fix its certificate",
        documented=True,
    ),
    Failure(
        "STARTTLS required",
        r"Must issue a STARTTLS command first",
        "the provider requires STARTTLS: use smtp+tls://",
    ),
    Failure(
        "AUTH required",
        r"Authentication required|AUTH not advertised",
        "the provider requires AUTH (or does not offer "
        "it here): use smtp+tls://LABEL@host with `auth <secrets>`",
    ),
    Failure(
        "TLS required for action",
        r"TLS required for action",
        "the action says `tls` but the URL is plain: drop one of them",
    ),
    Failure(
        "no smarthost",
        # a relay action without `host` delivers by MX: smtpd asks DNS for the recipient domain's
        # MX (a test host answers no DNS, and a smarthost setup needs none)
        r"MX lookup|No MX found for domain",
        "the relay action has no `host`, so smtpd delivers by MX itself instead of through the "
        "provider: add `host smtp+tls://LABEL@PROVIDER:587 auth <secrets>` to it",
    ),
    Failure(
        "provider unreachable",
        r"mta error reason=(?!.*Connection reset)",
        "smtpd could not talk to the provider; see the quoted reason",
    ),
)


def failure_for(text: str) -> Failure | None:
    """The first documented failure whose pattern `text` matches."""
    return next((f for f in FAILURES if re.search(f.pattern, text)), None)


# After a connection-level failure smtpd stops trying the provider for a while.
ROUTE_DISABLED = r"smtp-out: Disabling route .* for \d+s"

# Mail for a local alias reached the relay as KEY@host: it never met the `for local` rule.
UNEXPANDED_HINT = (
    "smtpd relayed mail for a local user without expanding the alias: a `match` above the "
    "`for local` one takes it (put `match from local for local action ...` first), or the local "
    "action has no `alias <table>`"
)


@dataclass(frozen=True)
class Probe:
    name: str
    recipient: str
    expect: str  # "relay" or "local:USER"
    description: str
    unused_table: str | None = None  # an aliases table given but applied by no action


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


def plan_probes(
    bundle: Bundle, config: Config | None, unused_aliases: Iterable[str] = ()
) -> tuple[list[Probe], list[str]]:
    """The external probe, and one per alias key (at most MAX_ALIAS_PROBES per table).

    `unused_aliases`: aliases tables the user gave that no action applies. The file is a
    statement of intent (mail to each key must end where it says), so its keys are probed too,
    and a failure says to apply the table.
    """
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
    # The text of each alias table, as installed: a db: table's source, never its binary db.
    unused = set(unused_aliases) - alias_tables(config)
    text_paths = {
        db_source(table.config) if table.backend == "db" else table.config: name
        for name in (*sorted(alias_files(config)), *sorted(unused))
        if (table := config.tables.get(name)) is not None and table.config is not None
    }
    texts = {f.path: f.content for f in bundle.files if f.path in text_paths}  # the last text wins
    for path, content in texts.items():
        table_name = text_paths[path] if text_paths[path] in unused else None
        aliases = parse_aliases(content)
        keys = sorted(aliases)
        if len(keys) > MAX_ALIAS_PROBES:
            notes.append(f"{path}: {len(keys)} aliases, probing the first {MAX_ALIAS_PROBES}")
        for key in keys[:MAX_ALIAS_PROBES]:
            if not ALIAS_KEY.fullmatch(key):  # a host's table may hold one (check refuses it)
                notes.append(f"alias {key!r}: not probed: not an address mail can be sent to")
                continue
            targets = expand(aliases, key)
            if len(targets) > MAX_TARGETS_PER_ALIAS:
                notes.append(
                    f"alias {key}: not probed: it expands to {len(targets)} targets (at most "
                    f"{MAX_TARGETS_PER_ALIAS}), and smtpd would deliver the probe to every one"
                )
                continue
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
                            table_name,
                        )
                    )
                else:
                    probes.append(
                        Probe(
                            f"alias-{key}->{value}",
                            key,
                            f"local:{value}",
                            f"mail to {key} lands in {value}'s mailbox",
                            table_name,
                        )
                    )
    return probes, notes


@dataclass(frozen=True)
class SentProbe:
    probe: Probe
    token: str  # in the subject: tells this probe's message from the others at the upstream
    mark: int  # smtpd's log position when it was submitted
    started: float
    refused: str | None = None  # smtpd's reply when it refused the submission itself


def submit_probe(run: RelayRun, probe: Probe) -> SentProbe:
    started = time.monotonic()
    token = secrets.token_hex(4)
    mail = OutgoingMail("root", (probe.recipient,), subject=f"relay-harness probe {probe.name} {token}")
    mark = run.log.mark()
    try:
        run.target.submit(mail)
    except MailRefused as refused:
        return SentProbe(probe, token, mark, started, refused.reply)
    return SentProbe(probe, token, mark, started)


def _refused(sent: SentProbe, profile: Profile) -> ProbeResult:
    """smtpd refused the probe at submission: its config's rules (a `match` with `reject`, or
    none that takes mail from local for this recipient) decided, so this is the config's fault."""
    probe, reply = sent.probe, sent.refused or ""
    if probe.expect.startswith("local:"):
        expected = f"delivered to {probe.expect[6:]}'s mailbox"
        rule = 'match from local for local action "LOCAL"'
    else:
        wanted = probe.expect[6:] if probe.expect.startswith("relay:") else probe.recipient
        expected = _relay_expected(profile, wanted)
        rule = 'match from local for any action "RELAY"'
    hint = (
        f"smtpd itself refused it at submission: no `match` of the config takes mail from local for "
        f"<{probe.recipient}>, or one rejects it: add `{rule}` (or remove the `reject` that catches it)"
    )
    return ProbeResult(probe, False, expected, f"refused at submission: {reply}", [f"smtpd: {reply}"], hint)


def await_probe(run: RelayRun, sent: SentProbe, profile: Profile, redactor: Redactor) -> ProbeResult:
    probe = sent.probe
    if sent.refused is not None:
        result = _refused(sent, profile)
    elif probe.expect.startswith("local:"):
        result = _wait_local(run, probe, probe.expect[6:], sent.token, sent.mark)
    else:
        wanted = probe.expect[6:] if probe.expect.startswith("relay:") else probe.recipient
        result = _wait_relay(run, probe, wanted, sent.token, sent.mark, profile)
    if not result.ok and probe.unused_table is not None:
        result.hint = (
            f"the config declares table {probe.unused_table} and its aliases say where this mail goes, "
            f"but no action applies it: add `alias <{probe.unused_table}>` to the local action"
        )
    result.evidence = [redactor(e) for e in result.evidence]
    result.observed = redactor(result.observed)
    result.seconds = time.monotonic() - sent.started
    return result


def run_probes(run: RelayRun, probes: list[Probe], profile: Profile, redactor: Redactor) -> list[ProbeResult]:
    """Every probe submitted before any is awaited, with relaying paused meanwhile (smtpctl).

    smtpd then relays them in one session instead of each waiting for its idle relay session's
    next 1 s hang-on tick (mta_session.c).
    """
    run.target.control("pause", "mta")
    try:
        sent = [submit_probe(run, probe) for probe in probes]
    finally:
        run.target.control("resume", "mta")
    return [await_probe(run, s, profile, redactor) for s in sent]


def _wait_relay(
    run: RelayRun, probe: Probe, rcpt: str, token: str, mark: int, profile: Profile
) -> ProbeResult:
    expected = _relay_expected(profile, rcpt)
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
            failure = failure_for(line)  # route-level failures: every relayed probe shares them
            if failure is not None:
                return _wrong_port(line, run.log.lines, profile) or _Seen(line=line, hint=failure.hint)
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


def _wrong_port(line: str, lines: list[str], profile: Profile) -> _Seen | None:
    """A connection failure on another port than the provider's: the fix names both ports.

    smtpd logs where it dialled (`mta connecting address=smtp+tls://192.0.2.10:2525`) under the
    same session id as the error; a relay URL without a port dials the scheme's default.
    """
    if not re.search(r"mta error reason=.*(Connection refused|timed out|Network is unreachable)", line):
        return None
    session = line.split(" ", 1)[0]
    for earlier in reversed(lines):
        m = re.match(rf"{re.escape(session)} mta connecting address=(\S+):(\d+)(?: |$)", earlier)
        if m is None:
            continue
        port = int(m.group(2))
        if port == profile.port:
            return None
        return _Seen(
            line=line,
            hint=f"smtpd dials port {port} (the relay URL's port, or its scheme's default when it names "
            f"none) but the provider listens on port {profile.port} (the profile's): write :{profile.port} "
            f"in the relay URL, or correct the profile's port if the provider really listens on {port}",
            context=(earlier,),
        )
    return None


def _relay_expected(profile: Profile, rcpt: str) -> str:
    auth = ", authenticated" if profile.auth == "required" else ""
    return f"arrives at {profile.host}:{profile.port} for {rcpt} over TLS={_tls_word(profile.tls)}{auth}"


def _route_disabled(lines: list[str]) -> _Seen | None:
    """smtpd gave up on the provider for a while after a failure (AUTH, TLS, certificate).

    It logs `smtp-out: Disabling route ... for 15s` once; mail queued after that (the next
    probes) waits longer than PROBE_TIMEOUT and smtpd logs nothing new about it, so the
    failure that disabled the route is what settles those probes too.
    """
    for i, line in enumerate(lines):
        if re.search(ROUTE_DISABLED, line):
            for earlier in reversed(lines[:i]):
                failure = failure_for(earlier)
                if failure is not None:
                    return _Seen(line=earlier, hint=failure.hint, context=(line,))
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
    if kind == "ok" and delivered_to == user:
        if token.encode() in run.target.mailbox(user):
            return ProbeResult(probe, True, expected, f"in {user}'s mailbox", [line])
        # Delivered to the user by the config's local action, which is not mbox (an mda, maildir,
        # lmtp): where the aliases file sends it; its own storage is the action's business.
        return ProbeResult(
            probe, True, expected, f"delivered to {user} by the local action (not an mbox)", [line]
        )
    observed = f"delivered as {delivered_to}" if kind == "ok" else f"{kind}"
    hint = f"check the aliases entry for {probe.recipient}; a db: table needs newaliases/makemap after edits"
    if kind == "relayed":
        hint = UNEXPANDED_HINT
    elif kind == "failed" and delivered_to == user and m is not None:
        # the aliases did their part (smtpd expanded it to the right user): the delivery did not
        observed = f"expanded to {user}, but the local action's delivery failed: {m.group('stat')}"
        hint = (
            f"the aliases entry is right; the local action could not deliver to {user} "
            f"(smtpd: {m.group('result')} {m.group('stat')}): check its mda command, maildir path "
            "or the mailbox's permissions"
        )
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
    failure = failure_for(stat)
    return failure.hint if failure is not None else None


def _tls_word(tls: str) -> str:
    return {"starttls-required": "starttls", "starttls-optional": "starttls if offered"}.get(tls, tls)
