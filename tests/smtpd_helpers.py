"""Running the real `smtpd -n` on a config text, shared by the smtpd.conf parser and lint tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
ARTICLE = DATA / "article-smtpd.conf"
SMTPD = shutil.which("smtpd") or "/usr/sbin/smtpd"
needs_smtpd = pytest.mark.skipif(
    shutil.which("smtpd") is None and not os.path.exists("/usr/sbin/smtpd"),
    reason="OpenSMTPD (smtpd) is not installed",
)


def smtpd_check(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    """Run `smtpd -n` on text (with @DIR@ → tmp_path); output with the path shortened."""
    for name in ("aliases", "secrets"):
        (tmp_path / name).write_text("")
    conf = tmp_path / "smtpd.conf"
    conf.write_text(text.replace("@DIR@", str(tmp_path)))
    proc = subprocess.run(
        [SMTPD, "-n", "-f", str(conf)], capture_output=True, text=True, timeout=60, check=False
    )
    output = (proc.stdout + proc.stderr).replace(str(conf), "smtpd.conf")
    return proc.returncode, output.splitlines()
