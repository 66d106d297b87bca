"""Images: Debian roots of other releases, built with the real debootstrap from apt's own mirror.

Two kinds of test. Those that need no download: apt's sources parsed, release names checked,
a build against a mirror that refuses (a closed loopback port, so nothing leaves the machine)
failing with exit 2 and the cause, the locks that serialise builds and keep an image in use from
being swapped or removed, and the temp dirs a killed build leaves. And those on the real trixie
image (built once into the machine's cache, the one `lab:trixie` uses, so CI pays for it once):
its manifest, that no daemon ran or runs from it, that its smtpd is 7.6 and checks a config, and
that a killed build (SIGKILL in the middle of dpkg, /proc mounted in the root) is cleaned up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from smtpd_helpers import smtpd_n

from harness.cli import main
from harness.targets import images
from harness.targets.images import (
    Image,
    ImageError,
    Mirror,
    apt_mirror,
    build_image,
    check_release,
    clean_stale_images,
    ensure_image,
    list_images,
    machine_release,
    remove_image,
    use_image,
)

RELEASE = "trixie"


def _closed_port() -> int:
    """A loopback port nothing listens on: the mirror that refuses every connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _needs_root_and_debootstrap() -> None:
    why = None
    if os.geteuid() != 0:
        why = "building images needs root"
    elif shutil.which("debootstrap") is None:
        why = "debootstrap is not installed: apt-get install debootstrap"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"images cannot be tested under CI: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of its own for tests that build, swap or remove (the machine's stays untouched)."""
    path = tmp_path / "images"
    monkeypatch.setenv(images.CACHE_ENV, str(path))
    return path


def _fake_image(cache: Path, release: str = RELEASE) -> Path:
    """A cached image's shape (manifest + root dir) without its 270 MB, for list/rm/lock tests."""
    path = cache / release
    (path / "root" / "etc").mkdir(parents=True)
    (path / "root" / "etc" / "marker").write_text("old image\n")
    manifest = {
        "release": release,
        "mirror": "http://mirror.invalid/debian",
        "built_at": "2026-01-01T00:00:00Z",
        "build_seconds": 1.0,
        "size_bytes": 4096,
        "smtpd_version": "OpenSMTPD 7.6.0-portable",
        "packages": {"opensmtpd": "7.6.0p1-1"},
    }
    (path / images.MANIFEST).write_text(json.dumps(manifest))
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- apt's sources, release names ----------------------------------------------------------------


def test_mirror_from_deb822_sources_skips_security_and_disabled(tmp_path: Path) -> None:
    (tmp_path / "a.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    mirror = apt_mirror((tmp_path / "missing.list", tmp_path), release="bookworm")
    assert mirror.url == "http://mirror.example/debian"
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert mirror.keyring == (keyring if os.path.isfile(keyring) else None)


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    listing = tmp_path / "sources.list"
    listing.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/nonexistent.gpg] http://mirror.example/debian bookworm main\n"
    )
    assert apt_mirror((listing,), release="bookworm") == Mirror("http://mirror.example/debian", None)


def test_no_mirror_is_an_error_that_says_how_to_give_one(tmp_path: Path) -> None:
    (tmp_path / "other.list").write_text("deb http://x.example/ nodistro-security main\n")
    with pytest.raises(ImageError, match=r"no Debian mirror in apt's sources .*--mirror URL"):
        apt_mirror((tmp_path,), release="bookworm")


def test_this_machines_mirror_is_found() -> None:
    """The machine's own apt configuration (Debian here) names a mirror the build can use."""
    assert re.match(r"^https?://", apt_mirror().url)


def test_machine_release(tmp_path: Path) -> None:
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13"\nVERSION_CODENAME=trixie\n')
    assert machine_release(tmp_path / "os-release") == "trixie"
    assert machine_release(tmp_path / "missing") == ""


def test_release_names_are_checked_before_any_build() -> None:
    _needs_root_and_debootstrap()
    assert check_release("trixie") == "trixie"
    with pytest.raises(ImageError, match=r"image 'Trixie; rm -rf /': not a Debian release name"):
        check_release("Trixie; rm -rf /")
    with pytest.raises(ImageError, match=r"image jammy: not a Debian release this debootstrap knows .*trix"):
        check_release("jammy")
    with pytest.raises(ImageError, match=r"image stable: not a Debian release"):
        check_release("stable")  # an alias: its image would turn into another release's


def test_missing_debootstrap_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ImageError, match=r"image trixie: debootstrap is not installed: apt-get install"):
        check_release("trixie")


# -- failed builds, locks, temp dirs --------------------------------------------------------------


def test_unreachable_mirror_fails_naming_release_and_cause_and_keeps_the_old_image(cache: Path) -> None:
    _needs_root_and_debootstrap()
    old = _fake_image(cache)
    before = _tree(old)
    mirror = Mirror(f"http://127.0.0.1:{_closed_port()}/debian")
    lines: list[str] = []
    with pytest.raises(ImageError) as info:
        build_image(RELEASE, mirror=mirror, progress=lines.append)
    cause = r"^image trixie: debootstrap failed \(exit 1\): Failed getting release file http://127"
    assert re.search(cause, str(info.value))
    assert any("building with debootstrap from http://127.0.0.1" in line for line in lines)
    assert _tree(old) == before, "a failed rebuild must leave the cached image as it was"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [RELEASE], "temp dir left"


def test_cli_build_failure_is_exit_2_with_one_line(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _needs_root_and_debootstrap()
    port = _closed_port()
    assert main(["lab", "image", "build", RELEASE, "--mirror", f"http://127.0.0.1:{port}/debian/"]) == 2
    err = capsys.readouterr().err
    release_file = f"http://127.0.0.1:{port}/debian/dists/trixie/Release"
    assert f"image trixie: debootstrap failed (exit 1): Failed getting release file {release_file}" in err
    assert "(log: failed: Connection refused.)" in err, "why: the reason is only in debootstrap's log"
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "image", "build", "jammy"], "image jammy: not a Debian release this debootstrap knows"),
        (["lab", "image", "build"], "lab image build: name a release (e.g. trixie); no image is cached yet"),
        (["lab", "image", "rm", RELEASE], "lab image rm: no image of trixie in "),
        (["lab", "image", "list", RELEASE], "lab image list: no image of trixie in "),
    ],
)
def test_cli_usage_errors(
    cache: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    _needs_root_and_debootstrap()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_list_and_rm(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_image(cache)
    assert main(["lab", "image", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{machine_release()}: the machine's own root (no image)" in out
    assert "trixie: OpenSMTPD 7.6.0-portable (opensmtpd 7.6.0p1-1), 0 MB, built 2026-01-01T00:00:00Z" in out
    assert [i.release for i in list_images()] == [RELEASE]
    assert main(["lab", "image", "rm", RELEASE]) == 0
    assert "removed image trixie" in capsys.readouterr().out
    assert list_images() == []
    assert not (cache / RELEASE).exists()
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_a_broken_manifest_is_no_image(cache: Path) -> None:
    path = _fake_image(cache)
    (path / images.MANIFEST).write_text("{not json")
    assert Image.load(path) is None
    assert list_images() == []


def _hold(path: Path, kind: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, kind)
    return fd


def _run_in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(fn())  # type: ignore[operator]
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _wait_for(lines: list[str], text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, f"{text!r} never reported: {lines}"
        time.sleep(0.01)


def test_a_second_build_waits_for_the_first(cache: Path) -> None:
    """Two runs never build one release at once: the second waits on the build lock."""
    _needs_root_and_debootstrap()
    fd = _hold(cache / f".{RELEASE}.build.lock", fcntl.LOCK_EX)  # another run is building
    lines: list[str] = []
    mirror = Mirror(f"http://127.0.0.1:{_closed_port()}/debian")
    thread, result = _run_in_thread(lambda: build_image(RELEASE, mirror=mirror, progress=lines.append))
    try:
        _wait_for(lines, "image trixie: waiting for another run building it")
        thread.join(0.5)
        assert thread.is_alive() and not any("building with debootstrap" in line for line in lines)
    finally:
        os.close(fd)
    thread.join(30)
    assert isinstance(result[0], ImageError) and "Failed getting release file" in str(result[0])


def test_first_use_after_a_concurrent_build_uses_that_build(cache: Path) -> None:
    """ensure_image waiting on a build finds the image that build made and builds nothing."""
    _needs_root_and_debootstrap()
    fd = _hold(cache / f".{RELEASE}.build.lock", fcntl.LOCK_EX)
    lines: list[str] = []
    thread, result = _run_in_thread(lambda: ensure_image(RELEASE, progress=lines.append))
    try:
        _wait_for(lines, "waiting for another run building it")
        _fake_image(cache)  # what the other run's build leaves when it is done
    finally:
        os.close(fd)
    thread.join(10)
    assert isinstance(result[0], Image) and result[0].release == RELEASE
    assert not any("building with debootstrap" in line for line in lines)


def test_an_image_in_use_is_not_removed_until_released(cache: Path) -> None:
    _needs_root_and_debootstrap()
    path = _fake_image(cache)
    lease = use_image(RELEASE, progress=lambda line: None)
    lines: list[str] = []
    thread, result = _run_in_thread(lambda: remove_image(RELEASE, progress=lines.append))
    try:
        _wait_for(lines, "image trixie: waiting for the runs using it to finish")
        thread.join(0.5)
        assert thread.is_alive() and (path / "root" / "etc" / "marker").exists()
    finally:
        lease.close()
    thread.join(10)
    assert result == [True] and not path.exists()


def test_stale_temp_dirs_of_dead_builds_are_removed(cache: Path) -> None:
    """A killed build's temp dir goes; one of a live process (or a build holding the lock) stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f".{RELEASE}.build-{dead.pid}"
    (stale / "root" / "etc").mkdir(parents=True)
    live = cache / f".{RELEASE}.build-{os.getpid()}"
    live.mkdir()
    assert clean_stale_images() == [stale]
    assert not stale.exists() and live.exists()


# -- the real trixie image -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trixie() -> Iterator[Image]:
    """The machine's cached trixie image, built here on first use (once per machine)."""
    _needs_root_and_debootstrap()
    lease = use_image(RELEASE)
    try:
        yield lease.image
    finally:
        lease.close()


def test_trixie_image_is_opensmtpd_7_6_with_versions_recorded(trixie: Image) -> None:
    assert trixie.smtpd_version.startswith("OpenSMTPD 7.6")
    assert trixie.opensmtpd.startswith("7.6.")
    for pkg in images.PACKAGES:
        assert pkg in trixie.packages
    query = subprocess.run(
        ["chroot", str(trixie.root), "dpkg-query", "-W", "-f", "${Version}", "opensmtpd"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert query.stdout == trixie.opensmtpd
    smtpd = subprocess.run(
        ["chroot", str(trixie.root), "/usr/sbin/smtpd", "-h"], capture_output=True, text=True
    )
    assert f"version: {trixie.smtpd_version}" in smtpd.stdout + smtpd.stderr
    assert 100e6 < trixie.size_bytes < 600e6


def test_trixie_smtpd_checks_a_config_in_the_root(trixie: Image, tmp_path: Path) -> None:
    """Its own smtpd, its own libraries: `smtpd -n` tells a good config from a broken one."""
    good = 'listen on localhost\naction "relay" relay\nmatch from local for any action "relay"\n'
    assert smtpd_n(good, tmp_path, trixie.root) == (0, "configuration OK\n")
    rc, output = smtpd_n(good.replace('any action "relay"', 'any action "outbound"'), tmp_path, trixie.root)
    assert rc == 1 and "/tmp/smtpd.conf:3: no such dispatcher: outbound" in output


def test_trixie_image_is_safe_to_share(trixie: Image) -> None:
    """No daemon starts in it, it names no real DNS server, and it carries no SSH host key."""
    policy = subprocess.run([str(trixie.root / "usr/sbin/policy-rc.d")], capture_output=True)
    assert policy.returncode == 101
    assert (trixie.root / "etc/resolv.conf").read_text() == "nameserver 127.0.0.1\nlookup file\n"
    assert list((trixie.root / "etc/ssh").glob("ssh_host_*")) == []
    running = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                root = os.readlink(proc / "root")
            except OSError:
                continue
            if root.startswith(str(trixie.root)):
                running.append((proc.name, (proc / "comm").read_text().strip()))
    assert running == [], f"processes running from the image (a daemon started by the install?): {running}"


def test_a_killed_build_is_cleaned_up(cache: Path) -> None:
    """SIGKILL to the build and its debootstrap mid-install: the temp dir (with /proc mounted in it)
    stays behind until `lab clean` (or the next build) unmounts and removes it; no image appears."""
    _needs_root_and_debootstrap()
    env = {**os.environ, images.CACHE_ENV: str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "lab", "image", "build", RELEASE],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "installing packages" in line:
                break
        else:
            pytest.fail(f"the build ended before installing: exit {proc.wait()}")
        root = next(cache.glob(f".{RELEASE}.build-*/root"))
        deadline = time.monotonic() + 60
        while not os.path.ismount(root / "proc"):  # debootstrap mounts /proc for the maintainer scripts
            assert time.monotonic() < deadline, "debootstrap never mounted /proc in the root"
            time.sleep(0.05)
    finally:
        for pid in _group(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    # debootstrap was started in a session of its own: kill that one too (a crash takes all).
    for pid in _debootstraps(cache):
        with contextlib.suppress(ProcessLookupError):  # it may have ended by itself meanwhile
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _debootstraps(cache):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not (cache / RELEASE).exists()
    temp = next(cache.glob(f".{RELEASE}.build-*"))
    assert clean_stale_images() == [temp]
    assert not temp.exists()
    assert not any(m.startswith(str(cache)) for m in images._mount_points())


def _group(pgid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getpgid(int(proc.name)) == pgid:
                    out.append(int(proc.name))
            except ProcessLookupError:
                continue
    return out


def _debootstraps(cache: Path) -> list[int]:
    """Processes working in this cache (debootstrap, its chroot'ed dpkg)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            root = os.readlink(proc / "root")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(cache) in cmdline or root.startswith(str(cache)) or cwd.startswith(str(cache)):
            out.append(int(proc.name))
    return out
