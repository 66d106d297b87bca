"""Nothing outside the test host changes, wherever the config's files live (issue 11, part 1).

Configs put their tables where their system does: FreeBSD under /usr/local/etc/mail, others
under /srv, /opt, a home directory, /var/tmp, /run/keys, a top-level directory of their own; an
mda writes where it likes; a careless table path may even name /usr/sbin/smtpd. Each runs
through the real `relay-harness check`, paused once the probes are done (its test host still
up) so the test can look inside the host: the files are there, as given. Afterwards this
machine is byte-identical at every path the configs name (and each ancestor directory that did
not exist is still absent). Only the paths the test names are looked at: other runs use the
machine at the same time.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

EXAMPLE = Path(__file__).parent.parent / "ci" / "examples"
U = f"rh-sealed-{os.getpid()}"  # this test run's own names, so no other run's files are looked at

# The real CLI, paused when the check's test host is about to be removed (all probes done):
# it says `paused NAME PID` (PID: the host's first process) and waits for the FIFO to be opened.
PAUSED = """
import sys
from harness.targets import lab
fifo, *argv = sys.argv[1:]
destroy = lab.LabHost.destroy

def paused(self):
    if self.pid is not None and self.target is not None:
        print("paused", self.name, self.pid, flush=True)
        open(fifo).close()
    destroy(self)

lab.LabHost.destroy = paused
from harness.cli import main
sys.exit(main(argv))
"""

TABLES = {
    "aliases": "/usr/local/etc/mail/aliases",  # FreeBSD's layout
    "secrets": f"/run/keys/{U}/secrets",
    "peers": f"/srv/{U}/peers",
    "domains": f"/opt/{U}/etc/domains",
    "users": f"/home/{U}/.config/users",
    "deep": f"/var/tmp/{U}/x/deep/t",
    "top": f"/{U}/t",  # a top-level directory this machine does not have
}
RELAY = 'relay host smtp+tls://perso@smtp.example.net:587 auth <secrets> mail-from "@example.org"'
SPREAD = (
    "".join(f"table {name} file:{path}\n" for name, path in TABLES.items())
    + "listen on socket\nlisten on lo\n"
    + 'action "local_mail" mbox alias <aliases>\n'
    + f'action "outbound" {RELAY}\n'
    + 'match from local for local action "local_mail"\n'
    + 'match from local for any action "outbound"\n'
)
MDA_OUT = f"/var/tmp/{U}-mda-out"
MDA = (
    "table aliases file:/etc/mail/aliases\ntable secrets file:/etc/mail/secrets\nlisten on socket\n"
    f'action "local_mail" mda "/bin/sh -c \'cat > {MDA_OUT}\'" alias <aliases>\n'
    f'action "outbound" {RELAY}\n'
    'match from local for local action "local_mail"\nmatch from local for any action "outbound"\n'
)
SMTPD_TABLE = (
    "table evil file:/usr/sbin/smtpd\nlisten on socket\n"
    'action "local_mail" mbox\nmatch from local for local action "local_mail"\n'
)
ALIASES = b"root: alice\npostmaster: root\n"


def _fingerprint(paths: list[str]) -> dict[str, object]:
    """Each path and every ancestor up to the first that exists: absent, or content hash and stat."""
    state: dict[str, object] = {}
    for path in paths:
        p = Path(path)
        for q in (p, *p.parents):
            if q.is_file():
                st = q.stat()
                digest = hashlib.sha256(q.read_bytes()).hexdigest()
                state[str(q)] = (digest, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
                break
            if q.exists():
                state[str(q)] = "directory"
                break
            state[str(q)] = None
    return state


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line from the check within {timeout:g}s"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").partition("\n")[0]


@dataclass
class Run:
    returncode: int
    output: str
    inside: dict[str, str]  # path → mode and owner, sha256, first 4 KiB, as read inside the host


def _paused_check(tmp_path: Path, config: str, look: list[str], *flags: str) -> Run:
    """The real check of `config`; `look`: paths read inside its host while it is up."""
    conf, fifo = tmp_path / "smtpd.conf", tmp_path / "go"
    conf.write_text(config)
    os.mkfifo(fifo)
    argv = ["check", str(conf), "--upstream", str(EXAMPLE / "provider.toml"), *flags]
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(fifo), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        line = _read_line(proc, 90)
        assert line.startswith("paused "), line + (
            proc.stderr.read().decode() if proc.poll() is not None else ""
        )
        inside_host = ["nsenter", "--target", line.split()[2], "--mount", "--root", "--wd"]
        inside = {}
        for path in look:
            done = subprocess.run(
                [
                    *inside_host,
                    "sh",
                    "-c",
                    'stat -c "%a %U:%G" "$1" && sha256sum < "$1" && head -c 4096 "$1"',
                    "-",
                    path,
                ],
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
            inside[path] = (done.stdout + done.stderr).replace("  -", "").strip()
        with open(fifo, "w"):
            pass  # the check goes on: removes its host, prints the report
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Run(proc.returncode, line + "\n" + out.decode() + err.decode(), inside)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_tables_anywhere_exist_inside_the_host_and_nowhere_on_this_machine(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_bytes(ALIASES)
    paths = list(TABLES.values())
    before = _fingerprint(paths)
    run = _paused_check(tmp_path, SPREAD, paths, "--table", f"aliases={aliases}")
    assert run.returncode == 0, run.output  # a correct config: the gate passes it
    assert run.inside[TABLES["aliases"]] == f"644 root:root\n{_sha(ALIASES)}\n{ALIASES.decode()}".strip()
    assert run.inside[TABLES["secrets"]].startswith("640 root:opensmtpd\n"), run.inside  # synthesized
    for name in ("peers", "domains", "users", "deep", "top"):  # unused: installed empty
        assert run.inside[TABLES[name]] == f"644 root:root\n{_sha(b'')}", (name, run.inside)
    assert _fingerprint(paths) == before


def test_an_mda_writes_inside_the_host_only(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_bytes(ALIASES)
    before = _fingerprint([MDA_OUT])
    run = _paused_check(tmp_path, MDA, [MDA_OUT], "--table", f"aliases={aliases}")
    # The aliases file sends root's mail to alice, and the local action (an mda) delivered it to her.
    assert run.returncode == 0, run.output
    assert "PASS  alias-root->alice" in run.output
    inside = run.inside[MDA_OUT]
    assert inside.startswith("644 alice:") and "Subject: relay-harness probe" in inside, run.inside
    assert _fingerprint([MDA_OUT]) == before


def test_a_table_at_smtpds_own_path_breaks_only_the_test_hosts_smtpd(tmp_path: Path) -> None:
    before = _fingerprint(["/usr/sbin/smtpd"])
    assert before["/usr/sbin/smtpd"] is not None
    run = _paused_check(tmp_path, SMTPD_TABLE, ["/usr/sbin/smtpd"])
    assert run.inside["/usr/sbin/smtpd"] == f"644 root:root\n{_sha(b'')}", run.inside
    assert run.returncode == 1, run.output  # the config overwrites its own smtpd: its fault
    assert _fingerprint(["/usr/sbin/smtpd"]) == before
