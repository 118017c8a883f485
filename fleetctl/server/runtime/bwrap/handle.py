"""Finding a bubblewrap sandbox's processes again: its handle (what the database keeps),
and the process primitives the runtime uses on it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleetctl.server.runtime.base import Handle, RuntimeFailure
from fleetctl.server.runtime.bwrap.cgroups import Cgroup

#: How long killed sandbox processes may take to leave their cgroup.
KILL_WAIT_S = 30.0
#: The start time recorded for a main process that ended before it could be read: no
#: process has it, so the sandbox is never taken for alive.
NEVER = -1


@dataclass(frozen=True, slots=True)
class SandboxHandle:
    """How to find a running sandbox again; kept in the database (no secrets)."""

    id: str
    uid: int  # the first host id of its range (its root)
    bwrap_pid: int
    init_pid: int
    init_start: int
    cgroup_version: int | None
    cgroup_paths: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Handle) -> SandboxHandle:
        return cls(**{**data, "cgroup_paths": tuple(data["cgroup_paths"])})

    @property
    def cgroup(self) -> Cgroup | None:
        if self.cgroup_version is None:
            return None
        return Cgroup(self.cgroup_version, tuple(Path(p) for p in self.cgroup_paths))


def start_time(pid: int) -> int:
    """Process start time (clock ticks since boot): tells a pid apart from a reused one.

    Raises ProcessLookupError for a process that is gone or a zombie.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        raise ProcessLookupError(pid)
    return int(fields[19])


def send_signal(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)


def kill_pid(pid: int) -> None:
    send_signal(pid, signal.SIGKILL)


def until(step: Callable[[], bool], limit_s: float = KILL_WAIT_S) -> None:
    """Retry `step()` until it returns True: cgroups empty a few ms after SIGKILL, or
    seconds later when the host's disk is saturated (a killed writer finishes its I/O)."""
    deadline, delay = time.monotonic() + limit_s, 0.005
    while not step():
        if time.monotonic() >= deadline:
            raise RuntimeFailure(f"sandbox processes did not exit {limit_s:g}s after SIGKILL")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def tree_bytes(top: Path) -> int:
    """Bytes the files under `top` take on disk (blocks actually used)."""
    total = 0
    for root, _, files in os.walk(top):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def exit_code(status: Path) -> int | None:
    """The main process's exit code once it ended, from bwrap's status file."""
    try:
        lines = status.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "exit-code" in event:
            return int(event["exit-code"])
    return None


def abandon(child: subprocess.Popen[bytes] | None, cgroup: Cgroup | None) -> None:
    """Undo a start cut short: its bwrap killed, its cgroup removed."""
    if child is not None:
        child.kill()
        child.wait()
    if cgroup is not None:
        until(cgroup.remove)


def runs_with(init_pid: int, entry: bytes) -> bool:
    """True while a process in the pid namespace of `init_pid` (a sandbox's) has `entry`
    (NAME=value) in its environment (read from the host: any user's, none can hide it
    from root outside)."""
    try:
        pidns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return False
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/ns/pid") == pidns:
                    environ = Path(f"/proc/{name}/environ").read_bytes()
                    if entry in environ.split(b"\0"):
                        return True
    return False
