"""Run `relay-harness` command lines by the hundred: a fork server with the harness imported.

A fresh interpreter costs about a second here (paramiko and cryptography load slowly on a shared
2-core machine), and the bad-input suites run hundreds of command lines. So one server process
imports the harness once and forks a child per command line: the child is a fresh process as
far as the command can tell (own process group, stdin /dev/null, stdout and stderr to files, no
logging handler configured, default signal dispositions) and runs `harness.cli.main` exactly as
the console script does, an uncaught exception printing its traceback as the interpreter would.
The server waits for the child on a pidfd with the case's timeout and kills its whole process
group at the end, saying whether anything of it was left running.

The server is single threaded (forking a multi-threaded process, such as a pytest-xdist worker,
can copy a lock another thread holds); requests and results are JSON lines on its stdin/stdout.
Run as a script, this file is the server; imported, it is the client (`CliRunner`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAB_BUILT = "relay-harness-test: a lab test host was being built"


@dataclass(frozen=True)
class Outcome:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    stopped: bool  # sent SIGTERM because stdout matched `until` (the command was running as meant)
    left_running: bool  # processes of the command's group still alive after it exited
    pid: int

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (
            f"relay-harness {' '.join(self.argv)}\n  rc={self.rc} seconds={self.seconds:.2f}"
            f"{' TIMED OUT' if self.timed_out else ''}{' STOPPED' if self.stopped else ''}"
            f"{' LEFT PROCESSES RUNNING' if self.left_running else ''}\n"
            f"  stdout: {self.stdout[-2000:]!r}\n  stderr: {self.stderr[-4000:]!r}"
        )


class CliRunner:
    """The client: starts the server and sends it one command line at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the CLI fork server did not start: {ready!r}")

    def run(
        self,
        argv: list[str],
        cwd: Path,
        timeout: float = 20.0,
        env: dict[str, str] | None = None,
        forbid_lab: bool = True,
        until: str | None = None,
    ) -> Outcome:
        """One command line.

        forbid_lab: building a test host ends the command (exit 99, LAB_BUILT on stderr).
        until: a regex; once stdout matches it the command is sent SIGTERM (a server that started).
        """
        request = {
            "argv": argv,
            "cwd": str(cwd),
            "timeout": timeout,
            "env": env or {},
            "forbid_lab": forbid_lab,
            "until": until,
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the CLI fork server died")
        data = json.loads(line)
        return Outcome(tuple(argv), **data)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- the server ------------------------------------------------------------------------------------
def _no_dns() -> None:
    """Names resolve as if no resolver answered: a fuzzed host name must never become a DNS query
    (the project talks to loopback only); IP literals pass."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(
        host: Any, port: Any = None, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        try:
            return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            if host in (None, "localhost"):
                return real(host, port, family, type, proto, flags)
            raise socket.gaierror(
                socket.EAI_NONAME, "Name or service not known (DNS is off in this test)"
            ) from None

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.gethostbyname = lambda host: getaddrinfo(host, None)[0][4][0]  # type: ignore[assignment]


def _child(request: dict[str, Any], out: int, err: str) -> None:
    """In the forked child: become a fresh `relay-harness` process and run the command line."""
    import atexit
    import logging
    import threading
    import traceback

    rc = 1
    try:
        os.setpgid(0, 0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.close(out)
        os.dup2(os.open(err, os.O_WRONLY | os.O_TRUNC), 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        logging.root.handlers.clear()
        _no_dns()
        if request["forbid_lab"]:
            from harness.targets import lab

            def refuse(*args: object, **kwargs: object) -> None:
                print(LAB_BUILT, file=sys.stderr, flush=True)
                os._exit(99)

            lab.Lab.__init__ = refuse  # type: ignore[method-assign,assignment]
        from harness.cli import main

        sys.argv = ["relay-harness", *request["argv"]]
        try:
            code = main(request["argv"])
            rc = code if isinstance(code, int) else 0
        except SystemExit as exc:  # argparse, as the interpreter handles it
            if exc.code is None:
                rc = 0
            elif isinstance(exc.code, int):
                rc = exc.code
            else:
                print(exc.code, file=sys.stderr)
                rc = 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join(timeout=5)
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(rc)


def _serve_one(request: dict[str, Any]) -> dict[str, Any]:
    """Fork, run, wait on a pidfd (and stdout, for `until`) until exit or the timeout."""
    # mkdtemp, not TemporaryDirectory: the child runs atexit hooks, which would remove the latter.
    tmp = tempfile.mkdtemp(prefix="rh-cli-runner-")
    try:
        err = os.path.join(tmp, "stderr")
        Path(err).touch()
        out_r, out_w = os.pipe()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            _child(request, out_w, err)
        os.close(out_w)
        os.set_blocking(out_r, False)
        pidfd = os.pidfd_open(pid)
        until = re.compile(request["until"]) if request.get("until") else None
        deadline = started + request["timeout"]
        stdout, stopped, timed_out, exited = b"", False, False, False
        while not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([pidfd, out_r], [], [], left)
            if out_r in ready:
                chunk = os.read(out_r, 65536)
                stdout += chunk
                if not chunk:
                    os.close(out_r)
                    out_r = -1
            if until is not None and not stopped and until.search(stdout.decode(errors="replace")):
                stopped = True
                os.killpg(pid, signal.SIGTERM)
            exited = pidfd in ready
            if out_r == -1 and not exited:  # stdout closed: only the exit is left to wait for
                ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
                exited = bool(ready)
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        if out_r != -1:
            os.set_blocking(out_r, True)
            os.set_blocking(out_r, False)
            try:
                while chunk := os.read(out_r, 65536):
                    stdout += chunk
            except BlockingIOError:
                pass
            os.close(out_r)
        seconds = time.monotonic() - started
        left_running = False
        try:
            os.killpg(pid, 0)
            left_running = True
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return {
            "rc": os.waitstatus_to_exitcode(status),
            "stdout": stdout.decode(errors="replace"),
            "stderr": Path(err).read_text(errors="replace"),
            "seconds": seconds,
            "timed_out": timed_out,
            "stopped": stopped,
            "left_running": left_running,
            "pid": pid,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def serve() -> None:
    # Import what the commands import, once: each fork then starts warm.
    import harness.accept.run
    import harness.check
    import harness.cli
    import harness.report
    import harness.scenarios
    import harness.targets.lab  # noqa: F401

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        result = _serve_one(json.loads(line))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
