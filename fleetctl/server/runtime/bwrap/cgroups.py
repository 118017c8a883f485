"""Per-sandbox cgroups, written directly: memory, cpu quota and pids, v1 and v2.

v1 (this project's CI host) keeps one hierarchy per controller; the sandbox's
groups are made under the server's own group of each controller, so whatever
limits the server itself still bound its sandboxes. v2 has one hierarchy; the
sandbox groups live under `/sys/fs/cgroup/fleetctl/` (the root group may hold
processes, so the no-internal-processes rule does not bite).

OOM is read from the kernel's `oom_kill` counter, never from an exit status,
which lies when a child process was the one killed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from fleetctl.server.runtime.base import Limits
from fleetctl.server.runtime.bwrap.host import CGROUP_ROOT, CONTROLLERS, cgroup_version, own_cgroup

CPU_PERIOD_US = 100_000


@dataclass(frozen=True, slots=True)
class Cgroup:
    """The cgroup directories of one sandbox (one per controller on v1, one on v2)."""

    version: int
    paths: tuple[Path, ...]

    @classmethod
    def existing(cls, name: str) -> Cgroup | None:
        """`name`'s groups if any of them exists (e.g. left by a start cut short)."""
        try:
            cgroup = cls.for_sandbox(name)
        except OSError:
            return None
        return cgroup if any(p.exists() for p in cgroup.paths) else None

    @classmethod
    def for_sandbox(cls, name: str) -> Cgroup:
        """Where `name`'s groups live on this host (not created yet)."""
        version = cgroup_version()
        if version == 2:
            return cls(2, (CGROUP_ROOT / "fleetctl" / name,))
        if version == 1:
            return cls(
                1,
                tuple(
                    CGROUP_ROOT / c / own_cgroup(c).lstrip("/") / "fleetctl" / name
                    for c in CONTROLLERS
                ),
            )
        raise OSError("no cgroup hierarchy is mounted at /sys/fs/cgroup")

    def create(self, limits: Limits) -> None:
        """Make the groups and write the limits; raises OSError when not permitted."""
        quota = max(1000, int(limits.cpu_cores * CPU_PERIOD_US))
        if self.version == 2:
            parent = self.paths[0].parent
            parent.mkdir(exist_ok=True)
            _enable_v2_controllers(parent)
            self.paths[0].mkdir(exist_ok=True)
            _write(self.paths[0] / "memory.max", limits.memory_bytes)
            _write(self.paths[0] / "memory.swap.max", 0, optional=True)
            _write(self.paths[0] / "pids.max", limits.pids)
            (self.paths[0] / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            return
        for path in self.paths:
            path.mkdir(parents=True, exist_ok=True)
        memory, cpu, pids = self.paths
        _write(memory / "memory.limit_in_bytes", limits.memory_bytes)
        # also bound swap so the memory limit is real (absent when swap accounting is off)
        _write(memory / "memory.memsw.limit_in_bytes", limits.memory_bytes, optional=True)
        _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
        _write(cpu / "cpu.cfs_quota_us", quota)
        _write(pids / "pids.max", limits.pids)

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The `cgroup.procs` files a process writes its pid into to join."""
        return tuple(str(p / "cgroup.procs") for p in self.paths)

    def join(self, pid: int) -> None:
        for procs in self.procs_files:
            Path(procs).write_text(str(pid))

    def oom_kills(self) -> int:
        """How many processes the kernel killed for running out of memory here."""
        memory = self.paths[0]
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found.update(int(p) for p in Path(procs).read_text().split())
            except OSError:
                continue
        return found

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    def remove(self) -> bool:
        """Kill what is left and remove the groups; False while processes remain."""
        self.kill_all()
        removed = True
        for path in self.paths:
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                removed = False
        return removed


def _write(path: Path, value: int, *, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except OSError:
        if not optional:
            raise


def _enable_v2_controllers(parent: Path) -> None:
    wanted = " ".join(f"+{c}" for c in CONTROLLERS)
    for group in (CGROUP_ROOT, parent):
        (group / "cgroup.subtree_control").write_text(wanted)
