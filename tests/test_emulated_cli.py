"""`--target emulated` through the real commands: relay-harness check and the scenario plugin.

The point of the emulated target is where nothing else runs: as an unprivileged user with no
OpenSMTPD on PATH. That is tested as it is meant, by running the check as `nobody` with a PATH
without /usr/sbin and a system python3 that can import only a copy of what the check imports
(so nothing from root's environment leaks in); that part needs root to switch user, and fails
rather than skips under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "ci" / "examples"
DATA = Path(__file__).parent / "data" / "check"
SYSTEM_PYTHON = Path("/usr/bin/python3")


def check_argv(config: Path, profile: Path, *tables: str) -> list[str]:
    argv = ["check", str(config), "--upstream", str(profile), "--target", "emulated"]
    for table in tables:
        argv += ["--table", table]
    return argv


def run_cli(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=cwd,
    )


def test_check_of_the_bundled_example_passes_on_the_emulated_target(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    argv = check_argv(EXAMPLE / "smtpd.conf", EXAMPLE / "provider.toml", f"aliases={EXAMPLE / 'aliases'}")
    proc = run_cli([*argv, "--report-json", str(report)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    data = json.loads(report.read_text())
    assert data["verdict"] == "pass" and data["target"].startswith("emulated:host")
    assert len(data["probes"]) == 5 and all(p["ok"] for p in data["probes"])
    assert any(n.startswith("ran on the emulated target") for n in data["notes"])


def test_the_emulated_check_loads_no_ssh_stack() -> None:
    """Not paramiko (nor the lab's clean-up of killed runs, which needs it): the emulated check
    pays only for what it uses."""
    argv = check_argv(EXAMPLE / "smtpd.conf", EXAMPLE / "provider.toml", f"aliases={EXAMPLE / 'aliases'}")
    code = (
        "import contextlib, io, sys\n"
        "from harness.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main({argv!r}) == 0\n"
        "print(sorted(m for m in ('paramiko', 'nacl', 'invoke', 'pytest') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr


def test_the_emulated_check_keeps_its_certificates_and_loads_them_without_trustme(tmp_path: Path) -> None:
    """The first check makes the CA and the provider's leaf (trustme); the next ones load them
    with ssl alone, and still relay to the provider, which requires STARTTLS, verified against
    that CA."""
    kept = tmp_path / "pki"
    env = {**os.environ, "RELAY_HARNESS_PKI_CACHE": str(kept)}
    argv = check_argv(EXAMPLE / "smtpd.conf", EXAMPLE / "provider.toml", f"aliases={EXAMPLE / 'aliases'}")
    code = (
        "import contextlib, io, sys\n"
        "from harness.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    code = main({argv!r})\n"
        "print(code, 'trustme' in sys.modules, 'PASS  relay-external' in out.getvalue())\n"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, env=env
        )
        for _ in range(2)
    ]
    assert [r.stdout.split() for r in runs] == [["0", "True", "True"], ["0", "False", "True"]], runs
    assert oct(kept.stat().st_mode & 0o777) == "0o700"
    assert sorted(p.name for p in kept.iterdir()) == [
        "ca.key",
        "ca.pem",
        "smtp.example.net.key",
        "smtp.example.net.pem",
    ]
    assert all(p.stat().st_mode & 0o077 == 0 for p in kept.iterdir())


def test_a_broken_config_fails_with_smtpds_words_on_the_emulated_target() -> None:
    proc = run_cli(
        check_argv(
            DATA / "no-mail-from.conf",
            DATA / "provider.toml",
            f"aliases={DATA / 'aliases'}",
            f"secrets={DATA / 'secrets'}",
        )
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'result="PermFail" stat="550 5.1.8 <root@host' in proc.stdout
    assert 'fix: rewrite the sender to a domain the provider accepts: add mail-from "@DOMAIN"' in proc.stdout


def test_a_config_outside_the_model_is_exit_2_naming_the_construct(tmp_path: Path) -> None:
    config = tmp_path / "smtpd.conf"
    config.write_text(
        (EXAMPLE / "smtpd.conf").read_text().replace("mbox alias <aliases>", 'mda "/usr/bin/procmail"')
    )
    proc = run_cli(check_argv(config, EXAMPLE / "provider.toml", f"aliases={EXAMPLE / 'aliases'}"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    line = (config.read_text().splitlines().index('action "local_mail" mda "/usr/bin/procmail"')) + 1
    assert proc.stderr == (
        f"relay-harness: emulated target cannot model local delivery `mda` at line {line}: use --target lab\n"
    )


def test_the_scenario_plugin_runs_cases_on_the_emulated_target_and_skips_declines(
    pytester: pytest.Pytester,
) -> None:
    library = pytester.path / "scenarios"
    library.mkdir()
    kept = (ROOT / "scenarios" / "tls" / "smtp_tls.toml").read_text()
    (library / "smtp_tls.toml").write_text(kept)
    declined = (
        (ROOT / "scenarios" / "tls" / "smtps.toml").read_text().replace("mbox alias <aliases>", 'mda "x"')
    )
    (library / "declined.toml").write_text(declined)
    result = pytester.runpytest_subprocess(
        "scenarios", "--relay-target", "emulated", "-p", "no:cacheprovider", "-rs"
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0, result.stdout.str()
    assert outcomes.get("passed", 0) == kept.count("[[case]]") > 0, result.stdout.str()
    assert outcomes.get("skipped", 0) == declined.count("[[case]]") > 0, result.stdout.str()
    config = declined.split('config = """\n', 1)[1].splitlines()
    line = next(i for i, text in enumerate(config, 1) if 'mda "x"' in text)
    result.stdout.fnmatch_lines(
        [f"*emulated target cannot model local delivery `mda` at line {line}: use --target lab*"]
    )
    collected = pytester.runpytest_subprocess(
        "scenarios",
        "--relay-target",
        "emulated",
        "-m",
        "not lab",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
    )
    assert "no tests collected" not in collected.stdout.str()  # nothing marked lab: it needs no lab


def _copy_runtime(dest: Path) -> None:
    """What the emulated check imports, copied where `nobody` can read it: the harness and the
    third-party packages it loads (found by loading them), nothing else of this environment."""
    argv = check_argv(EXAMPLE / "smtpd.conf", EXAMPLE / "provider.toml", f"aliases={EXAMPLE / 'aliases'}")
    code = (
        "import io, contextlib, os, sys\n"
        "from harness.cli import main\n"
        f"argv = {argv!r}\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(argv)\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f: print(os.path.realpath(f))\n"
    )
    with tempfile.TemporaryDirectory() as kept:  # a first run's imports: trustme makes the CA
        env = {**os.environ, "RELAY_HARNESS_PKI_CACHE": kept}
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env
        )
    sites = {os.path.realpath(p) for p in sys.path if p.endswith("site-packages")}
    tops = set()
    for path in proc.stdout.split():
        for site in sites:
            if path.startswith(site + os.sep):
                tops.add(Path(path).relative_to(site).parts[0])
    for site in sites:
        for top in tops:
            src = Path(site) / top
            if src.is_dir() and not top.endswith(".dist-info"):
                shutil.copytree(
                    src, dest / top, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            elif src.is_file() and top.endswith((".py", ".so")) and not top.startswith("__editable__"):
                shutil.copy(src, dest / top)
    shutil.copytree(ROOT / "harness", dest / "harness", ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can read (pytest's own tmp_path is inside a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="relay-harness-emulated-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


OPENSMTPD_NAMES = ("smtpd", "smtpctl", "smtp", "sendmail", "makemap", "newaliases", "mailq")
OPENSMTPD_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")
OPENSMTPD_LIBEXEC = ("/usr/libexec/opensmtpd", "/usr/lib/opensmtpd", "/usr/local/libexec/opensmtpd")


def _opensmtpd_files() -> list[str]:
    """Every OpenSMTPD program this machine has where a process could find it by name or path."""
    found = {
        os.path.join(d, n)
        for d in OPENSMTPD_DIRS
        for n in OPENSMTPD_NAMES
        if os.path.lexists(os.path.join(d, n))
    }
    return sorted(found) + [d for d in OPENSMTPD_LIBEXEC if os.path.isdir(d)]


def test_check_runs_as_nobody_without_opensmtpd_on_path(public_dir: Path) -> None:
    """As `nobody`, with a PATH without /usr/sbin, in a mount namespace where every OpenSMTPD
    program (smtpd, smtpctl, sendmail, mail.local, ...) is covered: not merely off PATH but
    unreachable by absolute path too, which the run proves before the check starts (it fails,
    rather than passing vacuously, if smtpd can still be executed)."""
    why = None
    if os.geteuid() != 0:
        why = "switching to the user nobody needs root"
    elif not SYSTEM_PYTHON.exists() or shutil.which("runuser") is None or shutil.which("unshare") is None:
        why = f"needs {SYSTEM_PYTHON}, runuser and unshare (util-linux)"
    else:
        version = subprocess.run(
            [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if version != str(sys.version_info[:2]):
            why = f"{SYSTEM_PYTHON} is Python {version}, this environment is {sys.version_info[:2]}"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the unprivileged run cannot be shown under CI: {why}", pytrace=False)
        pytest.skip(why)
    work = public_dir
    site = work / "site"
    site.mkdir(parents=True)
    _copy_runtime(site)
    for name in ("smtpd.conf", "provider.toml", "aliases"):
        shutil.copy(EXAMPLE / name, work / name)
    out = work / "out"
    out.mkdir()
    for path in work.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.chown(out, "nobody", "nogroup")
    path = "/usr/bin:/bin"
    assert shutil.which("smtpd", path=path) is None and shutil.which("smtpctl", path=path) is None
    hidden = _opensmtpd_files()
    argv = check_argv(work / "smtpd.conf", work / "provider.toml", f"aliases={work / 'aliases'}")
    main = (
        "import os, subprocess, sys\n"
        "assert os.geteuid() != 0\n"
        f"for p in {hidden!r} + ['/usr/sbin/smtpd']:\n"
        "    try:\n"
        "        subprocess.run([p, '-h'], capture_output=True, timeout=10)\n"
        "    except OSError:\n"
        "        continue\n"
        "    sys.exit(f'OpenSMTPD is reachable: {p} runs')\n"
        "from harness.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cover = " ".join(
        f"mount -t tmpfs -o ro,mode=755 none {p} &&" if os.path.isdir(p) else f"mount --bind /dev/null {p} &&"
        for p in hidden
    )
    proc = subprocess.run(
        [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", f'{cover} exec "$@"', "sh",
            "runuser", "-u", "nobody", "--",
            "env", "-i", f"PATH={path}", f"HOME={out}", f"PYTHONPATH={site}",
            str(SYSTEM_PYTHON), "-S", "-c", main, *argv, "--report-json", str(out / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("PASS: 5 passed, 0 failed in ")
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and report["target"].startswith("emulated:"), report
    assert (out / ".cache" / "relay-harness" / "pki" / "ca.pem").exists()  # the user's own, in its HOME
