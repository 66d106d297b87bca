"""What test hosts put on this machine, seen from the machine itself (/proc, `ip link`, /tmp).

Never from the lab's own bookkeeping, which is what a bug would corrupt. Other runs (pytest-xdist
workers, other users of the machine) have test hosts of their own at the same time: everything
here is looked up by owner pid or by a host's own identity, never "all test hosts".
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.targets.lab import PREFIX, TMP_PREFIX, LabHost, running_hosts


def proc_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of a process, None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces and parens
    return fields[0], int(fields[19])


def running(pid: int, start: int) -> bool:
    """The same process (not a reused pid) still exists and has not exited (a zombie holds no
    namespace, mount or socket: it counts as ended)."""
    now = proc_start(pid)
    return now is not None and now[1] == start and now[0] != "Z"


def boot_ticks() -> int:
    """Now, in the unit of a process's start time (clock ticks since boot)."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def pids_in_netns(inode: int, started_by: int | None = None) -> list[int]:
    """Every live process whose network namespace is `inode` (and that started by `started_by`:
    the kernel reuses a freed namespace's inode number for the next one, a newer host's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            link = os.readlink(entry / "ns" / "net")
        except OSError:
            continue  # gone meanwhile, or a zombie (no namespaces left)
        if link == f"net:[{inode}]":
            start = proc_start(int(entry.name))
            if started_by is None or (start is not None and start[1] <= started_by):
                found.append(int(entry.name))
    return found


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)[@:]", out, re.MULTILINE)}


@dataclass(frozen=True)
class Footprint:
    """What one test host put on the machine, taken while it runs."""

    name: str
    veth: str
    inode: int
    processes: tuple[tuple[int, int], ...]  # (pid, start time): survives pid reuse
    directory: Path
    commands: frozenset[str]  # what ran inside: proves the check saw what must be gone
    inner_pids: frozenset[int]  # the same processes' pids as the host sees them (its PID namespace)
    taken: int  # when (boot ticks): a namespace with the same inode later on is another one

    @classmethod
    def of(cls, name: str, veth: str, pid: int, directory: Path) -> Footprint:
        """`pid`: the host's first process (its network namespace is the host's)."""
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        taken = boot_ticks() + 1
        processes, commands, inner = [], set(), set()
        for p in pids_in_netns(inode):
            start = proc_start(p)
            with contextlib.suppress(OSError):
                commands.add(Path(f"/proc/{p}/comm").read_text().strip())
                nspid = re.search(r"^NSpid:\s+(.*)$", Path(f"/proc/{p}/status").read_text(), re.MULTILINE)
                if nspid:
                    inner.add(int(nspid.group(1).split()[-1]))
            if start is not None:
                processes.append((p, start[1]))
        return cls(
            name, veth, inode, tuple(processes), directory, frozenset(commands), frozenset(inner), taken
        )

    @classmethod
    def of_host(cls, host: LabHost) -> Footprint:
        assert host.pid is not None
        return cls.of(host.name, host.veth, host.pid, host.lab.dir)

    def running(self) -> list[str]:
        """What of it still runs or is configured (everything but its directory), in words."""
        left = []
        if self.veth in links():
            left.append(f"veth {self.veth}")
        left += [f"process {pid} in the namespace" for pid in pids_in_netns(self.inode, self.taken)]
        left += [f"process {pid}" for pid, start in self.processes if running(pid, start)]
        left += [f"test host {h.name}" for h in running_hosts() if h.name == self.name]
        return left

    def leftovers(self) -> list[str]:
        """What is still there, in words; empty when the host is entirely gone."""
        return self.running() + ([f"directory {self.directory}"] if self.directory.exists() else [])


def hosts_of(owner: int) -> list[str]:
    return [h.name for h in running_hosts() if h.owner == owner]


def own_lab_leftovers(pid: int) -> list[str]:
    """Anything carrying this process's lab names: test hosts, namespaces, veths, temp dirs."""
    left = [f"test host {name}" for name in hosts_of(pid)]
    left += [f"namespace {n}" for n in netns_names() if n.startswith(f"{PREFIX}-{pid}-")]
    left += [f"veth {n}" for n in links() if re.fullmatch(rf"{PREFIX}{pid}[hp]\d+", n)]
    left += [f"directory {p}" for p in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}{pid}-*")]
    return left
