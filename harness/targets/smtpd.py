"""The one driver of a real OpenSMTPD: the Target interface over any shell.

A lab test host, a staging machine and a sandbox on it differ only in the shell (see `shell`):
what is done to smtpd (install the bundle, `smtpd -n`, start it in the foreground with its log
followed, submit, `smtpctl`) is written here once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import paramiko

from harness.redact import Redactor, secrets_table_credentials
from harness.targets.base import (
    SMTPD_CONF,
    Bundle,
    BundleFile,
    ConfigCheck,
    Handshake,
    LogFollower,
    OutgoingMail,
    StartFailed,
    StartRefused,
    Submission,
    Target,
    TargetError,
    submission_failed,
)
from harness.targets.shell import CommandResult, Shell

if TYPE_CHECKING:
    from harness.upstream import UpstreamServer

# smtpd is ready for a submission once its listeners are up, the queue process has loaded the
# (empty) queue into the scheduler (a submission before can get EX_TEMPFAIL, 75) and its control
# socket takes connections (SmtpdTarget._await_control: its process logs nothing when it does).
READY = (r"smtp: will accept at most \d+ clients", r"queue: done loading queue into scheduler")
READY_TIMEOUT = 15.0
NOT_RUNNING = "smtpd doesn't seem to be running"  # smtpctl's words when the control socket refuses
CONTROL_RETRY = 0.05  # seconds between asking a starting smtpd's control socket again
# Every CA bundle a Linux smtpd may have been built to read; Debian's always, others where present.
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")

# SMTP submission from inside the target, with the target's own python3 (stdlib smtplib), so the
# connection comes from the host itself, as a local client's would: `listen on` + `match from local`.
_SMTP_SUBMIT = """
import smtplib, sys
host, port, sender, *rcpts = sys.argv[1:]
try:
    with smtplib.SMTP(host, int(port), timeout=30) as smtp:
        refused = smtp.sendmail(sender, rcpts, sys.stdin.buffer.read())
except (OSError, smtplib.SMTPException) as exc:
    sys.exit(f"SMTP to {host}:{port}: {exc}")
for rcpt, (code, text) in refused.items():
    print(f"refused {rcpt}: {code} {text.decode()}")
"""


# A TLS handshake with each address of each listener, from inside the target (stdlib ssl and
# smtplib). The chain is not verified: the user's certificate may come from any CA; the question
# is whether smtpd completes a handshake with the key and certificate the config gives it.
# An interface's addresses come from `ip -j addr` (link-local IPv6 left out: no scope to dial).
# Prints one JSON object a line: word, address, port, mode, der (base64) or error.
_TLS_HANDSHAKE = r"""
import base64, ipaddress, json, smtplib, socket, ssl, subprocess, sys
def addresses(word, kind):
    if kind == "address":
        return [str(ipaddress.ip_address(word.strip("[]")))]
    if kind == "hostname":
        return sorted({a[4][0] for a in socket.getaddrinfo(word, None, proto=socket.IPPROTO_TCP)})
    out = subprocess.run(["ip", "-j", "addr", "show", "dev", word], capture_output=True, text=True)
    found = []
    for link in json.loads(out.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") in ("inet", "inet6") and info.get("scope") != "link":
                found.append(info["local"])
    return found
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
for word, kind, port, mode in json.loads(sys.argv[1]):
    try:
        found = addresses(word, kind)
    except (OSError, ValueError) as exc:
        row = {"word": word, "address": word, "port": port, "mode": mode}
        print(json.dumps({**row, "error": f"cannot resolve {word}: {exc}"}))
        continue
    for address in found:
        row = {"word": word, "address": address, "port": port, "mode": mode}
        try:
            if mode == "smtps":
                with socket.create_connection((address, port), timeout=15) as raw:
                    with ctx.wrap_socket(raw) as tls:
                        der = tls.getpeercert(binary_form=True)
            else:
                with smtplib.SMTP(address, port, timeout=15) as smtp:
                    smtp.ehlo("relay-harness.test")
                    if not smtp.has_extn("starttls"):
                        raise smtplib.SMTPException("the listener does not offer STARTTLS after EHLO")
                    smtp.starttls(context=ctx)
                    der = smtp.sock.getpeercert(binary_form=True)
            row["der"] = base64.b64encode(der or b"").decode()
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(row), flush=True)
"""

# The local users an aliases table delivers to, created as `useradd -M -N -s /usr/sbin/nologin`
# would (no home made, group users, locked, uids above all others, nobody's 65534 skipped),
# written to passwd/shadow by one awk per batch: an aliases file of 100k users is a few commands
# in about 1.5 s (useradd takes 90 ms a user here: 2.5 hours).
# Names come on stdin, one a line; the command line stays the same size whatever their number.
USER_BATCH = 10_000
ADD_USERS = r"""awk -F: -v OFS=: '
FILENAME == "/etc/passwd" {
    have[$1] = 1; if ($3 >= 1000 && $3 != 65534 && $3 != 65535 && $3 > top) top = $3 + 0; next
}
$0 != "" && !($0 in have) {
    have[$0] = 1; top = (top < 1000 ? 1000 : top + 1); if (top == 65534) top = 65536
    print $0, "x", top, 100, "", "/home/" $0, "/usr/sbin/nologin" >> "/etc/passwd"
    print $0, "!", 19000, 0, 99999, 7, "", "", "" >> "/etc/shadow"
}' /etc/passwd -"""
# ... and their home directories, as a real host has them (useradd -m, adduser): `maildir` (whose
# default is ~/Maildir) and many an mda deliver there, and mail.maildir makes only the Maildir.
# Only where the target's whole root is private (a lab test host), never on a host's own /home.
# One perl (Essential in Debian), passwd read once; the names on stdin as for ADD_USERS.
MAKE_HOMES = r"""perl -e '
open(my $pw, "<", "/etc/passwd") or die "/etc/passwd: $!";
my %home; while (<$pw>) { chomp; my @f = split /:/; $home{$f[0]} = [@f[2, 3, 5]] }
while (my $u = <STDIN>) {
    chomp $u; my $e = $home{$u} or next; my ($uid, $gid, $dir) = @$e;
    next if !$dir || $dir eq "/" || -e $dir;
    mkdir($dir, 0750) or die "mkdir $dir: $!"; chown($uid, $gid, $dir) or die "chown $dir: $!";
}'"""


class EnclosureLimit(TargetError):
    """The enclosure cannot run this (a path it may not write, an interface it lacks): use the lab."""


# What smtpd says when it gives up at start-up, best first: fatal() in one of its processes
# ("pony express: smtpd: bind: Address already in use"), in the parent ("smtpd: cannot ..."), any
# line saying fatal, then any error-looking line; warnings ("warn: purge_task: ...") come last:
# smtpd logs some on every start.
_FATAL = (
    re.compile(r"^[a-z][a-z ]*: smtpd: .+"),
    re.compile(r"^smtpd: (?!setup done|process \w+ socket closed).+"),
    re.compile(r"\bfatal\b", re.IGNORECASE),
    re.compile(
        r"^(?!warn:).*\b(bind|cannot|could not|failed|No such file|Permission denied|invalid|not found"
        r"|in use)\b",
        re.IGNORECASE,
    ),
)


def startup_failure(lines: Iterable[str]) -> str | None:
    """The line that says why smtpd exited before it was ready, in its own words."""
    candidates = [line.strip() for line in lines if not line.startswith(("debug:", "relay-harness-pid"))]
    for pattern in _FATAL:
        found = next((line for line in candidates if pattern.search(line)), None)
        if found is not None:
            return found
    return None


def submission_command(mail: OutgoingMail, sendmail: str = "/usr/sbin/sendmail") -> str:
    """The shell command that hands `mail` (on stdin) to smtpd: sendmail, or SMTP to a listener."""
    if any(ch in a for a in (mail.sender, *mail.recipients) for ch in "\0\r\n"):
        # sshd drops the whole connection on a NUL in a command line: refuse such input here.
        raise TargetError(f"refusing to submit mail with control characters in an address: {mail.recipients}")
    rcpts = " ".join(shlex.quote(r) for r in mail.recipients)
    if mail.via == "smtp":
        command = (
            f"python3 -c {shlex.quote(_SMTP_SUBMIT)} {shlex.quote(mail.smtp_address)} {mail.smtp_port} "
            f"{shlex.quote(mail.sender)} {rcpts}"
        )
    elif mail.via == "sendmail":
        command = f"{sendmail} -f {shlex.quote(mail.sender)} {rcpts}"
    else:
        raise TargetError(f"unknown submission {mail.via!r}: sendmail or smtp")
    if mail.user != "root":
        command = f"su -s /bin/sh {shlex.quote(mail.user)} -c {shlex.quote(command)}"
    return command


# Many submissions in one command: the host's python3 reads `JSON header line + message` pairs
# from stdin and prints one JSON result line per message. A header is either the argv `submit`
# would run for that message (sendmail, su ...), run with the message on its stdin, or an SMTP
# submission as root, sent over one session kept open per listener: a session smtpd ends (its
# `smtp limit max-mails`, 100 by default) is reopened, and a message is sent again only when
# smtpd refused it at MAIL or the session was gone before it (nothing of it was taken).
# Bounded: 30 s per message, the batch's deadline, two tries per SMTP message.
_BULK_SUBMIT = r"""
import json, smtplib, subprocess, sys, time
deadline = time.monotonic() + float(sys.argv[1])
sessions = {}

def smtp(job, body):
    host, port, sender, rcpts = job["smtp"]
    for attempt in (1, 2):
        conn = sessions.pop((host, port), None)
        try:
            conn = conn or smtplib.SMTP(host, port, timeout=30)
            conn.ehlo_or_helo_if_needed()
            code, text = conn.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, sender)
        except (OSError, smtplib.SMTPException) as exc:
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
            if attempt == 2:
                return 1, f"SMTP to {host}:{port}: {exc}"
            continue
        try:
            refused = {}
            for rcpt in rcpts:
                code, text = conn.rcpt(rcpt)
                if code not in (250, 251):
                    refused[rcpt] = (code, text)
            if len(refused) == len(rcpts):
                conn.rset()
                raise smtplib.SMTPRecipientsRefused(refused)
            conn.data(body)
        except (OSError, smtplib.SMTPException) as exc:
            return 1, f"SMTP to {host}:{port}: {exc}"
        sessions[(host, port)] = conn
        return 0, "".join(f"refused {r}: {c} {t.decode()}\n" for r, (c, t) in refused.items())

inp = sys.stdin.buffer
while True:
    head = inp.readline()
    if not head:
        break
    job = json.loads(head)
    body = inp.read(job["size"])
    left = deadline - time.monotonic()
    if left <= 0:
        rc, out = -1, "not submitted: the batch ran out of time"
    elif "smtp" in job:
        rc, out = smtp(job, body)
    else:
        try:
            done = subprocess.run(job["argv"], input=body, capture_output=True, timeout=min(30.0, left))
            rc, out = done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")
        except (OSError, subprocess.TimeoutExpired) as exc:
            rc, out = -1, str(exc)
    print(json.dumps({"rc": rc, "out": out.strip()[-500:]}), flush=True)
for conn in sessions.values():
    try:
        conn.quit()
    except (OSError, smtplib.SMTPException):
        pass
"""
BULK_BATCH = 1000  # messages per command: keeps stdin and the result stream small
NOT_FOUND = 127  # the shell's "command not found": a host without python3


def bulk_job(mail: OutgoingMail, sendmail: str) -> dict[str, Any]:
    """How the bulk script submits `mail`; the same checks and commands as `submit`."""
    argv = shlex.split(submission_command(mail, sendmail))  # refuses what `submit` refuses
    if mail.via == "smtp" and mail.user == "root":
        return {"smtp": [mail.smtp_address, mail.smtp_port, mail.sender, list(mail.recipients)]}
    return {"argv": argv}


def bulk_submission(jobs: Sequence[tuple[dict[str, Any], bytes]]) -> tuple[str, bytes, float]:
    """The command, its stdin and its time bound for running (job, message) pairs in one go."""
    seconds = 60 + 0.1 * len(jobs)
    stream = bytearray()
    for job, body in jobs:
        stream += json.dumps({**job, "size": len(body)}).encode() + b"\n" + body
    return f"python3 -c {shlex.quote(_BULK_SUBMIT)} {seconds:g}", bytes(stream), seconds


def bulk_results(output: str, count: int, why: str) -> list[Submission]:
    """One Submission per message from the script's result lines; missing lines say `why`."""
    results = []
    for line in output.splitlines()[:count]:
        try:
            item = json.loads(line)
            ok = item["rc"] == 0
            results.append(Submission(ok, item["out"] if ok else f"exited {item['rc']}: {item['out']}"))
        except (ValueError, KeyError, TypeError):
            results.append(Submission(False, f"unreadable result: {line[:200]}"))
    results += [Submission(False, f"no result: {why}")] * (count - len(results))
    return results


# smtpd's processes; fatalx() in one logs `NAME: message` (log.c vfatalc), and smtpd exits.
_PROCESSES = r"(?:parent|smtpd|dispatcher|lka|queue|scheduler|control|ca|pony|klondike)"
# Lines of a process that are no failure: its start and the others' end, and what log_info() says
# while starting (`queue: queue compression enabled`, with `queue compression` in the config).
_NOT_FATAL = re.compile(
    r"setup|socket closed|pipe closed|exiting|done loading queue|imsg_read"
    r"|queue (?:compression|encryption) enabled"
)
# ...unless what it could not do is the test host's to provide (an address, a port, a file's access)
_HOST_LIMIT = re.compile(r"\bbind\b|Cannot assign requested address|Address already in use|Permission denied")


def start_failure(lines: list[str]) -> str | None:
    """Why smtpd exited while starting, in the words of the process that gave up (or None).

    OpenSMTPD 7.x checks some settings only when its processes start: `dispatcher: failed to
    parse protocols "tlsv1.9"`, `dispatcher: no ciphers for 'X'`. The fatal line is the last a
    process logs before the others notice it is gone, so the last candidate is the cause.
    """
    found = [line for line in lines if re.match(rf"^{_PROCESSES}: ", line) and not _NOT_FATAL.search(line)]
    return found[-1] if found else None


def duplicate_listener(lines: list[str]) -> str | None:
    """`Address already in use` because the config itself listens twice on one address and port
    (`listen on lo` and `listen on localhost`: the same 127.0.0.1 and ::1): the config's fault,
    here and on any host. smtpd logs each listener (`smtp: listen on [::1] port 25 flags ...`)
    before it binds them; another program's port (the test host's sshd) shows no such pair."""
    in_use = next((line for line in lines if "Address already in use" in line), None)
    if in_use is None:
        return None
    seen: set[str] = set()
    for line in lines:
        m = re.match(r"^debug: smtp: listen on (\S+ port \d+)", line)
        if m is None:
            continue
        if m.group(1) in seen:
            return (
                f"{in_use.strip()}: the config listens on {m.group(1)} twice (`listen on lo` and "
                "`listen on localhost` are the same addresses): remove one, or give one another port"
            )
        seen.add(m.group(1))
    return None


def wait_ready(log: LogFollower, timeout: float) -> None:
    """Every READY line, in whatever order smtpd's processes log them."""
    deadline = time.monotonic() + timeout
    for pattern in READY:
        log.wait_for(pattern, max(0.0, deadline - time.monotonic()))


class SmtpdTarget(Target):
    """OpenSMTPD on a host reached through `shell`; `sbin` is where its programs are.

    `upstream_address` is where smtpd reaches the fake upstream and where the harness listens
    for it, unless `enclosure` says otherwise (a sandbox on an existing host: see Enclosure).
    `fresh_spool` empties the queue and mailboxes before each start (test hosts only: an
    existing host's spool is never touched; a sandbox has a fresh one of its own).
    `owns_connection` False leaves the SSH connection open on `close` (its owner goes on using it).
    """

    def __init__(
        self,
        name: str,
        shell: Shell,
        upstream_address: str,
        *,
        fresh_spool: str | None = None,
        sbin: str = "/usr/sbin",
        enclosure: Enclosure | None = None,
        on_close: Callable[[], None] | None = None,
        owns_connection: bool = True,
        upstream_peers: tuple[str, ...] | None = None,
    ) -> None:
        self.name = name
        self.shell = shell
        self._upstream_address = upstream_address
        self._fresh_spool = fresh_spool
        self.smtpd = f"{sbin}/smtpd"
        self.smtpctl = f"{sbin}/smtpctl"
        self.makemap_path = f"{sbin}/makemap"
        self.sendmail = f"{sbin}/sendmail"
        self.enclosure = enclosure
        self._on_close = on_close
        self._owns_connection = owns_connection
        self._upstream_peers = upstream_peers
        self._smtpd: paramiko.Channel | None = None
        self._smtpd_pid: int | None = None
        self.log = LogFollower()

    @property
    def redactor(self) -> Redactor:
        return self.shell.redactor

    def redact(self, text: str) -> str:
        return self.shell.redactor(text)

    def run(self, command: str, stdin: bytes | None = None, timeout: float = 60) -> CommandResult:
        return self.shell.run(command, stdin, timeout)

    def check(self, command: str, stdin: bytes | None = None, timeout: float = 60) -> CommandResult:
        return self.shell.check(command, stdin, timeout)

    def read_file(self, path: str) -> bytes:
        return self.shell.read(path) or b""

    def write_file(
        self, path: str, content: bytes, mode: int = 0o644, owner: str = "root", group: str = "root"
    ) -> None:
        self.shell.write(path, content, mode, owner, group)

    # -- Target ---------------------------------------------------------------------------------
    def install(self, bundle: Bundle) -> None:
        if self.enclosure is not None:
            paths = [f.path for f in bundle.files] + [f.db for f in bundle.files if f.db]
            if bundle.config is not None:
                paths.append(bundle.config_path)
            outside = [p for p in paths if not self.enclosure.may_write(p)]
            if outside:
                raise EnclosureLimit(
                    f"{self.name}: would write outside its private paths: {', '.join(outside)}"
                )
        for start in range(0, len(bundle.users), USER_BATCH):
            names = "".join(f"{u}\n" for u in bundle.users[start : start + USER_BATCH])
            self.check(ADD_USERS, stdin=names.encode(), timeout=120)
            if self.enclosure is None:
                self.check(MAKE_HOMES, stdin=names.encode(), timeout=120)
        if bundle.config is not None:
            self.write_file(bundle.config_path, bundle.config.encode(), 0o644)
        for f in bundle.files:
            self.install_file(f)

    def install_file(self, f: BundleFile) -> None:
        if f.secret:
            for user, password in secrets_table_credentials(f.content):
                self.redactor.add(user, password)
        self.write_file(f.path, f.content, f.mode, f.owner, f.group)
        if f.db is not None:
            self.makemap(f.path, f.db, f.aliases)
            self.shell.set_owner(f.db, f.mode, f.owner, f.group)

    def makemap(self, source: str, db: str, aliases: bool = False) -> CommandResult:
        """Build the db from its source, as an admin runs makemap/newaliases after an edit."""
        kind = "-t aliases " if aliases else ""
        return self.check(f"{self.makemap_path} {kind}-o {shlex.quote(db)} {shlex.quote(source)}")

    def check_config(self, config_path: str = SMTPD_CONF) -> ConfigCheck:
        result = self.run(f"{shlex.quote(self.smtpd)} -n -f {shlex.quote(config_path)}")
        check = ConfigCheck.from_output(result.returncode, result.output, config_path)
        why = self.enclosure.limit(check.output) if self.enclosure is not None and not check.ok else None
        if why is not None:
            raise EnclosureLimit(f"{self.name}: {why}")
        return check

    def upstream_listen(self) -> tuple[str, int | None] | None:
        if self.enclosure is not None:
            return None  # its connections are handed over in-process: no port for anyone to try
        return self._upstream_address, None

    def upstream_peers(self) -> tuple[str, ...] | None:
        return self._upstream_peers

    def attach_upstream(self, upstream: UpstreamServer) -> None:
        if self.enclosure is not None:
            self.enclosure.attach(upstream)

    def start(self, config_path: str = SMTPD_CONF, trace: str | None = None) -> LogFollower:
        self.stop()
        if self._fresh_spool:
            self.check(self._fresh_spool)
        flags = f"-T {shlex.quote(trace)} " if trace else ""
        smtpd = f"exec {shlex.quote(self.smtpd)} -d -v {flags}-f {shlex.quote(config_path)} 2>&1"
        self.log = LogFollower()
        self._smtpd = self.shell.stream(f"echo relay-harness-pid $$; {smtpd}", self.log)
        try:
            first = self.log.wait_for(r"^relay-harness-pid (\d+)$", READY_TIMEOUT)
            self._smtpd_pid = int(first.group(1))
            wait_ready(self.log, READY_TIMEOUT)
            self._await_control()
        except TimeoutError as exc:
            self.stop()
            for line in self.log.lines if self.enclosure is not None else ():
                why = self.enclosure.limit(line) if self.enclosure is not None else None
                if why is not None:
                    raise EnclosureLimit(f"{self.name}: {why}") from None
            refusal = start_failure(self.log.lines) if self.log.closed else None
            twice = duplicate_listener(self.log.lines) if self.log.closed else None
            if twice is not None:
                raise StartRefused(self.name, ConfigCheck(False, twice, None, twice)) from None
            if refusal is not None and not _HOST_LIMIT.search(refusal):
                refusal = self.redact(refusal)
                raise StartRefused(self.name, ConfigCheck(False, refusal, None, refusal)) from None
            cause = startup_failure(self.log.lines)
            head = f"smtpd did not start: {cause}" if cause else "smtpd did not start"
            said = f"{self.name}: {self.redact(head)}\n{self.redact(str(exc))}"
            raise StartFailed(said, [self.redact(line) for line in self.log.lines]) from None
        return self.log

    def submit(self, mail: OutgoingMail) -> str:
        result = self.run(submission_command(mail, self.sendmail), stdin=mail.as_bytes())
        if result.returncode != 0:
            said = f"{self.name}: {mail.via} exited {result.returncode}: {result.output}"
            raise submission_failed(said, result.output)
        return result.output

    def submit_many(self, mails: Sequence[OutgoingMail]) -> list[Submission]:
        results: list[Submission | None] = [None] * len(mails)
        jobs: list[tuple[int, dict[str, Any], bytes]] = []
        for i, mail in enumerate(mails):
            try:
                jobs.append((i, bulk_job(mail, self.sendmail), mail.as_bytes()))
            except TargetError as exc:
                results[i] = Submission(False, str(exc))
        for start in range(0, len(jobs), BULK_BATCH):
            batch = jobs[start : start + BULK_BATCH]
            command, stdin, seconds = bulk_submission([(job, body) for _, job, body in batch])
            result = self.run(command, stdin=stdin, timeout=seconds + 30)
            if start == 0 and result.returncode == NOT_FOUND and not result.stdout:
                return super().submit_many(mails)  # no python3 on this host: one command a message
            why = f"the submission command exited {result.returncode}: {result.stderr.strip()[-300:]}"
            for (i, _, _), item in zip(batch, bulk_results(result.stdout, len(batch), why), strict=True):
                results[i] = Submission(item.ok, self.redact(item.output))
        return [r for r in results if r is not None]

    def tls_handshakes(self, listeners: Sequence[tuple[str, str, int, str]]) -> list[Handshake] | None:
        command = f"python3 -c {shlex.quote(_TLS_HANDSHAKE)} {shlex.quote(json.dumps(list(listeners)))}"
        result = self.run(command, timeout=30 + 20 * len(listeners))
        if result.returncode != 0:
            raise TargetError(f"{self.name}: the TLS handshake client failed: {self.redact(result.output)}")
        out = []
        for line in result.stdout.splitlines():
            row = json.loads(line)
            der = base64.b64decode(row["der"]) if "der" in row else None
            fields = (row["word"], row["address"], row["port"], row["mode"])
            out.append(Handshake(*fields, der, row.get("error")))
        return out

    def control(self, *args: str) -> str:
        result = self._smtpctl(*args)
        if result.returncode != 0:
            said = f"smtpctl {' '.join(args)} exited {result.returncode}: {result.output}"
            raise TargetError(f"{self.name}: {said}")
        return result.output

    def queue(self) -> str:
        return self._smtpctl("show", "queue").output

    def _await_control(self) -> None:
        """Until smtpd's control socket takes connections: sendmail (smtpctl enqueue) that finds
        it refusing does not fail, it writes the mail to the offline queue and exits 75 with no
        word, and smtpd relays it later. Its READY lines come from other processes. An smtpd that
        exited since (a table backend gave up: `fatal: failed to connect`) did start: the run
        finds it gone and says why (relay_run's exited_why), not a control socket's timeout."""
        said = self._smtpctl("show", "status")
        if NOT_RUNNING in said.output and not self.log.closed:
            raise TimeoutError(f"smtpd's control socket took no connection within {READY_TIMEOUT:g}s")

    def _smtpctl(self, *args: str) -> CommandResult:
        """smtpctl on the running smtpd. smtpd's control process listens on its socket in a
        process of its own and logs nothing when it does: under load the READY lines of the
        others came first, and smtpctl said `smtpd doesn't seem to be running` of an smtpd that
        was starting. Asked again while smtpd runs (its end is the event that stops the wait)."""
        command = " ".join([shlex.quote(self.smtpctl), *(shlex.quote(a) for a in args)])
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            result = self.run(command)
            started = self._smtpd is not None  # by us, so its output ends when it exits
            if NOT_RUNNING not in result.output or not started or time.monotonic() > deadline:
                return result
            if self.log.wait_closed(CONTROL_RETRY):
                return result  # smtpd has exited: that is the answer

    def mailbox(self, user: str) -> bytes:
        return self.read_file(f"/var/mail/{user}")

    def point(self, names: Iterable[str], address: str) -> None:
        entries = "".join(f"{address}\t{name}\n" for name in dict.fromkeys(names))
        self.check("cat >> /etc/hosts", stdin=entries.encode())

    def trust(self, ca_pem: bytes) -> None:
        """The test CA in place of every CA bundle smtpd may read (Debian's always), in one command.

        The old file is removed first: a symlink into /usr/share must not be written through.
        """
        first = CA_BUNDLES[0]
        paths = " ".join(CA_BUNDLES)
        self.check(
            f'pem=$(cat); for p in {paths}; do if [ "$p" = {first} ] || [ -e "$p" ]; then rm -f "$p"; '
            'mkdir -p "$(dirname "$p")"; printf \'%s\\n\' "$pem" > "$p"; chmod 644 "$p"; fi; done',
            stdin=ca_pem,
        )

    def upstream_address(self) -> str:
        return self.enclosure.seen_at if self.enclosure is not None else self._upstream_address

    def stop(self) -> None:
        chan, pid = self._smtpd, self._smtpd_pid
        self._smtpd = self._smtpd_pid = None
        if chan is None:
            return
        if pid is not None and not chan.exit_status_ready():
            with contextlib.suppress(TargetError):
                self.run(f"kill -TERM {pid} 2>/dev/null; true")
        self.log.wait_closed(10)
        with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
            chan.close()

    def close(self) -> None:
        with contextlib.suppress(TargetError):
            self.stop()
        try:
            if self._on_close is not None:
                self._on_close()
        finally:
            if self._owns_connection:
                self.shell.close()


class Enclosure:
    """A private place for smtpd inside a host that must not change (a sandbox on a staging host).

    It reaches the fake upstream through a tunnel: `seen_at` is the address smtpd connects to,
    and `attach` opens the place and hands each of its connections to the running upstream
    in-process (the upstream listens nowhere). Only paths `may_write` allows are
    written (the rest of the host is the host's); `limit` tells a refusal that comes from the
    enclosure (an interface it lacks) from one that comes from the config.
    """

    seen_at: str = "127.0.0.1"

    def attach(self, upstream: UpstreamServer) -> None:
        raise NotImplementedError

    def may_write(self, path: str) -> bool:
        raise NotImplementedError

    def limit(self, text: str) -> str | None:
        """Why `text` (smtpd's refusal or log) is the enclosure's limit, None when it is not."""
        return None
