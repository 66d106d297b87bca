"""What the bad-input suites share: the inputs that are right, a workspace, the verdict on a run.

The verdict is the project's promise for bad input (README, "Exit codes"): exit 2, exactly one
line on stderr that starts `relay-harness` and names the file, line, field or host and the cause,
nothing on stdout, no Python traceback anywhere, no test host built, no process left running,
and nothing in the workspace created or changed (every case runs in a fresh one, and the files
it reads and writes live there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from cli_runner import LAB_BUILT, Outcome

DATA = Path(__file__).parent / "data" / "check"
GOOD_CONF = (DATA / "good.conf").read_text()
GOOD_PROFILE = (DATA / "provider.toml").read_text()
GOOD_ALIASES = (DATA / "aliases").read_text()
GOOD_SECRETS = (DATA / "secrets").read_text()
GOOD_SCENARIO = """\
description = "a scenario that loads: the base every malformed one is one edit away from"
config = '''
table aliases file:/etc/mail/aliases
table secrets file:/etc/mail/secrets
listen on socket
action "local_mail" mbox alias <aliases>
action "outbound" relay host smtp+tls://label@smtp.example.net:587 auth <secrets> mail-from "@example.org"
match from local for local action "local_mail"
match from local for any action "outbound"
'''

[tables]
aliases = "root: alice\\n"
secrets = "label alice@example.org:scenario-pw-1\\n"

[upstream]
host = "smtp.example.net"
sender_domains = ["example.org"]
[[upstream.credentials]]
user = "alice@example.org"
password = "scenario-pw-1"

[[case]]
name = "relayed"
send = { to = ["bob@example.com"] }
[case.expect]
relayed = true
mail_from = "root@example.org"

[[case]]
name = "no-starttls"
twin_of = "relayed"
upstream = { tls = "none", auth = "none" }
[case.expect]
relayed = false
log = ["mta error reason=TLS required but not supported by remote host"]
"""
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s+File \".*\", line \d+", re.MULTILINE)
Snapshot = dict[str, tuple[str, int, str]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under root: kind, mode and content hash (FIFOs and sockets are not read)."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                if st.st_size > 1 << 24:  # big sparse inputs: size and mtime stand for the content
                    digest = f"size={st.st_size} mtime={st.st_mtime_ns}"
                else:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (stat.filemode(st.st_mode), st.st_size, digest)
    return out


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    out = [f"created {p}" for p in sorted(after.keys() - before.keys())]
    out += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    out += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return out


def problems(outcome: Outcome, patterns: tuple[str, ...], changed: list[str]) -> list[str]:
    """Why this run is not a clean usage error (empty: it is)."""
    out = []
    if outcome.timed_out:
        out.append(f"did not finish within {outcome.seconds:.0f}s (blocked?)")
    if TRACEBACK.search(outcome.output):
        out.append("a Python traceback was printed")
    if LAB_BUILT in outcome.stderr:
        out.append("a lab test host was built before the input was refused")
    if outcome.rc != 2:
        out.append(f"exit {outcome.rc}, not 2")
    if outcome.stdout.strip():
        out.append("stdout is not empty")
    lines = outcome.stderr.splitlines()
    if len(lines) != 1:
        out.append(f"stderr has {len(lines)} lines, not one")
    line = lines[-1] if lines else ""
    if lines and not line.startswith("relay-harness"):
        out.append("the error line does not start with `relay-harness`")
    for pattern in patterns:
        if not re.search(pattern, line):
            out.append(f"the error line does not say {pattern!r}")
    if outcome.left_running:
        out.append("processes were left running")
    out.extend(changed)
    return out


class Workspace:
    """A fresh directory per case, with helpers to put good and hostile files in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.immutable: list[Path] = []
        self.peers: dict[str, int] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def file(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def dir(self, name: str) -> str:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def fifo(self, name: str) -> str:
        path = self.root / name
        os.mkfifo(path)
        return str(path)

    def sparse(self, name: str, size: int = 4 << 30) -> str:
        """A file of `size` bytes (4 GiB by default) that takes no space: reading it all would."""
        path = self.root / name
        with path.open("wb") as fh:
            fh.truncate(size)
        return str(path)

    def locked(self, name: str, content: bytes | str = b"") -> str:
        """A file even root cannot write (chattr +i), or a directory no file can be created in."""
        path = self.root / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            self.file(name, content)
        subprocess.run(["chattr", "+i", str(path)], check=True)
        self.immutable.append(path)
        return str(path)

    def release(self) -> None:
        for path in self.immutable:
            subprocess.run(["chattr", "-i", str(path)], check=False)

    # -- the right inputs, for everything but the one bad thing a case is about ------------------
    def config(self, text: bytes | str = GOOD_CONF, name: str = "smtpd.conf") -> str:
        return self.file(name, text)

    def profile(self, text: bytes | str = GOOD_PROFILE, name: str = "provider.toml") -> str:
        return self.file(name, text)

    def tables(self, aliases: bytes | str = GOOD_ALIASES, secrets: bytes | str = GOOD_SECRETS) -> list[str]:
        return [
            "--table",
            f"aliases={self.file('aliases', aliases)}",
            "--table",
            f"secrets={self.file('secrets', secrets)}",
        ]

    def check(self, *extra: str, config: str | None = None, profile: str | None = None) -> list[str]:
        """`relay-harness check` with good inputs, except what the arguments replace."""
        argv = ["check", config or self.config(), "--upstream", profile or self.profile()]
        if not any(a == "--table" for a in extra):
            argv += self.tables()
        return [*argv, *extra]

    def scenario(self, text: bytes | str, name: str = "bad.toml") -> list[str]:
        """`relay-harness scenarios DIR` over a library of this one scenario."""
        self.file(f"lib/{name}", text)
        return ["scenarios", str(self.root / "lib")]


def edit(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is not in the text to edit"
    return text.replace(old, new, 1)


# -- peers that do not speak SSH, for `accept` ----------------------------------------------------
PEER_KINDS = ("garbage", "http", "banner-then-garbage", "silent", "closes", "reset", "endless", "ssh1")


class NotSshPeers:
    """TCP servers on 127.0.0.1, one port per kind of peer that is not an SSH server.

    garbage: random-looking bytes at once; http: an HTTP server's answer; banner-then-garbage: a
    valid SSH banner, then bytes that are no key exchange; silent: accepts and says nothing;
    closes: accepts and closes at once; reset: accepts and resets (RST); endless: a banner line
    that never ends; ssh1: an SSH-1.5 server (paramiko speaks 2.0 only).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="not-ssh-peers")
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        for kind in PEER_KINDS:
            server = await asyncio.start_server(
                lambda r, w, k=kind: self._serve(k, r, w), "127.0.0.1", 0, reuse_address=True
            )
            self._servers.append(server)
            self.ports[kind] = server.sockets[0].getsockname()[1]

    async def _serve(self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            if kind == "garbage":
                writer.write(bytes(range(256)) * 4 + b"\r\n")
            elif kind == "http":
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            elif kind == "banner-then-garbage":
                writer.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" + b"\x00\xff" * 600)
            elif kind == "ssh1":
                writer.write(b"SSH-1.5-OldServer\r\n")
            elif kind == "closes":
                writer.close()
                return
            elif kind == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.transport.abort()
                return
            elif kind == "endless":
                for _ in range(2000):  # bounded: 2000 x 1 KiB, then the peer gives up
                    writer.write(b"x" * 1024)
                    await writer.drain()
            if kind != "closes":
                await writer.drain()
                # Wait for the client to go (bounded): a real peer would not hang up first.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(), 30)
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def workspace(root: Path, peers: dict[str, int] | None = None) -> Iterator[Workspace]:
    ws = Workspace(root)
    ws.peers = peers or {}
    try:
        yield ws
    finally:
        ws.release()
