"""`relay-harness`: the command line. Each subcommand maps user errors to exit 2 with one line.

Exit codes are part of the interface CI pipelines rely on: 0 as meant, 1 the thing under test is
wrong, 2 the harness could not do its job (usage, environment, unreadable input).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from harness.errors import HarnessError
from harness.names import dns_name_problem

if TYPE_CHECKING:
    from harness.check import CheckReport
    from harness.userfiles import Output
from harness.pki import TestPki, kept_pki
from harness.upstream import SessionRecord, UpstreamServer, load_profile
from harness.userfiles import MAX_CONFIG_BYTES, outputs, read_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(HarnessError):
    """A flag or argument the user must fix: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one `--help` away), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _host_port(text: str) -> tuple[str, int]:
    """--listen HOST:PORT: HOST an IP address (a name would need a resolver), PORT 0-65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:2525, [::1]:2525)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = {"": "127.0.0.1", "localhost": "127.0.0.1"}.get(host, host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: HOST must be an IP address (e.g. 127.0.0.1:2525)"
        ) from None
    return host, int(port)


def _dns_name(text: str) -> str:
    problem = dns_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"host {problem}")
    return text


def _can_listen(host: str, port: int) -> None:
    """Bind once before anything is written (CA, record): an address this machine does not have,
    or a port in use, is then an error with nothing changed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} (--listen): {exc.strerror}") from None


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; any other name counts as not (resolving it would ask DNS)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_upstream(args: argparse.Namespace) -> int:
    """Run the fake provider until SIGINT/SIGTERM, appending one JSON line per finished session."""
    profile = load_profile(args.profile)
    host, port = args.listen if args.listen else ("127.0.0.1", profile.port)
    record = outputs({"--record": args.record}, [args.profile]).get("--record")
    if not _is_loopback(host):
        print(
            f"relay-harness upstream: warning: {host} is not a loopback address: anyone who can reach "
            "it can use this upstream, and learn from its replies whether a password is right",
            file=sys.stderr,
            flush=True,
        )
    _can_listen(host, port)
    pki = TestPki.load_or_create(args.certs)
    pki.server_cert(profile.host, profile.faults.cert)  # a corrupt leaf in --certs: said now, not per session
    record_file = record.open_append() if record is not None else None
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
    server.start()
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


def cmd_check(args: argparse.Namespace) -> int:
    """Run the config in a real smtpd (a lab test host, a sandbox on --target ssh://...) or the
    emulated one (--target emulated).

    The JSON and JUnit reports are written for every outcome once their paths are known to be
    good: a CI dashboard shows an exit 2 (the check could not run, and why) as an error, not as
    a missing report.
    """
    from harness.check import (
        CheckInput,
        CheckReport,
        check_input,
        parse_file_flags,
        parse_table_flags,
        read_tables,
        run_check,
    )
    from harness.report import text_report
    from harness.targets.select import parse_target, run_on

    given = [Path(v.partition("=")[2]) for v in (args.table or []) + (args.file or []) if "=" in v]
    files = outputs(
        {"--report-json": args.report_json, "--junit": args.junit}, [args.config, args.upstream, *given]
    )
    targets = args.target or ["lab"]
    try:
        config_text = read_text(args.config, limit=MAX_CONFIG_BYTES)
        profile = load_profile(args.upstream)
        tables = parse_table_flags(args.table or [])
        given_files = parse_file_flags(args.file or [])
        specs = [parse_target(t, args.identity, args.known_hosts) for t in targets]
        inp = CheckInput(args.config, config_text, profile, tables, read_tables(tables), given_files)
        check_input(inp)
        pki = kept_pki() if all(s.kind == "emulated" for s in specs) else TestPki()
        reports = []
        for spec in specs:  # one after the other: each target's hosts are gone before the next starts
            report, notes = run_on(spec, pki, profile.port, lambda target: run_check(target, inp, pki))
            report.notes.extend(notes)
            reports.append(report)
    except HarnessError as exc:
        # several targets too: one that cannot run (an image that cannot be built) is the
        # whole comparison's error, and the dashboard shows it, not a missing report
        _check_reports(files, CheckReport(str(args.config), ", ".join(targets), "error", error=str(exc)))
        raise
    if len(specs) > 1:
        return _check_side_by_side([s.text for s in specs], reports, files)
    print(text_report(report), flush=True)
    _check_reports(files, report)
    return EXIT_OK if report.ok else EXIT_FAILED


def _check_reports(files: dict[str, Output], report: CheckReport) -> None:
    from harness.report import check_junit_xml, json_bytes, json_report

    if "--report-json" in files:
        files["--report-json"].write(json_bytes(json_report(report)))
    if "--junit" in files:
        files["--junit"].write(check_junit_xml(report))


def _check_side_by_side(labels: list[str], reports: list[Any], files: dict[str, Any]) -> int:
    """Several --target: each target's report, then what differs between them, with both evidences."""
    from harness.report import json_bytes
    from harness.sidebyside import compare, side_by_side_json, side_by_side_junit_xml, side_by_side_text

    sbs = compare(labels, reports)
    print(side_by_side_text(sbs), flush=True)
    if "--report-json" in files:
        files["--report-json"].write(json_bytes(side_by_side_json(sbs)))
    if "--junit" in files:
        files["--junit"].write(side_by_side_junit_xml(sbs))
    return EXIT_OK if sbs.ok else EXIT_FAILED


def cmd_accept(args: argparse.Namespace) -> int:
    """The `accept` subcommand: exit 0 as before, 1 a finding or difference, 2 cannot check."""
    from harness.accept import baseline
    from harness.accept.run import AcceptOptions, run_accept
    from harness.report import accept_json, accept_junit_xml, accept_text, json_bytes

    inputs = [p for p in (args.baseline, args.upstream, args.identity, args.known_hosts) if p is not None]
    flags = {"--report-json": args.report_json, "--junit": args.junit, "--save-baseline": args.save_baseline}
    reports = outputs(flags, inputs)
    options = AcceptOptions(
        args.url,
        args.identity,
        args.known_hosts,
        args.upstream,
        args.baseline,
        None,  # --save-baseline: written below, like the reports, once the run is complete
        args.config,
        args.mail_log,
        not args.no_relay,
        args.relay_mode,
        args.connect_timeout,
        args.upgrade_to,
    )
    report = run_accept(options)
    print(accept_text(report), flush=True)
    if "--save-baseline" in reports:
        reports["--save-baseline"].write(baseline.dumps(report.baseline).encode())
    if "--report-json" in reports:
        reports["--report-json"].write(json_bytes(accept_json(report)))
    if "--junit" in reports:
        reports["--junit"].write(accept_junit_xml(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_scenarios(args: argparse.Namespace) -> int:
    """Print the scenario library's index (scenarios/README.md is this output)."""
    from harness.scenarios import index_markdown

    print(index_markdown(args.directory), end="")
    return EXIT_OK


def cmd_lab_clean(args: argparse.Namespace) -> int:
    """Remove what runs that are gone left (hosts kept with --relay-keep included), and dead image builds."""
    from harness.targets.images import clean_stale_images
    from harness.targets.lab import check_environment, clean_stale

    check_environment()
    removed = clean_stale(kept=True) + [f"image build {path}" for path in clean_stale_images()]
    for item in removed:
        print(f"removed {item}")
    print(f"relay-harness lab clean: {len(removed)} item(s) removed")
    return EXIT_OK


def cmd_lab_image(args: argparse.Namespace) -> int:
    """Build, list or remove the Debian roots that test hosts of other releases run from."""
    from harness.targets import images

    if args.image_command == "list":
        return _image_list(args.release)
    releases = args.release or [i.release for i in images.list_images()]
    if args.image_command == "build":
        if not releases:
            raise UsageError("lab image build: name a release (e.g. trixie); no image is cached yet")
        mirror = images.Mirror(args.mirror.rstrip("/")) if args.mirror else None
        for release in releases:
            print(images.build_image(release, mirror=mirror).describe())
        return EXIT_OK
    for release in releases:
        if not images.remove_image(release):
            raise UsageError(f"lab image rm: no image of {release} in {images.cache_dir()}")
        print(f"removed image {release}")
    return EXIT_OK


def _image_list(only: list[str]) -> int:
    from harness.targets import images

    cached = [i for i in images.list_images() if not only or i.release in only]
    own = images.machine_release()
    print(f"{own or 'this machine'}: the machine's own root (no image)")
    for image in cached:
        print(image.describe())
        if only:
            for pkg in ("opensmtpd", "openssh-server", "libssl3t64", "libssl3", "libc6"):
                if pkg in image.packages:
                    print(f"  {pkg} {image.packages[pkg]}")
            print(f"  root: {image.root}")
    missing = [r for r in only if r not in {i.release for i in cached}]
    if missing:
        raise UsageError(f"lab image list: no image of {', '.join(missing)} in {images.cache_dir()}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay-harness", description="End-to-end tests of OpenSMTPD relay configurations.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upstream", help="run the fake upstream (a recording smarthost)")
    up.add_argument("--profile", type=Path, required=True, help="provider profile (TOML)")
    up.add_argument("--listen", type=_host_port, help="HOST:PORT (default 127.0.0.1 and the profile's port)")
    up.add_argument("--certs", type=Path, default=Path("certs"), help="where the CA and leaf live")
    up.add_argument("--record", type=Path, help="append one JSON object per finished session here")
    up.set_defaults(func=cmd_upstream)

    check = sub.add_parser("check", help="check that an smtpd.conf relays as meant (real smtpd, lab host)")
    check.add_argument("config", type=Path, help="the smtpd.conf as it will ship")
    check.add_argument("--upstream", type=Path, required=True, help="provider profile (TOML)")
    check.add_argument("--table", action="append", metavar="NAME=FILE", help="content of `table NAME`")
    check.add_argument(
        "--file",
        action="append",
        metavar="PATH=LOCAL",
        help="any file of the host (a pki certificate or key, a script): LOCAL installed at PATH",
    )
    check.add_argument(
        "--target",
        action="append",
        metavar="lab|lab:RELEASE|emulated|ssh://USER@HOST[:PORT]",
        help="where smtpd runs: a lab test host (default), one of another Debian release (lab:trixie, "
        "its image built on first use), a sandbox on an existing host with its own smtpd (nothing "
        "on it modified; falls back to the lab when the host cannot sandbox), or the emulated smtpd "
        "(no root, no OpenSMTPD; declines what it does not model: exit 2); give several to compare",
    )
    check.add_argument("--identity", type=Path, help="SSH private key for --target ssh://")
    check.add_argument("--known-hosts", type=Path, help="known_hosts with the key of --target ssh://")
    check.add_argument("--report-json", type=Path, help="write the report as JSON here")
    check.add_argument("--junit", type=Path, help="write a JUnit XML report here (one testcase per probe)")
    check.set_defaults(func=cmd_check)

    scen = sub.add_parser("scenarios", help="print the index of a scenario library (Markdown)")
    scen.add_argument("directory", type=Path, nargs="?", default=Path("scenarios"))
    scen.set_defaults(func=cmd_scenarios)

    lab = sub.add_parser("lab", help="manage lab test hosts")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    clean = lab_sub.add_parser("clean", help="remove test hosts and temp dirs left by killed runs")
    clean.set_defaults(func=cmd_lab_clean)
    image = lab_sub.add_parser("image", help="Debian roots for test hosts of other releases (lab:RELEASE)")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build or rebuild images (default: every cached one)")
    build.add_argument("release", nargs="*", help="Debian release, e.g. trixie")
    build.add_argument("--mirror", help="Debian mirror URL (default: the one in apt's sources)")
    image_list = image_sub.add_parser("list", help="cached images, their smtpd and package versions")
    image_list.add_argument("release", nargs="*")
    rm = image_sub.add_parser("rm", help="remove images (default: every cached one)")
    rm.add_argument("release", nargs="*")
    for p in (build, image_list, rm):
        p.set_defaults(func=cmd_lab_image)

    _add_accept(sub)

    certs = sub.add_parser("certs", help="create or reuse the test CA (and leaves) in a directory")
    certs.add_argument("--certs", type=Path, default=Path("certs"))
    certs.add_argument("host", nargs="*", type=_dns_name, help="host names to issue leaves for")
    certs.set_defaults(func=cmd_certs)
    return parser


def _host_path(text: str) -> str:
    """A path on the host: absolute, and no control character (sshd drops a command with a NUL)."""
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r}: a path on the host must be absolute")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise argparse.ArgumentTypeError(f"{text!r}: a path with a control character")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 600:  # nan and inf too
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between 0 and 600")
    return value


def _add_accept(sub: Any) -> None:
    from harness.accept import RELAY_MODES
    from harness.targets import CONNECT_TIMEOUT

    p = sub.add_parser(
        "accept",
        help="read-only acceptance checks of an existing mail host over SSH (before/after an upgrade)",
        description="Check, without changing anything on it, that a host's OpenSMTPD still relays as before.",
    )
    p.add_argument("url", metavar="ssh://USER@HOST[:PORT]", help="the host to check")
    p.add_argument("--identity", type=Path, help="SSH private key (default: agent and ~/.ssh keys)")
    p.add_argument("--known-hosts", type=Path, help="known_hosts file with the host's key (besides ~/.ssh)")
    p.add_argument(
        "--upstream", type=Path, metavar="PROFILE.toml", help="provider profile for the relay probe"
    )
    p.add_argument("--baseline", type=Path, metavar="FILE.json", help="compare with a saved baseline")
    p.add_argument(
        "--save-baseline", type=Path, metavar="FILE.json", help="save this run's facts as a baseline"
    )
    p.add_argument("--report-json", type=Path, metavar="FILE", help="write the report as JSON here")
    p.add_argument(
        "--junit", type=Path, metavar="FILE", help="write a JUnit XML report (one testcase per check)"
    )
    p.add_argument(
        "--config",
        type=_host_path,
        help="smtpd.conf path on the host (default /etc/smtpd.conf, /etc/mail/smtpd.conf)",
    )
    p.add_argument(
        "--mail-log",
        type=_host_path,
        help="mail log on the host (default /var/log/mail.log or /var/log/maillog)",
    )
    p.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up on the host after this long without an answer, for each of TCP connect, "
        f"SSH banner and login (default {CONNECT_TIMEOUT:g})",
    )
    p.add_argument("--no-relay", action="store_true", help="skip the relay probe (facts only)")
    p.add_argument(
        "--relay-mode",
        choices=RELAY_MODES,
        default="auto",
        help="where the relay probe runs: sandbox = a second smtpd in private namespaces on the host "
        "(its binary, config and tables as they are), lab = the host's files copied into a local lab "
        "host, auto = the sandbox when the host can run it (default)",
    )
    p.add_argument(
        "--upgrade-to",
        metavar="RELEASE",
        help="also run the host's config and tables on that Debian release's smtpd (a lab test host of "
        "its image, e.g. trixie) and list what would break or change beside today's behaviour",
    )
    p.set_defaults(func=cmd_accept)


# The signals that stopped this run. Noted, not only raised: an error raised while unwinding (a
# `finally` whose SSH command the signal cut short) replaces the KeyboardInterrupt, and a
# cancelled check once exited 2 saying "smtpd exited while the probes ran".
_signalled: list[int] = []


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a cancelled CI job) and Ctrl-C unwind as KeyboardInterrupt, so test hosts and temp
    dirs are removed; the run then exits 130, whatever else went wrong on the way out."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def _clean_after_killed_runs() -> None:
    """Every command first removes what runs killed with SIGKILL left (their test hosts end by
    themselves; their temp dirs wait for this), so nothing piles up on a CI runner.
    `relay-harness lab clean` does the same, kept hosts included, and lists what it removed."""
    if os.geteuid() != 0:
        return  # only root builds test hosts
    from harness.targets.lab import clean_stale

    with contextlib.suppress(Exception):  # best effort, and quiet: never what a command's output is about
        clean_stale()


def main(argv: Sequence[str] | None = None) -> int:
    _signalled.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.command != "lab" and (getattr(args, "target", None) or ["lab"]) != ["emulated"]:
        _clean_after_killed_runs()  # (the emulated target builds no test host, nor loads their stack)
    try:
        code = func(args)
    except HarnessError as exc:
        if not _signalled:
            print(f"relay-harness: {exc}", file=sys.stderr)
            return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    else:
        if not _signalled:
            return code
    print("relay-harness: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
