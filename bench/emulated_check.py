"""Wall time of `relay-harness check --target emulated` on the bundled example (goal: well under
0.3 s), beside the same check on a lab test host (the real smtpd) and Python's own start-up, in
the same run.

Each run is a fresh process, timed from its start to its exit, as a CI job pays it. The lab row
needs root (it is left out, and said so, otherwise). Nearest-rank percentiles.

The runs are made as an installed copy runs: with bytecode caching on (pip compiles a wheel's
modules at install; PYTHONDONTWRITEBYTECODE, if this environment sets it, is dropped for them,
and the bytecode goes to a temporary PYTHONPYCACHEPREFIX, so the tree is left as it was) and
with the emulated check's kept certificates (pki.kept_pki) in a temporary directory: one
untimed run makes both. The first-run rows have neither: a copy of the harness without bytecode
(its modules compiled from source; the standard library and the packages keep theirs, as pip
leaves them) and a new CA made by trustme, as a CI job pays it once when it keeps no cache.

    python bench/emulated_check.py                 # 20 emulated runs, 5 lab runs, a table
    python bench/emulated_check.py --runs 50 --lab-runs 0
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "ci" / "examples"
GOAL_SECONDS = 0.3


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


def timed(
    command: list[str], env: dict[str, str] | None = None
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall seconds, CPU seconds (user + sys of the process and what it waited for) and the result.

    On a loaded machine the wall time is mostly waiting for a core; the CPU time is about what
    the same run costs on an idle one, plus the check's own waits on the wire.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def install_env(work: Path, name: str, bytecode: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if bytecode:
        env["PYTHONPYCACHEPREFIX"] = str(work / name / "bytecode")
    else:  # a copy without __pycache__, first on the path, and none written
        shutil.copytree(
            ROOT / "harness", work / name / "src" / "harness", ignore=shutil.ignore_patterns("__pycache__")
        )
        env["PYTHONPATH"] = str(work / name / "src")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["RELAY_HARNESS_PKI_CACHE"] = str(work / name / "pki")
    return env


def emulated_check(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    wall, cpu, proc = timed([*command, "--target", "emulated"], env)
    m = re.search(r"in (\d+\.\d+)s$", proc.stdout.strip())
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"emulated check failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return wall, cpu, float(m.group(1))


def emulated_rows(
    check: list[str], runs: int, work: Path
) -> tuple[list[tuple[str, list[float]]], list[float]]:
    """Python's start-up, first runs (each in fresh caches), then runs with warm caches."""
    rows: list[tuple[str, list[float]]] = []
    env = install_env(work, "warm")
    floor = [timed([sys.executable, "-c", "pass"], env) for _ in range(runs)]
    rows.append(("python -c pass (start-up floor): wall", [f[0] for f in floor]))
    rows.append(("python -c pass (start-up floor): CPU", [f[1] for f in floor]))
    first = [
        emulated_check(check, install_env(work, f"first-{i}", bytecode=False)) for i in range(min(runs, 3))
    ]
    rows.append(("emulated, first run: wall", [f[0] for f in first]))
    rows.append(("emulated, first run: CPU (user + sys)", [f[1] for f in first]))
    emulated_check(check, env)  # makes the bytecode and the kept certificates: not timed
    timed_runs = [emulated_check(check, env) for _ in range(runs)]
    walls = [t[0] for t in timed_runs]
    rows.append(("emulated: wall, process start to exit", walls))
    rows.append(("emulated: CPU (user + sys)", [t[1] for t in timed_runs]))
    rows.append(("emulated: as the check reports it", [t[2] for t in timed_runs]))
    return rows, walls


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="emulated checks (1-100)")
    parser.add_argument("--lab-runs", type=int, default=5, help="lab checks beside them (0-20; needs root)")
    args = parser.parse_args()
    check = [
        sys.executable,
        "-m",
        "harness.cli",
        "check",
        str(EXAMPLE / "smtpd.conf"),
        "--upstream",
        str(EXAMPLE / "provider.toml"),
        "--table",
        f"aliases={EXAMPLE / 'aliases'}",
    ]
    with tempfile.TemporaryDirectory(prefix="relay-harness-bench-") as work:
        rows, walls = emulated_rows(check, max(1, min(100, args.runs)), Path(work))
    lab_runs = max(0, min(20, args.lab_runs))
    lab_note = ""
    if lab_runs and os.geteuid() == 0:
        lab = []
        for _ in range(lab_runs):
            wall, _, proc = timed([*check, "--target", "lab"])
            if proc.returncode != 0:
                print(f"lab check failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
                return 1
            lab.append(wall)
        rows.append(("lab (real smtpd): wall, process start to exit", lab))
    elif lab_runs:
        lab_note = "lab row left out: the lab needs root"
    print(f"relay-harness check of ci/examples/smtpd.conf, seconds (load average {os.getloadavg()[0]:.1f})")
    print(f"{'measurement':48} {'runs':>4} {'p50':>6} {'p95':>6} {'mean':>6}")
    for name, values in rows:
        print(
            f"{name:48} {len(values):4d} {percentile(values, 50):6.3f} {percentile(values, 95):6.3f} "
            f"{statistics.mean(values):6.3f}"
        )
    if lab_note:
        print(lab_note)
    met = "yes" if percentile(walls, 50) < GOAL_SECONDS else "NO"
    print(f"goal: emulated wall p50 < {GOAL_SECONDS:g} s: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
