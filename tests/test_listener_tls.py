"""Which listeners `check` shakes hands with, and where it may not claim to have.

The handshakes themselves run against the real smtpd in the corpus (listener-* cases and
their twins); these pin what is read from the config and that the emulation, which cannot make
a TLS handshake with smtpd, declines such a config instead of reporting a listener it never tried.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.smtpdconf import TlsListener, parse_config, tls_listeners
from harness.smtpdconf.needs import listen_kind

CORPUS = Path(__file__).parent / "data" / "corpus"

CONFIG = """\
pki Mail.Example.Org cert "/etc/ssl/m.crt"
pki Mail.Example.Org key "/etc/ssl/m.key"
listen on lo
listen on socket
listen on lo smtps pki Mail.Example.Org
listen on eth0 port 2465 smtps pki mail.example.org
listen on 127.0.0.1 tls pki mail.example.org
listen on ::1 port 587 tls-require pki mail.example.org auth
listen on localhost port 10025 tls
"""


def test_each_tls_listener_with_its_port_mode_and_pki() -> None:
    config = parse_config(CONFIG, "smtpd.conf")
    assert tls_listeners(config) == [
        TlsListener("lo", 5, "smtps", 465, "mail.example.org", "smtps"),
        TlsListener("eth0", 6, "smtps", 2465, "mail.example.org", "smtps"),
        TlsListener("127.0.0.1", 7, "starttls", 25, "mail.example.org", "tls"),
        TlsListener("::1", 8, "starttls", 587, "mail.example.org", "tls-require"),
        TlsListener("localhost", 9, "starttls", 10025, None, "tls"),
    ]


def test_plain_listeners_and_sockets_are_not_shaken_hands_with() -> None:
    config = parse_config("listen on lo\nlisten on lo port 587 auth\nlisten on socket\n", "smtpd.conf")
    assert tls_listeners(config) == []


def test_a_listen_word_is_taken_as_smtpd_takes_it() -> None:
    assert [
        listen_kind(w) for w in ("lo", "eth0.100", "[::1]", "192.0.2.1", "localhost", "mx.example.org")
    ] == [
        "interface",
        "interface",
        "address",
        "address",
        "hostname",
        "hostname",
    ]


def test_the_emulated_target_declines_a_tls_listener_rather_than_pass_it(tmp_path: Path) -> None:
    argv = [
        "check", str(CORPUS / "listener-smtps.conf"), "--upstream", str(CORPUS / "provider.toml"),
        "--target", "emulated", "--table", f"aliases={CORPUS / 'aliases'}",
        "--file", f"/etc/ssl/mail.example.org.crt={CORPUS / 'listener.crt'}",
        "--file", f"/etc/ssl/private/mail.example.org.key={CORPUS / 'listener.key'}",
        "--report-json", str(tmp_path / "r.json"),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot model listen option `smtps` at line 9: use --target lab" in proc.stderr
    assert "PASS  listener" not in proc.stdout
