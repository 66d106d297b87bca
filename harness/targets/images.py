"""Debian roots of other releases, so a test host can run the smtpd a host will have after an upgrade.

Debian 12 ships OpenSMTPD 6.8, Debian 13 7.6: grammar, defaults and log texts differ, and the only
faithful way to know what a config does on 7.6 is to run 7.6. An image is a plain Debian root
made with `debootstrap --variant=minbase` plus what a test host needs, from the mirror apt uses
here (so no other outside host is contacted). It is built once, on first use or on demand, and
kept under CACHE_DIR/RELEASE:

    CACHE_DIR/trixie/root        the Debian root (a test host's lower root)
    CACHE_DIR/trixie/image.json  release, mirror, package versions (dpkg-query in the root), smtpd -h

The machine's own release needs no image: its root is `/`.

Concurrency: a build lock per release makes a second run wait for the first build and then use
it; a use lock is held shared by every lab using the image and exclusively only for the moment a
rebuild swaps the new root in or `rm` removes it, so an image never changes under a running host.
A build goes into a temp dir beside the image and is renamed into place when complete: a failed
or killed build leaves no half image, and its temp dir is removed by the next build.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.targets.base import TargetError

CACHE_DIR = Path("/var/cache/relay-harness/images")
CACHE_ENV = "RELAY_HARNESS_IMAGE_CACHE"  # another cache dir (a plain directory, not an overlay)
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# What a test host runs: smtpd (and makemap, smtpctl, sendmail), sshd (the harness drives every
# host over SSH), iproute2 (`ss` for accept's listener check), python3 (SMTP submission from inside
# the host uses its smtplib).
PACKAGES = ("opensmtpd", "openssh-server", "iproute2", "python3")
MANIFEST = "image.json"
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")
SUITE_ALIASES = frozenset({"stable", "testing", "unstable", "oldstable", "oldoldstable"})
RELEASE_NAME = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
# Never start a daemon in the image (during the build debootstrap's own policy does this; ours
# stays for anything run in the root later).
POLICY_RC_D = "#!/bin/sh\n# relay-harness image: never start services here\nexit 101\n"
# An image on its own names no DNS server: debootstrap copies the machine's resolv.conf.
RESOLV_CONF = "nameserver 127.0.0.1\nlookup file\n"
# debootstrap's steps, by the word its "I:" lines start with; each is reported once, in order.
PHASES = (
    ("downloading packages", ("Retrieving", "Validating", "Resolving", "Checking", "Chosen", "Found")),
    ("extracting the base system", ("Extracting",)),
    ("installing packages", ("Installing", "Unpacking", "Configuring")),
)

Progress = Callable[[str], None]


class ImageError(TargetError):
    """An image cannot be built or used; the message names the release and the cause."""


@dataclass(frozen=True)
class Image:
    """A built image, as recorded in its manifest."""

    release: str
    path: Path
    mirror: str
    built_at: str
    build_seconds: float
    size_bytes: int
    smtpd_version: str
    packages: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def opensmtpd(self) -> str:
        return self.packages.get("opensmtpd", "?")

    def describe(self) -> str:
        return (
            f"{self.release}: {self.smtpd_version} (opensmtpd {self.opensmtpd}), "
            f"{self.size_bytes / 1e6:.0f} MB, built {self.built_at} in {self.build_seconds:.0f}s "
            f"from {self.mirror}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "mirror": self.mirror,
            "built_at": self.built_at,
            "build_seconds": round(self.build_seconds, 1),
            "size_bytes": self.size_bytes,
            "smtpd_version": self.smtpd_version,
            "packages": self.packages,
        }

    @classmethod
    def load(cls, path: Path) -> Image | None:
        """The image in `path`, or None where there is none (or only a broken one)."""
        try:
            data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            image = cls(
                release=str(data["release"]),
                path=path,
                mirror=str(data["mirror"]),
                built_at=str(data["built_at"]),
                build_seconds=float(data["build_seconds"]),
                size_bytes=int(data["size_bytes"]),
                smtpd_version=str(data["smtpd_version"]),
                packages={str(k): str(v) for k, v in data["packages"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return image if image.root.is_dir() else None


# -- where things are ---------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or CACHE_DIR)


def machine_release(os_release: Path = Path("/etc/os-release")) -> str:
    """This machine's Debian code name (bookworm here): the release that needs no image."""
    try:
        text = os_release.read_text(encoding="utf-8")
    except OSError:
        return ""
    m = re.search(r'^VERSION_CODENAME="?([^"\n]*)"?$', text, re.MULTILINE)
    return m.group(1) if m else ""


def check_release_name(release: str) -> str:
    """A name that can be a release (checked before anything is built or looked up)."""
    if not RELEASE_NAME.match(release):
        raise ImageError(f"image {release!r}: not a Debian release name (e.g. trixie)")
    return release


def check_release(release: str) -> str:
    """A Debian release debootstrap knows, or an ImageError listing the ones it does."""
    check_release_name(release)
    if shutil.which("debootstrap") is None:
        raise ImageError(f"image {release}: debootstrap is not installed: apt-get install debootstrap")
    known = debian_releases()
    if release not in known:
        raise ImageError(
            f"image {release}: not a Debian release this debootstrap knows (known: {', '.join(known)})"
        )
    return release


def debian_releases(scripts: Path = DEBOOTSTRAP_SCRIPTS) -> list[str]:
    """Code names whose debootstrap script is Debian's (the ones that link to sid's).

    Suite aliases (stable, testing, ...) are left out: an image named after one would silently
    become another release's.
    """
    if not scripts.is_dir():
        return []
    return sorted(
        p.name
        for p in scripts.iterdir()
        if p.resolve().name == "sid" and p.name not in SUITE_ALIASES and "-" not in p.name
    )


@dataclass(frozen=True)
class Mirror:
    """The Debian archive apt uses here: its URL and the keyring it is checked with."""

    url: str
    keyring: str | None = None


def apt_mirror(sources: tuple[Path, ...] = SOURCES, release: str | None = None) -> Mirror:
    """The mirror of this machine's main Debian suite, read from apt's sources (one-line or deb822).

    Using apt's own mirror keeps the build on the package registry this machine already uses.
    """
    release = release or machine_release()
    entries: list[tuple[list[str], list[str], str | None]] = []  # (uris, suites, signed-by)
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files.extend(sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources")))
        elif src.is_file():
            files.append(src)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        entries.extend(_deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text))
    for wanted in (release, None):  # the machine's own suite first, then any Debian-looking one
        for uris, suites, keyring in entries:
            if uris and (wanted in suites if wanted else any(re.fullmatch(r"[a-z]+", s) for s in suites)):
                return Mirror(uris[0].rstrip("/"), keyring if keyring and os.path.isfile(keyring) else None)
    where = ", ".join(str(s) for s in sources)
    raise ImageError(f"no Debian mirror in apt's sources ({where}): give one with --mirror URL")


def _deb822_entries(text: str) -> list[tuple[list[str], list[str], str | None]]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        signed = fields.get("signed-by", "").strip()
        out.append((fields.get("uris", "").split(), fields.get("suites", "").split(), signed or None))
    return out


def _one_line_entries(text: str) -> list[tuple[list[str], list[str], str | None]]:
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            signed = re.search(r"signed-by=(\S+)", m.group(1) or "")
            out.append(([m.group(2)], [m.group(3)], signed.group(1) if signed else None))
    return out


def _apt_proxy() -> dict[str, str]:
    """apt's configured HTTP proxy, for debootstrap (which reads only the environment)."""
    env = {}
    for scheme in ("http", "https"):
        proc = subprocess.run(
            ["apt-config", "shell", "P", f"Acquire::{scheme}::Proxy"],
            capture_output=True,
            text=True,
            check=False,
        )
        m = re.search(r"P='([^']*)'", proc.stdout)
        if m and m.group(1) and m.group(1).upper() != "DIRECT":
            env[f"{scheme}_proxy"] = m.group(1)
    return env


# -- locks --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, kind: int, waiting: str, progress: Progress) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(waiting)
            fcntl.flock(fd, kind)
        yield fd
    finally:
        os.close(fd)


def _build_lock(cache: Path, release: str) -> Path:
    return cache / f".{release}.build.lock"


def _use_lock(cache: Path, release: str) -> Path:
    return cache / f".{release}.lock"


class ImageLease:
    """A shared hold on an image: while open, no rebuild or `rm` changes it under a test host."""

    def __init__(self, image: Image, fd: int) -> None:
        self.image = image
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def use_image(release: str, progress: Progress | None = None, cache: Path | None = None) -> ImageLease:
    """The image of `release`, built if there is none yet, held shared until the lease is closed."""
    progress = progress or stderr_progress
    cache = cache or cache_dir()
    for _ in range(3):  # an `rm` between the build and the shared lock: build again
        image = ensure_image(release, progress=progress, cache=cache)
        lock = _use_lock(cache, release)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"image {release}: waiting for another run replacing or removing it")
                fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        current = Image.load(image.path)
        if current is not None:
            return ImageLease(current, fd)
        os.close(fd)
    raise ImageError(f"image {release}: removed by another run each time it was built")


# -- building -----------------------------------------------------------------------------------


def ensure_image(release: str, progress: Progress | None = None, cache: Path | None = None) -> Image:
    """The cached image of `release`; built now if there is none (built on first use)."""
    progress = progress or stderr_progress
    cache = cache or cache_dir()
    check_release_name(release)
    image = Image.load(cache / release)
    if image is not None:
        return image  # a cached image needs no debootstrap
    check_release(release)
    with _locked(
        _build_lock(cache, release),
        fcntl.LOCK_EX,
        f"image {release}: waiting for another run building it",
        progress,
    ) as lock:
        image = Image.load(cache / release)  # the run we waited for built it
        if image is not None:
            return image
        return _build_locked(release, cache, None, progress, lock)


def build_image(
    release: str, mirror: Mirror | None = None, progress: Progress | None = None, cache: Path | None = None
) -> Image:
    """Build (or rebuild) the image of `release`; the old one stays in use until the new one is ready."""
    progress = progress or stderr_progress
    cache = cache or cache_dir()
    check_release(release)
    with _locked(
        _build_lock(cache, release),
        fcntl.LOCK_EX,
        f"image {release}: waiting for another run building it",
        progress,
    ) as lock:
        return _build_locked(release, cache, mirror, progress, lock)


def _build_locked(release: str, cache: Path, mirror: Mirror | None, progress: Progress, lock: int) -> Image:
    _remove_stale(cache, release)
    mirror = mirror or apt_mirror()
    tmp = cache / f".{release}.build-{os.getpid()}"
    root = tmp / "root"
    _remove_tree(tmp)
    root.mkdir(parents=True)
    os.chmod(tmp, 0o755)
    started = time.monotonic()
    try:
        _debootstrap(release, root, mirror, progress, lock)
        _finish_root(root)
        image = _manifest(release, tmp, mirror, time.monotonic() - started)
        (tmp / MANIFEST).write_text(json.dumps(image.to_json(), indent=2) + "\n", encoding="utf-8")
        final = cache / release
        with _locked(
            _use_lock(cache, release),
            fcntl.LOCK_EX,
            f"image {release}: built; waiting for the runs using the old image to finish",
            progress,
        ):
            old = cache / f".{release}.old-{os.getpid()}"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
        _remove_tree(old)
    except BaseException:
        _remove_tree(tmp)
        raise
    built = Image.load(final)
    if built is None:
        raise ImageError(f"image {release}: built, but its manifest cannot be read back in {final}")
    progress(
        f"image {release}: built in {built.build_seconds:.0f}s, {built.size_bytes / 1e6:.0f} MB, "
        f"{built.smtpd_version}"
    )
    return built


def _debootstrap(release: str, root: Path, mirror: Mirror, progress: Progress, lock: int) -> None:
    """Run debootstrap, holding the build lock (inherited) for as long as it runs.

    If this process is killed, debootstrap goes on writing into the temp dir: passing it the lock
    keeps the next build (and `lab clean`) from removing that dir under it.
    """
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    if mirror.keyring:
        cmd.append(f"--keyring={mirror.keyring}")
    cmd += [release, str(root), mirror.url]
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
        **_apt_proxy(),
    }
    progress(f"image {release}: building with debootstrap from {mirror.url} (about a minute, once)")
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C reaches us, and we end its whole group
        pass_fds=(lock,),
    )
    assert proc.stdout is not None
    tail: list[str] = []
    phase = -1
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tail = [*tail[-19:], line]
            step = _phase(line)
            if step > phase:
                phase = step
                progress(f"image {release}: {PHASES[phase][0]}")
        rc = proc.wait()
    except BaseException:
        _end_group(proc)
        raise
    if rc != 0:
        raise ImageError(f"image {release}: debootstrap failed (exit {rc}): {_cause(tail, root)}")


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """debootstrap and everything it runs in the root (dpkg, maintainer scripts)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
            return


def _phase(line: str) -> int:
    word = line[3:].split(" ", 1)[0] if line.startswith("I: ") else ""
    return next((n for n, (_label, words) in enumerate(PHASES) if word in words), -1)


def _cause(tail: list[str], root: Path) -> str:
    """debootstrap's own error line with the reason its log gives, or the end of its output.

    debootstrap says what it failed to do (`Failed getting release file URL`); why (`wget: unable
    to resolve host address`, `Connection refused`, a dpkg error) is only in its log.
    """
    errors = [line for line in tail if line.startswith("E: ")]
    log = root / "debootstrap" / "debootstrap.log"
    detail = ""
    with contextlib.suppress(OSError):
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
        detail = " | ".join(dict.fromkeys(lines[-3:]))  # wget repeats itself for InRelease and Release
    if errors:
        return errors[-1][3:] + (f" (log: {detail})" if detail else "")
    return " | ".join(tail[-3:]) or "no output"


def _finish_root(root: Path) -> None:
    """What makes the root safe to keep and share: no daemon starts, no real DNS, no host keys."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC_D)
    policy.chmod(0o755)
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text(RESOLV_CONF)
    (root / "etc/hostname").write_text("relay-harness-image\n")
    for key in (root / "etc/ssh").glob("ssh_host_*"):  # every test host gets the lab's own key
        key.unlink()
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def _manifest(release: str, path: Path, mirror: Mirror, seconds: float) -> Image:
    root = path / "root"
    query = subprocess.run(
        ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f", "${Package}\t${Version}\n"],
        capture_output=True,
        text=True,
        check=False,
    )
    if query.returncode != 0:
        raise ImageError(f"image {release}: dpkg-query in the root failed: {query.stderr.strip()}")
    packages = dict(line.split("\t", 1) for line in query.stdout.splitlines() if "\t" in line)
    for pkg in PACKAGES:
        if pkg not in packages:
            raise ImageError(f"image {release}: {pkg} is not installed in the root")
    version = subprocess.run(
        ["chroot", str(root), "/usr/sbin/smtpd", "-h"], capture_output=True, text=True, check=False
    )
    m = re.search(r"version:\s*(.+)", version.stdout + version.stderr)
    if not m:
        raise ImageError(
            f"image {release}: smtpd -h in the root printed no version: {version.stderr.strip()}"
        )
    return Image(
        release=release,
        path=path,
        mirror=mirror.url,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=seconds,
        size_bytes=_tree_size(root),
        smtpd_version=m.group(1).strip(),
        packages=packages,
    )


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# -- listing, removing, cleaning ---------------------------------------------------------------


def list_images(cache: Path | None = None) -> list[Image]:
    cache = cache or cache_dir()
    if not cache.is_dir():
        return []
    images = (Image.load(p) for p in sorted(cache.iterdir()) if not p.name.startswith("."))
    return [i for i in images if i is not None]


def remove_image(release: str, progress: Progress | None = None, cache: Path | None = None) -> bool:
    """Remove the image of `release` (waiting for runs that use it); False if there was none."""
    progress = progress or stderr_progress
    cache = cache or cache_dir()
    check_release_name(release)
    final = cache / release
    if not final.exists():
        return False
    with _locked(
        _use_lock(cache, release),
        fcntl.LOCK_EX,
        f"image {release}: waiting for the runs using it to finish",
        progress,
    ):
        gone = cache / f".{release}.old-{os.getpid()}"
        final.rename(gone)
    _remove_tree(gone)
    return True


_TEMP = re.compile(r"^\.(?P<release>[a-z][a-z0-9-]*)\.(?:build|old)-(?P<pid>\d+)$")


def clean_stale_images(cache: Path | None = None) -> list[Path]:
    """Remove the temp dirs of builds and swaps whose run is gone (a killed build leaves one)."""
    cache = cache or cache_dir()
    removed: list[Path] = []
    if not cache.is_dir():
        return removed
    for path in sorted(cache.iterdir()):
        m = _TEMP.match(path.name)
        if m and not _alive(int(m.group("pid"))):
            # The build lock is held by a build's debootstrap too (inherited): a temp dir of a
            # build that still runs, in another PID namespace, is left alone.
            with _locked_nb(_build_lock(cache, m.group("release"))) as got:
                if got:
                    _remove_tree(path)
                    removed.append(path)
    return removed


def _remove_stale(cache: Path, release: str) -> None:
    """Under the build lock: every temp dir of this release is a dead build's."""
    for path in sorted(cache.glob(f".{release}.*-*")):
        m = _TEMP.match(path.name)
        if m and m.group("release") == release and not _alive(int(m.group("pid"))):
            _remove_tree(path)


@contextlib.contextmanager
def _locked_nb(path: Path) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """rm -rf, after unmounting whatever a killed debootstrap left mounted inside (/proc, /sys)."""
    if not path.exists():
        return
    prefix = os.path.realpath(path) + "/"
    for mount in sorted(_mount_points(), key=len, reverse=True):
        if mount.startswith(prefix):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    if any(m.startswith(prefix) for m in _mount_points()):
        raise ImageError(f"cannot remove {path}: something is still mounted inside it")
    shutil.rmtree(path, ignore_errors=True)


def _mount_points() -> list[str]:
    points = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4:
                points.append(fields[4].encode().decode("unicode_escape"))
    return points


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stderr_progress(line: str) -> None:
    """The progress line: one line per step on stderr, so CI logs and terminals read alike."""
    print(f"relay-harness: {line}", file=sys.stderr, flush=True)
