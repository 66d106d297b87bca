"""Per-release expectations in scenarios (`[case.expect.release.NAME]`): loading, merging, errors.

The library's own use of them runs against the real smtpds in `pytest scenarios/` (6.8 here) and
`pytest scenarios/ --relay-target lab:trixie` (7.6), which CI runs both; these tests pin the rules.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.expectations import ConfigError, Log, Relayed, Tls
from harness.scenarios import ScenarioError, index_markdown, load_scenario

BASE = '''
description = "release overrides"
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
'''


def load(tmp_path: Path, cases: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "scenarios" / "case.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    # the loader's twin rule is tested elsewhere: these cases stand alone and say so
    path.write_text(
        BASE + re.sub(r'(\[\[case\]\]\nname = "[^"]+"\n)', r'\1no_twin = "a loader test"\n', cases)
    )
    return load_scenario(path)


def test_an_override_replaces_only_the_groups_it_gives(tmp_path: Path) -> None:
    scenario = load(
        tmp_path,
        """
[[case]]
name = "expired"
[case.expect]
relayed = false
tls = "starttls"
log = ["SSL certificate check failed"]
[case.expect.release.trixie]
tls = "none"
log = ["certificate verification failed"]
""",
    )
    case = scenario.cases[0]
    assert case.expect_on(None) == case.expect == case.expect_on("bookworm")
    trixie = case.expect_on("trixie")
    assert trixie.relayed == Relayed(False)  # kept
    assert trixie.tls == Tls("none")
    assert trixie.log == Log(("certificate verification failed",))


def test_refusal_is_all_or_nothing(tmp_path: Path) -> None:
    scenario = load(
        tmp_path,
        """
[[case]]
name = "refused-on-trixie"
[case.expect]
relayed = true
tls = "starttls"
[case.expect.release.trixie]
config_error = "pki required for tls/smtps"

[[case]]
name = "refused-on-bookworm"
[case.expect]
config_error = "syntax error"
config_error_line = 3
[case.expect.release.trixie]
relayed = true
""",
    )
    on_trixie = scenario.cases[0].expect_on("trixie")
    assert on_trixie.config_error == ConfigError("pki required for tls/smtps", None)
    assert on_trixie.relayed is None and on_trixie.tls is None
    accepted = scenario.cases[1].expect_on("trixie")
    assert accepted.config_error is None and accepted.relayed == Relayed(True)


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        (
            '[case.expect.release."Trixie 13"]\nrelayed = true',
            "expect.release.Trixie 13",
            "not a Debian release",
        ),
        ("[case.expect.release.trixie]\nrelayd = true", "expect.release.trixie.relayd", "unknown field"),
        ('[case.expect.release.trixie]\ntls = "tls1.3"', "expect.release.trixie.tls", "starttls"),
        ("[case.expect.release.trixie]", "expect.release.trixie", "say what differs"),
        (
            '[case.expect.release.trixie]\nconfig_error = "x"\nrelayed = true',
            "expect.release.trixie.config_error",
            "a refused config sends nothing",
        ),
        ('[case.expect]\nrelease = "trixie"', "expect.release", "must be tables"),
    ],
)
def test_malformed_overrides_are_load_errors(tmp_path: Path, override: str, field: str, message: str) -> None:
    head = '\n[[case]]\nname = "c"\n'
    body = override if override.startswith("[case.expect]") else "[case.expect]\nrelayed = true\n" + override
    if override.startswith("[case.expect]"):
        body = override.replace("[case.expect]\n", "[case.expect]\nrelayed = true\n")
    with pytest.raises(ScenarioError) as info:
        load(tmp_path, head + body + "\n")
    assert info.value.field == field and message in info.value.message, str(info.value)
    assert info.value.line is not None


def test_an_override_alone_is_not_a_case(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="expectations of its own"):
        load(tmp_path, '\n[[case]]\nname = "c"\n[case.expect.release.trixie]\nrelayed = true\n')


def test_the_index_shows_each_release_override(tmp_path: Path) -> None:
    load(
        tmp_path,
        """
[[case]]
name = "c"
[case.expect]
relayed = true
[case.expect.release.trixie]
log = ["cert-check"]
""",
    )
    index = index_markdown(tmp_path / "scenarios")
    assert "- `c` *(no twin: a loader test)*: relayed = true\n  - on trixie: log = ['cert-check']" in index


def test_the_library_records_the_6_8_to_7_6_differences() -> None:
    """Every case of the README's table of differences exists and has its trixie override."""
    library = Path(__file__).parent.parent / "scenarios"
    cases = {c.name: c for p in library.rglob("*.toml") for c in load_scenario(p).cases}
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("## From OpenSMTPD 6.8 to 7.6") :]
    named = {n for n in cases if f"`{n}`" in table}
    assert named, "the README's table names no scenario case"
    for name in named:
        assert "trixie" in cases[name].releases, f"{name} is in the table but has no trixie override"
