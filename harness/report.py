"""Reports of a check: text for people, JSON for scripts, JUnit XML for CI dashboards.

Every report is built from the same CheckReport, whose texts were redacted when they were
recorded, so no format can leak a password the others hide.
"""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from harness.check import CheckReport


def text_report(report: CheckReport) -> str:
    lines = [f"relay-harness check {report.config} on {report.target}"]
    if report.verdict == "refused":
        where = f"{report.config}:{report.refusal_line}: " if report.refusal_line else ""
        lines.append(f"  REFUSED  smtpd -n: {where}{report.refusal}")
        lines.extend(_finding_lines(report, only_line=report.refusal_line))
    for r in report.results:
        lines.append(f"  {'PASS' if r.ok else 'FAIL'}  {r.probe.name}: {r.probe.description}")
        if not r.ok:
            lines.append(f"        expected: {r.expected}")
            lines.append(f"        observed: {r.observed}")
            lines.extend(f"        evidence: {e}" for e in r.evidence if e)
            if r.hint:
                lines.append(f"        fix: {r.hint}")
    if report.verdict != "refused":
        lines.extend(_finding_lines(report))
    lines.extend(f"  note: {n}" for n in report.notes)
    passed = sum(r.ok for r in report.results)
    failed = len(report.results) - passed
    verdict = {"pass": "PASS", "fail": "FAIL", "refused": "FAIL (config refused)"}[report.verdict]
    lines.append(f"{verdict}: {passed} passed, {failed} failed in {report.seconds:.2f}s")
    return "\n".join(lines)


def _finding_lines(report: CheckReport, only_line: int | None = None) -> list[str]:
    out = []
    for f in report.findings:
        if only_line is not None and f.line != only_line:
            continue
        out.append(f"  lint  {report.config}:{f.line}: {f.severity}: {f.message} ({f.rule})")
        if f.hint:
            out.append(f"        fix: {f.hint}")
    return out


def json_report(report: CheckReport) -> dict[str, Any]:
    return {
        "config": report.config,
        "target": report.target,
        "verdict": report.verdict,
        "ok": report.ok,
        "seconds": round(report.seconds, 3),
        "refusal": report.refusal,
        "refusal_line": report.refusal_line,
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


def write_json(report: CheckReport, path: Path) -> None:
    path.write_text(json.dumps(json_report(report), indent=2) + "\n", encoding="utf-8")


def write_junit(report: CheckReport, path: Path) -> None:
    """One testcase per probe; a refused config is one failing testcase `smtpd-accepts-config`."""
    suite = ET.Element("testsuite", name=f"relay-harness check {report.config}")
    cases = 0
    failures = 0
    if report.verdict == "refused":
        case = ET.SubElement(suite, "testcase", classname="relay-harness.check", name="smtpd-accepts-config")
        failure = ET.SubElement(case, "failure", message=f"smtpd refused the config: {report.refusal}")
        failure.text = text_report(report)
        cases, failures = 1, 1
    for r in report.results:
        case = ET.SubElement(
            suite, "testcase", classname="relay-harness.check", name=r.probe.name, time=f"{r.seconds:.3f}"
        )
        cases += 1
        if not r.ok:
            failures += 1
            failure = ET.SubElement(case, "failure", message=f"expected {r.expected}; observed {r.observed}")
            failure.text = "\n".join([*r.evidence, *([f"fix: {r.hint}"] if r.hint else [])])
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("time", f"{report.seconds:.3f}")
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
