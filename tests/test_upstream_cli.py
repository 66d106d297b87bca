"""`relay-harness upstream` as a user runs it: a real process, swaks as the client, signals to stop.

swaks 20201014 (Debian bookworm) checks the chain with --tls-verify but not the host name, so the
negative twin of a verified session here is a CA the server's certificate does not chain to.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

HOST = "smtp.example.net"
USER = "alice@example.org"
PASSWORD = "Sw4ks-pa55word-kept-secret"
START_TIMEOUT = 20.0
RUN_TIMEOUT = 20.0

PROFILE = f"""\
host = "{HOST}"
tls = "starttls-required"
auth = "required"
sender_domains = ["example.org"]

[[credentials]]
user = "{USER}"
password_env = "RH_CLI_TEST_PASSWORD"
"""

needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")


def _command() -> list[str]:
    exe = Path(sys.executable).with_name("relay-harness")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli"]


class Upstream:
    """One `relay-harness upstream` process; stdout is read line by line on a thread."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, RH_CLI_TEST_PASSWORD=PASSWORD, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*_command(), "upstream", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_listening(self) -> int:
        """The port from the `listening on HOST:PORT` line; fails if the process ends first."""
        while True:
            line = self.lines.get(timeout=START_TIMEOUT)
            if line is None:
                raise AssertionError(f"upstream ended before listening: {self.stop_output()}")
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                return int(m.group(1))

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=RUN_TIMEOUT)

    def stop_output(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=RUN_TIMEOUT)
        self._reader.join(timeout=RUN_TIMEOUT)
        assert self.proc.stderr is not None
        return "".join(self.stdout), self.proc.stderr.read()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "provider.toml").write_text(PROFILE, encoding="utf-8")
    return tmp_path


@pytest.fixture
def upstream(workdir: Path) -> Iterator[Upstream]:
    proc = Upstream(
        [
            "--profile",
            str(workdir / "provider.toml"),
            "--listen",
            "127.0.0.1:0",
            "--certs",
            str(workdir / "certs"),
            "--record",
            str(workdir / "sessions.jsonl"),
        ]
    )
    yield proc
    proc.stop_output()


def swaks(port: int, ca: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{port}",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(ca),
            "--tls-sni",
            HOST,
            "--helo",
            "client.example.org",
            "--from",
            USER,
            "--to",
            "bob@example.com",
            "--auth-user",
            USER,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@needs_swaks
def test_swaks_delivers_through_the_standalone_upstream(upstream: Upstream, workdir: Path) -> None:
    port = upstream.wait_listening()
    ca = workdir / "certs" / "ca.pem"
    assert ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")

    good = swaks(port, ca, "--auth", "PLAIN", "--auth-password", PASSWORD)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "250 2.0.0 Ok: queued as" in good.stdout

    wrong = swaks(port, ca, "--auth", "LOGIN", "--auth-password", "not-" + PASSWORD)
    assert wrong.returncode == 28, wrong.stdout + wrong.stderr  # swaks: AUTH failed
    assert "535 5.7.8 Authentication credentials invalid" in wrong.stdout

    other_ca = workdir / "other-ca.pem"
    other_ca.write_bytes(trustme.CA().cert_pem.bytes())
    untrusted = swaks(port, other_ca, "--auth", "PLAIN", "--auth-password", PASSWORD)
    assert untrusted.returncode == 29, untrusted.stdout + untrusted.stderr  # swaks: TLS failed
    assert "certificate verify failed" in untrusted.stdout + untrusted.stderr

    assert upstream.signal(signal.SIGTERM) == 0
    stdout, stderr = upstream.stop_output()
    assert "stopped after 3 session(s)" in stdout
    assert "Traceback" not in stderr

    text = (workdir / "sessions.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 3
    by_result = {
        "good": next(r for r in records if r["messages"]),
        "wrong": next(r for r in records if r["auth"] and not r["auth"][0]["success"]),
        "untrusted": next(r for r in records if r["tls_error"]),
    }
    good_rec = by_result["good"]
    assert good_rec["tls"] == "starttls" and good_rec["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert good_rec["ehlo"] == "client.example.org"
    assert good_rec["auth"] == [{"mechanism": "PLAIN", "user": USER, "success": True, "over_tls": True}]
    (msg,) = good_rec["messages"]
    assert (msg["mail_from"], msg["rcpt_to"], msg["accepted"]) == (USER, ["bob@example.com"], True)
    assert "This is a test mailing" in msg["body"]
    assert good_rec["ended"] is not None
    assert by_result["wrong"]["auth"][0]["mechanism"] == "LOGIN"
    assert by_result["wrong"]["messages"] == []
    assert by_result["untrusted"]["tls"] == "none" and by_result["untrusted"]["auth"] == []
    assert PASSWORD not in text + stdout + stderr


@needs_swaks
def test_second_start_reuses_the_ca(workdir: Path) -> None:
    args = [
        "--profile",
        str(workdir / "provider.toml"),
        "--listen",
        "127.0.0.1:0",
        "--certs",
        str(workdir / "certs"),
    ]
    first = Upstream(args)
    first.wait_listening()
    assert first.signal(signal.SIGINT) == 0
    first.stop_output()
    ca_before = (workdir / "certs" / "ca.pem").read_bytes()
    leaf_before = (workdir / "certs" / f"{HOST}.pem").read_bytes()
    kept = workdir / "ca-from-first-run.pem"
    kept.write_bytes(ca_before)

    second = Upstream(args)
    try:
        port = second.wait_listening()
        assert (workdir / "certs" / "ca.pem").read_bytes() == ca_before
        assert (workdir / "certs" / f"{HOST}.pem").read_bytes() == leaf_before
        # a client set up against the first run's CA still verifies the second run
        result = swaks(port, kept, "--auth", "PLAIN", "--auth-password", PASSWORD)
        assert result.returncode == 0, result.stdout + result.stderr
        assert second.signal(signal.SIGTERM) == 0
    finally:
        second.stop_output()
    assert oct((workdir / "certs" / "ca.key").stat().st_mode & 0o777) == "0o600"


BAD_PROFILES = [
    ('host = "smtp.example.net"\ntls = "sometimes"\n', 2, "tls"),
    ('host = "smtp.example.net"\n\n[faults]\ncert = "revoked"\n', 4, "faults.cert"),
    (
        '[[credentials]]\nuser = "a"\npassword_env = "RH_CLI_TEST_UNSET_VAR"\n',
        3,
        "credentials[0].password_env",
    ),
    ('host = "smtp.example.net\n', 1, "toml"),
]


@pytest.mark.parametrize(("text", "line", "field"), BAD_PROFILES, ids=[f for _, _, f in BAD_PROFILES])
def test_bad_profile_exits_2_with_one_line(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "RH_CLI_TEST_UNSET_VAR"}
    result = subprocess.run(
        [
            *_command(),
            "upstream",
            "--profile",
            str(path),
            "--listen",
            "127.0.0.1:0",
            "--certs",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"relay-harness: {path}:{line}: {field}: ")
    assert not (tmp_path / "c").exists()  # nothing created for a profile that cannot run


def test_missing_profile_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = subprocess.run(
        [*_command(), "upstream", "--profile", str(missing), "--certs", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"relay-harness: {missing}: profile: cannot read: No such file or directory"
    )


def test_port_in_use_exits_2(workdir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                *_command(),
                "upstream",
                "--profile",
                str(workdir / "provider.toml"),
                "--listen",
                f"127.0.0.1:{port}",
                "--certs",
                str(workdir / "certs"),
            ],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=dict(os.environ, RH_CLI_TEST_PASSWORD=PASSWORD),
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def _listen(workdir: Path, address: str) -> Upstream:
    return Upstream(
        ["--profile", str(workdir / "provider.toml"), "--listen", address, "--certs", str(workdir / "certs")]
    )


def test_listen_on_a_non_loopback_address_warns_first(workdir: Path) -> None:
    # 203.0.113.1 (TEST-NET-3) is on no interface here: the warning comes, then the bind fails,
    # so the test never opens a port anyone else could reach.
    proc = _listen(workdir, "203.0.113.1:2525")
    assert proc.proc.wait(timeout=RUN_TIMEOUT) == 2
    _, err = proc.stop_output()
    warning, failure = err.strip().splitlines()
    assert warning.startswith("relay-harness upstream: warning: 203.0.113.1 is not a loopback address")
    assert "learn from its replies whether a password is right" in warning
    assert failure.startswith("relay-harness: cannot listen on 203.0.113.1:2525")
    assert "Traceback" not in err


@pytest.mark.parametrize("address", ["127.0.0.2:0", "[::1]:0", "localhost:0"])
def test_listen_on_loopback_does_not_warn(workdir: Path, address: str) -> None:
    proc = _listen(workdir, address)
    line = proc.lines.get(timeout=START_TIMEOUT)
    assert line is not None and "listening on" in line, proc.stop_output()
    assert proc.signal(signal.SIGTERM) == 0
    _, err = proc.stop_output()
    assert "warning" not in err
