"""What can be learned about an existing mail host by reading it: each fact with its evidence.

Everything here only reads. Commands are the ones an admin would type (`smtpd -n`, `stat`,
`ss`, `tail` of the mail log), so every finding can be re-checked by hand with the command the
report quotes. File contents are read into memory; a secrets table never leaves it in clear:
its passwords go into the host's redactor before any output is recorded.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from harness.accept.errors import AcceptError as AcceptError
from harness.accept.locate import SYSTEMD_UNITS, locate_config, smtpd_group
from harness.probes import FAILURES
from harness.redact import secrets_table_credentials
from harness.smtpdconf import (
    Config,
    ConfigSyntaxError,
    Finding,
    alias_tables,
    auth_tables,
    db_source,
    expectations,
    lint,
    parse_config,
)
from harness.smtpdconf.parse import grammar_for
from harness.targets.shell import SEARCH_PATH, CommandResult, Shell, find_smtpd, smtpd_version
from harness.upstream import Profile

Status = Literal["pass", "fail", "warn", "info"]
# Debian and Ubuntu, the BSDs (and Fedora with rsyslog), Alpine (busybox syslogd logs everything there).
MAIL_LOGS = ("/var/log/mail.log", "/var/log/maillog", "/var/log/messages")
LOG_LINES = 5000
MAX_QUOTED = 5


@dataclass
class Fact:
    """One check: what was run, what it printed, and what that means."""

    name: str
    status: Status
    summary: str
    command: str = ""
    output: str = ""
    evidence: list[str] = field(default_factory=list)
    hint: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass(frozen=True)
class FileStat:
    mode: int
    owner: str
    group: str
    mtime: int
    size: int

    def describe(self) -> str:
        return f"mode {self.mode:o} {self.owner}:{self.group}"


@dataclass(frozen=True)
class HostFile:
    """A file the config names, as read from the host. `secret` content is never reported."""

    path: str
    content: bytes = field(repr=False)
    stat: FileStat
    secret: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class TableFacts:
    name: str
    backend: str
    path: str
    secret: bool
    aliases: bool
    file: HostFile | None  # the file smtpd opens (the .db for db:), None when missing
    source: HostFile | None = None  # a db: table's text source, when there is one


@dataclass
class HostFacts:
    """Everything read from the host; `facts` are the verdicts drawn from it."""

    host: str
    smtpd: str = ""
    version: str = ""
    os_name: str = ""
    debian_release: str = ""  # VERSION_CODENAME of a Debian host (/etc/os-release), else ""
    config_path: str = ""
    config: HostFile | None = None
    parsed: Config | None = None
    findings: list[Finding] = field(default_factory=list)
    tables: list[TableFacts] = field(default_factory=list)
    includes: list[HostFile] = field(default_factory=list)  # files `include` lines name, as read
    service: str = ""
    smtpd_group: str = "opensmtpd"
    facts: list[Fact] = field(default_factory=list)

    def read_files(self) -> list[HostFile]:
        """Every file read from the host, for the unchanged-afterwards check."""
        files = [self.config] if self.config else []
        files.extend(self.includes)
        for t in self.tables:
            files.extend(f for f in (t.file, t.source) if f is not None)
        return files


def version_tuple(version: str) -> tuple[int, int] | None:
    m = re.search(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


# -- reading ------------------------------------------------------------------------------------
# -L: a table or config reached through a symlink is judged by the file smtpd opens, not the link.
STAT = "stat -L -c '%a %U %G %Y %s' -- {p} 2>/dev/null || stat -L -f '%Lp %Su %Sg %m %z' -- {p}"


def stat_files(shell: Shell, paths: Iterable[str]) -> dict[str, FileStat | None]:
    """Mode, owner, group, mtime, size of each path, in one command (each SSH command costs)."""
    paths = list(dict.fromkeys(paths))
    if not paths:
        return {}
    quoted = " ".join(shlex.quote(p) for p in paths)
    loop = f'for p in {quoted}; do echo "$(' + STAT.format(p='"$p"') + ' || echo missing)"; done'
    lines = shell.run(loop).stdout.splitlines()
    out: dict[str, FileStat | None] = {}
    for path, line in zip(paths, lines + [""] * (len(paths) - len(lines)), strict=True):
        parts = line.split()
        ok = len(parts) == 5 and all(re.fullmatch(r"\d+", x) for x in (parts[0], parts[3], parts[4]))
        out[path] = (
            FileStat(int(parts[0], 8), parts[1], parts[2], int(parts[3]), int(parts[4])) if ok else None
        )
    return out


def read_host_file(shell: Shell, path: str, stat: FileStat | None, secret: bool = False) -> HostFile | None:
    if stat is None:
        return None
    content = shell.read(path)
    if content is None:
        return None
    if secret:
        for user, password in secrets_table_credentials(content):
            shell.redactor.add(user, password)
    return HostFile(path, content, stat, secret)


# -- gathering ----------------------------------------------------------------------------------
def debian_release(os_release: str) -> str:
    """The code name of a Debian host (`ID=debian`), from its /etc/os-release; "" for any other."""
    values = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', os_release, re.MULTILINE))
    return values.get("VERSION_CODENAME", "") if values.get("ID") == "debian" else ""


def preflight(shell: Shell, config_path: str | None) -> HostFacts:
    """What must hold for any check to mean something; AcceptError (exit 2) otherwise."""
    facts = HostFacts(shell.name)
    smtpd = find_smtpd(shell)
    if smtpd is None:
        raise AcceptError(f"{shell.name}: OpenSMTPD is not installed (no smtpd in PATH or /usr/sbin)")
    facts.smtpd = smtpd
    facts.os_name = shell.run("uname -sr").stdout.strip()
    facts.debian_release = debian_release(shell.run("cat /etc/os-release 2>/dev/null").stdout)
    version = shell.run(f"{shlex.quote(facts.smtpd)} -h 2>&1")
    said = smtpd_version(version.output)
    if said is not None:
        facts.version = said
    elif facts.os_name.startswith("OpenBSD"):
        facts.version = facts.os_name.split()[-1]  # OpenBSD's smtpd is versioned with the OS
    else:
        said = version.output.splitlines()[0] if version.output else f"exit {version.returncode}"
        raise AcceptError(f"{shell.name}: OpenSMTPD is not installed ({facts.smtpd} -h: {said})")
    facts.facts.append(
        Fact(
            "smtpd-present",
            "pass",
            f"{facts.smtpd}: OpenSMTPD {facts.version} on {facts.os_name}",
            version.command,
            version.output,
        )
    )
    facts.service = service_kind(shell)
    location, running_groups = locate_config(shell, facts.smtpd, facts.service, config_path)
    facts.config_path = location.path
    stat = stat_files(shell, [location.path])[location.path]
    facts.config = read_host_file(shell, location.path, stat)
    if facts.config is None:
        raise AcceptError(
            f"{shell.name}: no smtpd config at {location.path} ({location.how})"
            + ("" if config_path else ": pass --config PATH")
        )
    facts.smtpd_group, _ = smtpd_group(shell, running_groups)
    summary = f"config {location.path}: {location.how}"
    facts.facts.append(Fact("config-location", "info", summary, location.command, location.output))
    return facts


def gather(shell: Shell, facts: HostFacts, profile: Profile | None, mail_log: str | None) -> None:
    """All read-only facts, appended to `facts.facts` in the order a person would check them."""
    assert facts.config is not None
    text = facts.config.content.decode("utf-8", "replace")
    try:
        facts.parsed = parse_config(
            text, facts.config_path, grammar_for(facts.version), include=_includer(shell, facts)
        )
        facts.findings = lint(facts.parsed)
    except ConfigSyntaxError as exc:
        facts.facts.append(Fact("config-grammar", "warn", f"relay-harness cannot parse the config: {exc}"))
    for include in facts.parsed.includes if facts.parsed is not None else ():
        if not include.path.startswith("/"):
            raise AcceptError(
                f"{shell.name}: {facts.config_path}:{include.line}: include {include.path!r} is a relative "
                "path: which file smtpd read depends on the directory it was started in: pass --config "
                "PATH of a config that includes by absolute paths"
            )
    facts.facts.extend(_include_facts(facts))
    if facts.parsed is not None:
        facts.facts.append(_grammar_fact(facts))
    check = shell.run(f"{shlex.quote(facts.smtpd)} -n -f {shlex.quote(facts.config_path)} 2>&1")
    facts.facts.append(
        Fact(
            "smtpd-n",
            "pass" if check.returncode == 0 else "fail",
            "smtpd accepts the installed config"
            if check.returncode == 0
            else f"smtpd refuses the installed config (exit {check.returncode})",
            check.command,
            check.output,
        )
    )
    facts.facts.append(_service_fact(shell, facts))
    if facts.parsed is not None:
        facts.facts.extend(_listen_facts(shell, facts.parsed))
        _read_tables(shell, facts)
        facts.facts.extend(_table_facts(facts))
        if profile is not None:
            facts.facts.extend(_credential_facts(facts, profile))
    facts.facts.append(_log_fact(shell, facts, mail_log))


def _includer(shell: Shell, facts: HostFacts) -> Callable[[str], str | None]:
    """An `include` line's file, read from the host (kept for the unchanged check and the copy)."""

    def read(path: str) -> str | None:
        if not path.startswith("/"):
            return None
        known = next((f for f in facts.includes if f.path == path), None)
        found = known or read_host_file(shell, path, stat_files(shell, [path])[path])
        if found is None:
            return None
        if known is None:
            facts.includes.append(found)
        return found.content.decode("utf-8", "replace")

    return read


def _include_facts(facts: HostFacts) -> list[Fact]:
    """Each file the config includes: read and followed (its statements are the config's), or missing."""
    out: list[Fact] = []
    read = {f.path: f for f in facts.includes}
    for include in facts.parsed.includes if facts.parsed is not None else ():
        found = read.get(include.path)
        name = f"include:{include.path}"
        if found is None:
            out.append(
                Fact(name, "fail", f"line {include.line}: include {include.path}: the file does not exist")
            )
        else:
            summary = (
                f"line {include.line}: include {include.path}: read and followed, {found.stat.describe()}"
            )
            out.append(Fact(name, "pass", summary, STAT.format(p=shlex.quote(include.path))))
    return out


def _grammar_fact(facts: HostFacts) -> Fact:
    config = facts.parsed
    assert config is not None
    old = [f for f in facts.findings if f.rule == "pre-6.4-syntax"]
    new = bool(config.actions or config.matches)
    v = version_tuple(facts.version)
    evidence = [f"{facts.config_path}:{f.line}: {f.message}" for f in old]
    if v is not None and v >= (6, 4) and old:
        return Fact(
            "config-grammar",
            "fail",
            f"pre-6.4 grammar on a 6.4+ smtpd (OpenSMTPD {facts.version})",
            evidence=evidence,
            hint=old[0].hint,
        )
    if v is not None and v < (6, 4) and new:
        return Fact(
            "config-grammar",
            "fail",
            f"6.4+ grammar (action/match) on a pre-6.4 smtpd (OpenSMTPD {facts.version})",
            hint="upgrade OpenSMTPD to 6.4 or later, or keep the pre-6.4 config for this host",
        )
    kind = "pre-6.4" if old else "6.4+"
    errors = [f"{facts.config_path}:{f.line}: {f.message}" for f in facts.findings if f.severity == "error"]
    return Fact(
        "config-grammar",
        "warn" if errors else "pass",
        f"{kind} grammar fits OpenSMTPD {facts.version or '(unknown version)'}"
        + (f"; {len(errors)} lint error(s)" if errors else ""),
        evidence=errors,
    )


def service_kind(shell: Shell) -> str:
    """How the host runs smtpd: "systemd", "rcctl", or (neither) "control-socket"."""
    detect = shell.run(
        f"if test -d /run/systemd/system && command -v systemctl >/dev/null; then echo systemd; "
        f"elif {SEARCH_PATH} command -v rcctl >/dev/null; then echo rcctl; else echo none; fi"
    )
    init = detect.stdout.strip()
    return init if init in ("systemd", "rcctl") else "control-socket"


def _service_fact(shell: Shell, facts: HostFacts) -> Fact:
    """systemd, rcctl, or (neither) the control socket: whichever the host has, named."""
    init = facts.service or service_kind(shell)
    if init == "systemd":
        for unit in SYSTEMD_UNITS:
            active = shell.run(f"systemctl is-active {unit}")
            enabled = shell.run(f"systemctl is-enabled {unit}")
            if enabled.stdout.strip() in ("", "not-found") and unit != SYSTEMD_UNITS[-1]:
                continue
            ok = active.returncode == 0 and enabled.returncode == 0
            return Fact(
                "service",
                "pass" if ok else "fail",
                f"systemd unit {unit}: {active.stdout.strip() or '?'}, {enabled.stdout.strip() or '?'}",
                f"{active.command}; {enabled.command}",
                f"{active.output}\n{enabled.output}".strip(),
                hint=None if ok else f"systemctl enable --now {unit}",
            )
    if init == "rcctl":
        check = shell.run("rcctl check smtpd")
        flags = shell.run("rcctl get smtpd status")
        ok = check.returncode == 0 and flags.returncode == 0
        return Fact(
            "service",
            "pass" if ok else "fail",
            f"rcctl: smtpd {'running' if check.returncode == 0 else 'not running'}, "
            f"{'enabled' if flags.returncode == 0 else 'not enabled'}",
            f"{check.command}; {flags.command}",
            f"{check.output}\n{flags.output}".strip(),
            hint=None if ok else "rcctl enable smtpd && rcctl start smtpd",
        )
    status = shell.run(f"{SEARCH_PATH} smtpctl show status 2>&1")
    status = CommandResult("smtpctl show status", status.returncode, status.stdout, status.stderr)
    ok = status.returncode == 0
    return Fact(
        "service",
        "pass" if ok else "fail",
        ("smtpd is running" if ok else "smtpd is not running")
        + " (no systemd or rcctl on the host: asked smtpd's control socket; enabled at boot not checked)",
        status.command,
        status.output,
        hint=None if ok else "start smtpd",
    )


def _listen_facts(shell: Shell, config: Config) -> list[Fact]:
    """Each `listen on` of the config has its socket listening."""
    out: list[Fact] = []
    sockets: set[tuple[str, int]] | None = None
    listing: CommandResult | None = None
    for listen in config.listens:
        where = f"line {listen.line}: listen on {listen.interface} {' '.join(listen.options)}".strip()
        if listen.interface == "socket":
            res = shell.run("test -S /var/run/smtpd.sock || test -S /run/smtpd.sock")
            ok = res.returncode == 0
            out.append(
                Fact(
                    f"listen:{listen.line}",
                    "pass" if ok else "fail",
                    f"{where}: control socket {'present' if ok else 'missing'}",
                    res.command,
                    res.output,
                )
            )
            continue
        if listing is None:
            listing = shell.run("ss -Hltn 2>/dev/null || netstat -an -f inet")
            sockets = _listening(listing.stdout)
        assert sockets is not None
        port = _listen_port(listen.options)
        addresses = _interface_addresses(shell, listen.interface)
        hit = sorted(
            f"{a}:{p}"
            for a, p in sockets
            if p == port and (a in _WILDCARDS or addresses is None or a in addresses)
        )
        out.append(
            Fact(
                f"listen:{listen.line}",
                "pass" if hit else "fail",
                f"{where}: {'listening on ' + ', '.join(hit) if hit else f'nothing listens on port {port}'}"
                + (f" ({listen.interface}: {', '.join(sorted(addresses))})" if addresses else ""),
                listing.command,
                listing.output,
            )
        )
    return out


_WILDCARDS = {"0.0.0.0", "*", "::", "[::]"}


def _listening(text: str) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "LISTEN" and len(words) >= 4:
            local = words[3]
        elif words[-1] == "LISTEN" and len(words) >= 4:
            local = words[3].replace(".", ":") if words[3].count(".") == 4 else words[3]
        else:
            continue
        addr, _, port = local.rpartition(":")
        if port.isdigit():
            found.add((addr.strip("[]").split("%")[0] or "*", int(port)))
    return found


def _listen_port(options: tuple[str, ...]) -> int:
    if "port" in options:
        i = options.index("port")
        if i + 1 < len(options) and options[i + 1].isdigit():
            return int(options[i + 1])
    return 465 if "smtps" in options else 25


def _interface_addresses(shell: Shell, interface: str) -> set[str] | None:
    """The addresses a `listen on` names; None means any address (all, or unknown here)."""
    if interface in ("all", "any", "egress"):
        return None
    if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", interface):
        return {interface}
    if interface == "localhost":
        return {"127.0.0.1", "::1"}
    res = shell.run(
        f"ip -o addr show dev {shlex.quote(interface)} 2>/dev/null || ifconfig {shlex.quote(interface)}"
    )
    addrs = set(re.findall(r"inet6? ([0-9a-fA-F:.]+)", res.stdout))
    return addrs or None


def _read_tables(shell: Shell, facts: HostFacts) -> None:
    config = facts.parsed
    assert config is not None
    secret_names = set(auth_tables(config))
    alias_names = alias_tables(config)
    tables = [t for t in config.tables.values() if t.backend in ("file", "db") and t.config]
    sources = {t.name: db_source(t.config) for t in tables if t.backend == "db" and t.config}
    stats = stat_files(shell, [*(t.config for t in tables if t.config), *sources.values()])
    for table in tables:
        assert table.config is not None
        secret = table.name in secret_names
        src = sources.get(table.name)
        facts.tables.append(
            TableFacts(
                table.name,
                table.backend,
                table.config,
                secret,
                table.name in alias_names,
                read_host_file(shell, table.config, stats[table.config], secret),
                read_host_file(shell, src, stats[src], secret) if src else None,
            )
        )


def _table_facts(facts: HostFacts) -> list[Fact]:
    out: list[Fact] = []
    for t in facts.tables:
        name = f"table:{t.name}"
        command = STAT.format(p=shlex.quote(t.path))
        if t.file is None:
            out.append(
                Fact(
                    name,
                    "fail",
                    f"table {t.name}: {t.backend}:{t.path} does not exist",
                    command,
                    hint=f"create {t.path} (smtpd -n and smtpd's start fail without it)",
                )
            )
            continue
        problems: list[str] = []
        hints: list[str] = []
        if t.secret:
            st = t.file.stat
            if st.mode != 0o640 or st.owner != "root" or st.group != facts.smtpd_group:
                problems.append(
                    f"secrets table is {st.describe()}, must be mode 640 root:{facts.smtpd_group}"
                )
                hints.append(f"chown root:{facts.smtpd_group} {t.path} && chmod 640 {t.path}")
        if t.backend == "db" and t.source is not None and t.source.stat.mtime > t.file.stat.mtime:
            problems.append(f"{t.path} is older than its source {t.source.path}: the db is stale")
            hints.append("newaliases" if t.aliases else f"makemap {t.source.path}")
        summary = f"table {t.name}: {t.backend}:{t.path} exists, {t.file.stat.describe()}"
        if t.secret:
            summary += " (secrets table; content not shown)"
        if problems:
            summary = f"table {t.name}: " + "; ".join(problems)
        out.append(
            Fact(
                name,
                "fail" if problems else "pass",
                summary,
                command,
                f"{t.file.stat.mode:o} {t.file.stat.owner} {t.file.stat.group} {t.file.stat.mtime} "
                f"{t.file.stat.size}",
                hint="; ".join(hints) or None,
            )
        )
    return out


def _credential_facts(facts: HostFacts, profile: Profile) -> list[Fact]:
    """The host's password for each label compared with the profile's, never shown."""
    config = facts.parsed
    assert config is not None
    out: list[Fact] = []
    for route in expectations(config):
        if not route.label or not route.auth_table:
            continue
        table = next((t for t in facts.tables if t.name == route.auth_table), None)
        content = table.file.content if table and table.file and table.backend == "file" else None
        if content is None:
            continue
        entry = _secrets_entry(content, route.label)
        name = f"credentials:{route.label}"
        if entry is None:
            out.append(Fact(name, "fail", f"label {route.label} is not in {table.path if table else '?'}"))
            continue
        user, password = entry
        known = [c for c in profile.credentials if c.user == user]
        if not known:
            out.append(Fact(name, "warn", f"label {route.label}: user {user} is not in the profile"))
        elif profile.check_password(user, password):
            out.append(Fact(name, "pass", f"label {route.label}: password for {user} matches the profile"))
        else:
            out.append(
                Fact(
                    name,
                    "fail",
                    f"label {route.label}: password for {user} differs from the profile's (not shown)",
                    hint="update the secrets table, then smtpctl update table secrets",
                )
            )
    return out


def _secrets_entry(content: bytes, label: str) -> tuple[str, str] | None:
    for raw in content.decode("utf-8", "replace").splitlines():
        parts = raw.split("#", 1)[0].split(None, 1)
        if len(parts) == 2 and parts[0] == label and ":" in parts[1]:
            user, _, password = parts[1].strip().partition(":")
            return user, password
    return None


def _log_fact(shell: Shell, facts: HostFacts, mail_log: str | None) -> Fact:
    """Recent log lines matching the documented failures, quoted (redacted)."""
    result: CommandResult | None = None
    for path in (mail_log,) if mail_log else MAIL_LOGS:
        res = shell.run(f"test -f {shlex.quote(path)} && tail -n {LOG_LINES} {shlex.quote(path)}")
        if res.returncode == 0:
            result = res
            break
    if result is None and facts.service == "systemd":
        res = shell.run(f"journalctl -u opensmtpd -n {LOG_LINES} --no-pager -q")
        result = res if res.returncode == 0 else None
    if result is None:
        where = mail_log or " or ".join(MAIL_LOGS)
        return Fact("mail-log", "warn", f"no mail log found at {where}")
    evidence, hints, kinds = [], [], []
    lines = result.stdout.splitlines()
    for failure in (f for f in FAILURES if f.documented):
        hits = [line for line in lines if re.search(failure.pattern, line)]
        if hits:
            kinds.append(f"{failure.name} ({len(hits)})")
            evidence.extend(hits[-MAX_QUOTED:])
            hints.append(failure.hint)
    command = result.command.partition("&& ")[2] or result.command
    if not kinds:
        return Fact("mail-log", "pass", f"no documented failure in the last {len(lines)} log lines", command)
    return Fact(
        "mail-log",
        "fail",
        "documented failures in the mail log: " + ", ".join(kinds),
        command,
        evidence=[shell.redactor(e) for e in evidence],
        hint="; ".join(hints),
    )


def unchanged(shell: Shell, files: Iterable[HostFile]) -> Fact:
    """The files read are as they were: same content (by hash), mode, owner and mtime."""
    files = list(files)
    paths = [f.path for f in files]
    stats = stat_files(shell, paths)
    quoted = " ".join(shlex.quote(p) for p in paths)
    res = shell.run(f"sha256sum -- {quoted} 2>/dev/null || sha256 -r -- {quoted}")
    digests: dict[str, str] = {}
    for line in res.stdout.splitlines():
        digest, _, path = line.partition(" ")
        digests[path.lstrip(" *")] = digest
    changed: list[str] = []
    for f in files:
        if stats.get(f.path) != f.stat:
            changed.append(f"{f.path}: was {f.stat}, now {stats.get(f.path)}")
        elif digests.get(f.path) != f.sha256:
            changed.append(f"{f.path}: content changed (sha256)")
    if changed:
        return Fact("host-unchanged", "fail", "files changed during the run", res.command, evidence=changed)
    return Fact(
        "host-unchanged",
        "pass",
        f"{len(files)} file(s) read and unchanged by hash, mode, owner and mtime: {', '.join(paths)}",
        res.command,
    )
