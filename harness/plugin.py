"""pytest plugin (entry point `relay_harness`): lab fixtures, and scenarios/*.toml as test items.

Lab fixtures skip where the lab cannot run (not root, no OpenSMTPD) on a developer's machine,
but fail under CI=true: a CI run that silently skipped every real test would be a green lie.
pytest loads this module in every run of a user's environment: the harness's heavy modules
(paramiko, aiosmtpd, cryptography) are imported only when a fixture or scenario is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from harness.pki import TestPki
    from harness.scenarios import Case, CaseOutcome, Scenario
    from harness.targets.lab import Lab, LabHost


def _lab_unavailable() -> str | None:
    from harness.targets.lab import LabError, check_environment

    try:
        check_environment()
    except LabError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def relay_pki() -> TestPki:
    """The test CA every lab host trusts and every fake upstream's certificate comes from."""
    from harness.pki import TestPki

    return TestPki()


@pytest.fixture(scope="session")
def relay_lab(relay_pki: TestPki) -> Iterator[Lab]:
    """One lab per test session (per xdist worker); removed with everything in it at the end."""
    why = _lab_unavailable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the lab cannot run under CI: {why}", pytrace=False)
        pytest.skip(f"lab unavailable: {why}")
    from harness.targets.lab import Lab

    lab = Lab(relay_pki.ca_pem)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def lab_host(relay_lab: Lab) -> Iterator[LabHost]:
    """A fresh test host per test (about 0.2 s): no state leaks from one test to the next."""
    host = relay_lab.create_host()
    try:
        yield host
    finally:
        relay_lab.destroy_host(host)


# -- scenarios/*.toml as test items ----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("relay-harness")
    group.addoption(
        "--relay-target",
        default="lab",
        metavar="lab|lab:RELEASE|emulated|ssh://USER@HOST[:PORT]",
        help="where scenario configs run: lab (test hosts with the real OpenSMTPD, the default), "
        "lab:RELEASE (test hosts of another Debian release's image, e.g. lab:trixie), a sandbox on "
        "an existing host with its own smtpd (falls back to the lab where it cannot), or emulated "
        "(in-process, no root; a case it cannot model is skipped with the reason)",
    )
    group.addoption("--relay-identity", type=Path, help="SSH private key for --relay-target ssh://")
    group.addoption("--relay-known-hosts", type=Path, help="known_hosts for --relay-target ssh://")
    group.addoption(
        "--relay-keep",
        action="store_true",
        help="keep each scenario's test host after a failure, and print how to enter it",
    )


def pytest_configure(config: pytest.Config) -> None:
    from harness.scenarios import MARKERS

    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    config.addinivalue_line("markers", "lab: needs root, network namespaces and the real OpenSMTPD")
    from harness.errors import HarnessError
    from harness.targets.select import parse_target

    try:
        parse_target(config.getoption("relay_target"), flag="--relay-target")
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".toml" and "scenarios" in file_path.parts:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


_LAB_KEY = pytest.StashKey["Lab"]()
_PKI_KEY = pytest.StashKey["TestPki"]()


def _scenario_lab(config: pytest.Config) -> tuple[Lab, TestPki]:
    """One lab for all scenario items of this process, created on first use."""
    if _LAB_KEY not in config.stash:
        why = _lab_unavailable()
        if why is not None:
            if os.environ.get("CI"):
                pytest.fail(f"the lab cannot run under CI: {why}", pytrace=False)
            pytest.skip(f"lab unavailable: {why}")
        from harness.pki import TestPki
        from harness.targets.lab import Lab

        pki = TestPki()
        config.stash[_PKI_KEY] = pki
        config.stash[_LAB_KEY] = Lab(pki.ca_pem)
    return config.stash[_LAB_KEY], config.stash[_PKI_KEY]


def pytest_unconfigure(config: pytest.Config) -> None:
    lab = config.stash.get(_LAB_KEY, None)
    if lab is not None and not config.getoption("relay_keep", False):
        lab.close()


TWIN_PROPERTY = "twin_verdict"  # JUnit property of a twin item: which expectation tells it apart


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line for the twin pairs of the run (each pair's verdict with -v), also under xdist."""
    verdicts = []
    for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed"):
        if report.when == "call":
            verdicts += [(report.nodeid, v) for k, v in report.user_properties if k == TWIN_PROPERTY]
    if not verdicts:
        return
    nothing = [(n, v) for n, v in verdicts if v.startswith("this pair proves nothing")]
    terminalreporter.section("relay-harness twins", sep="-")
    shown = verdicts if config.getoption("verbose") > 0 else nothing
    for nodeid, verdict in sorted(shown):
        terminalreporter.write_line(f"{nodeid}: {verdict}")
    terminalreporter.write_line(
        f"{len(verdicts)} twin pair(s): {len(verdicts) - len(nothing)} discriminate, "
        f"{len(nothing)} prove nothing"
    )


class ScenarioFailure(Exception):
    """A case whose observations differ from its expectations; shown without a traceback."""


class ScenarioFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        from harness.scenarios import ScenarioError, load_scenario

        try:
            scenario = load_scenario(self.path)
        except ScenarioError as exc:
            raise self.CollectError(f"malformed scenario: {exc}") from None
        emulated = self.config.getoption("relay_target") == "emulated"
        for case in scenario.cases:
            item = ScenarioItem.from_parent(self, name=case.name, scenario=scenario, case=case)
            for marker in (*case.markers, *(() if emulated else ("lab",))):
                item.add_marker(marker)
            yield item


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario: Scenario, case: Case, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario
        self.case = case

    def runtest(self) -> None:
        from harness.scenarios import run_case
        from harness.targets.select import parse_target

        spec = parse_target(self.config.getoption("relay_target"))
        if spec.kind != "lab":
            self._run_elsewhere(spec.text)
            return
        from harness.targets.images import machine_release

        lab, pki = _scenario_lab(self.config)
        host = lab.create_host(release=spec.release)
        release = spec.release or machine_release()  # whose [case.expect.release.*] applies
        keep = False
        try:
            assert host.target is not None
            outcome = run_case(host.target, self.scenario, self.case, pki, release)
            proves_nothing = self._judge_twin(outcome, release)
            if not outcome.ok or proves_nothing:
                report = "\n".join(filter(None, [proves_nothing, outcome.explain()]))
                keep = bool(self.config.getoption("relay_keep"))
                if keep:
                    host.keep()
                    report += f"\ntest host kept: {host.enter_command()} (when done: relay-harness lab clean)"
                raise ScenarioFailure(report)
        finally:
            if not keep:
                lab.destroy_host(host)

    def _run_elsewhere(self, spec: str) -> None:
        """On --relay-target ssh://...: a sandbox on that host per case (the lab where it cannot);
        on --relay-target emulated: the emulated smtpd, a case it cannot model skipped."""
        from harness.pki import TestPki
        from harness.scenarios import run_case
        from harness.targets.emulated.decline import Declined
        from harness.targets.select import parse_target, run_on

        target = parse_target(
            spec, self.config.getoption("relay_identity"), self.config.getoption("relay_known_hosts")
        )
        pki = TestPki()
        try:
            outcome, notes = run_on(
                target, pki, self.case.profile.port, lambda t: run_case(t, self.scenario, self.case, pki)
            )
        except Declined as declined:
            pytest.skip(str(declined))
        for note in notes:
            self.add_report_section("call", "relay-target", note)
        proves_nothing = self._judge_twin(outcome)
        if not outcome.ok or proves_nothing:
            raise ScenarioFailure("\n".join(filter(None, [proves_nothing, outcome.explain()])))

    def _judge_twin(self, outcome: CaseOutcome, release: str | None = None) -> str | None:
        """Judge a twin's outcome by its positive's expectations; the failure text if none fails.

        The positive's expectations come from the scenario data, not from its run: the positive
        may run on another xdist worker, or not at all (-k).
        """
        from harness.scenarios import judge_twin

        if self.case.twin_of is None:
            return None
        verdict = judge_twin(self.scenario.case(self.case.twin_of), outcome.observation, release)
        text = outcome.redactor(verdict.explain())
        self.user_properties.append((TWIN_PROPERTY, text))
        if verdict.proves:
            self.add_report_section("call", "twin", text)
            return None
        return text

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ScenarioFailure):
            head = f"scenario {self.scenario.path.name}::{self.case.name} failed"
            if self.case.description:
                head += f" ({self.case.description})"
            return f"{head}\n{excinfo.value}"
        from harness.errors import HarnessError

        if isinstance(excinfo.value, HarnessError):
            return f"scenario {self.case.name}: {excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, (self.case.line or 1) - 1, f"scenario: {self.case.name}"
