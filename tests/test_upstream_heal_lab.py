"""Faults that heal, and bulk submission, through the REAL smtpd on lab test hosts.

The library's healing cases (scenarios/faults/provider_faults.toml) pass when run as scenarios;
here each expectation is shown to fail when what it counts is different, so a green case means
the count was right and not that nothing was checked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness.expectations import DeliveredOnce, Expectations, Relayed
from harness.pki import TestPki
from harness.relay import relay_run
from harness.scenarios import Case, Scenario, load_scenario, run_case
from harness.targets.base import Bundle, OutgoingMail
from harness.targets.lab import LabHost
from harness.upstream import Faults, parse_profile

pytestmark = pytest.mark.lab

FAULTS = Path(__file__).parent.parent / "scenarios" / "faults" / "provider_faults.toml"


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario(FAULTS)


def _case(scenario: Scenario, name: str) -> Case:
    return next(c for c in scenario.cases if c.name == name)


def _with_faults(case: Case, **faults: object) -> Case:
    return dataclasses.replace(case, profile=dataclasses.replace(case.profile, faults=Faults(**faults)))  # type: ignore[arg-type]


def test_deferrals_counted_one_too_many_fails(
    lab_host: LabHost, relay_pki: TestPki, scenario: Scenario
) -> None:
    assert lab_host.target is not None
    case = _with_faults(_case(scenario, "tempfail-at-rcpt-heals-after-2"), tempfail="rcpt", times=3)
    outcome = run_case(lab_host.target, scenario, case, relay_pki)
    assert not outcome.ok
    wanted = "expected 2 deferral(s) before delivery, saw smtpd deferred it more often"
    assert any(wanted in f for f in outcome.failures), outcome.failures


def test_deferrals_of_a_provider_that_never_heals_fail(
    lab_host: LabHost, relay_pki: TestPki, scenario: Scenario
) -> None:
    assert lab_host.target is not None
    case = _with_faults(_case(scenario, "tempfail-at-rcpt-heals-after-2"), tempfail="rcpt")
    outcome = run_case(lab_host.target, scenario, case, relay_pki)
    assert not outcome.ok
    assert any("deferred it more often" in f for f in outcome.failures)
    assert any("expected the upstream to accept the mail" in f for f in outcome.failures)


def test_delivered_once_fails_when_the_message_arrives_twice(
    lab_host: LabHost, relay_pki: TestPki, scenario: Scenario
) -> None:
    assert lab_host.target is not None
    healthy = _case(scenario, "healthy")
    expect = Expectations(relayed=Relayed(True), delivered_once=DeliveredOnce())
    case = dataclasses.replace(healthy, mails=healthy.mails * 2, expect=expect)
    outcome = run_case(lab_host.target, scenario, case, relay_pki)
    assert not outcome.ok
    # The second copy is either counted already or still queued: either way not "once".
    twice = "accepted exactly once by the upstream, saw counts: {'bob@example.com': 2}"
    queued = "nothing left queued for ['bob@example.com']"
    assert any(twice in f or queued in f for f in outcome.failures), outcome.failures


PLAIN = parse_profile('host = "smtp.example.net"\nport = 587\ntls = "none"\nauth = "none"\n')
CONFIG = (
    "listen on socket\nlisten on lo0\n"
    'action "out" relay host smtp+notls://smtp.example.net:587\nmatch from local for any action "out"\n'
)


def test_submit_many_gives_one_result_per_message_and_relays_the_accepted(
    lab_host: LabHost, relay_pki: TestPki
) -> None:
    target = lab_host.target
    assert target is not None
    mails = [
        OutgoingMail("root", ("one@example.com",)),
        OutgoingMail("root", ("bad\n@example.com",)),  # refused before it reaches the host
        OutgoingMail("root", ("two@example.com",), user="no-such-user"),  # su fails on the host
        OutgoingMail("root@localhost", ("three@example.com",), via="smtp"),
        *(OutgoingMail("root", (f"bulk{i}@example.com",)) for i in range(40)),
        # Over SMTP, past smtpd's 100 messages a session: the session is reopened, nothing lost.
        *(OutgoingMail("load@example.org", (f"smtp{i}@example.com",), via="smtp") for i in range(150)),
    ]
    with relay_run(target, Bundle(CONFIG), PLAIN, relay_pki) as run:
        results = target.submit_many(mails)
        wanted = {"one@example.com", "three@example.com"} | {f"bulk{i}@example.com" for i in range(40)}
        wanted |= {f"smtp{i}@example.com" for i in range(150)}
        recorder = run.upstream.recorder

        def relayed() -> set[str]:
            return {r for _, m in recorder.messages() if m.accepted for r in m.rcpt_to}

        recorder.wait_for(lambda _: wanted <= relayed(), 60)
        incoming = run.log.matching(r"smtp connected address=127\.0\.0\.1 ")
    assert len(results) == len(mails)
    assert [r.ok for r in results[:4]] == [True, False, False, True]
    assert all(r.ok for r in results[4:])
    assert "control characters" in results[1].output
    assert results[2].output.startswith("exited 1:") and "no-such-user" in results[2].output
    relayed = [r for _, m in recorder.messages() if m.accepted for r in m.rcpt_to]
    assert sorted(relayed) == sorted(wanted)  # each once; the refused two never left the host
    assert len(incoming) == 2  # 151 SMTP messages in one session kept open, reopened after 100
