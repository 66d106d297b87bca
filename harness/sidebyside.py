"""One config's check on several targets, compared probe by probe (`check --target A --target B`).

The point of running a config on lab:bookworm and lab:trixie side by side is the difference: what
an upgrade would break, fix or change. So the comparison is its own small piece, used by `check`
with several targets and by `accept --upgrade-to`, and it always quotes both sides' evidence:
"it fails on trixie" is only useful next to what trixie's smtpd said and what bookworm's said.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from harness.check import CheckReport
from harness.probes import ProbeResult
from harness.report import Report, check_report, json_report, junit_report, junit_xml, text

# How a probe (or the config itself) goes from the first target to another.
KINDS = {
    "breaks": "passes on {a}, fails on {b}",
    "fixed": "fails on {a}, passes on {b}",
    "changes": "fails on both, with different evidence",
    "refused": "accepted by {a}, refused by {b}",
    "accepted": "refused by {a}, accepted by {b}",
    "refused-both": "refused by both, in different words",
    "missing": "probed on {a} only",
}


@dataclass(frozen=True)
class Side:
    """One target's outcome for one probe: its verdict and the words that back it."""

    target: str
    ok: bool
    observed: str
    evidence: tuple[str, ...] = ()
    hint: str | None = None

    def lines(self) -> list[str]:
        out = [f"{self.target}: {'PASS' if self.ok else 'FAIL'}: {self.observed}"]
        out += [f"  evidence: {e}" for e in self.evidence if e]
        if self.hint:
            out.append(f"  fix: {self.hint}")
        return out


@dataclass(frozen=True)
class Difference:
    probe: str  # a probe name, or "config" for smtpd -n
    kind: str  # one of KINDS
    sides: tuple[Side, ...]

    def summary(self) -> str:
        a, b = self.sides[0].target, self.sides[-1].target
        return f"{self.probe}: {KINDS[self.kind].format(a=a, b=b)}"


@dataclass
class SideBySide:
    """The reports of one config on several targets (in the order given) and their differences."""

    labels: list[str]
    reports: list[CheckReport]
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)


def _config_side(label: str, report: CheckReport) -> Side:
    if report.verdict == "refused":
        where = f"line {report.refusal_line}: " if report.refusal_line else ""
        return Side(label, False, f"smtpd -n refused the config: {where}{report.refusal}")
    return Side(label, True, "smtpd -n accepted the config")


def _probe_side(label: str, result: ProbeResult) -> Side:
    return Side(label, result.ok, result.observed, tuple(result.evidence), result.hint)


def shape(line: str) -> str:
    """A log line without what differs between any two runs (ids, numbers, addresses, host names),
    so two runs compare equal unless smtpd said something else."""
    line = re.sub(r"\b[0-9a-f]{8,}\b", "ID", line)
    line = re.sub(r"SHA256:[0-9A-Za-z+/=]+", "SHA256:FP", line)
    line = re.sub(r"\bhost\d+\.", "hostN.", line)
    return re.sub(r"\d+", "N", line)


def _differ(x: Side, y: Side) -> bool:
    return (x.observed, x.hint) != (y.observed, y.hint) or [shape(e) for e in x.evidence] != [
        shape(e) for e in y.evidence
    ]


def compare(labels: list[str], reports: list[CheckReport]) -> SideBySide:
    """Each probe and the config's acceptance, the first target against each other one."""
    out = SideBySide(labels, reports)
    base_label, base = labels[0], reports[0]
    for label, other in zip(labels[1:], reports[1:], strict=True):
        a, b = _config_side(base_label, base), _config_side(label, other)
        if a.ok != b.ok:
            out.differences.append(Difference("config", "refused" if a.ok else "accepted", (a, b)))
        elif not a.ok and _differ(a, b):  # 6.8's syntax error, 7.6's start-up failure: both matter
            out.differences.append(Difference("config", "refused-both", (a, b)))
        theirs = {r.probe.name: r for r in other.results}
        for mine in base.results:
            match = theirs.pop(mine.probe.name, None)
            if match is None:
                if other.verdict != "refused":
                    out.differences.append(
                        Difference(mine.probe.name, "missing", (_probe_side(base_label, mine),))
                    )
                continue
            x, y = _probe_side(base_label, mine), _probe_side(label, match)
            if x.ok and not y.ok:
                kind = "breaks"
            elif y.ok and not x.ok:
                kind = "fixed"
            elif not x.ok and _differ(x, y):
                kind = "changes"
            else:
                continue
            out.differences.append(Difference(mine.probe.name, kind, (x, y)))
        for name, result in theirs.items():
            if base.verdict != "refused":
                out.differences.append(Difference(name, "missing", (_probe_side(label, result),)))
    return out


def side_by_side_text(sbs: SideBySide) -> str:
    parts = [text(check_report(r)) for r in sbs.reports]
    lines = [f"differences between {', '.join(sbs.labels)}:"]
    if not sbs.differences:
        lines.append("  none: every probe behaves the same")
    for diff in sbs.differences:
        lines.append(f"  DIFF  {diff.summary()}")
        for side in diff.sides:
            lines.extend(f"        {line}" for line in side.lines())
    verdicts = ", ".join(
        f"{label} {'PASS' if r.ok else 'FAIL'}" for label, r in zip(sbs.labels, sbs.reports, strict=True)
    )
    lines.append(f"{'PASS' if sbs.ok else 'FAIL'}: {verdicts}; {len(sbs.differences)} difference(s)")
    return "\n\n".join(parts) + "\n\n" + "\n".join(lines)


def side_by_side_json(sbs: SideBySide) -> dict[str, Any]:
    return {
        "ok": sbs.ok,
        "targets": [
            {"label": label, **json_report(r)} for label, r in zip(sbs.labels, sbs.reports, strict=True)
        ],
        "differences": [
            {
                "probe": d.probe,
                "kind": d.kind,
                "summary": d.summary(),
                "sides": [
                    {
                        "target": s.target,
                        "ok": s.ok,
                        "observed": s.observed,
                        "evidence": list(s.evidence),
                        "hint": s.hint,
                    }
                    for s in d.sides
                ],
            }
            for d in sbs.differences
        ],
    }


def side_by_side_junit_xml(sbs: SideBySide) -> bytes:
    """One testcase per probe and target (`NAME [TARGET]`); a refusal is one testcase per target."""
    parts = [junit_report(r) for r in sbs.reports]
    combined = Report(parts[0].title, parts[0].head, classname=parts[0].classname)
    combined.seconds = sum(r.seconds for r in sbs.reports)  # one after the other
    for label, part in zip(sbs.labels, parts, strict=True):
        combined.rows.extend(dataclasses.replace(row, name=f"{row.name} [{label}]") for row in part.rows)
    return junit_xml(combined)
