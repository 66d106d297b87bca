"""`accept --upgrade-to trixie` against lab hosts made to look like real bookworm mail hosts.

The host's config and tables, read as accept reads them, run on a lab host of the trixie image;
the report lists what would break or change beside today's behaviour. The pair: a host both
releases treat alike, and one whose TLS listener has no pki (7.6 refuses that config).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from test_accept import accept, config, make_real

from harness.accept.run import AcceptReport
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
