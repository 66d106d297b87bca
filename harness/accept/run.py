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
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.accept import baseline as baselines
from harness.accept.facts import AcceptError, Fact, HostFacts, gather, preflight, unchanged
from harness.bundle import TableInput, build_bundle
from harness.check import CheckReport
from harness.pki import TestPki
from harness.probes import Probe, ProbeResult, plan_probes, run_probes
from harness.redact import Redactor, secrets_table_credentials
from harness.relay import ConfigRejected, relay_run
from harness.smtpdconf import RelayExpectation, expectations
from harness.targets import CONNECT_TIMEOUT
from harness.targets.base import Bundle, BundleFile, Target, TargetError
from harness.targets.sandbox import SandboxCapability, probe_capability, sandbox_target
from harness.targets.select import lab_target
from harness.targets.shell import SMTPD_GROUP_NAMES, Shell, as_root, connect
from harness.targets.smtpd import EnclosureLimit
from harness.upstream import Credential, Profile, UpstreamError, load_profile

# A fresh lab test host: of this machine's release (None), or of a Debian release's image.
LabFactory = Callable[[TestPki, str | None], AbstractContextManager[Target]]
WAY_COPY = "relay checked in the local lab with the host's files (copied)"
WAY_SANDBOX = (
    "relay checked in a sandbox on the host (host's smtpd binary, config and tables as they are; "
    "its connections carried over SSH channels to the fake upstream)"
)
WAY_NONE = "relay not checked"
SBIN_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# Users and groups a lab host has; other owners of copied files become root there. smtpd's
# groups by any system's name: the lab host gives the file to its own (Shell._group_name).
KNOWN_OWNERS = {"root", "_smtpd", "_smtpq", "opensmtpd", "opensmtpq"}
KNOWN_GROUPS = {"root", *(g for family in SMTPD_GROUP_NAMES for g in family)}


# -- the relay, on a copy -----------------------------------------------------------------------
def smarthost_route(facts: HostFacts) -> RelayExpectation | None:
    if facts.parsed is None:
        return None
    return next((r for r in expectations(facts.parsed) if r.via == "smarthost" and r.connect_host), None)


def relay_profile(route: RelayExpectation, facts: HostFacts) -> tuple[Profile, str]:
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


def _group(name: str) -> str:
    return name if name in KNOWN_GROUPS else "root"


def host_bundle(facts: HostFacts) -> Bundle:
    """The host's config and tables as read, with their modes and owners, for a copy in the lab."""
    assert facts.config is not None
    tables: dict[str, TableInput] = {}
    for t in facts.tables:
        f, source = t.file, t.source
        if f is None:
            continue
        meta = (f.stat.mode, _owner(f.stat.owner), _group(f.stat.group))
        if t.backend == "db":
            smeta = (
                (source.stat.mode, _owner(source.stat.owner), _group(source.stat.group)) if source else None
            )
            content = source.content if source else b""
            tables[t.name] = TableInput(content, meta, built=f.content, source_meta=smeta)
        else:
            tables[t.name] = TableInput(f.content, meta)
    included = [
        BundleFile(f.path, f.content, f.stat.mode, _owner(f.stat.owner), _group(f.stat.group))
        for f in facts.includes
    ]
    config = facts.config.content.decode("utf-8", "replace")
    return build_bundle(config, facts.parsed, tables, config_path=facts.config_path, extra_files=included)


def relay_probe(
    facts: HostFacts,
    profile: Profile | None,
    lab_factory: LabFactory,
    mode: str = "lab",
    shell: Shell | None = None,
) -> tuple[list[Fact], str, list[str], CheckReport | None]:
    """The relay tried for real: in a sandbox on the host, or on a copy in the local lab.

    `mode` "sandbox" insists on the host (exit 2 when it cannot), "auto" prefers it and says
    why it fell back, "lab" copies the host's files into a local lab host. Also returns the
    probes' outcome as a check report (None when nothing was probed), for `--upgrade-to`.
    """
    notes: list[str] = []
    route = smarthost_route(facts)
    if route is None:
        fact = Fact("relay", "info", "the config has no smarthost route: relay not probed")
        return [fact], WAY_NONE, notes, None
    if profile is None:
        profile, note = relay_profile(route, facts)
        notes.append(note)
    elif (route.connect_host, route.port) != (profile.host, profile.port):
        fact = Fact(
            "relay-route",
            "fail",
            f"the config relays to {route.connect_host}:{route.port} ({route.url}), "
            f"the profile is for {profile.host}:{profile.port}; relay not probed",
            hint="point the relay URL at the provider in the profile, or pass that provider's profile",
        )
        return [fact], WAY_NONE, notes, None
    if mode != "lab" and shell is not None:
        capability = probe_capability(shell.run)
        why = capability.reason
        if why is None:
            try:
                sandbox_facts, probe_notes, report = _sandbox_probe(shell, capability, facts, profile)
                return sandbox_facts, WAY_SANDBOX, notes + probe_notes, report
            except EnclosureLimit as exc:
                why = str(exc)
        if mode == "sandbox":
            raise AcceptError(f"{shell.name}: --relay-mode sandbox: the host cannot run the sandbox: {why}")
        notes.append(f"the host cannot run the relay sandbox ({why}): its files were copied to the local lab")
    release, why = copy_release(facts)
    if why:
        notes.append(why)
    facts_out, lab_notes, report = lab_probe(facts, profile, lab_factory, release)
    return facts_out, WAY_COPY, notes + lab_notes, report


def copy_release(facts: HostFacts) -> tuple[str | None, str]:
    """The release whose smtpd the copy runs on: the host's own, so the copy judges as it would.

    A Debian host of another release than this machine (a trixie host, after the upgrade) gets a
    lab host of that release's image (built on first use); any other host this machine's smtpd,
    said in a note where its version is not the host's.
    """
    from harness.targets.images import debian_releases, machine_release

    own = machine_release()
    release = facts.debian_release
    if release and release != own and release in debian_releases():
        return release, f"the host runs Debian {release}: its files were copied to a lab host of {release}"
    if release == own or not facts.version or facts.version == _machine_smtpd_version():
        return None, ""
    return None, (
        f"the copy runs this machine's smtpd ({own or 'its release'}), not the host's OpenSMTPD "
        f"{facts.version}: where they differ, the relay verdict is this machine's smtpd's"
    )


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


def _probe_on(
    target: Target, bundle: Bundle, facts: HostFacts, profile: Profile, pki: TestPki, where: str
) -> tuple[list[Fact], CheckReport]:
    """The relay probes through `relay_run` on any target; a refused config is a fact, not an error."""
    redactor = facts_redactor(facts, profile)
    add = getattr(target, "redactor", None)
    if isinstance(add, Redactor):
        add.extend(redactor)
    probes, _ = plan_probes(host_bundle(facts), facts.parsed)
    report = CheckReport(facts.config_path, target.name, "fail")
    try:
        with relay_run(target, bundle, profile, pki) as run:
            results = run_probes(run, probes, profile, redactor)
    except ConfigRejected as refused:
        report.verdict = "refused"
        report.refusal = redactor(refused.check.message or refused.check.output)
        report.refusal_line = refused.check.line
        fact = Fact(
            "relay",
            "fail",
            f"smtpd {where} refused the host's config and tables",
            f"smtpd -n -f {facts.config_path}",
            redactor(refused.check.output),
        )
        return [fact], report
    report.results = results
    report.verdict = "pass" if all(r.ok for r in results) else "fail"
    return [_relay_fact(p, r, where) for p, r in zip(probes, results, strict=True)], report


def _sandbox_probe(
    shell: Shell, capability: SandboxCapability, facts: HostFacts, profile: Profile
) -> tuple[list[Fact], list[str], CheckReport]:
    """The host's smtpd, config and tables as they are, in private namespaces on the host.

    EnclosureLimit (before any probe ran) lets "auto" fall back to the lab; any other failure
    of the harness is exit 2. The sandbox is ended and looked for afterwards in every case,
    Ctrl-C included, and what was found is a fact of its own.
    """
    redactor = facts_redactor(facts, profile)
    _, notes = plan_probes(host_bundle(facts), facts.parsed)
    sbin = facts.smtpd.rpartition("/")[0] or "/usr/sbin"
    target, sandbox = sandbox_target(shell, sbin, capability, profile.port)
    where = f"in the sandbox on {shell.name}, the host's {facts.config_path} and tables as they are"
    in_place = Bundle(None, config_path=facts.config_path)
    try:
        out, report = _probe_on(target, in_place, facts, profile, TestPki(), where)
    except EnclosureLimit:
        raise
    except (TargetError, UpstreamError, EOFError) as exc:
        raise AcceptError(
            f"the relay probe could not run in the sandbox on {shell.name}: "
            f"{redactor(str(exc)) or type(exc).__name__} (pass --relay-mode lab, or --no-relay)"
        ) from None
    finally:
        target.close()
    out.append(_sandbox_gone(sandbox.netns, sandbox.dir, sandbox.leftovers))
    return out, notes, report


def _sandbox_gone(netns: str | None, directory: str | None, leftovers: list[str]) -> Fact:
    command = f"ls /proc/*/ns/net | grep {netns}; ls -d {directory}"
    if leftovers:
        return Fact(
            "sandbox-removed",
            "fail",
            "the sandbox left something on the host",
            command,
            evidence=list(leftovers),
            hint="end the listed processes and remove the directory by hand",
        )
    return Fact(
        "sandbox-removed",
        "pass",
        f"sandbox ended: no process left in its network namespace {netns}, {directory} removed",
        command,
    )


def _machine_smtpd_version() -> str:
    """`smtpd -h`'s version of this machine's smtpd (what a plain lab host runs)."""
    proc = subprocess.run(["smtpd", "-h"], capture_output=True, text=True, check=False, env=SBIN_PATH)
    m = re.search(r"OpenSMTPD\s+(\S+)", proc.stdout + proc.stderr)
    return m.group(1) if m else ""


def lab_probe(
    facts: HostFacts, profile: Profile, lab_factory: LabFactory, release: str | None = None
) -> tuple[list[Fact], list[str], CheckReport]:
    """The host's config and tables, copied verbatim into a local lab host (of `release`'s image,
    or of this machine), relaying to the fake."""
    redactor = facts_redactor(facts, profile)
    bundle = host_bundle(facts)
    _, notes = plan_probes(bundle, facts.parsed)
    pki = TestPki()
    try:
        with lab_factory(pki, release) as target:
            files = f"{len(bundle.files)} table file(s)"
            where = f"on {target.name} with the host's {facts.config_path} and {files}, copied"
            out, report = _probe_on(target, bundle, facts, profile, pki, where)
    except (TargetError, UpstreamError, EOFError) as exc:
        # The harness, not the host, failed: exit 2, with the way out for a machine without a lab.
        raise AcceptError(
            f"the relay probe could not run in the local lab: {redactor(str(exc)) or type(exc).__name__} "
            "(pass --no-relay to check the host's facts only)"
        ) from None
    return out, notes, report


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
    connect_timeout: float = CONNECT_TIMEOUT
    upgrade_to: str | None = None  # a Debian release: the host's files also run on its smtpd


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


def _default_lab(pki: TestPki, release: str | None) -> AbstractContextManager[Target]:
    return lab_target(pki, release)


def run_accept(options: AcceptOptions, lab_factory: LabFactory = _default_lab) -> AcceptReport:
    """Everything `accept` does; AcceptError/BaselineError for exit 2, a report otherwise."""
    started = time.monotonic()
    if options.upgrade_to is not None:
        from harness.targets.images import check_release_name

        check_release_name(options.upgrade_to)  # a bad name is exit 2 before the host is contacted
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
        today = None
        if options.relay:
            relay, report.relay_way, notes, today = relay_probe(
                facts, profile, lab_factory, options.relay_mode, shell
            )
            report.notes.extend(notes)
        else:
            report.notes.append("--no-relay: the relay was not probed")
        facts.facts.extend(relay)
        if options.upgrade_to is not None:
            from harness.accept.upgrade import upgrade_facts

            upgraded, notes = upgrade_facts(
                facts, profile, options.upgrade_to, today, report.relay_way, lab_factory
            )
            facts.facts.extend(upgraded)
            report.notes.extend(notes)
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
def _connected(options: AcceptOptions) -> Iterator[Shell]:
    """Root on the host (as logged in or through sudo -n), closed afterwards."""
    try:
        shell = connect(options.url, options.identity, options.known_hosts, options.connect_timeout)
    except TargetError as exc:
        raise AcceptError(str(exc)) from None
    try:
        try:
            root = as_root(shell)
        except TargetError as exc:
            raise AcceptError(str(exc)) from None
        yield root
    except EOFError:
        raise AcceptError(f"{shell.name}: the SSH connection was closed by the host") from None
    finally:
        shell.close()


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
