"""The scenario format and the pytest plugin that collects it (pytester: a real pytest run)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest

from harness.cli import main as cli_main
from harness.expectations import ConfigError, Relayed, Tls
from harness.pki import TestPki
from harness.scenarios import ScenarioError, _case_bundle, index_markdown, load_scenario

pytest_plugins = ["pytester"]
LIBRARY = Path(__file__).parent.parent / "scenarios"
TWIN_DATA = Path(__file__).parent / "data" / "twins"

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


def test_expectations_load_typed_and_frozen(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD))
    relayed, refused = (c.expect for c in scenario.cases)
    assert relayed.relayed == Relayed(True) and relayed.tls == Tls("starttls")
    assert refused.config_error == ConfigError("no such dispatcher: outbound", 4)
    assert relayed.wait_seconds == 10.0 and relayed.delivery is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        relayed.tls = None  # type: ignore[misc]
    assert relayed.toml() == "relayed = true, tls = 'starttls'"


def expect_lines(extra: str) -> str:
    """GOOD with the first case's [case.expect] (file lines 21-22) followed by `extra` (line 23 on)."""
    return GOOD.replace('tls = "starttls"\n', f'tls = "starttls"\n{extra}\n', 1)


# Each wrong type is a collection error naming file, line and field (file lines: GOOD's text
# starts with a newline, so the first case's [case.expect] is line 20, the second case line 24).
WRONG_TYPES = {
    "delivery.result = 5": (expect_lines("delivery = { result = 5 }"), 23, "expect.delivery.result"),
    "delivery.result unknown": (
        expect_lines('delivery = { result = "Delivered" }'),
        23,
        "expect.delivery.result",
    ),
    "delivery.stat bad regex": (expect_lines("delivery = { stat = '(' }"), 23, "expect.delivery.stat"),
    "delivery unknown key": (expect_lines("delivery = { status = 'x' }"), 23, "expect.delivery.status"),
    "mbox without user": (expect_lines('mbox = { contains = "x" }'), 23, "expect.mbox.user"),
    "mbox not a table": (expect_lines('mbox = "alice"'), 23, "expect.mbox"),
    "bounce.contains = 1": (
        expect_lines('bounce = { user = "root", contains = 1 }'),
        23,
        "expect.bounce.contains",
    ),
    "relayed not a bool": (GOOD.replace("relayed = true", 'relayed = "yes"'), 21, "expect.relayed"),
    "tls unknown mode": (GOOD.replace('tls = "starttls"', 'tls = "tls"'), 22, "expect.tls"),
    "auth.success not a bool": (expect_lines('auth = { success = "yes" }'), 23, "expect.auth.success"),
    "auth unknown key": (expect_lines("auth = { password = 'x' }"), 23, "expect.auth.password"),
    "auth_attempted = 1": (expect_lines("auth_attempted = 1"), 23, "expect.auth_attempted"),
    "mail_from = 5": (expect_lines("mail_from = 5"), 23, "expect.mail_from"),
    "rcpt_to a string": (expect_lines('rcpt_to = "bob@example.com"'), 23, "expect.rcpt_to"),
    "log a string": (expect_lines('log = "AUTH rejected"'), 23, "expect.log"),
    "log_absent of numbers": (expect_lines("log_absent = [1]"), 23, "expect.log_absent"),
    "queue of numbers": (expect_lines("queue = [1]"), 23, "expect.queue"),
    "upstream_reply bad regex": (expect_lines("upstream_reply = '['"), 23, "expect.upstream_reply"),
    "submission_refused = 5": (expect_lines("submission_refused = 5"), 23, "expect.submission_refused"),
    "deferrals too many": (expect_lines("deferrals = 11"), 23, "expect.deferrals"),
    "deferrals without relayed": (
        GOOD.replace("relayed = true\n", "deferrals = 1\n", 1),
        21,
        "expect.deferrals",
    ),
    "delivered_once = false": (expect_lines("delivered_once = false"), 23, "expect.delivered_once"),
    "timeout = true": (expect_lines("timeout = true"), 23, "expect.timeout"),
    "timeout too long": (expect_lines("timeout = 600"), 23, "expect.timeout"),
    "config_error_line a string": (
        GOOD.replace("config_error_line = 4", 'config_error_line = "4"'),
        30,
        "expect.config_error_line",
    ),
    "config_error_line alone": (expect_lines("config_error_line = 4"), 23, "expect.config_error_line"),
    "config_error = 5": (
        GOOD.replace('config_error = "no such dispatcher: outbound"', "config_error = 5"),
        29,
        "expect.config_error",
    ),
    "nothing to wait for": (GOOD.replace("relayed = true\n", "", 1), 20, "expect"),
    "config_replace = 5": (
        GOOD.replace("""config_replace = [['"outbound" relay', '"unbound" relay']]""", "config_replace = 5"),
        27,
        "config_replace",
    ),
    "config_replace pair of numbers": (
        GOOD.replace("""[['"outbound" relay', '"unbound" relay']]""", "[[1, 2]]"),
        27,
        "config_replace",
    ),
    "top-level table the config lacks": (
        GOOD.replace('secrets = "label', 'nosuch = "x"\nsecrets = "label'),
        11,
        "tables.nosuch",
    ),
    "case table the config lacks": (
        GOOD.replace('name = "relayed"', 'name = "relayed"\ntables = { aliases = "root: alice" }'),
        20,
        "tables.aliases",
    ),
    "stale_tables of a file: table": (
        GOOD.replace('name = "relayed"', 'name = "relayed"\nstale_tables = { secrets = "x" }'),
        20,
        "stale_tables.secrets",
    ),
    "twin_of = 5": (GOOD.replace('twin_of = "relayed"', "twin_of = 5"), 26, "twin_of"),
    "twin_of itself": (GOOD.replace('twin_of = "relayed"', 'twin_of = "refused"'), 26, "twin_of"),
    "case description = 5": (
        GOOD.replace('name = "refused"', 'name = "refused"\ndescription = 5'),
        26,
        "description",
    ),
    "send.from = 5": (
        GOOD.replace('name = "relayed"', 'name = "relayed"\nsend = { from = 5 }'),
        20,
        "send.from",
    ),
    "send.port = true": (
        GOOD.replace('name = "relayed"', 'name = "relayed"\nsend = { port = true }'),
        20,
        "send.port",
    ),
    "secret_tables a string": (
        GOOD.replace('markers = ["auth"]', 'markers = ["auth"]\nsecret_tables = "secrets"'),
        4,
        "secret_tables",
    ),
}


@pytest.mark.parametrize(("broken", "line", "field"), WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_wrong_types_are_collection_errors_naming_file_line_and_field(
    tmp_path: Path, broken: str, line: int, field: str
) -> None:
    path = write(tmp_path, broken)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert (err.value.field, err.value.line) == (field, line), str(err.value)
    assert str(err.value).startswith(f"{path}:{line}: {field}: ")


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
    assert (
        "config_error: expected smtpd -n to refuse the config with 'no such table', "
        "saw 'no such dispatcher: outbound'"
    ) in out
    assert "smtpd -n: /etc/smtpd.conf:4: no such dispatcher: outbound" in out
    assert "Traceback" not in out and "pw-1" not in out
    junit = (pytester.path / "j.xml").read_text()
    assert 'name="relayed"' in junit and 'name="refused"' in junit


@pytest.mark.lab
def test_a_twin_that_meets_every_expectation_of_its_positive_fails_as_proving_nothing(
    pytester: pytest.Pytester, relay_lab: object
) -> None:
    (pytester.path / "scenarios").mkdir()
    shutil.copy(TWIN_DATA / "proves_nothing.toml", pytester.path / "scenarios" / "pair.toml")
    result = pytester.runpytest_subprocess("scenarios", "-p", "no:cacheprovider", "-v", "--junitxml=j.xml")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*pair.toml::breaks-nothing FAILED*",
            "*this pair proves nothing: the twin satisfies every expectation of relays",
            "*pair.toml::no-starttls: twin discriminated by: relayed (positive wants the upstream to accept "
            "the mail, twin saw nothing accepted); tls (positive wants TLS starttls, twin saw TLS none)",
            "2 twin pair(s): 1 discriminate, 1 prove nothing",
        ]
    )
    assert "Traceback" not in out and "twin-pw-1" not in out
    cases = {c.get("name"): c for c in ElementTree.parse(pytester.path / "j.xml").iter("testcase")}
    verdicts = {
        name: [p.get("value") for p in case.iter("property") if p.get("name") == "twin_verdict"]
        for name, case in cases.items()
    }
    assert verdicts["relays"] == []
    assert verdicts["breaks-nothing"] == [
        "this pair proves nothing: the twin satisfies every expectation of relays"
    ]
    assert str(verdicts["no-starttls"][0]).startswith("twin discriminated by: relayed (")
    # The positive's expectations come from the scenario data: the twin is judged the same when
    # the positive does not run at all, and on another xdist worker.
    alone = pytester.runpytest_subprocess("scenarios", "-p", "no:cacheprovider", "-k", "breaks-nothing")
    alone.assert_outcomes(failed=1)
    alone.stdout.fnmatch_lines(["*this pair proves nothing: the twin satisfies every expectation of relays"])
    spread = pytester.runpytest_subprocess("scenarios", "-p", "no:cacheprovider", "-n", "2")
    spread.assert_outcomes(passed=2, failed=1)
    spread.stdout.fnmatch_lines(["2 twin pair(s): 1 discriminate, 1 prove nothing"])


def test_scenarios_index_of_a_missing_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["scenarios", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    missing = tmp_path / "missing"
    assert (
        err
        == f"relay-harness: {missing}: scenarios: no such directory (give the scenario library's directory)\n"
    )
    (tmp_path / "empty").mkdir()
    assert cli_main(["scenarios", str(tmp_path / "empty")]) == 2
    assert "no *.toml scenario files" in capsys.readouterr().err


def test_every_library_file_is_indexed() -> None:
    index = (LIBRARY / "README.md").read_text()
    assert index == index_markdown(LIBRARY), (
        "regenerate: relay-harness scenarios scenarios/ > scenarios/README.md"
    )
    files = sorted(LIBRARY.rglob("*.toml"))
    assert len(files) >= 10
    for path in files:
        for case in load_scenario(path).cases:
            assert f"`{case.name}`" in index, f"{path}::{case.name} missing from scenarios/README.md"


_RELEASE_RECORD = (
    "a record of a release difference: what 6.8 refuses, 7.6 relays; each release expects what is "
    "the other's failure, so running it on both is the pair"
)
# Positives of the library exempted from the twin rule, each with its reason in the TOML. Adding
# one here is a deliberate act: a case that cannot be shown to fail proves little.
LIBRARY_NO_TWIN: dict[str, str] = {
    "grammar/releases.toml::socket-no-dsn": _RELEASE_RECORD,
    "grammar/releases.toml::list-across-lines": _RELEASE_RECORD,
    "grammar/releases.toml::mapping-for-rcpt-to": _RELEASE_RECORD,
}


def test_every_positive_case_of_the_library_has_a_broken_twin() -> None:
    """The rule, over the whole library, recomputed here rather than trusted to the loader."""
    problems, exempt = [], {}
    for path in sorted(LIBRARY.rglob("*.toml")):
        rel = path.relative_to(LIBRARY).as_posix()
        try:
            scenario = load_scenario(path)
        except ScenarioError as exc:
            problems.append(str(exc))
            continue
        twinned = {c.twin_of for c in scenario.cases if c.twin_of}
        for case in scenario.cases:
            if case.no_twin is not None:
                exempt[f"{rel}::{case.name}"] = case.no_twin
            elif case.twin_of is None and case.name not in twinned:
                problems.append(f"{rel}::{case.name} has no broken twin")
    assert not problems, "\n".join(problems)
    assert exempt == LIBRARY_NO_TWIN


def test_every_library_case_builds_its_bundle() -> None:
    """Tables are checked at load time, so building a case's bundle cannot refuse one at run time."""
    pki = TestPki()
    for path in sorted(LIBRARY.rglob("*.toml")):
        scenario = load_scenario(path)
        for case in scenario.cases:
            bundle = _case_bundle(case, scenario.secret_tables, pki)
            assert bundle.config == case.config, f"{path}::{case.name}"


WITHOUT_TWIN = GOOD.replace('twin_of = "relayed"\n', "")


def test_a_positive_without_a_broken_twin_is_a_load_error_naming_every_such_case(tmp_path: Path) -> None:
    path = write(tmp_path, WITHOUT_TWIN)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert (err.value.field, err.value.line) == ("twin_of", 19), str(err.value)
    assert str(err.value).startswith(f"{path}:19: twin_of: no broken twin for relayed, refused: ")
    assert 'no_twin = "why"' in str(err.value)


def test_no_twin_exempts_a_case_with_its_reason_shown_in_the_index(tmp_path: Path) -> None:
    reason = "smtpd refusing the config is the whole point"
    one = WITHOUT_TWIN.replace('name = "refused"\n', f'name = "refused"\nno_twin = "{reason}"\n')
    path = write(tmp_path, one)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert "no broken twin for relayed:" in str(err.value)
    both = one.replace('name = "relayed"\n', 'name = "relayed"\nno_twin = "a second reason"\n')
    write(tmp_path, both)
    scenario = load_scenario(path)
    assert [c.no_twin for c in scenario.cases] == ["a second reason", reason]
    assert f"*(no twin: {reason})*" in index_markdown(tmp_path / "scenarios")


@pytest.mark.parametrize(
    ("broken", "line", "message"),
    [
        (
            GOOD.replace('name = "relayed"\n', 'name = "relayed"\nno_twin = ""\n'),
            20,
            "must say why this case cannot have a broken twin",
        ),
        (
            GOOD.replace('name = "relayed"\n', 'name = "relayed"\nno_twin = 5\n'),
            20,
            "must say why this case cannot have a broken twin",
        ),
        (
            GOOD.replace('name = "relayed"\n', 'name = "relayed"\nno_twin = "none needed"\n'),
            20,
            "relayed has a broken twin (refused): remove no_twin",
        ),
        (
            GOOD.replace('twin_of = "relayed"\n', 'twin_of = "relayed"\nno_twin = "x"\n'),
            27,
            "a twin needs no twin of its own",
        ),
    ],
    ids=["empty", "not a string", "stale: it has a twin", "on a twin"],
)
def test_a_bad_no_twin_is_a_load_error(tmp_path: Path, broken: str, line: int, message: str) -> None:
    path = write(tmp_path, broken)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert (err.value.field, err.value.line) == ("no_twin", line), str(err.value)
    assert message in err.value.message


def test_plugin_reports_a_positive_without_a_twin_as_a_collection_error(pytester: pytest.Pytester) -> None:
    (pytester.path / "scenarios").mkdir()
    (pytester.path / "scenarios" / "lonely.toml").write_text(WITHOUT_TWIN)
    result = pytester.runpytest("scenarios", "--collect-only", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["*malformed scenario: *lonely.toml:19: twin_of: no broken twin for relayed, refused*"]
    )
    assert "Traceback" not in result.stdout.str()
