"""`relay-harness accept`: does an existing mail host still relay as before? Learned by reading it.

The host is reached over SSH and only read: facts come from commands an admin would type. The
relay itself is tried for real without touching the running smtpd: preferably by the host's own
smtpd binary reading its own config and tables in a sandbox on the host (private namespaces, see
`sandbox`), relaying through an SSH reverse tunnel to the fake upstream here; where the host
cannot sandbox (or with --relay-mode lab), on a copy: the config and tables installed verbatim on
a fresh LOCAL lab test host. The report says which way was used. Nothing is sent to the real
provider, nothing of the host's is written, and the files read are checked unchanged by hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import paramiko

from harness.accept import baseline as baselines
from harness.accept.facts import AcceptError, Fact, HostFacts, gather, preflight, unchanged
from harness.accept.sandbox import SandboxCapability, SandboxTarget, SandboxUnavailable
from harness.pki import TestPki
from harness.redact import Redactor, secrets_table_credentials
from harness.smtpdconf import RelayExpectation, expectations
from harness.targets.base import Bundle, BundleFile, Target, TargetError
from harness.targets.ssh import CommandResult, SshTarget
from harness.upstream import Credential, Profile, UpstreamError, load_profile

if TYPE_CHECKING:
    from harness.check import Probe, ProbeResult

LabFactory = Callable[[TestPki], AbstractContextManager[Target]]
WAY_COPY = "relay checked in the local lab with the host's files (copied)"
WAY_SANDBOX = (
    "relay checked in a sandbox on the host (host's smtpd binary, config and tables as they are; "
    "SSH reverse tunnel to the fake upstream)"
)
RELAY_MODES = ("auto", "sandbox", "lab")
# smtpd -n's words for a listener it cannot set up (an interface or address the sandbox lacks).
SANDBOX_LIMIT = re.compile(
    r"invalid virtual ip or interface|bind: Cannot assign requested address|interface .* not found"
)
WAY_NONE = "relay not checked"
# Users and groups a lab host has; other owners of copied files become root there.
KNOWN_OWNERS = {"root", "_smtpd", "_smtpq", "opensmtpd", "opensmtpq"}


# -- connecting ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SshUrl:
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"ssh://{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


def parse_ssh_url(url: str) -> SshUrl:
    parts = urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError:
        raise AcceptError(f"{url}: bad port") from None
    if parts.scheme != "ssh" or not parts.hostname or not parts.username or parts.path not in ("", "/"):
        raise AcceptError(f"{url}: expected ssh://USER@HOST[:PORT]")
    return SshUrl(parts.username, parts.hostname, port)


def connect(
    url: str, identity: Path | None = None, known_hosts: Path | None = None, timeout: float = 10
) -> SshTarget:
    """An SshTarget on the host, or AcceptError naming the host and the cause."""
    where = parse_ssh_url(url)
    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys()
        if known_hosts is not None:
            client.load_host_keys(str(known_hosts))
    except OSError as exc:
        raise AcceptError(f"{known_hosts}: cannot read known hosts: {exc.strerror}") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    if identity is not None and not identity.is_file():
        raise AcceptError(f"--identity {identity}: no such file")
    name = f"{where.host}:{where.port}"
    try:
        client.connect(
            where.host,
            where.port,
            username=where.user,
            key_filename=str(identity) if identity else None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=identity is None,
            look_for_keys=identity is None,
        )
    except paramiko.BadHostKeyException as exc:
        raise AcceptError(f"{name}: host key mismatch ({exc.key.get_name()}): refusing to connect") from None
    except paramiko.AuthenticationException:
        key = f"key {identity}" if identity else "the agent's and default keys"
        raise AcceptError(f"{name}: authentication refused for user {where.user} with {key}") from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        causes = "; ".join(sorted({getattr(e, "strerror", None) or str(e) for e in exc.errors.values()}))
        raise AcceptError(f"{name}: unreachable: {causes}") from None
    except socket.gaierror as exc:
        raise AcceptError(f"{where.host}: unreachable: cannot resolve the name: {exc.strerror}") from None
    except TimeoutError:
        raise AcceptError(f"{name}: unreachable: no answer within {timeout:g}s") from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise AcceptError(
                f"{name}: host key unknown: add it to ~/.ssh/known_hosts (check its fingerprint first) "
                "or pass --known-hosts FILE"
            ) from None
        raise AcceptError(f"{name}: SSH failed: {exc}") from None
    except OSError as exc:
        raise AcceptError(f"{name}: unreachable: {exc.strerror or exc}") from None
    return SshTarget(f"{where.user}@{where.host}", client, upstream_address="")


class RemoteShell:
    """Read-only access to the host: commands (through `sudo -n` when not root) and file bytes."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.name = target.name
        self.redactor: Redactor = target.redactor
        self.sudo = False
        self.sandbox_capability: SandboxCapability | None = None

    def prepare(self) -> None:
        """Root, or passwordless sudo: anything less cannot read the secrets table (exit 2)."""
        uid = self.target.run("id -u")
        if uid.stdout.strip() == "0":
            return
        probe = self.target.run("sudo -n true")
        if probe.returncode != 0:
            raise AcceptError(
                f"{self.name}: not root and no passwordless sudo ({probe.output or 'sudo -n true failed'}): "
                "the harness needs root to read the secrets table"
            )
        self.sudo = True

    def _wrap(self, command: str) -> str:
        return f"sudo -n sh -c {shlex.quote(command)}" if self.sudo else command

    def run(self, command: str, timeout: float = 60) -> CommandResult:
        result = self.target.run(self._wrap(command), timeout=timeout)
        shown = f"sudo {command}" if self.sudo else command
        return CommandResult(shown, result.returncode, result.stdout, result.stderr)

    def read(self, path: str) -> bytes | None:
        """The file's bytes as they are (not redacted: the caller decides what is secret)."""
        transport = self.target.client.get_transport()
        if transport is None or not transport.is_active():
            raise AcceptError(f"{self.name}: the SSH connection is closed")
        try:
            chan = transport.open_session()
            chan.settimeout(60)
            chan.exec_command(self._wrap(f"cat -- {shlex.quote(path)}"))
            chan.shutdown_write()
            data = chan.makefile("rb").read()
            chan.makefile_stderr("rb").read()
            rc = chan.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise AcceptError(f"{self.name}: reading {path} failed: {exc or type(exc).__name__}") from None
        return bytes(data) if rc == 0 else None


# -- the relay, on a copy -----------------------------------------------------------------------
def _route(facts: HostFacts) -> RelayExpectation | None:
    if facts.parsed is None:
        return None
    return next((r for r in expectations(facts.parsed) if r.via == "smarthost" and r.connect_host), None)


def _profile_for(route: RelayExpectation, facts: HostFacts) -> tuple[Profile, str]:
    """Without --upstream: a provider like the URL says, accepting the host's own credentials."""
    creds: list[Credential] = []
    table = next((t for t in facts.tables if t.name == route.auth_table), None)
    if route.label and table is not None and table.file is not None and table.backend == "file":
        for line in table.file.content.decode("utf-8", "replace").splitlines():
            parts = line.split("#", 1)[0].split(None, 1)
            if len(parts) == 2 and parts[0] == route.label:
                pairs = secrets_table_credentials(line.encode())
                creds.extend(Credential(u, p) for u, p in pairs)
    profile = Profile(
        host=route.connect_host or "",
        port=route.port,
        tls=route.tls_mode,
        auth="required" if route.auth else "none",
        credentials=tuple(creds),
    )
    note = (
        "no --upstream profile: the fake upstream accepted the host's own credentials, "
        "so the password itself was not verified against the provider's"
    )
    return profile, note


def _owner(name: str) -> str:
    return name if name in KNOWN_OWNERS else "root"


def _bundle(facts: HostFacts) -> Bundle:
    from harness.check import local_users, parse_aliases

    assert facts.config is not None
    files: list[BundleFile] = []
    users: set[str] = set()
    for t in facts.tables:
        for f in (t.source, t.file):  # the source first: install order is the file order
            if f is None:
                continue
            st = f.stat
            files.append(BundleFile(f.path, f.content, st.mode, _owner(st.owner), _owner(st.group), f.secret))
        text = t.source or t.file
        if t.aliases and text is not None and (t.backend == "file" or t.source is not None):
            users.update(local_users(parse_aliases(text.content)))
    config = facts.config.content.decode("utf-8", "replace")
    return Bundle(config, tuple(files), tuple(sorted(users)), facts.config_path)


def _probe_plan(facts: HostFacts) -> tuple[list[Probe], list[str]]:
    """The probes, planned from the tables' text only.

    A db: table's file is binary (Berkeley DB): read as aliases(5) text it yields random "keys"
    (bytes around a colon), and a probe to such a recipient put NUL bytes into the sendmail
    command line, which sshd rejects by closing the whole connection. Its source text, when
    there is one, is planned from instead.
    """
    from harness.check import plan_probes

    bundle = _bundle(facts)
    binary = {t.file.path for t in facts.tables if t.backend == "db" and t.file is not None}
    text_only = dataclasses.replace(bundle, files=tuple(f for f in bundle.files if f.path not in binary))
    return plan_probes(text_only, facts.parsed)


def relay_probe(
    facts: HostFacts,
    profile: Profile | None,
    lab_factory: LabFactory,
    mode: str = "lab",
    shell: RemoteShell | None = None,
) -> tuple[list[Fact], str, list[str]]:
    """The relay tried for real: in a sandbox on the host, or on a copy in the local lab.

    `mode` "sandbox" insists on the host (exit 2 when it cannot), "auto" prefers it and says
    why it fell back, "lab" copies the host's files into a local lab host.
    """
    notes: list[str] = []
    route = _route(facts)
    if route is None:
        return [Fact("relay", "info", "the config has no smarthost route: relay not probed")], WAY_NONE, notes
    if profile is None:
        profile, note = _profile_for(route, facts)
        notes.append(note)
    elif (route.connect_host, route.port) != (profile.host, profile.port):
        fact = Fact(
            "relay-route",
            "fail",
            f"the config relays to {route.connect_host}:{route.port} ({route.url}), "
            f"the profile is for {profile.host}:{profile.port}; relay not probed",
            hint="point the relay URL at the provider in the profile, or pass that provider's profile",
        )
        return [fact], WAY_NONE, notes
    if mode != "lab" and shell is not None:
        why = _sandbox_unavailable(shell)
        if why is None:
            try:
                sandbox_facts, probe_notes = _sandbox_probe(shell, facts, profile)
                return sandbox_facts, WAY_SANDBOX, notes + probe_notes
            except SandboxUnavailable as exc:
                why = str(exc)
        if mode == "sandbox":
            raise AcceptError(f"{shell.name}: --relay-mode sandbox: the host cannot run the sandbox: {why}")
        notes.append(f"the host cannot run the relay sandbox ({why}): its files were copied to the local lab")
    facts_out, lab_notes = _lab_probe(facts, profile, lab_factory)
    return facts_out, WAY_COPY, notes + lab_notes


def _sandbox_unavailable(shell: RemoteShell) -> str | None:
    """Why the host cannot run the sandbox (None: it can); what was learned is kept on `shell`."""
    from harness.accept.sandbox import probe_capability

    capability = probe_capability(shell.run)
    shell.sandbox_capability = capability
    return capability.reason


def _relay_fact(probe: Probe, r: ProbeResult, where: str) -> Fact:
    return Fact(
        f"relay:{probe.name}",
        "pass" if r.ok else "fail",
        f"{probe.description}: {r.observed}" if r.ok else probe.description,
        f"sendmail -f root {probe.recipient} ({where})",
        "" if r.ok else f"expected: {r.expected}\nobserved: {r.observed}",
        evidence=r.evidence,
        hint=r.hint,
    )


def _sandbox_probe(shell: RemoteShell, facts: HostFacts, profile: Profile) -> tuple[list[Fact], list[str]]:
    """The host's smtpd, config and tables as they are, in private namespaces on the host.

    SandboxUnavailable (before any probe ran) lets "auto" fall back to the lab; any other
    failure of the harness is exit 2. The sandbox is ended and looked for afterwards in every
    case, Ctrl-C included, and what was found is a fact of its own.
    """
    from harness.check import run_probe
    from harness.relay import RelayRun
    from harness.upstream import UpstreamServer

    redactor = facts_redactor(facts, profile)
    capability = shell.sandbox_capability or SandboxCapability()
    probes, notes = _probe_plan(facts)
    pki = TestPki()
    sandbox = SandboxTarget(shell.target, shell.sudo, facts.smtpd, capability, redactor)
    where = f"in the sandbox on {shell.name}, the host's {facts.config_path} and tables as they are"
    out: list[Fact] = []
    try:
        sandbox.point((profile.host,), sandbox.upstream_address())
        sandbox.trust(pki.ca_pem)
        with UpstreamServer(profile, pki, "127.0.0.1", 0) as upstream:
            try:
                sandbox.open(profile.port, upstream.port)
            except TargetError as exc:
                if isinstance(exc, SandboxUnavailable):
                    raise
                raise SandboxUnavailable(redactor(str(exc))) from None
            check = sandbox.check_config(facts.config_path)
            if not check.ok and SANDBOX_LIMIT.search(check.output):
                # A listener on an interface or address the sandbox lacks (it has only the
                # host's loopback): a limit of the sandbox, not a fault of the host.
                why = redactor(check.message or check.output)
                raise SandboxUnavailable(
                    f"its smtpd cannot listen there as configured ({why}): "
                    "the sandbox has only a loopback interface"
                )
            try:
                log = sandbox.start(facts.config_path) if check.ok else None
            except TargetError:
                limit = next((line for line in sandbox.log.lines if SANDBOX_LIMIT.search(line)), None)
                if limit is not None:
                    raise SandboxUnavailable(
                        f"its smtpd cannot listen there as configured ({limit.strip()}): "
                        "the sandbox has only a loopback interface"
                    ) from None
                raise
            if log is None:
                out.append(
                    Fact(
                        "relay",
                        "fail",
                        "the host's smtpd refused its own config and tables in the sandbox",
                        f"smtpd -n -f {facts.config_path} ({where})",
                        redactor(check.output),
                    )
                )
            else:
                run = RelayRun(sandbox, upstream, log, check)
                for probe in probes:
                    out.append(_relay_fact(probe, run_probe(run, probe, profile, redactor), where))
    except SandboxUnavailable:
        raise
    except (TargetError, UpstreamError, EOFError) as exc:
        raise AcceptError(
            f"the relay probe could not run in the sandbox on {shell.name}: "
            f"{redactor(str(exc)) or type(exc).__name__} (pass --relay-mode lab, or --no-relay)"
        ) from None
    finally:
        sandbox.close()
    out.append(_sandbox_gone(sandbox))
    return out, notes


def _sandbox_gone(sandbox: SandboxTarget) -> Fact:
    command = f"ls /proc/*/ns/net | grep {sandbox.netns}; ls -d {sandbox.dir}"
    if sandbox.leftovers:
        return Fact(
            "sandbox-removed",
            "fail",
            "the sandbox left something on the host",
            command,
            evidence=list(sandbox.leftovers),
            hint="end the listed processes and remove the directory by hand",
        )
    return Fact(
        "sandbox-removed",
        "pass",
        f"sandbox ended: no process left in its network namespace {sandbox.netns}, {sandbox.dir} removed",
        command,
    )


def _lab_probe(facts: HostFacts, profile: Profile, lab_factory: LabFactory) -> tuple[list[Fact], list[str]]:
    """The host's config and tables, copied verbatim into a local lab host, relaying to the fake."""
    from harness.check import run_probe
    from harness.relay import ConfigRejected, relay_run

    notes: list[str] = []
    redactor = facts_redactor(facts, profile)
    bundle = _bundle(facts)
    pki = TestPki()
    where = f"on {{lab}} with the host's {facts.config_path} and {len(bundle.files)} table file(s), copied"
    out: list[Fact] = []
    try:
        with lab_factory(pki) as target:
            lab = target.name
            add = getattr(target, "redactor", None)
            if isinstance(add, Redactor):
                for t in facts.tables:
                    for f in (t.file, t.source):
                        if f is not None and f.secret:
                            for user, password in secrets_table_credentials(f.content):
                                add.add(user, password)
                for cred in profile.credentials:
                    add.add(cred.user, cred.password)
            probes, probe_notes = _probe_plan(facts)
            notes.extend(probe_notes)
            with relay_run(target, bundle, profile, pki) as run:
                for probe in probes:
                    r = run_probe(run, probe, profile, redactor)
                    out.append(_relay_fact(probe, r, where.format(lab=lab)))
    except ConfigRejected as refused:
        out.append(
            Fact(
                "relay",
                "fail",
                "smtpd in the local lab refused the host's config and tables as copied",
                f"smtpd -n -f {facts.config_path}",
                redactor(refused.check.output),
            )
        )
    except (TargetError, UpstreamError, EOFError) as exc:
        # The harness, not the host, failed: exit 2, with the way out for a machine without a lab.
        raise AcceptError(
            f"the relay probe could not run in the local lab: {redactor(str(exc)) or type(exc).__name__} "
            "(pass --no-relay to check the host's facts only)"
        ) from None
    return out, notes


def facts_redactor(facts: HostFacts, profile: Profile | None) -> Redactor:
    redactor = Redactor((c.user, c.password) for c in (profile.credentials if profile else ()))
    for t in facts.tables:
        for f in (t.file, t.source):
            if f is not None and f.secret:
                for user, password in secrets_table_credentials(f.content):
                    redactor.add(user, password)
    return redactor


# -- the run and its report ---------------------------------------------------------------------
@dataclass(frozen=True)
class AcceptOptions:
    url: str
    identity: Path | None = None
    known_hosts: Path | None = None
    upstream: Path | None = None
    baseline: Path | None = None
    save_baseline: Path | None = None
    config: str | None = None
    mail_log: str | None = None
    relay: bool = True
    relay_mode: str = "auto"


@dataclass
class AcceptReport:
    url: str
    host: str = ""
    version: str = ""
    config_path: str = ""
    facts: list[Fact] = field(default_factory=list)
    relay_way: str = WAY_NONE
    differences: list[str] | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(f.failed for f in self.facts) and not self.differences


def _default_lab(pki: TestPki) -> AbstractContextManager[Target]:
    from harness.check import lab_target

    return lab_target(pki)


def run_accept(options: AcceptOptions, lab_factory: LabFactory = _default_lab) -> AcceptReport:
    """Everything `accept` does; AcceptError/BaselineError for exit 2, a report otherwise."""
    started = time.monotonic()
    profile = _load_profile(options.upstream)
    before = baselines.load(options.baseline) if options.baseline else None
    report = AcceptReport(options.url)
    with _connected(options) as shell:
        facts = preflight(shell, options.config)
        report.host, report.version, report.config_path = shell.name, facts.version, facts.config_path
        if profile is not None:
            for cred in profile.credentials:
                shell.redactor.add(cred.user, cred.password)
        gather(shell, facts, profile, options.mail_log)
        relay: list[Fact] = []
        if options.relay:
            relay, report.relay_way, notes = relay_probe(
                facts, profile, lab_factory, options.relay_mode, shell
            )
            report.notes.extend(notes)
        else:
            report.notes.append("--no-relay: the relay was not probed")
        facts.facts.extend(relay)
        facts.facts.append(unchanged(shell, facts.read_files()))
        redact = shell.redactor
        report.facts = [_redacted(f, redact) for f in facts.facts]
        report.notes = [redact(n) for n in report.notes]
        report.baseline = baselines.build(
            facts, [f for f in report.facts if f.name.startswith("relay")], report.relay_way
        )
    report.notes.insert(0, report.relay_way)
    if before is not None:
        report.differences = baselines.compare(before, report.baseline)
    if options.save_baseline is not None:
        baselines.save(report.baseline, options.save_baseline)
    report.seconds = time.monotonic() - started
    return report


def _load_profile(path: Path | None) -> Profile | None:
    from harness.upstream import ProfileError

    if path is None:
        return None
    try:
        return load_profile(path)
    except ProfileError as exc:
        raise AcceptError(str(exc)) from None


@contextlib.contextmanager
def _connected(options: AcceptOptions) -> Iterator[RemoteShell]:
    target = connect(options.url, options.identity, options.known_hosts)
    try:
        shell = RemoteShell(target)
        shell.prepare()
        yield shell
    except TargetError as exc:
        raise AcceptError(str(exc)) from None
    except EOFError:
        raise AcceptError(f"{target.name}: the SSH connection was closed by the host") from None
    finally:
        target.client.close()


def _redacted(fact: Fact, redact: Redactor) -> Fact:
    return Fact(
        fact.name,
        fact.status,
        redact(fact.summary),
        redact(fact.command),
        redact(fact.output),
        [redact(e) for e in fact.evidence],
        redact(fact.hint) if fact.hint else None,
    )


MAX_OUTPUT_LINES = 8


def text_report(report: AcceptReport) -> str:
    lines = [f"relay-harness accept {report.url} (OpenSMTPD {report.version or '?'}, {report.config_path})"]
    for f in report.facts:
        lines.append(f"  {f.status.upper():4}  {f.name}: {f.summary}")
        if f.command:
            lines.append(f"        $ {f.command}")
        output = f.output.splitlines()
        if f.status != "pass" or len(output) <= 2:
            shown = output[:MAX_OUTPUT_LINES]
            lines.extend(f"        | {line}" for line in shown)
            if len(output) > len(shown):
                lines.append(f"        | ... ({len(output) - len(shown)} more lines in the JSON report)")
        lines.extend(f"        evidence: {e}" for e in f.evidence)
        if f.hint and f.status != "pass":
            lines.append(f"        fix: {f.hint}")
    if report.differences is not None:
        if report.differences:
            lines.append(f"  FAIL  baseline: {len(report.differences)} difference(s)")
            lines.extend(f"        {d}" for d in report.differences)
        else:
            lines.append("  PASS  baseline: no difference")
    lines.extend(f"  note: {n}" for n in report.notes)
    counts = {s: sum(f.status == s for f in report.facts) for s in ("pass", "fail", "warn")}
    verdict = "PASS" if report.ok else "FAIL"
    lines.append(
        f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['warn']} warning(s)"
        + (f", {len(report.differences)} baseline difference(s)" if report.differences else "")
        + f" in {report.seconds:.2f}s"
    )
    return "\n".join(lines)


def json_report(report: AcceptReport) -> dict[str, Any]:
    return {
        "url": report.url,
        "host": report.host,
        "version": report.version,
        "config": report.config_path,
        "ok": report.ok,
        "relay_way": report.relay_way,
        "seconds": round(report.seconds, 3),
        "facts": [
            {
                "name": f.name,
                "status": f.status,
                "summary": f.summary,
                "command": f.command,
                "output": f.output,
                "evidence": f.evidence,
                "hint": f.hint,
            }
            for f in report.facts
        ],
        "baseline_differences": report.differences,
        "notes": report.notes,
    }


def write_junit(report: AcceptReport, path: Path) -> None:
    """One testcase per fact (warnings pass, with their text as output), one for the baseline."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name=f"relay-harness accept {report.url}")
    failures = 0
    cases = list(report.facts)
    if report.differences is not None:
        cases.append(
            Fact(
                "baseline",
                "fail" if report.differences else "pass",
                "baseline comparison",
                evidence=report.differences,
            )
        )
    for f in cases:
        case = ET.SubElement(suite, "testcase", classname="relay-harness.accept", name=f.name)
        body = "\n".join([f"$ {f.command}" if f.command else "", f.output, *f.evidence]).strip()
        if f.failed:
            failures += 1
            failure = ET.SubElement(case, "failure", message=f.summary)
            failure.text = body + (f"\nfix: {f.hint}" if f.hint else "")
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"{f.status}: {f.summary}\n{body}".strip()
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("time", f"{report.seconds:.3f}")
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def cmd_accept(args: Any) -> int:
    """The `accept` subcommand: exit 0 as before, 1 a finding or difference, 2 cannot check."""
    import json

    from harness.accept.baseline import BaselineError
    from harness.cli import UsageError

    options = AcceptOptions(
        args.url,
        args.identity,
        args.known_hosts,
        args.upstream,
        args.baseline,
        args.save_baseline,
        args.config,
        args.mail_log,
        not args.no_relay,
        args.relay_mode,
    )
    try:
        report = run_accept(options)
    except (AcceptError, BaselineError) as exc:
        raise UsageError(str(exc)) from None
    print(text_report(report), flush=True)
    try:
        if args.report_json:
            args.report_json.write_text(json.dumps(json_report(report), indent=2) + "\n", encoding="utf-8")
        if args.junit:
            write_junit(report, args.junit)
    except OSError as exc:
        raise UsageError(f"cannot write the report: {exc}") from None
    return 0 if report.ok else 1
