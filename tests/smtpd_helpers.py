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


def smtpd_n(text: str, tmp_path: Path, root: Path | None = None) -> tuple[int, str]:
    """`smtpd -n` of text: this machine's smtpd, or the one in the Debian root `root`.

    In a root (an image), smtpd runs chrooted with tmp_path bind-mounted on its /tmp inside a
    mount namespace of its own: the shared image is never written.
    """
    (tmp_path / "smtpd.conf").write_text(text)
    if root is None:
        cmd = [SMTPD, "-n", "-f", str(tmp_path / "smtpd.conf")]
    else:
        script = 'mount --bind "$1" "$2/tmp" && exec chroot "$2" /usr/sbin/smtpd -n -f /tmp/smtpd.conf'
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(tmp_path),
            str(root),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout + proc.stderr
