"""`accept --upgrade-to trixie` against lab hosts made to look like real bookworm mail hosts.

The host's config and tables, read as accept reads them, run on a lab host of the trixie image;
the report lists what would break or change beside today's behaviour. The pair: a host both
releases treat alike, and one whose TLS listener has no pki (7.6 refuses that config).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_accept import PASSWORD, PROVIDER, accept, config, make_real, snapshot

from harness.accept.run import AcceptReport
from harness.cli import main
from harness.report import accept_text
from harness.targets.images import Image, use_image
from harness.targets.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def trixie() -> Iterator[Image]:
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed: apt-get install debootstrap")
    lease = use_image("trixie")
    try:
        yield lease.image
    finally:
        lease.close()


def _upgrade(report: AcceptReport) -> dict[str, str]:
    return {f.name: f.status for f in report.facts if f.name.startswith("upgrade")}


def test_upgrade_to_trixie_with_nothing_changing(relay_lab: Lab, trixie: Image) -> None:
    host = relay_lab.create_host()
    try:
        make_real(host)
        report = accept(relay_lab, host, upgrade_to="trixie")
    finally:
        relay_lab.destroy_host(host)
    text = accept_text(report)
    facts = _upgrade(report)
    assert facts.get("upgrade") == "pass", text
    assert facts and all(status == "pass" for status in facts.values()), text
    assert any(name.startswith("upgrade:relay:") for name in facts), text
    assert "lab:trixie" in text and "every probe behaves as today" in text
    assert report.ok, text


def test_upgrade_to_trixie_names_what_breaks_beside_today(relay_lab: Lab, trixie: Image) -> None:
    host = relay_lab.create_host()
    try:
        # 6.8 runs a TLS listener without pki; 7.6 refuses such a config
        conf = config()
        assert "listen on lo\n" in conf
        make_real(host, conf=conf.replace("listen on lo\n", "listen on lo tls\n"))
        report = accept(relay_lab, host, upgrade_to="trixie")
    finally:
        relay_lab.destroy_host(host)
    text = accept_text(report)
    facts = _upgrade(report)
    assert all(f.status == "pass" for f in report.facts if f.name.startswith("relay:")), text  # today
    assert facts.get("upgrade:relay") == "fail", text
    assert facts.get("upgrade-difference:config") == "fail", text
    assert "invalid listen option: pki required for tls/smtps" in text
    assert "PASS: smtpd -n accepted the config" in text  # today's side, beside it
    assert not report.ok


def test_upgrade_to_a_bad_release_is_refused_before_the_host_is_contacted(relay_lab: Lab) -> None:
    from harness.errors import HarnessError

    host = relay_lab.create_host()
    try:
        with pytest.raises(HarnessError, match="not a Debian release name"):
            accept(relay_lab, host, upgrade_to="Trixie 13")
    finally:
        relay_lab.destroy_host(host)


@pytest.mark.parametrize("mode", ["auto", "lab"])
def test_cli_upgrade_to_trixie_leaves_the_host_byte_for_byte(
    relay_lab: Lab, trixie: Image, mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a user runs it (today's relay in a sandbox on the host, or copied to the lab): the host's
    files keep content, mode, owner and mtime, and the reports name what changes on trixie."""
    host = relay_lab.create_host()
    try:
        target = make_real(host, conf=config().replace("listen on lo\n", "listen on lo tls\n"))
        before = snapshot(target)
        relay_lab.ssh_config()
        report, junit = tmp_path / "r.json", tmp_path / "r.xml"
        code = main(
            [
                "accept", f"ssh://root@{host.address}", "--identity", str(relay_lab.dir / "id_ed25519"),
                "--known-hosts", str(relay_lab.dir / "known_hosts"), "--upstream", str(PROVIDER),
                "--relay-mode", mode, "--upgrade-to", "trixie",
                "--report-json", str(report), "--junit", str(junit),
            ]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert snapshot(target) == before, "accept --upgrade-to changed the host"
    finally:
        relay_lab.destroy_host(host)
    assert code == 1, out
    data = json.loads(report.read_text())
    assert ("sandbox" if mode == "auto" else "copied") in data["relay_way"], data["relay_way"]
    status = {f["name"]: f["status"] for f in data["facts"]}
    assert status["host-unchanged"] == "pass", out
    assert status["relay:relay-external"] == "pass", out  # today, on the host's own smtpd
    assert status["upgrade-difference:config"] == "fail", out
    assert "invalid listen option: pki required for tls/smtps" in out
    for text in (out, report.read_text(), junit.read_text()):
        assert PASSWORD not in text


def test_accept_on_an_upgraded_host_reads_and_relays_it_as_7_6(relay_lab: Lab, trixie: Image) -> None:
    """After the upgrade: a trixie host whose config uses what only 7.6 accepts (`protocols` on
    the relay) is read in full (its listeners and tables checked), not left as unparsable, and
    its copy relays on trixie's smtpd (this machine's 6.8 refused it: a false exit 1)."""
    host = relay_lab.create_host(release="trixie")
    try:
        conf = config().replace('mail-from "@example.org"', 'mail-from "@example.org" protocols "tlsv1.2"')
        make_real(host, conf=conf)
        report = accept(relay_lab, host)
    finally:
        relay_lab.destroy_host(host)
    text = accept_text(report)
    status = {f.name: f.status for f in report.facts}
    assert status["config-grammar"] == "pass", text
    assert "fits OpenSMTPD 7.6" in text
    assert status["table:secrets"] == "pass" and status["table:aliases"] == "pass", text
    assert [s for n, s in status.items() if n.startswith("listen:")] == ["pass", "pass"], text
    # the copy judges with the host's own smtpd: a lab host of trixie, not this machine's 6.8
    assert "its files were copied to a lab host of trixie" in text
    assert "on lab:trixie/" in text
    assert status["relay:relay-external"] == "pass", text
    assert report.ok, text
