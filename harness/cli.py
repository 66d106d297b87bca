"""`relay-harness`: the command line. Each subcommand maps user errors to exit 2 with one line.

Exit codes are part of the interface CI pipelines rely on: 0 as meant, 1 the thing under test is
wrong, 2 the harness could not do its job (usage, environment, unreadable input).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.pki import TestPki
from harness.upstream import ProfileError, SessionRecord, UpstreamError, UpstreamServer, load_profile

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Anything the user can fix: printed as one line, exit 2."""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_upstream(args: argparse.Namespace) -> int:
    """Run the fake provider until SIGINT/SIGTERM, appending one JSON line per finished session."""
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise UsageError(str(exc)) from None
    host, port = args.listen if args.listen else ("127.0.0.1", profile.port)
    pki = TestPki.load_or_create(args.certs)
    record_file = args.record.open("a", encoding="utf-8") if args.record else None
    lock = threading.Lock()

    def on_closed(session: SessionRecord) -> None:
        if record_file is None:
            return
        with lock:
            record_file.write(json.dumps(session.to_json()) + "\n")
            record_file.flush()

    server = UpstreamServer(profile, pki, host, port)
    server.recorder._on_closed = on_closed
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except UpstreamError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"relay-harness upstream: listening on {server.host}:{server.port} "
        f"(tls={profile.tls}, auth={profile.auth}, protocol={profile.protocol}); "
        f"CA: {args.certs / 'ca.pem'}",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        server.stop()
        if record_file is not None:
            record_file.close()
    print(f"relay-harness upstream: stopped after {len(server.recorder.sessions)} session(s)", flush=True)
    return EXIT_OK


def cmd_certs(args: argparse.Namespace) -> int:
    """Create (or reuse) the test CA and a leaf for HOST in DIR, for use outside the harness."""
    pki = TestPki.load_or_create(args.certs)
    for host in args.host:
        pki.server_cert(host, "good")
    print(f"CA: {args.certs / 'ca.pem'}; leaves: {', '.join(args.host) or 'none'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay-harness", description="End-to-end tests of OpenSMTPD relay configurations."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upstream", help="run the fake upstream (a recording smarthost)")
    up.add_argument("--profile", type=Path, required=True, help="provider profile (TOML)")
    up.add_argument("--listen", type=_host_port, help="HOST:PORT (default 127.0.0.1 and the profile's port)")
    up.add_argument("--certs", type=Path, default=Path("certs"), help="where the CA and leaf live")
    up.add_argument("--record", type=Path, help="append one JSON object per finished session here")
    up.set_defaults(func=cmd_upstream)

    certs = sub.add_parser("certs", help="create or reuse the test CA (and leaves) in a directory")
    certs.add_argument("--certs", type=Path, default=Path("certs"))
    certs.add_argument("host", nargs="*", help="host names to issue leaves for")
    certs.set_defaults(func=cmd_certs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        print(f"relay-harness: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("relay-harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
