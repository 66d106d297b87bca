"""The emulated target against the real smtpd: every scenario case, every check test's config
(tests/test_check_cli.py's CHECKS) and every corpus config (tests/data/corpus, with the flags its
test gives), run on both, and whether they agree.

Agreement means the same verdict (a scenario case's expectations met or not, with the same
failures; a check's verdict and every probe's result) and the same decisive evidence: smtpd's
own lines that decide a case (deliveries, errors, warnings, certificate checks, refused
commands, the config refusal with its line), normalised for what differs by nature (ids, the
test host's number and addresses, delays), and what the fake upstream recorded (TLS, AUTH,
envelopes, replies). A case the emulation declines is counted as declined, with its reason.

    python bench/differential.py                 # as root (the lab); about 20 minutes here
    python bench/differential.py -k auth --show  # only cases whose name contains "auth", with diffs

Exit 0 when every case agrees or is declined, 1 on any disagreement, 2 when the lab cannot run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the check tests' configs are defined there (CHECKS)

from harness.check import (  # noqa: E402
    CheckInput,
    CheckReport,
    check_input,
    parse_file_flags,
    parse_table_flags,
    read_tables,
    run_check,
)
from harness.errors import HarnessError  # noqa: E402
from harness.pki import TestPki  # noqa: E402
from harness.scenarios import Case, CaseOutcome, Scenario, load_scenario, run_case  # noqa: E402
from harness.targets.base import Target  # noqa: E402
from harness.targets.emulated import Declined, EmulatedTarget  # noqa: E402
from harness.upstream import SessionRecord, load_profile  # noqa: E402

# smtpd's lines that decide a case; the rest (debug, hang-on ticks, per-process start-up) do not.
DECISIVE = re.compile(
    r" mta delivery | mda delivery | mta error reason=| mta connecting | mta server-cert-check "
    r"| mta ssl_check_name| smtp failed-command "
    r"|^smtp-out: (Disabling route|Error on session|Failed to resolve)|^warn: (?!purge_task)"
)
NORMALISE = (
    (re.compile(r"\b[0-9a-f]{16}\b"), "ID"),
    (re.compile(r"\b(msgid|evpid)=[0-9a-f]+"), r"\1=ID"),
    (re.compile(r"host\d+\.relay-harness\.test"), "HOST"),
    (re.compile(r"198\.51\.100\.\d+"), "ADDR"),
    (re.compile(r"delay=\w+"), "delay=*"),
    (re.compile(r"RH\d{6}"), "RHn"),
    (re.compile(r"#\d+ "), "#n "),
    (re.compile(r"\b(size)=\d+"), r"\1=n"),
)


def normalise(text: str) -> str:
    for pattern, repl in NORMALISE:
        text = pattern.sub(repl, text)
    return text


@dataclass
class Side:
    """What one target did with one case."""

    verdict: str = ""
    evidence: list[str] = field(default_factory=list)
    declined: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Item:
    kind: str  # scenario or check
    name: str
    run: Callable[[Target, TestPki], Side]
    real: Side = field(default_factory=Side)
    emulated: Side = field(default_factory=Side)

    @property
    def agrees(self) -> bool:
        return self.emulated.declined is not None or (
            self.real.error is None
            and self.emulated.error is None
            and self.real.verdict == self.emulated.verdict
            and self.real.evidence == self.emulated.evidence
        )


def _log_evidence(target: Target) -> list[str]:
    """smtpd's decisive lines, normalised, as a sorted list (concurrent processes interleave).

    Which recipient of a message smtpd tries first follows its random envelope ids, so the
    recipients of delivery lines are compared as a set, beside the lines without them.
    """
    log = getattr(target, "log", None)
    lines = [line for line in (log.lines if log is not None else []) if DECISIVE.search(line)]
    rcpts = sorted(
        {m.group(1) for line in lines for m in re.finditer(r" (?:to|rcpt)=<([^>]*)>", line)} - {"-"}
    )
    lines = [re.sub(r" (to|rcpt)=<[^>]*>", r" \1=<R>", line) for line in lines]
    return sorted(normalise(line) for line in lines) + ([normalise(f"recipients: {rcpts}")] if rcpts else [])


def _record_evidence(sessions: tuple[SessionRecord, ...]) -> list[str]:
    """What reached the upstream, per session that authenticated or carried mail: TLS, AUTH,
    envelopes and the replies to them.

    The sessions are the upstream's snapshot when the case stopped waiting, so only what a
    session has published by then is compared: its AUTH attempts and messages (a bare
    connection's EHLO and close may still be in flight). The reply list is left out: to a
    client speaking TLS into a plain port the upstream answers whatever it made of the
    ClientHello, which depends on the TLS library.
    """
    out = []
    for s in sessions:
        if not s.auth and not s.messages:
            continue
        auth = ",".join(f"{a.mechanism}:{a.user}:{'ok' if a.success else 'failed'}" for a in s.auth)
        msgs = ";".join(
            f"<{m.mail_from}> -> {sorted(m.rcpt_to)} refused {sorted(m.rejected_rcpt_to)}: {m.reply}"
            for m in s.messages
        )
        out.append(normalise(f"upstream: tls={s.tls} auth={auth or '-'} messages={msgs or '-'}"))
    return sorted(out)


def scenario_item(scenario: Scenario, case: Case) -> Item:
    def run(target: Target, pki: TestPki) -> Side:
        outcome: CaseOutcome = run_case(target, scenario, case, pki)
        verdict = "pass" if outcome.ok else "fail: " + "; ".join(normalise(f) for f in outcome.failures)
        seen = outcome.observation
        refusal = [] if seen.config.ok else [normalise(f"smtpd -n: {seen.config.output}")]
        return Side(verdict, refusal + _record_evidence(seen.sessions) + _log_evidence(target))

    return Item("scenario", f"{scenario.path.relative_to(ROOT / 'scenarios')}::{case.name}", run)


def check_item(key: str, inp: CheckInput, kind: str = "check") -> Item:
    def run(target: Target, pki: TestPki) -> Side:
        try:
            check_input(inp)
            report: CheckReport = run_check(target, inp, pki)
        except Declined:
            raise
        except HarnessError as exc:  # exit 2 (what the test host lacks): the same words on both
            return Side(normalise(f"error: {exc}"), _log_evidence(target))
        verdict = report.verdict + (
            f" at line {report.refusal_line}: {report.refusal}" if report.refusal else ""
        )
        probes = [
            normalise(f"{r.probe.name}: {'ok' if r.ok else 'FAIL'}; {r.observed}; {r.evidence[:1]}; {r.hint}")
            for r in report.results
        ]
        return Side(verdict, probes + _log_evidence(target))

    return Item(kind, key, run)


def collect(pattern: str, work: Path) -> list[Item]:
    items = []
    for path in sorted((ROOT / "scenarios").rglob("*.toml")):
        scenario = load_scenario(path)
        items.extend(scenario_item(scenario, case) for case in scenario.cases)
    from test_check_cli import CHECKS, DATA

    for key, chk in CHECKS.items():
        config = Path(chk.config) if chk.config.startswith("/") else DATA / chk.config
        tables = parse_table_flags(
            [f"{t.partition('=')[0]}={DATA / t.partition('=')[2]}" for t in chk.tables]
        )
        inp = CheckInput(config, config.read_text(encoding="utf-8"), load_profile(DATA / chk.profile), tables)
        items.append(check_item(key, inp))
    items.extend(corpus_items(work))
    return [i for i in items if pattern in i.name]


def corpus_items(work: Path) -> Iterator[Item]:
    """tests/data/corpus: the configs people write, each with the flags its check test gives."""
    from test_check_corpus import CASES as CORPUS_CASES
    from test_check_corpus import CORPUS

    for case in CORPUS_CASES.values():
        out = work / case.name
        out.mkdir(parents=True)
        config = out / "smtpd.conf"
        config.write_text(case.config, encoding="utf-8")
        db = out / "db.sqlite"
        if case.sqlite:
            with sqlite3.connect(db) as conn:
                conn.executescript((CORPUS / case.sqlite).read_text(encoding="utf-8"))
        args = [a.replace("{corpus}", str(CORPUS)).replace("{db}", str(db)) for a in case.args]
        flags: dict[str, list[str]] = {"--table": [], "--file": []}
        for flag, value in zip(args[::2], args[1::2], strict=True):
            flags[flag].append(value)
        tables = parse_table_flags(flags["--table"])
        inp = CheckInput(
            config,
            case.config,
            load_profile(CORPUS / case.profile),
            tables,
            read_tables(tables),
            parse_file_flags(flags["--file"]),
        )
        yield check_item(f"corpus::{case.name}", inp, "corpus")


SETTLE_QUIET = 1.5  # seconds without a decisive line: longer than smtpd's 1 s before a bounce
SETTLE_MAX = 5.0


def settle_before_stop(target: Target) -> None:
    """Both targets get the same quiet time before they stop.

    A case ends at its last awaited event; what smtpd does right after (its reading of the
    reply to the last message, an LMTP server's further replies) lands in the log of a target
    that stops slowly (the lab: SIGTERM over SSH) and not in one that stops at once (the
    emulation). Waiting until no decisive line has come for SETTLE_QUIET seconds (at most
    SETTLE_MAX) makes both logs complete. The quiet time is longer than the second smtpd waits
    before it sends a bounce (bounce.c): with 0.5 s, whether a PermFail's bounce and its local
    delivery (`parent_forward_open` for a user without a home) were in a log depended on load.
    """
    stop = target.stop

    def settled() -> None:
        log = getattr(target, "log", None)
        deadline = time.monotonic() + SETTLE_MAX
        if log is not None:
            seen = -1
            while time.monotonic() < deadline:
                count = sum(1 for line in log.lines if DECISIVE.search(line))
                if count == seen:
                    break
                seen = count
                time.sleep(SETTLE_QUIET)  # quiet is the absence of an event: it can only be waited out
        stop()

    setattr(target, "stop", settled)  # noqa: B010 (an instance's stop, for this run only)


def attempt(run: Callable[[Target, TestPki], Side], target: Target, pki: TestPki) -> Side:
    settle_before_stop(target)
    started = time.monotonic()
    try:
        side = run(target, pki)
    except Declined as exc:
        side = Side(declined=str(exc))
    except Exception as exc:  # a harness error on one side is a disagreement to look at, not a crash
        side = Side(error=f"{type(exc).__name__}: {exc}")
    side.seconds = time.monotonic() - started
    return side


@contextmanager
def lab_runner(pki: TestPki) -> Iterator[Callable[[Item], None]]:
    """Runs an item's real side on a fresh lab test host, removed right after."""
    from harness.targets.lab import Lab

    with Lab(pki.ca_pem) as lab:

        def real(item: Item) -> None:
            host = lab.create_host()
            try:
                assert host.target is not None
                item.real = attempt(item.run, host.target, pki)
            finally:
                lab.destroy_host(host)

        yield real


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--show", action="store_true", help="print both sides' evidence for disagreements")
    parser.add_argument("--parallel", type=int, default=2, help="lab cases at once (1-4)")
    args = parser.parse_args()
    from harness.targets.lab import LabError, check_environment

    try:
        check_environment()
    except LabError as exc:
        print(f"differential: the real side needs the lab: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="relay-harness-differential-"))
    try:
        return run_items(collect(args.k, work), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_items(items: list[Item], args: argparse.Namespace) -> int:
    pki = TestPki()
    started = time.monotonic()
    for item in items:
        target = EmulatedTarget()
        try:
            item.emulated = attempt(item.run, target, pki)
        finally:
            target.close()
    with lab_runner(pki) as real, ThreadPoolExecutor(max(1, min(4, args.parallel))) as pool:
        list(pool.map(real, items))
    wall = time.monotonic() - started
    return report(items, wall, args.show)


def report(items: list[Item], wall: float, show: bool) -> int:
    agree = declined = 0
    print(f"{'case':64} {'real':>6} {'emul':>6}  result")
    for item in items:
        e, r = item.emulated, item.real
        if e.declined is not None:
            declined += 1
            result = f"declined: {e.declined}"
        elif item.agrees:
            agree += 1
            result = f"agree ({r.verdict.split(':')[0]})"
        else:
            result = "DISAGREE"
        print(f"{item.kind[0]} {item.name:62} {r.seconds:5.1f}s {e.seconds:5.2f}s  {result}")
        if not item.agrees and show:
            for label, side in (("real", r), ("emulated", e)):
                print(f"    {label}: {side.error or side.verdict}")
            only_real = [x for x in r.evidence if x not in e.evidence]
            only_emulated = [x for x in e.evidence if x not in r.evidence]
            for x in only_real:
                print(f"    only real:     {x}")
            for x in only_emulated:
                print(f"    only emulated: {x}")
    total = len(items)
    kinds = {k: sum(1 for i in items if i.kind == k) for k in ("scenario", "check", "corpus")}
    print(
        f"\n{total} cases ({kinds['scenario']} scenario cases, {kinds['check']} check configs, "
        f"{kinds['corpus']} corpus configs): {agree} agree, {declined} declined, "
        f"{total - agree - declined} disagree "
        f"({100 * (agree + declined) / max(1, total):.0f}% agreement or declared decline) in {wall:.0f}s"
    )
    return 0 if agree + declined == total else 1


if __name__ == "__main__":
    sys.exit(main())
