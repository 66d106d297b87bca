"""`--target ssh://` for check and `--relay-target ssh://` for the scenario library.

The staging hosts are lab test hosts made to look like real ones (test_accept.make_real: a
config of their own in /etc/smtpd.conf, a daemon smtpd running, a mail log). The config under
test runs in a sandbox on the host with the host's own smtpd; the host's files, processes and
listeners are the same afterwards, and nothing it leaves open lets another local user reach the
fake upstream. Each passing check beside its broken twin.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_accept import PROVIDER, make_real, snapshot
from test_accept_sandbox import alive, host_state

from harness.cli import main
from harness.targets.lab import Lab, LabHost

pytestmark = pytest.mark.lab

DATA = Path(__file__).parent / "data" / "check"
# Every listening socket of the host's network namespace by its address: TCP and UDP ports and
# Unix sockets, abstract ones included (`ss` prints the Netid first when given several kinds).
LISTENERS = "ss -Hlntux | awk '{print $1, $5}' | sort"


def ssh_args(lab: Lab, host: LabHost) -> list[str]:
    lab.ssh_config()  # writes known_hosts for the lab's hosts
    return [
        "--target",
        f"ssh://root@{host.address}",
        "--identity",
        str(lab.dir / "id_ed25519"),
        "--known-hosts",
        str(lab.dir / "known_hosts"),
    ]


def check(
    lab: Lab, host: LabHost, conf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, object], str]:
    report = tmp_path / "report.json"
    rc = main(
        [
            "check",
            str(DATA / conf),
            "--upstream",
            str(PROVIDER),
            "--table",
            f"aliases={DATA / 'aliases'}",
            "--table",
            f"secrets={DATA / 'secrets'}",
            "--report-json",
            str(report),
            *ssh_args(lab, host),
        ]
    )
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return rc, json.loads(report.read_text()), out.out + out.err


def test_check_runs_in_a_sandbox_on_the_host_and_leaves_it_as_it_was(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = make_real(lab_host)
    files, state = snapshot(target), host_state(target)
    rc, report, out = check(relay_lab, lab_host, "good.conf", tmp_path, capsys)
    assert rc == 0, out
    assert str(report["target"]).startswith("sandbox on root@"), out
    assert "ran in a sandbox on root@" in out and "with the host's /usr/sbin/smtpd" in out
    assert snapshot(target) == files and host_state(target) == state
    alive(target)


def test_check_on_the_host_fails_the_broken_twin(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same host, the config without mail-from: the provider's 550, exit 1, as in the lab."""
    target = make_real(lab_host)
    files = snapshot(target)
    rc, report, out = check(relay_lab, lab_host, "no-mail-from.conf", tmp_path, capsys)
    assert rc == 1, out
    assert str(report["target"]).startswith("sandbox on root@"), out
    assert "Sender address rejected: Domain not found" in out
    assert snapshot(target) == files


def test_a_table_outside_the_sandboxs_private_paths_falls_back_to_the_lab(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sandbox keeps only /etc, /run, /var/spool, /var/mail and /var/log private: a config
    whose table lives in /srv would write onto the host, so the run goes to the lab, and says so."""
    target = make_real(lab_host)
    files = snapshot(target)
    conf = tmp_path / "srv.conf"
    conf.write_text((DATA / "good.conf").read_text().replace("/etc/mail/secrets", "/srv/mail/secrets"))
    rc = main(
        [
            "check",
            str(conf),
            "--upstream",
            str(PROVIDER),
            "--table",
            f"aliases={DATA / 'aliases'}",
            "--table",
            f"secrets={DATA / 'secrets'}",
            *ssh_args(relay_lab, lab_host),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "would write outside its private paths: /srv/mail/secrets" in out
    assert "ran in the local lab instead" in out and "on lab:host" in out
    assert snapshot(target) == files


def test_a_host_that_cannot_sandbox_falls_back_to_the_lab_naming_its_smtpd(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = make_real(lab_host)
    target.check("mount --bind /dev/null $(command -v unshare)")
    rc, report, out = check(relay_lab, lab_host, "good.conf", tmp_path, capsys)
    assert rc == 0, out
    assert str(report["target"]).startswith("lab:"), out
    assert "unshare of network/mount/PID namespaces is refused" in out
    assert "(OpenSMTPD 6." in out or "(OpenSMTPD 7." in out, out


def test_no_listener_on_the_host_and_no_way_in_for_another_user(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a probe relays, the host has exactly the listeners it had (the sandbox's connections
    go over SSH channels, not a tunnel port), user nobody cannot enter the sandbox's network
    namespace, where the forwarder listens, and the upstream here listens on no port at all (each
    connection is handed to it in-process)."""
    import harness.probes
    from harness.targets.sandbox import Sandbox
    from harness.upstream import UpstreamServer

    target = make_real(lab_host)
    before = target.check(LISTENERS).stdout
    seen: dict[str, str] = {}
    real_await = harness.probes.await_probe
    sandboxes: list[Sandbox] = []
    real_attach = Sandbox.attach

    def attach(self: Sandbox, upstream: UpstreamServer) -> None:
        sandboxes.append(self)
        seen["upstream listens"] = str(upstream.listening)  # on this machine: it must not
        real_attach(self, upstream)

    def look_then_await(*args: object, **kw: object) -> object:
        if "listeners" not in seen:
            seen["listeners"] = target.check(LISTENERS).stdout
            pid = sandboxes[0].pid
            seen["nobody"] = target.run(
                f"su -s /bin/sh nobody -c 'nsenter --target {pid} --net true' 2>&1; echo rc=$?"
            ).stdout
        return real_await(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Sandbox, "attach", attach)
    monkeypatch.setattr(harness.probes, "await_probe", look_then_await)
    lab_args = ssh_args(relay_lab, lab_host)
    rc = main(["check", str(DATA / "good.conf"), "--upstream", str(PROVIDER), *_tables(), *lab_args])
    assert rc == 0
    assert seen["listeners"] == before, (before, seen["listeners"])
    assert seen["upstream listens"] == "False"
    refused = seen["nobody"]
    assert "rc=0" not in refused and re.search("Permission denied|Operation not permitted", refused), refused


def _tables() -> list[str]:
    return ["--table", f"aliases={DATA / 'aliases'}", "--table", f"secrets={DATA / 'secrets'}"]


# The first two cases of scenarios/auth/auth.toml: a positive and its broken twin.
_AUTH = (Path(__file__).parent.parent / "scenarios" / "auth" / "auth.toml").read_text()
SCENARIO = _AUTH[: _AUTH.index('[[case]]\nname = "label-missing-from-secrets"')]


def test_the_scenario_library_runs_on_a_staging_host(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path
) -> None:
    """`pytest --relay-target ssh://...`: the cases run in a sandbox on the host; the broken twin
    fails the positive's expectations there too (its own pass)."""
    make_real(lab_host)
    relay_lab.ssh_config()
    library = tmp_path / "scenarios"
    library.mkdir()
    (library / "staging.toml").write_text(SCENARIO)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            str(library),
            "--rootdir",
            str(tmp_path),
            "--relay-target",
            f"ssh://root@{lab_host.address}",
            "--relay-identity",
            str(relay_lab.dir / "id_ed25519"),
            "--relay-known-hosts",
            str(relay_lab.dir / "known_hosts"),
            "-rA",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout, proc.stdout
    assert "lab:" not in proc.stdout  # no fallback: both ran on the host


def test_check_on_a_host_whose_smtpd_group_is_named_smtpd(
    relay_lab: Lab, lab_host: LabHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Alpine and Arch call smtpd's group `smtpd`: the secrets table (root:_smtpd in the bundle)
    goes to that group, as to `opensmtpd` on Debian."""
    from test_accept import ALIASES, secrets

    assert lab_host.target is not None
    lab_host.target.check("groupmod -n smtpd opensmtpd")  # the test host's own /etc
    target = make_real(lab_host, files=(ALIASES, replace(secrets(), group="smtpd")))
    files = snapshot(target)
    rc, report, out = check(relay_lab, lab_host, "good.conf", tmp_path, capsys)
    assert rc == 0, out
    assert str(report["target"]).startswith("sandbox on root@"), out
    assert snapshot(target) == files
