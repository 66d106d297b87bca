"""Latency of the lab against the issue's targets, each beside the floor measured in the same run.

    python bench/lab_latency.py [--hosts 20] [--messages 20] [--deadline 300]

Two figures decide whether the lab is cheap enough to build a host per test and to check relays
by waiting on records:

1. test host bring-up: network namespace + sshd + SSH connected + smtpd started and ready
   (`Lab.create_host`, then `SmtpdTarget.start` until smtpd logs that it accepts clients).
   Installing the bundle and `smtpd -n` are shown apart: they depend on the config, not the lab.
   Floor: `smtpd -d -v -f CONF` started inside the same, already built host until a TCP connect
   to 127.0.0.1:25 there gets the `220` banner, timed by a probe running inside the host (so SSH
   and the probe's own start-up are not counted).
2. relay latency: `sendmail` submission over SSH until the fake upstream's recorder holds the
   accepted message. smtpd keeps a relay session open ~10 s and reuses it, so the first message
   of a fresh smtpd (new connection: TCP, STARTTLS, AUTH) and the following ones (reused
   connection) are separate rows; each message is put in a row by what the upstream recorded
   (its position in its session), not by assumption.
   Floor: smtplib from this machine straight to the same upstream, same STARTTLS + AUTH profile,
   per message on a new connection and on one reused connection.

Percentiles are nearest-rank. Everything runs on 127.0.0.1 and the lab's 198.51.100.0/24 veths;
everything is removed at the end (Lab.close) even when a step fails or the deadline is hit.
Needs root, OpenSMTPD and sshd (as the lab does). Exit 0 with the table.
"""

from __future__ import annotations

import argparse
import math
import shlex
import smtplib
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.pki import TestPki
from harness.relay import RelayRun, relay_run
from harness.targets.base import Bundle, BundleFile, OutgoingMail
from harness.targets.lab import Lab, LabHost
from harness.targets.smtpd import SmtpdTarget
from harness.upstream import MessageRecord, Profile, SessionRecord, parse_profile

MAX_HOSTS = 100
MAX_MESSAGES = 200
BRING_UP_TARGET = 0.5  # seconds, p50 (from the issue)
RELAY_TARGET = 0.3  # seconds, p50 (from the issue)
WAIT = 10.0  # longest wait for any single event (a record, a banner)
SSH_ROUND_TRIPS = 3  # per host: what one SSH command costs, the unit of every lab step
# The probe's interpreter (only stdlib; its start-up is not timed). A venv's python may live under
# /root, which a test host need not share, so the system one first.
# An idle relay session takes new mail only when its hang-on timer fires, once a second
# (mta_session.c, mta_on_timeout), for up to ~10 s: what the reused-connection row mostly measures.
HANGON = r"mta: timeout for session hangon"
PROBE_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

HOST = "smtp.example.net"
PASSWORD = "bench-horse-7"
USER = "alice@example.org"
SENDER, RCPT = "root", "bob@example.com"
SECRETS = BundleFile(
    "/etc/mail/secrets", f"label {USER}:{PASSWORD}\n".encode(), 0o640, "root", "_smtpd", True
)
ALIASES = BundleFile("/etc/mail/aliases", b"root: alice\n")
# tests/test_lab_e2e.py's config: smtp+tls with AUTH and mail-from, as the users ship it.
CONFIG = (
    "table aliases file:/etc/mail/aliases\n"
    "table secrets file:/etc/mail/secrets\n"
    "listen on socket\n"
    "listen on lo0\n"
    'action "local_mail" mbox alias <aliases>\n'
    f'action "outbound" relay host smtp+tls://label@{HOST}:587 auth <secrets> mail-from "@example.org"\n'
    'match from local for local action "local_mail"\n'
    'match from local for any action "outbound"\n'
)
PROFILE = (
    f'host = "{HOST}"\nport = 587\ntls = "starttls-required"\nauth = "required"\n'
    'sender_domains = ["example.org"]\n'
    f'[[credentials]]\nuser = "{USER}"\npassword = "{PASSWORD}"\n'
)

# Runs inside the test host. Polls connect() because "a port started listening" in another
# process has no event one can wait on; 0.5 ms between refused attempts bounds the error and keeps
# the probe from taking a CPU away from smtpd's own start. The ready log line is read as it comes.
PROBE = r"""
import os, pwd, socket, subprocess, sys, threading, time
conf, limit = sys.argv[1], float(sys.argv[2])
t0 = time.perf_counter()
smtpd = subprocess.Popen(["/usr/sbin/smtpd", "-d", "-v", "-f", conf],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
ready = []
def follow():
    for line in smtpd.stdout:
        if b"smtp: will accept at most" in line and not ready:
            ready.append(time.perf_counter() - t0)
threading.Thread(target=follow, daemon=True).start()
try:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", 25), timeout=limit) as s:
                banner = s.makefile("rb").readline()
            break
        except ConnectionRefusedError:
            if smtpd.poll() is not None or time.perf_counter() - t0 > limit:
                print("error smtpd never listened on 127.0.0.1:25"); sys.exit(0)
            time.sleep(0.0005)
    banner_at = time.perf_counter() - t0
    if not banner.startswith(b"220"):
        print("error banner", banner[:60]); sys.exit(0)
finally:
    smtpd.terminate()
    smtpd.wait(timeout=limit)
# What sshd adds to every command: it runs root's shell with `-c`, and bash reads ~/.bashrc when
# SSH_CLIENT is set and SHLVL < 2, as for sshd's direct child.
shell = pwd.getpwuid(0).pw_shell or "/bin/sh"
s0 = time.perf_counter()
subprocess.run([shell, "-c", "true"], env=dict(os.environ, SHLVL="0"), stdin=subprocess.DEVNULL,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=limit)
shell_at = time.perf_counter() - s0
print(f"ok {banner_at:.6f} {ready[0] if ready else -1:.6f} {shell_at:.6f}")
"""


class Deadline:
    """The global bound: every loop asks before another round, every wait is capped by it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.hit = False

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, needed: float = 0.0) -> bool:
        if self.left() <= needed:
            self.hit = True
        return not self.hit

    def wait(self) -> float:
        return max(0.1, min(WAIT, self.left()))


@dataclass
class Series:
    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def pct(self, p: float) -> float | None:
        """Nearest-rank percentile; None without samples."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Results:
    create: Series = field(default_factory=Series)  # namespace + sshd + SSH connected
    install: Series = field(default_factory=Series)  # bundle, point, trust, smtpd -n
    start: Series = field(default_factory=Series)  # smtpd start until ready (log line)
    bring_up: Series = field(default_factory=Series)  # create + start
    bring_up_full: Series = field(default_factory=Series)  # create + install + start
    floor_banner: Series = field(default_factory=Series)  # smtpd -d start → 220, inside the host
    floor_ready: Series = field(default_factory=Series)  # smtpd -d start → ready log line, inside
    submit: Series = field(default_factory=Series)  # sendmail over SSH until it returned
    relay_new: Series = field(default_factory=Series)
    relay_reused: Series = field(default_factory=Series)
    direct_new: Series = field(default_factory=Series)
    direct_reused: Series = field(default_factory=Series)
    ssh: Series = field(default_factory=Series)  # one SSH command (`true`) until its exit status
    shell: Series = field(default_factory=Series)  # root's shell start-up as sshd runs it, inside
    hangon: int = 0  # reused-connection messages that smtpd sent on its idle session's timer tick
    failures: list[str] = field(default_factory=list)


def bundle() -> Bundle:
    return Bundle(CONFIG, (ALIASES, SECRETS), users=("alice",))


def profile() -> Profile:
    return parse_profile(PROFILE)


def prepare(host: LabHost, target: SmtpdTarget, pki: TestPki) -> None:
    """What relay_run does before it starts smtpd, for a host with no upstream yet."""
    target.install(bundle())
    target.point([HOST], host.upstream_address)
    target.trust(pki.ca_pem)
    check = target.check_config()
    if not check.ok:
        raise SystemExit(f"smtpd -n refused the bench config: {check.output}")


# --- 1. bring-up -------------------------------------------------------------------------------


def bring_up(lab: Lab, pki: TestPki, count: int, deadline: Deadline, out: Results) -> None:
    for _ in range(count):
        if not deadline.allows(needed=5.0):
            return
        t0 = time.perf_counter()
        host = lab.create_host()
        t1 = time.perf_counter()
        try:
            target = host.target
            assert target is not None
            prepare(host, target, pki)
            t2 = time.perf_counter()
            target.start()
            t3 = time.perf_counter()
            out.create.add(t1 - t0)
            out.install.add(t2 - t1)
            out.start.add(t3 - t2)
            out.bring_up.add((t1 - t0) + (t3 - t2))
            out.bring_up_full.add(t3 - t0)
            target.stop()
            floor(target, deadline, out)
        finally:
            lab.destroy_host(host)


def floor(target: SmtpdTarget, deadline: Deadline, out: Results) -> None:
    """smtpd's own start, timed inside the host that was just measured (same files, same kernel)."""
    target.check("find /var/spool/smtpd /var/mail -mindepth 1 -delete")  # as SmtpdTarget.start does
    limit = deadline.wait()
    command = f"{shlex.quote(PROBE_PYTHON)} -c {shlex.quote(PROBE)} /etc/smtpd.conf {limit:.1f}"
    result = target.run(command, timeout=limit + 10)
    words = result.stdout.split()
    if result.returncode != 0 or not words or words[0] != "ok":
        out.failures.append("floor probe: " + (result.output[-200:] or f"probe exited {result.returncode}"))
        return
    out.floor_banner.add(float(words[1]))
    if float(words[2]) >= 0:
        out.floor_ready.add(float(words[2]))
    out.shell.add(float(words[3]))
    for _ in range(SSH_ROUND_TRIPS):
        t0 = time.perf_counter()
        target.check("true")
        out.ssh.add(time.perf_counter() - t0)


# --- 2. relay latency --------------------------------------------------------------------------


def relay(lab: Lab, pki: TestPki, count: int, deadline: Deadline, out: Results) -> None:
    if not deadline.allows(needed=10.0):
        return
    host = lab.create_host()
    try:
        target = host.target
        assert target is not None
        with relay_run(target, bundle(), profile(), pki) as run:
            # Reused connection: one smtpd, messages one after the other (each awaited); the
            # first of them opens the connection, hence one more.
            for i in range(count + 1):
                if not deadline.allows(needed=1.0):
                    break
                relay_one(run, f"reused {i}", deadline, out)
            # New connection: a fresh smtpd per message (its restart is not timed).
            for i in range(count):
                if not deadline.allows(needed=2.0):
                    break
                target.stop()
                run.log = target.start()
                relay_one(run, f"new {i}", deadline, out)
            direct(run, pki, count, deadline, out)
    finally:
        lab.destroy_host(host)


def relay_one(run: RelayRun, subject: str, deadline: Deadline, out: Results) -> None:
    subject = f"lab-latency {subject}"
    mail = OutgoingMail(SENDER, (RCPT,), subject=subject)
    t0 = time.perf_counter()
    mark = run.send(mail)
    t1 = time.perf_counter()
    try:
        session, message = run.wait_relayed(deadline.wait(), has_subject(subject))
    except TimeoutError as exc:
        out.failures.append(f"relay {subject}: {str(exc)[:200]}")
        return
    t2 = time.perf_counter()
    out.submit.add(t1 - t0)
    if session.messages.index(message) == 0:
        out.relay_new.add(t2 - t0)
        return
    out.relay_reused.add(t2 - t0)
    if run.log.matching(HANGON, since=mark):
        out.hangon += 1


def has_subject(subject: str) -> Callable[[SessionRecord, MessageRecord], bool]:
    needle = f"Subject: {subject}\n".encode()
    return lambda _s, m: needle in m.body.replace(b"\r\n", b"\n")


class ProviderSMTP(smtplib.SMTP):
    """Connects to the upstream's address but checks its certificate for the provider's name,
    as smtpd does after /etc/hosts points the name at the upstream."""

    def __init__(self, address: str, port: int, timeout: float) -> None:
        self._address = address
        super().__init__(HOST, port, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((self._address, port), timeout)


def direct(run: RelayRun, pki: TestPki, count: int, deadline: Deadline, out: Results) -> None:
    """The floor: the same upstream and profile, from this machine, no smtpd in between."""
    context = ssl.create_default_context(cadata=pki.ca_pem.decode())
    address, port = run.upstream.address

    def login() -> ProviderSMTP:
        client = ProviderSMTP(address, port, deadline.wait())
        client.ehlo("bench.relay-harness.test")
        client.starttls(context=context)
        client.ehlo("bench.relay-harness.test")
        client.login(USER, PASSWORD)
        return client

    def send(client: ProviderSMTP, subject: str) -> None:
        mail = OutgoingMail(f"{SENDER}@example.org", (RCPT,), subject=subject).as_bytes()
        client.sendmail(f"{SENDER}@example.org", [RCPT], mail)
        run.upstream.recorder.wait_for_message(has_subject(subject), deadline.wait())

    for i in range(count):
        if not deadline.allows(needed=1.0):
            break
        t0 = time.perf_counter()
        client = login()
        send(client, f"lab-latency direct new {i}")
        out.direct_new.add(time.perf_counter() - t0)
        client.quit()
    client = login()
    try:
        for i in range(count):
            if not deadline.allows(needed=1.0):
                break
            t0 = time.perf_counter()
            send(client, f"lab-latency direct reused {i}")
            out.direct_reused.add(time.perf_counter() - t0)
    finally:
        client.quit()


# --- the table ---------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def verdict(series: Series, target: float) -> str:
    p50 = series.pct(50)
    if p50 is None:
        return "no data"
    return "yes" if p50 < target else "NO"


def table(out: Results, hosts: int, messages: int, deadline: Deadline, elapsed: float) -> str:
    head = (
        f"{'measurement':<46} {'n':>3} {'p50':>6} {'p95':>6}   {'floor':<40} {'n':>3} {'p50':>6} {'p95':>6}"
    )
    rows: list[str] = []

    def row(name: str, s: Series, floor_name: str = "", f: Series | None = None) -> None:
        line = f"{name:<46} {len(s.samples):>3} {ms(s.pct(50)):>6} {ms(s.pct(95)):>6}"
        if f is not None:
            line += f"   {floor_name:<40} {len(f.samples):>3} {ms(f.pct(50)):>6} {ms(f.pct(95)):>6}"
        rows.append(line)

    def target_row(name: str, s: Series, target: float) -> None:
        rows.append(f"  {name:<52} p50 {ms(s.pct(50)):>5} ms < {target * 1000:.0f} ms: {verdict(s, target)}")

    row(
        "bring-up: netns + sshd + SSH + smtpd ready",
        out.bring_up,
        "smtpd -d start -> 220 (inside host)",
        out.floor_banner,
    )
    row("  of which netns + sshd + SSH connected", out.create)
    row(
        "  of which smtpd start -> ready log line",
        out.start,
        "smtpd -d start -> ready line (inside)",
        out.floor_ready,
    )
    row("bring-up incl. install + point + trust + -n", out.bring_up_full)
    row("  of which install + point + trust + smtpd -n", out.install)
    row(
        "relay, first message (new connection)",
        out.relay_new,
        "smtplib new conn (STARTTLS+AUTH)",
        out.direct_new,
    )
    row(
        "relay, subsequent (reused connection)",
        out.relay_reused,
        "smtplib reused connection",
        out.direct_reused,
    )
    all_relay = Series(out.relay_new.samples + out.relay_reused.samples)
    row("relay, all messages", all_relay)
    row("  of which sendmail over SSH returned", out.submit)
    row("SSH command round trip (`true`)", out.ssh)
    row("  of which root's shell start-up (inside host)", out.shell)

    lines = [
        f"lab latency: {hosts} host(s) asked, {messages} message(s) asked per row; times in ms, "
        f"nearest-rank percentiles; {elapsed:.1f} s"
        + (" (global deadline hit: fewer samples)" if deadline.hit else ""),
        "",
        head,
        "-" * len(head),
        *rows,
        "",
        "targets (from the issue):",
    ]
    rows = []
    target_row("bring-up (netns + sshd + SSH + smtpd ready)", out.bring_up, BRING_UP_TARGET)
    target_row("relay, first message (new connection)", out.relay_new, RELAY_TARGET)
    target_row("relay, subsequent (reused connection)", out.relay_reused, RELAY_TARGET)
    target_row("relay, all messages", all_relay, RELAY_TARGET)
    lines += rows
    lines += [
        "",
        "notes:",
        f"  {out.hangon} of {len(out.relay_reused.samples)} reused-connection message(s) left smtpd on its "
        "idle session's 1 s hang-on tick",
        f"  ({HANGON!r} in its log), not on submission: smtpd's pacing, not the harness's.",
        "  Every lab step is SSH commands; each starts root's shell with -c (bash reads ~/.bashrc under",
        "  sshd; test hosts have a private, empty /root): the last row is what that costs per command.",
    ]
    if out.failures:
        lines += ["", f"failures ({len(out.failures)}; not in the figures):", *out.failures[:5]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=20, help=f"test hosts to bring up (1-{MAX_HOSTS})")
    parser.add_argument("--messages", type=int, default=20, help=f"messages per row (1-{MAX_MESSAGES})")
    parser.add_argument("--deadline", type=float, default=300.0, help="global bound in seconds")
    args = parser.parse_args()
    hosts = max(1, min(args.hosts, MAX_HOSTS))
    messages = max(1, min(args.messages, MAX_MESSAGES))
    deadline = Deadline(args.deadline)
    out = Results()
    start = time.perf_counter()
    pki = TestPki()
    lab = Lab(pki.ca_pem)
    try:
        bring_up(lab, pki, hosts, deadline, out)
        relay(lab, pki, messages, deadline, out)
    finally:
        lab.close()
    print(table(out, hosts, messages, deadline, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
