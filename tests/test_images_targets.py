"""lab:RELEASE end to end: test hosts of the trixie image through check, pytest and accept.

Real commands against the real smtpds: 6.8 on this machine's root, 7.6 in the trixie image
(built on first use into the machine's cache, as `lab:trixie` builds it for a user). Each
comparison has its pair: a config both releases agree on, and one they do not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.pki import TestPki
from harness.targets.images import Image, use_image
from harness.targets.lab import Lab, LabError, check_environment
from harness.targets.select import parse_target

pytestmark = pytest.mark.lab

DATA = Path(__file__).parent / "data" / "check"
GOOD = DATA / "good.conf"
PROVIDER = DATA / "provider.toml"
SECRETS = f"secrets={DATA / 'secrets'}"
ALIASES = f"aliases={DATA / 'aliases'}"


def _needs_lab() -> None:
    why = None
    try:
        check_environment()
    except LabError as exc:
        why = str(exc)
    if why is None and shutil.which("debootstrap") is None:
        why = "debootstrap is not installed: apt-get install debootstrap"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"cannot run under CI: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="module")
def trixie() -> Iterator[Image]:
    _needs_lab()
    lease = use_image("trixie")
    try:
        yield lease.image
    finally:
        lease.close()


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv], capture_output=True, text=True, timeout=300, check=False
    )


# -- the target spec -------------------------------------------------------------------------------


def test_lab_release_specs() -> None:
    from harness.targets.images import machine_release

    assert parse_target("lab:trixie").release == "trixie"
    assert parse_target(f"lab:{machine_release()}").release is None  # this machine's own root
    with pytest.raises(HarnessError, match=r"image 'Trixie!': not a Debian release name"):
        parse_target("lab:Trixie!")


def test_check_with_an_unknown_release_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _needs_lab()
    rc = main(["check", str(GOOD), "--upstream", str(PROVIDER), "--target", "lab:jammy"])
    err = capsys.readouterr().err
    assert rc == 2 and "image jammy: not a Debian release this debootstrap knows" in err
    assert "Traceback" not in err


def test_side_by_side_with_a_release_that_cannot_be_had_still_writes_both_reports(tmp_path: Path) -> None:
    """An exit 2 of `check --target A --target B` is an error in the CI dashboard, not a
    missing report (as it is with one target)."""
    _needs_lab()
    json_path, junit_path = tmp_path / "report.json", tmp_path / "junit.xml"
    done = run_cli(
        "check", str(GOOD), "--upstream", str(PROVIDER), "--table", ALIASES,
        "--target", "lab", "--target", "lab:jammy",
        "--report-json", str(json_path), "--junit", str(junit_path),
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads(json_path.read_text())
    assert report["verdict"] == "error" and report["target"] == "lab, lab:jammy"
    assert "image jammy: not a Debian release this debootstrap knows" in report["error"]
    errors = ET.fromstring(junit_path.read_text()).findall(".//error")
    assert errors and "image jammy" in (errors[0].get("message") or "") + (errors[0].text or "")


# -- a test host of the image ----------------------------------------------------------------------


def test_a_trixie_host_runs_the_images_sshd_and_smtpd(trixie: Image) -> None:
    with Lab(TestPki().ca_pem) as lab:
        host = lab.create_host(release="trixie")
        assert host.target is not None
        run = host.target.run
        assert run("/usr/sbin/smtpd -h 2>&1 | head -1").stdout.strip() == f"version: {trixie.smtpd_version}"
        assert "VERSION_CODENAME=trixie" in run("cat /etc/os-release").stdout
        sshd = run("readlink /proc/$PPID/exe; /usr/sbin/sshd -V 2>&1 | head -1").output
        # trixie's OpenSSH 10 (bookworm has 9.2 and no sshd-session): the image's sshd serves us
        revision = trixie.packages["openssh-server"].split("-", 1)[1]
        assert "/usr/lib/openssh/sshd-session" in sshd
        assert re.search(rf"OpenSSH_10\.\S+ Debian-{re.escape(revision)}", sshd), sshd
        assert "trixie" in host.target.name
        # the image is the lower root: a write in the host does not reach it
        run("echo changed > /etc/relay-harness-probe")
        assert not (trixie.root / "etc" / "relay-harness-probe").exists()


# -- check on several targets ----------------------------------------------------------------------


def test_check_side_by_side_agreeing_releases(trixie: Image, tmp_path: Path) -> None:
    junit, report = tmp_path / "j.xml", tmp_path / "r.json"
    out = run_cli(
        "check", str(GOOD), "--upstream", str(PROVIDER), "--table", SECRETS, "--table", ALIASES,
        "--target", "lab:bookworm", "--target", "lab:trixie",
        "--junit", str(junit), "--report-json", str(report),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "differences between lab:bookworm, lab:trixie:\n  none: every probe behaves the same" in out.stdout
    assert trixie.smtpd_version in out.stdout
    data = json.loads(report.read_text())
    assert [t["label"] for t in data["targets"]] == ["lab:bookworm", "lab:trixie"] and data[
        "differences"
    ] == []
    cases = ET.parse(junit).getroot().findall("testcase")
    names = {c.get("name") for c in cases}
    probes = {p["name"] for p in data["targets"][0]["probes"]}
    assert names == {f"{p} [{t}]" for p in probes for t in ("lab:bookworm", "lab:trixie")}


def test_check_side_by_side_names_what_the_upgrade_breaks_with_both_evidences(
    trixie: Image, tmp_path: Path
) -> None:
    """A TLS listener without pki: 6.8 accepts the config and relays, but its listener fails
    STARTTLS (`reason=ca-failure`); 7.6 refuses the config."""
    conf = tmp_path / "smtpd.conf"
    conf.write_text(GOOD.read_text().replace("listen on socket\n", "listen on socket\nlisten on lo0 tls\n"))
    junit = tmp_path / "j.xml"
    out = run_cli(
        "check", str(conf), "--upstream", str(PROVIDER), "--table", SECRETS, "--table", ALIASES,
        "--target", "lab:bookworm", "--target", "lab:trixie", "--junit", str(junit),
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "DIFF  config: accepted by lab:bookworm, refused by lab:trixie" in out.stdout
    assert "lab:bookworm: PASS: smtpd -n accepted the config" in out.stdout
    assert "invalid listen option: pki required for tls/smtps" in out.stdout
    assert "FAIL  listener 127.0.0.1:25 tls: TLS handshake (EHLO, then STARTTLS)" in out.stdout
    assert "smtp disconnected reason=ca-failure" in out.stdout
    assert "FAIL: lab:bookworm FAIL, lab:trixie FAIL" in out.stdout
    failed = [
        c.get("name") for c in ET.parse(junit).getroot().findall("testcase") if c.find("failure") is not None
    ]
    assert failed == ["listener 127.0.0.1:25 tls [lab:bookworm]", "smtpd-accepts-config [lab:trixie]"]


def test_check_side_by_side_quotes_both_releases_certificate_errors(trixie: Image, tmp_path: Path) -> None:
    """An expired provider certificate fails on both, in each release's own words."""
    out = run_cli(
        "check", str(GOOD), "--upstream", str(DATA / "provider-cert-expired.toml"), "--table", SECRETS,
        "--table", ALIASES, "--target", "lab:bookworm", "--target", "lab:trixie",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "DIFF  relay-external: fails on both, with different evidence" in out.stdout
    assert "SSL certificate check failed" in out.stdout
    assert "certificate verification failed: certificate has expired" in out.stdout
    # the same failure, recognised on both: the same fix is offered twice
    assert out.stdout.count("fix: the provider's certificate does not verify") >= 2


def test_check_side_by_side_a_7_6_only_setting(trixie: Image, tmp_path: Path) -> None:
    """`protocols` on a relay: 6.8's syntax error at its line (the tables given were installed, so
    smtpd blames the setting, not a missing table file), 7.6 relays with TLS 1.2 on the wire."""
    conf = tmp_path / "smtpd.conf"
    text = GOOD.read_text().replace(
        'mail-from "@example.org"', 'mail-from "@example.org" protocols "tlsv1.2"'
    )
    conf.write_text(text)
    report = tmp_path / "r.json"
    out = run_cli(
        "check", str(conf), "--upstream", str(PROVIDER), "--table", SECRETS, "--table", ALIASES,
        "--target", "lab:bookworm", "--target", "lab:trixie", "--report-json", str(report),
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"REFUSED  smtpd -n: {conf}:8: syntax error" in out.stdout
    assert "DIFF  config: refused by lab:bookworm, accepted by lab:trixie" in out.stdout
    assert "could not parse" not in out.stdout
    data = json.loads(report.read_text())
    trixie_side = data["targets"][1]
    assert trixie_side["verdict"] == "pass", out.stdout
    relayed = next(p for p in trixie_side["probes"] if p["name"] == "relay-external")
    assert "(TLSv1.2)" in relayed["observed"]


def test_check_side_by_side_a_config_both_refuse_in_their_own_words(trixie: Image, tmp_path: Path) -> None:
    """A misspelt `protocols`, with `queue compression` (whose log_info() comes first at start):
    6.8's syntax error beside the line of the 7.6 process that gave up, named as a difference."""
    conf = tmp_path / "smtpd.conf"
    text = GOOD.read_text().replace(
        'mail-from "@example.org"', 'mail-from "@example.org" protocols "tlsv1.9"'
    )
    conf.write_text(text.replace("listen on socket\n", "queue compression\nlisten on socket\n"))
    out = run_cli(
        "check", str(conf), "--upstream", str(PROVIDER), "--table", SECRETS, "--table", ALIASES,
        "--target", "lab:bookworm", "--target", "lab:trixie",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "DIFF  config: refused by both, in different words" in out.stdout
    assert "lab:bookworm: FAIL: smtpd -n refused the config: line 9: syntax error" in out.stdout
    assert 'dispatcher: failed to parse protocols "tlsv1.9"' in out.stdout
    assert "queue compression enabled" not in out.stdout


# -- the scenario library on trixie ------------------------------------------------------------------


def test_pytest_relay_target_lab_trixie_applies_the_release_overrides(trixie: Image) -> None:
    """The expired-certificate pair on 7.6: the trixie override passes, and without it the
    base (6.8) expectation fails on 7.6, so the override is what makes the case pass."""
    library = Path(__file__).parent.parent / "scenarios" / "tls" / "certificates.toml"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(library), "-k", "expired"]
    ok = subprocess.run([*args, "--relay-target", "lab:trixie"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "1 passed" in ok.stdout, ok.stdout
    from harness.scenarios import load_scenario, run_case

    scenario = load_scenario(library)
    case = scenario.case("expired")
    with Lab(TestPki().ca_pem) as lab:
        pki = TestPki()
        host = lab.create_host(release="trixie")
        assert host.target is not None
        outcome = run_case(host.target, scenario, case, pki, release="bookworm")  # 6.8's expectations
    assert not outcome.ok
    assert any("SSL certificate check failed" in f for f in outcome.failures), outcome.failures


def test_relay_target_with_a_bad_release_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co",
         "--relay-target", "lab:No Such"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 4 and "not a Debian release name" in out.stderr + out.stdout
