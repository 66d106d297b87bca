"""Reports for every command: text for people, JSON for scripts, JUnit XML for CI dashboards.

`check` and `accept` both come down to rows (a probe, a fact) with a status and the lines that
explain it; the text and JUnit writers here render any list of rows, so both commands' reports
read alike. Every text was redacted when it was recorded, so no format can leak a password the
others hide.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.accept.facts import Fact
    from harness.accept.run import AcceptReport
    from harness.check import CheckReport
    from harness.probes import ProbeResult

MAX_OUTPUT_LINES = 8


@dataclass(frozen=True)
class Row:
    """One line of a report and what explains it: a probe of `check`, a fact of `accept`."""

    name: str
    status: str  # pass, fail, warn, info
    summary: str
    details: tuple[str, ...] = ()  # shown under the row, already worded
    failure: str = ""  # JUnit's failure message
    body: str = ""  # JUnit's failure text or system-out
    seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    @property
    def errored(self) -> bool:
        return self.status == "error"


@dataclass
class Report:
    """Rows between a head line and a verdict line; `extra` lines stand after the rows."""

    title: str
    head: str
    rows: list[Row] = field(default_factory=list)
    before: list[str] = field(default_factory=list)  # lines before the rows (a refusal)
    extra: list[str] = field(default_factory=list)
    verdict: str = ""
    seconds: float = 0.0
    classname: str = "relay-harness"


def text(report: Report) -> str:
    lines = [report.head, *report.before]
    for row in report.rows:
        lines.append(f"  {row.status.upper():4}  {row.name}: {row.summary}")
        lines.extend(f"        {d}" for d in row.details)
    lines.extend(report.extra)
    lines.append(report.verdict)
    return "\n".join(lines)


def junit(report: Report, path: Path) -> None:
    path.write_bytes(junit_xml(report))


def junit_xml(report: Report) -> bytes:
    """One testcase per row; failing rows carry their explanation, others it as system-out."""
    import xml.etree.ElementTree as ET  # only for JUnit: a check without --junit never loads it

    suite = ET.Element("testsuite", name=report.title)
    failures = errors = 0
    for row in report.rows:
        attrs = {"classname": report.classname, "name": row.name}
        if row.seconds is not None:
            attrs["time"] = f"{row.seconds:.3f}"
        case = ET.SubElement(suite, "testcase", attrs)
        if row.failed or row.errored:
            errors += row.errored
            failures += row.failed
            kind = "error" if row.errored else "failure"
            failure = ET.SubElement(case, kind, message=row.failure or row.summary)
            failure.text = row.body
        elif row.body:
            ET.SubElement(case, "system-out").text = row.body
    suite.set("tests", str(len(report.rows)))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("time", f"{report.seconds:.3f}")
    return bytes(ET.tostring(suite, encoding="utf-8", xml_declaration=True))


def json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json(data: dict[str, Any], path: Path) -> None:
    path.write_bytes(json_bytes(data))


# -- check ----------------------------------------------------------------------------------------
def _probe_row(r: ProbeResult) -> Row:
    details: list[str] = []
    if not r.ok:
        details = [f"expected: {r.expected}", f"observed: {r.observed}"]
        details += [f"evidence: {e}" for e in r.evidence if e]
        if r.hint:
            details.append(f"fix: {r.hint}")
    return Row(
        r.probe.name,
        "pass" if r.ok else "fail",
        r.probe.description,
        tuple(details),
        failure=f"expected {r.expected}; observed {r.observed}",
        body="\n".join([*r.evidence, *([f"fix: {r.hint}"] if r.hint else [])]) if not r.ok else "",
        seconds=r.seconds,
    )


def _finding_lines(report: CheckReport, only_line: int | None = None) -> list[str]:
    out = []
    for f in report.findings:
        if only_line is not None and f.line != only_line:
            continue
        out.append(f"  lint  {report.config}:{f.line}: {f.severity}: {f.message} ({f.rule})")
        if f.hint:
            out.append(f"        fix: {f.hint}")
    return out


def check_report(report: CheckReport) -> Report:
    out = Report(
        f"relay-harness check {report.config}", f"relay-harness check {report.config} on {report.target}"
    )
    out.classname, out.seconds = "relay-harness.check", report.seconds
    if report.verdict == "error":
        out.before.append(f"  ERROR  {report.error}")
        out.verdict = "ERROR: the check could not run (not a verdict on the config)"
        return out
    if report.verdict == "refused":
        where = f"{report.config}:{report.refusal_line}: " if report.refusal_line else ""
        out.before.append(f"  REFUSED  {report.refusal_stage}: {where}{report.refusal}")
        out.before.extend(_finding_lines(report, only_line=report.refusal_line))
    out.rows = [_probe_row(r) for r in report.results]
    if report.verdict != "refused":
        out.extra.extend(_finding_lines(report))
    out.extra.extend(f"  note: {n}" for n in report.notes)
    passed = sum(r.ok for r in report.results)
    failed = len(report.results) - passed
    verdict = {"pass": "PASS", "fail": "FAIL", "refused": "FAIL (config refused)"}[report.verdict]
    out.verdict = f"{verdict}: {passed} passed, {failed} failed in {report.seconds:.2f}s"
    return out


def text_report(report: CheckReport) -> str:
    return text(check_report(report))


def json_report(report: CheckReport) -> dict[str, Any]:
    return {
        "config": report.config,
        "target": report.target,
        "verdict": report.verdict,
        "ok": report.ok,
        "seconds": round(report.seconds, 3),
        "error": report.error,
        "refusal": report.refusal,
        "refusal_line": report.refusal_line,
        "refusal_stage": report.refusal_stage if report.refusal is not None else None,
        "probes": [
            {
                "name": r.probe.name,
                "description": r.probe.description,
                "ok": r.ok,
                "expected": r.expected,
                "observed": r.observed,
                "evidence": r.evidence,
                "hint": r.hint,
                "seconds": round(r.seconds, 3),
            }
            for r in report.results
        ],
        "lint": [dataclasses.asdict(f) for f in report.findings],
        "notes": report.notes,
    }


def write_junit(report: CheckReport, path: Path) -> None:
    path.write_bytes(check_junit_xml(report))


def junit_report(report: CheckReport) -> Report:
    """The check's report with one row per JUnit testcase: a refused config is one failing row."""
    out = check_report(report)
    if report.verdict == "error":
        out.rows = [
            Row("relay-harness-check", "error", "the check ran", failure=report.error or "", body=text(out))
        ]
    if report.verdict == "refused":
        refused = Row(
            "smtpd-accepts-config",
            "fail",
            "smtpd accepts the config",
            failure=f"smtpd refused the config: {report.refusal}",
            body=text(out),
        )
        out.rows.insert(0, refused)
    return out


def check_junit_xml(report: CheckReport) -> bytes:
    """One testcase per probe; a refused config is one failing testcase `smtpd-accepts-config`."""
    return junit_xml(junit_report(report))


# -- accept ---------------------------------------------------------------------------------------
def _fact_row(f: Fact) -> Row:
    details: list[str] = []
    if f.command:
        details.append(f"$ {f.command}")
    output = f.output.splitlines()
    if f.status != "pass" or len(output) <= 2:
        shown = output[:MAX_OUTPUT_LINES]
        details.extend(f"| {line}" for line in shown)
        if len(output) > len(shown):
            details.append(f"| ... ({len(output) - len(shown)} more lines in the JSON report)")
    details.extend(f"evidence: {e}" for e in f.evidence)
    if f.hint and f.status != "pass":
        details.append(f"fix: {f.hint}")
    body = "\n".join([f"$ {f.command}" if f.command else "", f.output, *f.evidence]).strip()
    if f.failed:
        body += f"\nfix: {f.hint}" if f.hint else ""
    else:
        body = f"{f.status}: {f.summary}\n{body}".strip()
    return Row(f.name, f.status, f.summary, tuple(details), failure=f.summary, body=body)


def accept_report(report: AcceptReport, facts: Iterable[Fact] | None = None) -> Report:
    out = Report(
        f"relay-harness accept {report.url}",
        f"relay-harness accept {report.url} (OpenSMTPD {report.version or '?'}, {report.config_path})",
    )
    out.classname, out.seconds = "relay-harness.accept", report.seconds
    out.rows = [_fact_row(f) for f in (report.facts if facts is None else facts)]
    if report.differences is not None:
        if report.differences:
            out.extra.append(f"  FAIL  baseline: {len(report.differences)} difference(s)")
            out.extra.extend(f"        {d}" for d in report.differences)
        else:
            out.extra.append("  PASS  baseline: no difference")
    out.extra.extend(f"  note: {n}" for n in report.notes)
    counts = {s: sum(f.status == s for f in report.facts) for s in ("pass", "fail", "warn")}
    out.verdict = (
        f"{'PASS' if report.ok else 'FAIL'}: {counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['warn']} warning(s)"
        + (f", {len(report.differences)} baseline difference(s)" if report.differences else "")
        + f" in {report.seconds:.2f}s"
    )
    return out


def accept_text(report: AcceptReport) -> str:
    return text(accept_report(report))


def accept_json(report: AcceptReport) -> dict[str, Any]:
    return {
        "url": report.url,
        "host": report.host,
        "version": report.version,
        "config": report.config_path,
        "ok": report.ok,
        "relay_way": report.relay_way,
        "seconds": round(report.seconds, 3),
        "facts": [
            {
                "name": f.name,
                "status": f.status,
                "summary": f.summary,
                "command": f.command,
                "output": f.output,
                "evidence": f.evidence,
                "hint": f.hint,
            }
            for f in report.facts
        ],
        "baseline_differences": report.differences,
        "notes": report.notes,
    }


def accept_junit(report: AcceptReport, path: Path) -> None:
    path.write_bytes(accept_junit_xml(report))


def accept_junit_xml(report: AcceptReport) -> bytes:
    """One testcase per fact (warnings pass, with their text as output), one for the baseline."""
    from harness.accept.facts import Fact

    facts = list(report.facts)
    if report.differences is not None:
        differs = bool(report.differences)
        facts.append(
            Fact(
                "baseline", "fail" if differs else "pass", "baseline comparison", evidence=report.differences
            )
        )
    return junit_xml(accept_report(report, facts))
