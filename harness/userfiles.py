"""Files the user names on the command line or in a scenario: read and written with one clear error.

Every input file goes through `read_bytes`/`read_text` and every output through `Output`, so no
command can print a traceback for a directory, a FIFO, /proc/self/mem, a 4 GiB file or a stray
Latin-1 byte, and none blocks: a FIFO is read with a deadline (process substitution, `<(...)`,
works), any other special file is refused. Outputs are checked before any work starts, so a
check that passed is not turned into an error by a report it cannot write, and a regular file is
replaced atomically: the previous report stays whole until the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from harness.errors import HarnessError

MAX_BYTES = 64 << 20  # larger than any profile, table or baseline a person keeps
# An smtpd.conf is a few KiB; the harness parses it a character at a time as smtpd does (about
# 5 s a MiB here), so a bigger one is refused rather than parsed for minutes.
MAX_CONFIG_BYTES = 1 << 20
FIFO_TIMEOUT = 10.0  # seconds a FIFO's writer gets to finish (e.g. `--table secrets=<(vault ...)`)


class UserFileError(HarnessError):
    """A file the user named cannot be used; str() names it (and the line) and the cause."""

    def __init__(
        self, path: str | Path, message: str, line: int | None = None, flag: str | None = None
    ) -> None:
        self.path, self.line, self.message = str(path), line, message
        where = f"{path}:{line}" if line else str(path)
        if flag:  # `--table aliases=` reads as typed: --table aliases=FILE
            where = f"{flag}{where}" if flag.endswith("=") else f"{flag} {where}"
        super().__init__(f"{where}: {message}")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: Path, flag: str | None = None, limit: int = MAX_BYTES) -> bytes:
    """The file's bytes, or UserFileError: missing, unreadable, not a file, a silent FIFO, too large."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UserFileError(path, f"cannot read: {exc.strerror}", flag=flag) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode):
            return _read_fifo(fd, path, flag, limit)
        if not stat.S_ISREG(mode):
            raise UserFileError(path, f"is {_kind(mode)}, not a file", flag=flag)
        size = os.fstat(fd).st_size
        if size > limit:
            raise UserFileError(path, f"too large ({size} bytes; at most {_size(limit)})", flag=flag)
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 1 << 20):  # /proc and friends say size 0: read up to the limit
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise UserFileError(path, f"too large (more than {_size(limit)})", flag=flag)
        return b"".join(chunks)
    except OSError as exc:
        raise UserFileError(path, f"cannot read: {exc.strerror or exc}", flag=flag) from None
    finally:
        os.close(fd)


def _read_fifo(fd: int, path: Path, flag: str | None, limit: int) -> bytes:
    """A FIFO's content until its writer closes it, within FIFO_TIMEOUT; never blocks for ever."""
    deadline = time.monotonic() + FIFO_TIMEOUT
    data = b""
    while True:
        try:  # read first: with no writer, read says EOF at once while select would wait
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise UserFileError(
                    path, f"is a FIFO whose writer did not finish within {FIFO_TIMEOUT:g}s", flag=flag
                ) from None
            continue
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise UserFileError(path, f"too large (more than {_size(limit)})", flag=flag)
    if not data:
        raise UserFileError(path, "is a FIFO nobody wrote to: give a regular file", flag=flag)
    return data


def decode_text(data: bytes, path: str | Path, flag: str | None = None) -> str:
    """UTF-8 text without NUL bytes, or UserFileError naming the line of the first bad byte."""
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise UserFileError(path, "contains a NUL byte: not a text file", line, flag)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserFileError(
            path,
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}): save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)",
            line,
            flag,
        ) from None


def read_text(path: Path, flag: str | None = None, limit: int = MAX_BYTES) -> str:
    return decode_text(read_bytes(path, flag, limit), path, flag)


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class Output:
    """A file the command will write at the end, checked now: where it can go, and that it can.

    A regular file (or a new one) is written to a temporary file beside it and renamed over it;
    a FIFO or a device (`/dev/stdout`, `>(...)`) is opened now, without blocking (a FIFO nobody
    reads is an error), and written at the end.
    """

    def __init__(self, path: Path, flag: str, inputs: Iterable[Path] = ()) -> None:
        self.flag = flag
        given = path if str(path) else Path(".")
        self.path = Path(os.path.realpath(given))  # where a regular file is replaced (not a symlink)
        self._fd: int | None = None
        shown = str(path) or "''"
        for source in inputs:
            if same_file(given, source):
                raise UserFileError(
                    shown,
                    f"is also an input of this command ({source}): writing it would destroy it",
                    flag=flag,
                )
        try:
            st = os.stat(given)
        except FileNotFoundError:
            self._check_parent(shown)
            return
        except OSError as exc:
            raise UserFileError(shown, f"cannot write there: {exc.strerror}", flag=flag) from None
        if stat.S_ISREG(st.st_mode):
            if not os.access(given, os.W_OK):
                raise UserFileError(shown, "not writable", flag=flag)
            self._check_parent(shown)
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
            try:
                self._fd = os.open(given, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    raise UserFileError(shown, "is a FIFO nobody reads", flag=flag) from None
                raise UserFileError(shown, f"cannot write: {exc.strerror}", flag=flag) from None
            os.set_blocking(self._fd, True)
        else:
            raise UserFileError(shown, f"is {_kind(st.st_mode)}: give a file name", flag=flag)

    def _check_parent(self, shown: str) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise UserFileError(shown, f"directory {parent} does not exist", flag=self.flag)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserFileError(shown, f"not writable: cannot create files in {parent}", flag=self.flag)

    def same_as(self, other: Output) -> bool:
        return self.path == other.path or same_file(self.path, other.path)

    def write(self, data: bytes) -> None:
        try:
            if self._fd is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                return
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(tmp, stat.S_IMODE(os.stat(self.path).st_mode))
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise UserFileError(self.path, f"cannot write: {exc.strerror or exc}", flag=self.flag) from None
        finally:
            self.close()

    def open_append(self) -> TextIO:
        """A line-buffered text file appending to it (a record of sessions, one JSON line each)."""
        try:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                return os.fdopen(fd, "w", encoding="utf-8", buffering=1)
            return self.path.open("a", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise UserFileError(self.path, f"cannot write: {exc.strerror or exc}", flag=self.flag) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def outputs(flags: dict[str, Path | None], inputs: Iterable[Path] = ()) -> dict[str, Output]:
    """Every output flag that was given, checked; two flags naming one file is an error too."""
    inputs = list(inputs)
    out: dict[str, Output] = {}
    for flag, path in flags.items():
        if path is None:
            continue
        output = Output(path, flag, inputs)
        for other_flag, other in out.items():
            if output.same_as(other):
                other.close()
                output.close()
                raise UserFileError(path, f"{other_flag} and {flag} name the same file", flag=flag)
        out[flag] = output
    return out
