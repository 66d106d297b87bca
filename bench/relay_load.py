"""Load through the real smtpd: N messages from inside a lab test host, relayed to the fake upstream,
and the same relay to Postfix's smtp-sink in the same run, side by side.

    python bench/relay_load.py [--messages 10000] [--fault tempfail-rcpt-times-2 ...] [--no-sink]

As root, in the project venv (the lab needs root; Postfix is fetched as bench/upstream_throughput.py
does it). For each upstream a fresh test host: the bench's config is installed, relaying is paused
(`smtpctl pause mta`), the N messages are submitted in bulk (`Target.submit_many`: SMTP to the
host's own listener from inside it, 1000 a command), relaying is resumed and timed until smtpd has
logged a final result for every message. Each message has its own recipient (load-I@example.com), so
every side can say which message it saw: the upstream's records (ours: counted on the wire), smtpd's
log (the sink, which records nothing), and smtpd's queue at the end.

Prints one JSON object: our relay's figures at the top (submitted, relayed_once, duplicates, lost,
still_queued, seconds, msgs_per_s, ...), the same under "smtp_sink", their "ratio" (our msgs/s over
the sink's) and "goals" with whether each was met. A message is lost if it was submitted, is not
at the upstream and is not in the queue. `seconds` is the relay phase (resume to the last final
result); `total_seconds` adds the submission. With --fault the provider misbehaves and heals (the
profile's `times`/`for_seconds`); whenever the relay stalls, the envelopes smtpd holds as deferred
(`smtpctl show queue`) are rescheduled at once by id instead of after smtpd's back-off, and the
sink row is left out (it would compare a faulty provider with a healthy one).

Bounded: at most 100 000 messages, 5 rounds, 50 forced retry rounds, and --deadline seconds a
round (default 900); everything is removed at the end (Lab.close), also on failure or Ctrl-C.
Exit 0 with the JSON; 2 with one line when the lab or Postfix cannot be had.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from upstream_throughput import BenchError, postfix_root, smtp_sink

from harness.pki import TestPki
from harness.relay import DELIVERY, relay_run
from harness.targets.base import Bundle, LogFollower, OutgoingMail
from harness.targets.lab import Lab, LabError
from harness.targets.smtpd import SmtpdTarget
from harness.upstream import Profile, ProfileError, Recorder, parse_profile

MAX_MESSAGES = 100_000
MAX_ROUNDS = 5
MAX_RETRIES = 50  # rounds of forced retries of deferred mail, at most, per run
SETTLE = 1.0  # seconds without a final result before deferred mail is retried at once
RETRY_BATCH = 1000  # deferred envelopes rescheduled in one command, at most
HOST = "smtp.example.net"
RCPT = re.compile(r"^load-(\d+)@example\.com$")
# The bench's own config, chosen for what is measured (the upstream's part of a relay):
# - `smtp+notls`: smtp-sink speaks no TLS, so both upstreams get the same clear-text session;
# - smtpd's per-session cap (100 messages, then a new connection) stays as shipped, but the
#   connection delays that follow it (5 s per route, 2 s per relay) are timers, not work: they
#   would make both rows a measure of smtpd's politeness. `conn-delay-*` 0 removes them, and
#   `session-mail-max` 1000 keeps each session long enough to be measured in its steady state.
# - messages are submitted over SMTP to `listen on lo0` (the test host's loopback), one session
#   kept open: smtpd's `smtp limit max-mails` stays at its 100, so the client reconnects every
#   100 messages, as any bulk sender there must (a few ms each, not worth a changed limit).
CONFIG = f"""\
listen on lo0
mta limit session-mail-max 1000 conn-delay-route 0 conn-delay-relay 0 reconn-delay-route 0
action "out" relay host smtp+notls://{HOST}:587
match from local for any action "out"
"""
PROFILE = f'host = "{HOST}"\nport = 587\ntls = "none"\nauth = "none"\n'
FAULT = re.compile(
    r"^(?:tempfail-(?P<stage>connect|ehlo|auth|mail|rcpt|data)|drop-(?P<drop>after-ehlo|after-data))"
    r"-(?:times-(?P<times>\d+)|for-(?P<seconds>\d+(?:\.\d+)?)s)$"
)
GOALS = {"lost": 0, "duplicates": 0, "total_seconds_at_most": 300.0, "ratio_at_least": 0.9}


@dataclass
class Row:
    """One upstream's run; the first seven are the issue's figures."""

    submitted: int = 0
    relayed_once: int = 0
    duplicates: int = 0
    lost: int = 0
    still_queued: int = 0
    seconds: float = 0.0
    msgs_per_s: float = 0.0
    submit_failed: int = 0
    submit_seconds: float = 0.0
    total_seconds: float = 0.0
    deferrals: int = 0
    forced_retries: int = 0
    sessions: int = 0
    counted_from: str = ""
    notes: list[str] = field(default_factory=list)


def fault_profile(faults: list[str]) -> str:
    """The provider profile with the --fault flags as a [faults] table (one bound for all)."""
    table: dict[str, str] = {}
    for flag in faults:
        m = FAULT.match(flag)
        if m is None:
            raise BenchError(
                f"--fault {flag!r}: want tempfail-STAGE-times-N, tempfail-STAGE-for-Ss, "
                "drop-after-ehlo|after-data-times-N or -for-Ss"
            )
        key = "tempfail" if m["stage"] else "drop"
        bound = f"times = {m['times']}" if m["times"] else f"for_seconds = {m['seconds']}"
        if key in table or table.get("bound", bound) != bound:
            raise BenchError(f"--fault {flag!r}: one tempfail and one drop at most, with the same bound")
        table[key] = f'{key} = "{m["stage"] or m["drop"]}"'
        table["bound"] = bound
    if not table:
        return PROFILE
    return PROFILE + "[faults]\n" + "".join(v + "\n" for v in table.values())


def mails(n: int) -> list[OutgoingMail]:
    return [
        OutgoingMail("load@example.org", (f"load-{i}@example.com",), subject=f"relay-load {i}", via="smtp")
        for i in range(n)
    ]


class Outcomes:
    """smtpd's final results per message, read from its log as it is written (no full rescans)."""

    def __init__(self, log: LogFollower) -> None:
        self.log = log
        self.ok: Counter[int] = Counter()
        self.failed: Counter[int] = Counter()  # PermFail: final, not retried
        self.deferred = 0
        self.last_final = time.monotonic()
        self._index = log.mark()
        self._regex = re.compile(DELIVERY)
        self._news = threading.Event()
        self._unsubscribe = log.subscribe(self._news.set)

    def read(self, wait: float) -> None:
        self._news.wait(wait)
        self._news.clear()
        for line in self.log.lines_since(self._index):
            self._index += 1
            m = self._regex.search(line)
            rcpt = RCPT.match(m["rcpt"]) if m else None
            if m is None or rcpt is None:
                continue
            i = int(rcpt.group(1))
            if m["result"] == "TempFail":
                self.deferred += 1
                continue
            (self.ok if m["result"] == "Ok" else self.failed)[i] += 1
            self.last_final = time.monotonic()

    def final(self) -> int:
        return len(self.ok) + len(self.failed)

    def close(self) -> None:
        self._unsubscribe()


def deferred_in_queue(target: SmtpdTarget) -> list[str]:
    """Envelopes smtpd holds for a later try: pending, with the error of the last one."""
    out = target.run("smtpctl show queue", timeout=120).stdout
    return re.findall(r"^([0-9a-f]{16})\|.*\|pending\|\d+\|.+$", out, re.MULTILINE)


def reschedule(target: SmtpdTarget, evpids: list[str]) -> list[str]:
    """`smtpctl schedule EVPID` for each, in one command; the ones smtpd did reschedule.

    Each by its id, never `schedule all`: that also releases the envelopes smtpd is holding back
    while the relay is busy (hiwat), and thousands at once stall it for seconds.
    """
    ids = " ".join(e for e in evpids if re.fullmatch(r"[0-9a-f]{16}", e))
    script = f'for e in {ids}; do printf "%s " "$e"; smtpctl schedule "$e"; done'
    out = target.run(script, timeout=120).stdout
    return [m.group(1) for m in re.finditer(r"^([0-9a-f]{16}) 1 envelope", out, re.MULTILINE)]


def queued(target: SmtpdTarget) -> set[int]:
    """Messages still in smtpd's queue, by their recipient (`smtpctl show queue`)."""
    out = target.run("smtpctl show queue", timeout=120).stdout
    return {int(m.group(1)) for m in re.finditer(r"load-(\d+)@example\.com", out)}


def relay(target: SmtpdTarget, log: LogFollower, n: int, deadline: float, recorder: Recorder | None) -> Row:
    """Submit n messages with relaying paused, resume, and wait for every final result."""
    how = "upstream records" if recorder is not None else "smtpd log (smtp-sink records nothing)"
    row = Row(counted_from=how)
    target.control("pause", "mta")
    start = time.perf_counter()
    results = target.submit_many(mails(n))
    row.submit_seconds = time.perf_counter() - start
    submitted = {i for i, r in enumerate(results) if r.ok}
    row.submitted, row.submit_failed = len(submitted), n - len(submitted)
    if row.submit_failed:
        first = next(r.output for r in results if not r.ok)
        row.notes.append(f"{row.submit_failed} submission(s) failed, first: {first[:200]}")
    outcomes = Outcomes(log)
    relay_start = time.perf_counter()
    target.control("resume", "mta")
    last_end = relay_start
    last_retry = 0.0
    try:
        while outcomes.final() < len(submitted) and time.monotonic() < deadline:
            before = outcomes.final()
            outcomes.read(min(0.5, max(0.0, deadline - time.monotonic())))
            if outcomes.final() > before:
                last_end = time.perf_counter()
            # Deferred mail waits for smtpd's back-off (minutes): once nothing has become final
            # for a while, retry what smtpd holds as deferred, at once. Its queue says which, not
            # its log: a route smtpd takes down (`mta host-rejects-all-mails`) defers envelopes
            # without a delivery line for each.
            idle = time.monotonic() - max(outcomes.last_final, last_retry)
            if outcomes.deferred and idle >= SETTLE and row.forced_retries < MAX_RETRIES:
                last_retry = time.monotonic()
                deferred = deferred_in_queue(target)
                if deferred:
                    row.forced_retries += 1
                    reschedule(target, deferred[:RETRY_BATCH])
        if outcomes.final() < len(submitted):
            row.notes.append(f"stopped at the deadline with {len(submitted) - outcomes.final()} not final")
    finally:
        outcomes.close()
    row.seconds = last_end - relay_start
    row.total_seconds = row.submit_seconds + row.seconds
    in_queue = queued(target)
    if recorder is not None:  # the wire is the truth: what the upstream accepted
        seen = Counter(
            int(m.group(1))
            for _, msg in recorder.messages()
            if msg.accepted
            for r in msg.rcpt_to
            if (m := RCPT.match(r))
        )
        row.sessions = sum(1 for s in recorder.sessions if s.refused is None)
        logged_only = {i for i in outcomes.ok if i not in seen}
        if logged_only:
            row.notes.append(f"{len(logged_only)} logged Ok by smtpd but not recorded by the upstream")
    else:
        seen = outcomes.ok
        row.sessions = sum(1 for line in log.lines_since(0) if " mta connected" in line)
    row.relayed_once = sum(1 for i in submitted if seen[i] == 1)
    row.duplicates = sum(c - 1 for c in seen.values() if c > 1)
    row.still_queued = len({i for i in submitted if seen[i] == 0} & in_queue)
    row.lost = len({i for i in submitted if seen[i] == 0} - in_queue)
    row.deferrals = outcomes.deferred
    if outcomes.failed:
        row.notes.append(f"{len(outcomes.failed)} message(s) failed permanently (PermFail)")
    if set(seen) - submitted:
        row.notes.append(f"{len(set(seen) - submitted)} recipient(s) seen that were not submitted")
    row.msgs_per_s = row.relayed_once / row.seconds if row.seconds else 0.0
    return row


@contextlib.contextmanager
def sink_run(target: SmtpdTarget, bundle: Bundle, root: Path) -> Iterator[LogFollower]:
    """relay_run's order (upstream, bundle, names, `smtpd -n`, smtpd) with smtp-sink upstream."""
    address = target.upstream_address()
    with smtp_sink(root, address, 587):
        target.install(bundle)
        target.point([HOST], address)
        check = target.check_config(bundle.config_path)
        if not check.ok:
            raise BenchError(f"smtpd refused the bench's config: {check.output}")
        log = target.start(bundle.config_path)
        try:
            yield log
        finally:
            target.stop()


def one_round(
    lab: Lab, profile: Profile, pki: TestPki, root: Path | None, args: argparse.Namespace
) -> tuple[Row, Row | None]:
    """Ours, then smtp-sink (when `root`), each on a fresh test host with the same config and load."""
    deadline = time.monotonic() + args.deadline
    bundle = Bundle(CONFIG)
    host = lab.create_host()
    assert host.target is not None
    with relay_run(host.target, bundle, profile, pki) as relayed:
        ours = relay(host.target, relayed.log, args.messages, deadline, relayed.upstream.recorder)
    lab.destroy_host(host)
    if root is None:
        return ours, None
    host = lab.create_host()
    assert host.target is not None
    with sink_run(host.target, bundle, root) as log:
        sink = relay(host.target, log, args.messages, deadline, None)
    lab.destroy_host(host)
    return ours, sink


def figures(row: Row) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(row).items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        profile = parse_profile(fault_profile(args.fault), "<--fault>")
    except ProfileError as exc:
        raise BenchError(str(exc)) from None
    root = postfix_root() if not args.no_sink and not args.fault else None
    pki = TestPki()
    with Lab(pki.ca_pem) as lab:
        rounds = [one_round(lab, profile, pki, root, args) for _ in range(args.repeat)]
    ours = max((o for o, _ in rounds), key=lambda r: r.msgs_per_s)
    sinks = [s for _, s in rounds if s is not None]
    sink = max(sinks, key=lambda r: r.msgs_per_s) if sinks else None
    out = figures(ours)
    out["smtp_sink"] = figures(sink) if sink is not None else None
    out["ratio"] = round(ours.msgs_per_s / sink.msgs_per_s, 3) if sink and sink.msgs_per_s else None

    def brief(row: Row | None) -> dict[str, Any] | None:
        keys = ("msgs_per_s", "lost", "duplicates", "still_queued", "total_seconds")
        return {k: figures(row)[k] for k in keys} if row is not None else None

    out["rounds"] = [{"ours": brief(o), "smtp_sink": brief(s)} for o, s in rounds]
    out["fault"] = args.fault or None
    out["messages"] = args.messages
    out["config"] = CONFIG
    every = [o for o, _ in rounds]
    met = {  # losses and time in every round; the ratio of the best rounds (a shared, noisy machine)
        "lost": all(o.lost == GOALS["lost"] for o in every),
        "duplicates": all(o.duplicates == GOALS["duplicates"] for o in every),
        "total_seconds": all(o.total_seconds <= GOALS["total_seconds_at_most"] for o in every),
    }
    if out["ratio"] is not None:
        met["ratio"] = out["ratio"] >= GOALS["ratio_at_least"]
    out["goals"] = {**GOALS, "met": met}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="how many (default 10000)")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        help="provider fault that heals: tempfail-STAGE-times-N, drop-after-data-times-N, ...-for-Ss",
    )
    parser.add_argument("--no-sink", action="store_true", help="leave out the smtp-sink row")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each row its best (default 1)")
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds a round (default 900)")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= MAX_MESSAGES:
        parser.error(f"--messages must be between 1 and {MAX_MESSAGES}")
    if not 1 <= args.repeat <= MAX_ROUNDS:
        parser.error(f"--repeat must be between 1 and {MAX_ROUNDS}")
    try:
        out = run(args)
    except (BenchError, LabError) as exc:
        print(f"relay_load: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
