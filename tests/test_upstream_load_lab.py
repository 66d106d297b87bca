"""bench/relay_load.py on a small load, through the real smtpd: what it counts must be right.

Not a timing test (figures are the bench's job): it checks that a load with faults that heal
arrives exactly once, and that the twin whose provider never heals within the run is reported as
still queued, not as relayed and not as lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lab

BENCH = Path(__file__).parent.parent / "bench" / "relay_load.py"


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--no-sink", *args], capture_output=True, text=True, timeout=timeout
    )


def _figures(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


@pytest.mark.usefixtures("relay_lab")  # skips (or fails under CI) where the lab cannot run
def test_load_with_a_tempfail_and_dropped_connections_arrives_exactly_once() -> None:
    out = _figures(
        _bench("--messages", "300", "--fault", "tempfail-rcpt-times-2", "--fault", "drop-after-data-times-2")
    )
    assert (out["submitted"], out["relayed_once"], out["duplicates"], out["lost"]) == (300, 300, 0, 0)
    assert out["still_queued"] == 0
    assert out["deferrals"] >= 4  # two refused RCPTs and (at least) the two messages cut off
    assert out["forced_retries"] >= 1 and out["notes"] == []
    assert out["smtp_sink"] is None and out["ratio"] is None  # a faulty provider is not compared


@pytest.mark.usefixtures("relay_lab")
def test_twin_a_provider_that_never_heals_leaves_everything_queued_none_lost() -> None:
    out = _figures(_bench("--messages", "20", "--fault", "tempfail-rcpt-for-3600s", "--deadline", "25"))
    assert (out["submitted"], out["relayed_once"], out["still_queued"], out["lost"]) == (20, 0, 20, 0)
    assert out["deferrals"] >= 20
    assert any("stopped at the deadline with 20 not final" in n for n in out["notes"])
    assert out["goals"]["met"]["lost"] is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fault", "tempfail-rcpt"], "want tempfail-STAGE-times-N"),
        (["--fault", "tempfail-rcpt-times-0"], "faults.times: must be between 1 and 100000"),
        (["--fault", "tempfail-rcpt-times-2", "--fault", "drop-after-data-times-3"], "the same bound"),
    ],
)
def test_a_bad_fault_flag_is_one_line_exit_2(flags: list[str], message: str) -> None:
    done = _bench("--messages", "1", *flags, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("relay_load: ") and message in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
