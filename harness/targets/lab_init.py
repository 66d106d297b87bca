"""The first process of a test host: builds its private root, starts sshd, ends the host with its owner.

The lab runs this file with the machine's python (`python3 -I -S lab_init.py relay-harness-host
NAME OWNER_PID OWNER_START LAB_DIR`) as PID 1 of fresh network, mount, UTS, IPC and PID
namespaces (`unshare ... --pid --fork --kill-child`). Standard library only, and everything it
needs is imported before it changes its root: after `pivot_root` the machine's files are gone
from its view (with an image as the lower root, the python library there may not even exist).

The root it builds (DESIGN.md: "The test host is a sealed, faithful copy"):
- a tmpfs as `/`; for every top-level directory of the lower root (the machine's `/`, or a
  directory holding another Debian release) an overlay whose writes go to a second tmpfs, so a
  file the config names anywhere (/usr/local/etc/mail, /srv, /opt, /home/u, a new top-level
  directory) and every write smtpd or an mda makes stay inside; symlinks (merged /usr) copied;
- every other mount below the lower root an overlay of its own (a separate /home or /var/lib is
  seen as on the real host), read-only where overlayfs refuses it (said in a note);
- fresh /proc (this PID namespace), /sys (read-only, this network namespace), /dev (a few device
  nodes, its own devpts), /run, /tmp, /var/spool, /var/mail, /var/log and /root.
Both tmpfs vanish with the mount namespace: a test host leaves nothing on the disk.

Protocol with the lab, one line each on stdout (sshd's own stderr shares it): `pid N` (this
process as the machine sees it), `note TEXT`, `built`, `sshd N`, `kept`, `error TEXT`. On stdin:
one JSON line (the spec), then `start` (the network is up: start sshd), then `keep` (optional). stdin is
the lifeline: at its end (the owner exited, was killed, or closed it) this process exits, and the
kernel ends every process of the PID namespace with it; so does the network namespace and, with
it, the veth. `keep` (pytest --relay-keep) makes it outlive its owner until `lab clean`; it
writes /run/relay-harness/kept in the host's root, where a cleaner in any namespace sees it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import json
import os
import platform
import select
import signal
import socket
import stat
import sys
from typing import Any

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND = 0x20, 0x1000
MNT_DETACH = 0x2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217, "i686": 217}
# Made fresh instead of overlaid: they belong to this host alone (kernel views, or state a test
# must start without: spool, mailboxes, logs, root's start-up files).
FRESH_TOP = ("proc", "sys", "dev", "run", "tmp")
FRESH_BELOW = (("var/spool", 0o755), ("var/mail", 0o1777), ("var/log", 0o755), ("root", 0o700))
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
TOP_FILE_LIMIT = 16 << 20  # a top-level regular file (/.dockerenv) is copied; a huge one is not

libc = ctypes.CDLL(None, use_errno=True)


def say(*words: object) -> None:
    print("relay-harness-init", *words, flush=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    rc = libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(rc, f"mount {fstype or 'bind'} {source} on {target}")


def _escape(path: str) -> str:
    """overlayfs option syntax: `,` separates options, `:` separates lower layers."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


class Builder:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.lower: str = os.path.realpath(spec["lower"])
        self.new: str = spec["newroot"]
        self.layers: str = spec["layers"]
        self.skip: tuple[str, ...] = tuple(spec.get("skip", ()))
        self.count = 0

    def build(self) -> None:
        submounts = self._submounts()  # read before our own mounts join the list
        mount("rh-root", self.new, "tmpfs", 0, "mode=0755")
        mount("rh-layers", self.layers, "tmpfs", 0, "mode=0700")
        for name in sorted(os.listdir(self.lower)):
            self._top(name)
        for relative in submounts:
            self._submount(relative)
        self._fresh()

    # -- the lower root, overlaid -------------------------------------------------------------
    def _top(self, name: str) -> None:
        source, target = os.path.join(self.lower, name), os.path.join(self.new, name)
        st = os.lstat(source)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(target)
            os.chown(target, st.st_uid, st.st_gid)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            if name not in FRESH_TOP and source not in self.skip:
                self._overlay(source, target)
        elif stat.S_ISREG(st.st_mode) and st.st_size <= TOP_FILE_LIMIT:
            self._copy(source, target, st)

    def _overlay(self, source: str, target: str) -> None:
        self.count += 1
        upper, work = f"{self.layers}/{self.count}/u", f"{self.layers}/{self.count}/w"
        os.makedirs(upper)
        os.mkdir(work)
        st = os.stat(source)
        os.chown(upper, st.st_uid, st.st_gid)
        os.chmod(upper, stat.S_IMODE(st.st_mode))
        options = f"lowerdir={_escape(source)},upperdir={upper},workdir={work}"
        try:
            mount("rh-overlay", target, "overlay", 0, options)
        except OSError as exc:
            # overlayfs refuses some lowers (a third level of stacking, some file systems): the
            # tree is then seen read-only, still never written.
            mount(source, target, None, MS_BIND)
            mount(source, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
            say("note", f"{source[len(self.lower) :] or '/'} is read-only in the test host ({exc.strerror})")

    @staticmethod
    def _copy(source: str, target: str, st: os.stat_result) -> None:
        with open(source, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        os.chown(target, st.st_uid, st.st_gid)
        os.chmod(target, stat.S_IMODE(st.st_mode))

    def _submounts(self) -> list[str]:
        """Mount points below the lower root, relative to it, parents first."""
        found = []
        prefix = self.lower.rstrip("/") + "/"
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                point = _unescape(line.split()[4].decode("utf-8", "surrogateescape"))
                if not point.startswith(prefix) or any(
                    point == s or point.startswith(s + "/") for s in self.skip
                ):
                    continue
                relative = point[len(prefix) :]
                if "/" not in relative or relative.split("/")[0] in FRESH_TOP:
                    continue  # a top-level mount is its directory's overlay already
                if any(relative == p or relative.startswith(p + "/") for p, _ in FRESH_BELOW):
                    continue
                found.append(relative)
        return sorted(set(found), key=lambda p: (p.count("/"), p))

    def _submount(self, relative: str) -> None:
        source, target = os.path.join(self.lower, relative), os.path.join(self.new, relative)
        try:
            st = os.stat(source)
            if stat.S_ISDIR(st.st_mode) and os.path.isdir(target) and not os.path.islink(target):
                self._overlay(source, target)
            elif stat.S_ISREG(st.st_mode) and st.st_size <= TOP_FILE_LIMIT and not os.path.islink(target):
                self._copy(source, target, st)  # a bind-mounted file (a container's /etc/hosts)
        except OSError as exc:
            say("note", f"/{relative} (a mount on this machine) is not in the test host: {exc.strerror}")

    # -- what is the host's own ---------------------------------------------------------------
    def _fresh(self) -> None:
        new = self.new
        for name in FRESH_TOP:
            os.makedirs(f"{new}/{name}", 0o755, exist_ok=True)  # an image may lack one
        mount("proc", f"{new}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for path in ("sys", "sysrq-trigger"):  # the machine's kernel settings stay the machine's
            if not os.path.exists(f"{new}/proc/{path}"):
                continue
            mount(f"{new}/proc/{path}", f"{new}/proc/{path}", None, MS_BIND)
            mount(f"{new}/proc/{path}", f"{new}/proc/{path}", None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        mount("sysfs", f"{new}/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        dev = f"{new}/dev"
        mount("rh-dev", dev, "tmpfs", MS_NOSUID, "mode=0755")
        for name in DEVICES:
            if os.path.exists(f"/dev/{name}"):
                open(f"{dev}/{name}", "w").close()
                mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
        os.mkdir(f"{dev}/pts")
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        os.mkdir(f"{dev}/shm")
        mount("rh-shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for name, fd in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
            os.symlink(f"/proc/self/fd{fd}", f"{dev}/{name}")
        self._tmpfs("run", 0o755)
        for path, mode in (("run/sshd", 0o755), ("run/lock", 0o1777), ("run/relay-harness", 0o700)):
            os.mkdir(f"{new}/{path}")
            os.chmod(f"{new}/{path}", mode)
        self._tmpfs("tmp", 0o1777)
        for path, mode in FRESH_BELOW:
            self._tmpfs(path, mode)
        os.mkdir(f"{new}/var/spool/smtpd")
        os.chmod(f"{new}/var/spool/smtpd", 0o711)

    def _tmpfs(self, relative: str, mode: int) -> None:
        """A fresh tmpfs with the owner and mode the lower root's directory has (else `mode`)."""
        target = os.path.join(self.new, relative)
        uid = gid = 0
        try:
            st = os.stat(os.path.join(self.lower, relative))
            uid, gid, mode = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
        except FileNotFoundError:
            pass
        if os.path.islink(target):  # /var/mail -> spool/mail: the directory it names, inside
            link = os.readlink(target)
            target = self.new + link if os.path.isabs(link) else os.path.join(os.path.dirname(target), link)
        os.makedirs(target, exist_ok=True)
        mount(f"rh-{relative.replace('/', '-')}", target, "tmpfs", 0, f"mode={mode:o},uid={uid},gid={gid}")

    def pivot(self) -> None:
        os.chdir(self.new)
        number = SYS_PIVOT_ROOT.get(platform.machine())
        if number is None:
            raise OSError(0, f"pivot_root: unknown system call number on {platform.machine()}")
        _check(libc.syscall(number, b".", b"."), "pivot_root")
        _check(libc.umount2(b".", MNT_DETACH), "umount the machine's root")
        os.chdir("/")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def seed(files: list[list[Any]]) -> None:
    """The host's own files (hosts, resolv.conf, sshd's keys), written inside its new root.

    After pivot_root: an absolute symlink (resolv.conf -> /run/...) then resolves inside the test
    host, never on the machine. The old file is removed first, never written through.
    """
    for path, mode, content in files:
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.write(fd, base64.b64decode(content))
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def quiet_dad() -> None:
    """No IPv6 duplicate address detection in this network namespace: an address still
    `tentative` cannot be bound, and smtpd's `listen on eth0` would fail for a second."""
    for scope in ("all", "default"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{scope}/accept_dad", "w") as fh:
                fh.write("0")
        except OSError:
            pass  # IPv6 disabled: nothing to detect


class Lifeline:
    """stdin, read without buffering: the spec and commands, and its end (the owner gone)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.ended = False

    def feed(self) -> None:
        data = os.read(0, 65536)
        self.buffer += data
        self.ended = not data

    def line(self) -> bytes | None:
        """The next whole line, waiting for it; None once stdin has ended."""
        while b"\n" not in self.buffer:
            if self.ended:
                return None
            self.feed()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def spawn(argv: list[str], stderr: int) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(stderr, 2)
            os.execve(argv[0], argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        finally:
            os._exit(127)
    return pid


def forward(data: bytes) -> None:
    """sshd's log to the owner; once the owner is gone (a kept host), nowhere."""
    with contextlib.suppress(OSError):
        os.write(1, data)


def serve(life: Lifeline, argv: list[str]) -> None:
    """sshd runs, its log relayed, until stdin ends (or, kept, until killed).

    sshd's end is told only after the last of its log: said from the SIGCHLD handler, it reached
    the owner before the lines that say why sshd stopped (`sshd did not start:` and nothing).
    """
    log_r, log_w = os.pipe()
    sshd = spawn(argv, log_w)
    os.close(log_w)
    ended: dict[int, int] = {}

    def reap(signum: int, frame: object) -> None:
        # PID 1 inherits every orphan (smtpd once its SSH session ends): reap them all.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == sshd:
                ended[sshd] = os.waitstatus_to_exitcode(status)

    signal.signal(signal.SIGCHLD, reap)
    reap(signal.SIGCHLD, None)
    say("sshd", sshd)
    kept = False
    watched = [0, log_r]
    while watched:
        ready, _, _ = select.select(watched, [], [])
        if log_r in ready:
            data = os.read(log_r, 65536)
            if data:
                forward(data)
            else:
                # No one writes sshd's log any more: sshd is ending, if it has not ended.
                watched.remove(log_r)
                forward(f"relay-harness-init exited sshd {_end_of(sshd, ended)}\n".encode())
        if 0 in ready:
            life.feed()
            while b"\n" in life.buffer:
                line, _, life.buffer = life.buffer.partition(b"\n")
                if line == b"keep" and not kept:
                    kept = True
                    # Seen by cleaners in any namespace through /proc/PID/root (lab.KEPT_MARKER).
                    os.close(os.open("/run/relay-harness/kept", os.O_WRONLY | os.O_CREAT, 0o600))
                    say("kept")
            if life.ended:
                if not kept:
                    return
                watched.remove(0)
    while kept:
        signal.pause()  # until `lab clean` ends it


def _end_of(pid: int, ended: dict[int, int], timeout: float = 5.0) -> int:
    """The exit code of a child whose output has ended, once it has exited (its pidfd says so;
    bounded, so that PID 1 never stops reading its lifeline); -1 if it lives on. The SIGCHLD
    handler may have reaped it already and written it down."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return ended.get(pid, -1)  # reaped already
    try:
        select.select([fd], [], [], timeout)
        reaped, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if reaped else ended.get(pid, -1)
    except ChildProcessError:
        return ended.get(pid, -1)
    finally:
        os.close(fd)


def main() -> None:
    outside = int(os.readlink("/proc/self"))  # still the machine's /proc: the machine's pid
    quiet_dad()
    say("pid", outside)
    life = Lifeline()
    line = life.line()
    if line is None:
        return
    spec = json.loads(line)
    # The lab dir's owner lock (lab._owned_dir), held for as long as this host lives, by this
    # process alone (not unshare, not sshd): every cleaner, in any namespace and of any version,
    # spares the dir of a live host, a kept one included, and finds it free once the host is gone.
    lock = os.open(spec["owner_lock"], os.O_RDONLY | os.O_CLOEXEC)
    fcntl.flock(lock, fcntl.LOCK_SH)
    builder = Builder(spec)
    builder.build()
    builder.pivot()
    seed(spec["files"])
    socket.sethostname(spec["hostname"].encode())
    say("built")
    if life.line() != b"start":
        return  # the owner is gone (or gave up) before the network was up
    serve(life, spec["sshd"])


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # one line for the lab to quote, never a traceback
        say("error", f"{type(exc).__name__}: {exc}")
        sys.exit(1)
