"""Wall time of `relay-harness check` on the bundled example, as a user runs it (issue target: < 2 s).

Runs the real command N times (bounded), each a fresh process building its own lab test host,
and prints p50/p95 wall time beside the time the check itself reports (everything after the
process start: parse, lab host, install, smtpd, probes, teardown).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "ci" / "examples"
TARGET_SECONDS = 2.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="how many checks (1-50)")
    parser.add_argument("--deadline", type=float, default=300.0, help="global bound in seconds")
    args = parser.parse_args()
    runs = max(1, min(50, args.runs))
    exe = Path(sys.executable).parent / "relay-harness"
    command = [
        str(exe),
        "check",
        str(EXAMPLE / "smtpd.conf"),
        "--upstream",
        str(EXAMPLE / "provider.toml"),
        "--table",
        f"aliases={EXAMPLE / 'aliases'}",
    ]
    walls: list[float] = []
    inner: list[float] = []
    stop = time.monotonic() + args.deadline
    for _ in range(runs):
        if time.monotonic() > stop:
            break
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        walls.append(time.perf_counter() - start)
        m = re.search(r"in (\d+\.\d+)s$", proc.stdout.strip())
        if proc.returncode != 0 or m is None:
            print(f"check failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
            return 1
        inner.append(float(m.group(1)))
    probes = len(re.findall(r"^  PASS", proc.stdout, re.MULTILINE))
    print(f"relay-harness check of ci/examples/smtpd.conf ({probes} probes), {len(walls)} runs, seconds")
    print(f"{'measurement':44} {'p50':>6} {'p95':>6} {'mean':>6}")
    for name, values in (("wall, process start to exit", walls), ("reported by the check", inner)):
        print(
            f"{name:44} {percentile(values, 50):6.2f} {percentile(values, 95):6.2f} "
            f"{statistics.mean(values):6.2f}"
        )
    met = "yes" if percentile(walls, 50) < TARGET_SECONDS else "NO"
    print(f"target: wall p50 < {TARGET_SECONDS:g} s: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
