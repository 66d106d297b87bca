"""The scenario format and the pytest plugin that collects it (pytester: a real pytest run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.scenarios import ScenarioError, index_markdown, load_scenario

pytest_plugins = ["pytester"]
LIBRARY = Path(__file__).parent.parent / "scenarios"

GOOD = '''
description = "a small scenario"
markers = ["auth"]
config = """
table secrets file:/etc/mail/secrets
listen on lo0
action "outbound" relay host smtp+tls://label@smtp.example.net:587 auth <secrets> mail-from "@example.org"
match from local for any action "outbound"
"""
[tables]
secrets = "label alice@example.org:pw-1\\n"
[upstream]
sender_domains = ["example.org"]
[[upstream.credentials]]
user = "alice@example.org"
password = "pw-1"

[[case]]
name = "relayed"
[case.expect]
relayed = true
tls = "starttls"

[[case]]
name = "refused"
twin_of = "relayed"
config_replace = [['"outbound" relay', '"unbound" relay']]
[case.expect]
config_error = "no such dispatcher: outbound"
config_error_line = 4
'''


def write(tmp_path: Path, text: str, name: str = "case.toml") -> Path:
    path = tmp_path / "scenarios" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_good_scenario_loads_with_cases_and_twins(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD))
    assert [c.name for c in scenario.cases] == ["relayed", "refused"]
    assert scenario.cases[1].twin_of == "relayed"
    assert 'action "unbound"' in scenario.cases[1].config
    assert scenario.cases[0].markers == ("auth",)
    assert "pw-1" not in repr(scenario.cases[0].profile)


@pytest.mark.parametrize(
    ("broken", "line", "field"),
    [
        (GOOD.replace('tls = "starttls"', 'tls = "starttls"\ncolour = "red"'), 23, "expect.colour"),
        (GOOD.replace('markers = ["auth"]', 'markers = ["speed"]'), 3, "markers"),
        (GOOD.replace('name = "refused"', 'name = "relayed"'), 25, "name"),
        (GOOD.replace('twin_of = "relayed"', 'twin_of = "nobody"'), 26, "twin_of"),
        (
            GOOD.replace("[[upstream.credentials]]", 'tls = "sometimes"\n[[upstream.credentials]]'),
            14,
            "upstream.tls",
        ),
        (
            GOOD.replace("'\"outbound\" relay', '\"unbound\" relay'", "'no such text', 'x'"),
            27,
            "config_replace",
        ),
        (GOOD.replace("relayed = true\n", "relayed = false\n"), 21, "expect.relayed"),
        (
            GOOD.replace("config_error_line = 4", "config_error_line = 4\nrelayed = true"),
            29,
            "expect.config_error",
        ),
        (
            GOOD.replace("[case.expect]\nrelayed = true", "[case.expect]\nlog = ['(unclosed']"),
            21,
            "expect.log",
        ),
        (GOOD.replace('name = "relayed"', 'name = "relayed"\nsend = { to = [] }'), 20, "send.to"),
        (GOOD + "\n[[case]\n", 32, "toml"),
    ],
)
def test_malformed_scenario_names_file_line_and_field(
    tmp_path: Path, broken: str, line: int, field: str
) -> None:
    path = write(tmp_path, broken)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert (err.value.path, err.value.field) == (str(path), field)
    assert err.value.line == line, str(err.value)
    assert str(err.value).startswith(f"{path}:{line}: {field}: ")


def test_plugin_reports_a_malformed_file_as_a_collection_error_without_traceback(
    pytester: pytest.Pytester,
) -> None:
    bad = pytester.path / "scenarios" / "bad.toml"
    bad.parent.mkdir()
    bad.write_text(GOOD.replace('markers = ["auth"]', 'markers = ["speed"]'))
    result = pytester.runpytest("scenarios", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # collection errors stop the run
    result.stdout.fnmatch_lines(["*malformed scenario: *bad.toml:3: markers: unknown marker 'speed'*"])
    assert "Traceback" not in result.stdout.str()


def test_plugin_collects_cases_selectable_by_keyword_and_marker(pytester: pytest.Pytester) -> None:
    (pytester.path / "scenarios").mkdir()
    (pytester.path / "scenarios" / "s.toml").write_text(GOOD)
    result = pytester.runpytest(
        "scenarios", "--collect-only", "-q", "-k", "refused", "-p", "no:cacheprovider"
    )
    result.stdout.fnmatch_lines(["scenarios/s.toml::refused"])
    assert "::relayed" not in result.stdout.str()
    result = pytester.runpytest(
        "scenarios", "--collect-only", "-q", "-m", "auth and lab", "-p", "no:cacheprovider"
    )
    result.stdout.fnmatch_lines(["scenarios/s.toml::relayed", "scenarios/s.toml::refused"])


@pytest.mark.lab
def test_plugin_runs_cases_against_the_real_smtpd_and_shows_expected_vs_observed(
    pytester: pytest.Pytester, relay_lab: object
) -> None:
    (pytester.path / "scenarios").mkdir()
    wrong = GOOD.replace('config_error = "no such dispatcher: outbound"', 'config_error = "no such table"')
    (pytester.path / "scenarios" / "s.toml").write_text(wrong)
    result = pytester.runpytest_subprocess("scenarios", "-p", "no:cacheprovider", "--junitxml=j.xml")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "expected config error 'no such table', got 'no such dispatcher: outbound'" in out
    assert "smtpd -n: /etc/smtpd.conf:4: no such dispatcher: outbound" in out
    assert "Traceback" not in out and "pw-1" not in out
    junit = (pytester.path / "j.xml").read_text()
    assert 'name="relayed"' in junit and 'name="refused"' in junit


def test_every_library_file_has_a_broken_twin_and_is_indexed() -> None:
    index = (LIBRARY / "README.md").read_text()
    assert index == index_markdown(LIBRARY), (
        "regenerate: relay-harness scenarios scenarios/ > scenarios/README.md"
    )
    files = sorted(LIBRARY.rglob("*.toml"))
    assert len(files) >= 10
    for path in files:
        scenario = load_scenario(path)
        assert any(c.twin_of for c in scenario.cases), f"{path} has no broken twin"
        for case in scenario.cases:
            assert f"`{case.name}`" in index, f"{path}::{case.name} missing from scenarios/README.md"
