"""Where an existing host's smtpd takes its config from, and which group it reads tables as.

Systems put the config in different places (Debian /etc/smtpd.conf, OpenBSD /etc/mail, Alpine,
Arch and Fedora /etc/smtpd, FreeBSD /usr/local/etc/mail) and an admin may start smtpd with
`-f PATH` anywhere. Guessing from a list reads the wrong file on such a host (Debian's default
config, left beside the one in use, looked healthy), so the host is asked, in the order that
decides what smtpd really reads: the running smtpd's command line, then the service's
definition (systemd's ExecStart), then the default compiled into the host's own smtpd binary.
Only when none of them says is the list tried, and only a single match is taken: anything
that cannot be known is an AcceptError (exit 2) that says to pass --config.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass

from harness.accept.errors import AcceptError
from harness.targets.shell import SMTPD_GROUP_NAMES, CommandResult, Shell

# Where a config lives when nothing on the host says: each system's packaged default.
CONFIG_CANDIDATES = (
    "/etc/smtpd.conf",  # Debian, Ubuntu
    "/etc/mail/smtpd.conf",  # OpenBSD
    "/etc/smtpd/smtpd.conf",  # Alpine, Arch, Fedora
    "/usr/local/etc/mail/smtpd.conf",  # FreeBSD
)
# The group smtpd's unprivileged processes run as, by system: a secrets table must be readable by it.
SMTPD_GROUPS = SMTPD_GROUP_NAMES[0]
# smtpd's options that take an argument (smtpd.c's getopt string "B:dD:hnP:f:FT:vx:"; a child
# re-executed as `-x PROC` shows its parent's arguments until it retitles itself).
_WITH_ARGUMENT = "BDPfTx"
# The group as a number: ps cuts long names to fit its column (`opensmt+`).
PROCESSES = "ps -A -o pid= -o gid= -o args= 2>/dev/null || ps -o pid,gid,args"
DEFAULT_IN_BINARY = r"grep -a -o '/[-_./A-Za-z0-9]*smtpd\.conf' {smtpd} | sort -u"
SYSTEMD_UNITS = ("opensmtpd", "smtpd")


@dataclass(frozen=True)
class Location:
    """Where the config is, and how that was learned (the command and what it printed)."""

    path: str
    how: str
    command: str = ""
    output: str = ""


@dataclass(frozen=True)
class RunningSmtpd:
    pid: str
    args: tuple[str, ...]

    @property
    def config(self) -> str | None:
        """`-f`'s argument; None when started without one (its compiled-in default)."""
        return config_option(self.args[1:])


def config_option(args: tuple[str, ...] | list[str]) -> str | None:
    """The `-f` argument in smtpd's arguments, read as its getopt reads them (`-dvf PATH` too)."""
    found: str | None = None
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--" or not word.startswith("-") or word == "-":
            break
        for n, flag in enumerate(word[1:], start=1):
            if flag in _WITH_ARGUMENT:
                value = word[n + 1 :]
                if not value and i < len(words):
                    value, i = words[i], i + 1
                if flag == "f":
                    found = value
                break
    return found


def running_smtpds(listing: str) -> tuple[list[RunningSmtpd], set[str]]:
    """smtpd's parent processes (children retitle themselves `smtpd: NAME`) and the groups of
    its unprivileged `lookup` process (the one that opens tables, by gid), from PROCESSES' output."""
    parents: list[RunningSmtpd] = []
    groups: set[str] = set()
    for line in listing.splitlines():
        words = line.split()
        if len(words) < 3 or not words[0].isdigit():
            continue
        pid, group, args = words[0], words[1], words[2:]
        if posixpath.basename(args[0]) == "smtpd":
            parents.append(RunningSmtpd(pid, tuple(args)))
        elif args[0] == "smtpd:" and args[1:2] == ["lookup"] and group not in ("0", "root"):
            groups.add(group)
    return parents, groups


def systemd_exec_start(show: str) -> tuple[str, ...] | None:
    """The argv of `systemctl show -p ExecStart UNIT`'s `argv[]=...` (None: no ExecStart)."""
    m = re.search(r"argv\[\]=([^;]*)", show)
    if m is None:
        return None
    try:
        return tuple(shlex.split(m.group(1)))
    except ValueError:
        return tuple(m.group(1).split())


class Unknowable(AcceptError):
    """The host does not say where its config is; `why` says what it did say."""

    def __init__(self, shell: Shell, why: str) -> None:
        super().__init__(f"{shell.name}: {why}: pass --config PATH (the config smtpd runs with)")
        self.why = why


def _from_args(shell: Shell, args: tuple[str, ...], where: str) -> str | None:
    path = config_option(args[1:])
    if path is not None and not path.startswith("/"):
        raise Unknowable(shell, f"{where} names its config by a relative path (-f {path})")
    return path


def locate_config(
    shell: Shell, smtpd: str, service: str, given: str | None = None
) -> tuple[Location, set[str]]:
    """Where the host's smtpd reads its config (`given`: --config, said beside what the host
    says), and the group(s) its running lookup process has."""
    listing = shell.run(PROCESSES)
    if given is None:
        return _ask(shell, smtpd, service, listing)
    try:
        own, groups = _ask(shell, smtpd, service, listing)
    except Unknowable as exc:
        return Location(given, f"--config (the host does not say: {exc.why})"), running_smtpds(
            listing.stdout
        )[1]
    how = "--config" if own.path == given else f"--config (the host's smtpd reads {own.path}: {own.how})"
    return Location(given, how, own.command, own.output), groups


def own_root(shell: Shell, parents: list[RunningSmtpd]) -> list[RunningSmtpd]:
    """The smtpd whose root directory is the host's: one in a container (another root, seen in
    the host's process list) reads its `-f` path inside that root, not this host's file.
    Where /proc cannot say (not Linux), all of them."""
    if not parents:
        return parents
    pids = " ".join(p.pid for p in parents)
    res = shell.run(
        "stat -L -c %d:%i / 2>/dev/null && for p in " + pids + "; do "
        'echo "$p $(stat -L -c %d:%i /proc/$p/root 2>/dev/null)"; done'
    )
    lines = res.stdout.splitlines()
    if res.returncode != 0 or not lines:
        return parents
    ours, roots = lines[0].strip(), dict(line.split(None, 1) for line in lines[1:] if len(line.split()) == 2)
    return [p for p in parents if roots.get(p.pid, ours) == ours]


def _ask(shell: Shell, smtpd: str, service: str, listing: CommandResult) -> tuple[Location, set[str]]:
    parents, groups = running_smtpds(listing.stdout)
    parents = own_root(shell, parents)
    shown = "\n".join(line for line in listing.stdout.splitlines() if "smtpd" in line)
    if parents:
        configs = {p.pid: _from_args(shell, p.args, f"the running smtpd (pid {p.pid})") for p in parents}
        named = {c for c in configs.values() if c is not None}
        if len(set(configs.values())) > 1:
            seen = ", ".join(f"pid {pid}: {c or 'its default'}" for pid, c in sorted(configs.items()))
            raise Unknowable(shell, f"several smtpd run with different configs ({seen})")
        if named:
            path = named.pop()
            parent = parents[0]
            how = f"the running smtpd (pid {parent.pid}) was started with -f {path}"
            return Location(path, how, listing.command, shown), groups
        return _compiled_default(shell, smtpd, "the running smtpd was started without -f"), groups
    if service == "systemd":
        for unit in SYSTEMD_UNITS:
            show = shell.run(f"systemctl show -p ExecStart {unit}")
            argv = systemd_exec_start(show.stdout)
            if not argv or posixpath.basename(argv[0]) != "smtpd":
                continue
            started = _from_args(shell, argv, f"systemd unit {unit}'s ExecStart")
            if started is not None:
                how = f"smtpd is not running; systemd unit {unit}'s ExecStart has -f {started}"
                return Location(started, how, show.command, show.output), groups
            return _compiled_default(
                shell, smtpd, f"smtpd is not running; unit {unit} starts it without -f"
            ), groups
    return _compiled_default(shell, smtpd, "smtpd is not running"), groups


def _compiled_default(shell: Shell, smtpd: str, why: str) -> Location:
    """The path compiled into the host's smtpd binary (what it reads without -f); else the list."""
    found = shell.run(DEFAULT_IN_BINARY.format(smtpd=shlex.quote(smtpd)))
    paths = [p for p in found.stdout.split() if p.startswith("/")]
    if found.returncode == 0 and len(paths) == 1:
        return Location(paths[0], f"{why}: {smtpd}'s compiled-in default is {paths[0]}", found.command)
    exists = shell.run(
        "for p in "
        + " ".join(shlex.quote(p) for p in CONFIG_CANDIDATES)
        + '; do test -f "$p" && echo "$p"; done'
    )
    present = exists.stdout.split()
    if len(present) == 1:
        how = (
            f"{why}, and {smtpd} names no single default: {present[0]} is the only config in the usual places"
        )
        return Location(present[0], how, exists.command, exists.output)
    what = (
        f"several configs ({', '.join(present)})"
        if present
        else f"no config at {' or '.join(CONFIG_CANDIDATES)}"
    )
    raise Unknowable(shell, f"{why}, {smtpd} names no single default, and there are {what}")


def smtpd_group(shell: Shell, running: set[str]) -> tuple[str, CommandResult | None]:
    """The group the host's smtpd reads tables as: its running lookup process's, else the first
    of SMTPD_GROUPS the host has."""
    if len(running) == 1:
        gid = next(iter(running))
        res = shell.run(f"getent group {gid} 2>/dev/null || grep '^[^:]*:[^:]*:{gid}:' /etc/group")
        name = res.stdout.partition(":")[0].strip()
        if res.returncode == 0 and name:
            return name, res
    names = " ".join(SMTPD_GROUPS)
    res = shell.run(f'for g in {names}; do grep -q "^$g:" /etc/group && echo $g; done')
    have = res.stdout.split()
    return (have[0] if have else SMTPD_GROUPS[1]), res
