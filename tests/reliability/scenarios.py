"""Soak and crash scenarios on real servers and sandboxes, as plain functions.

Each scenario starts servers of its own (stopped by PID after), drives `fleetctl`
as subprocesses, and returns a `Tally` of what it observed instead of asserting:
the tests in this package assert the tally is clean, and
`tests/bench/reliability_report.py` prints it. Counting is done through the API by
fleetctl's own fleet label with the oracle (`tests.conftest.control`), which has an
API key of its own and retries injected 5xx and resets itself, so it never shares a
retry bug with the SDK under test, and the faults it meets are not counted as the
system's.

    duplicates  sandboxes beyond the first for one fleet key, after an apply
    leaked      sandbox dirs, cgroups or processes left on the host after a destroy
    lost        sandboxes RUNNING before a crash, still wanted, but gone (or replaced)
                after the re-run apply
    problems    anything else that went wrong (failed apply or plan, not converged)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetctl.plan.identity import KEY_LABEL, fleet_label
from fleetctl.server.runtime.base import ID_RANGE
from tests.conftest import (
    Server,
    control,
    faults,
    own_server,
    start_server,
    stop_server,
    traversable_dir,
)

Event = dict[str, Any]
FAULTS = "error=0.1,reset=0.05,seed=7,scope=control"
CGROUP_ROOT = Path("/sys/fs/cgroup")
APPLY_TIMEOUT = 180.0


@dataclass
class Tally:
    """What one or more scenarios observed; `clean` when nothing went wrong."""

    rounds: int = 0
    converged_rounds: int = 0
    faults_injected: int = 0
    duplicates: int = 0
    leaked: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what happened, for the report only

    def add(self, other: Tally) -> None:
        self.rounds += other.rounds
        self.converged_rounds += other.converged_rounds
        self.faults_injected += other.faults_injected
        self.duplicates += other.duplicates
        self.leaked += other.leaked
        self.lost += other.lost
        self.problems += other.problems
        self.notes += other.notes

    def line(self) -> str:
        return (
            f"rounds={self.rounds} faults_injected={self.faults_injected} "
            f"duplicates={self.duplicates} leaked={self.leaked} lost={self.lost} "
            f"converged_rounds={self.converged_rounds}"
        )


# --- servers and the oracle -------------------------------------------------------------


def faults_injected(server: Server) -> int:
    """Errors, resets and lost responses the client under test met (not the oracle)."""
    suffered = faults(server)
    return sum(suffered.get(kind, 0) for kind in ("error", "reset", "after"))


# --- fleets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """A one-group fleet spec (`replicas` x memory_gb 0.25) aimed at one server."""

    server: Server
    name: str
    replicas: int
    spec: Path

    @classmethod
    def write(cls, server: Server, directory: Path, name: str, replicas: int) -> Fleet:
        spec = directory / f"{name}.yaml"
        spec.write_text(textwrap.dedent(f"""\
            apiVersion: fleetctl/v1
            kind: Fleet
            name: {name}
            labels: [{name}-fleet]
            defaults: {{image: python:3.11-slim, memory_gb: 0.25, network_access: false}}
            sandboxes:
              - name: worker
                replicas: {replicas}
            """))  # fmt: skip
        return cls(server, name, replicas, spec)

    def aimed_at(self, server: Server) -> Fleet:
        """The same fleet on another server (e.g. the one restarted on the same data dir)."""
        return Fleet(server, self.name, self.replicas, self.spec)

    @property
    def labels(self) -> list[str]:
        return [fleet_label(self.name)]

    def env(self) -> dict[str, str]:
        """The environment of a `fleetctl` aimed at this fleet's server."""
        return {
            **os.environ,
            "FLEETCTL_API_URL": self.server.url,
            "FLEETCTL_API_KEY": self.server.token,
        }

    def live(self) -> list[dict[str, Any]]:
        """Every (undeleted) sandbox carrying the fleet's label, whatever its status."""
        response = control(
            self.server,
            "GET",
            "/sandbox",
            params={"labels": self.labels, "per_page": 500},
        )
        assert response.is_success, response.text
        found = response.json()
        assert found["total"] == len(found["sandboxes"]), found["total"]
        return list(found["sandboxes"])

    def keys(self) -> list[str]:
        """The fleet keys of the live sandboxes, sorted; a duplicate appears twice."""
        return keys_of(self.live())

    def wanted(self) -> list[str]:
        return sorted(f"worker-{i}" for i in range(self.replicas))

    def wait_running(self, timeout: float = 60) -> list[dict[str, Any]] | None:
        """Poll until every live sandbox is RUNNING; None if one failed or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.live()
            statuses = {s["status"] for s in found}
            if statuses == {"RUNNING"}:
                return found
            if statuses & {"TERMINATED", "ERROR", "TIMEOUT"} or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def fleetctl(self, *argv: str, timeout: float = APPLY_TIMEOUT) -> tuple[int, str]:
        """Run `python -m fleetctl ARGV` to completion; exit code and stdout+stderr.

        A run past `timeout` is killed (by PID) and reported as exit code -1."""
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetctl", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=self.spec.parent,
        )
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate(timeout=30)
            return -1, f"hung for {timeout}s: " + out.decode()
        return process.returncode, out.decode()

    def apply(self) -> tuple[int, str]:
        return self.fleetctl("apply", str(self.spec), "--yes", "-o", "json")

    def spawn_apply(self, log: Path | None = None) -> subprocess.Popen[bytes]:
        """`fleetctl apply SPEC --yes -o json` with NDJSON on a pipe, stderr to `log` (or
        discarded)."""
        with open(log or os.devnull, "ab") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "fleetctl", "apply", str(self.spec), "--yes", "-o", "json"],
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env(),
                cwd=self.spec.parent,
            )


def keys_of(sandboxes: list[dict[str, Any]]) -> list[str]:
    """The fleet keys of `sandboxes`, sorted; a duplicate appears twice."""
    return sorted(
        label.removeprefix(KEY_LABEL)
        for s in sandboxes
        for label in s["labels"]
        if label.startswith(KEY_LABEL)
    )


def duplicates_in(sandboxes: list[dict[str, Any]]) -> int:
    return sum(n - 1 for n in Counter(keys_of(sandboxes)).values())


def read_events(
    process: subprocess.Popen[bytes], until: Callable[[list[Event]], bool], timeout: float
) -> list[Event]:
    """Read NDJSON events until `until(events)` holds; fail at the deadline or output end."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    events: list[Event] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not until(events):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"condition not met within {timeout}s; events: {events}"
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 65536)
            assert chunk, f"output ended (exit {process.wait()}) first; events: {events}"
            *lines, buffer = (buffer + chunk).split(b"\n")
            events += [json.loads(line) for line in lines if line.strip()]
    return events


def created(count: int) -> Callable[[list[Event]], bool]:
    return lambda events: sum(e["event"] == "created" for e in events) >= count


@contextlib.contextmanager
def reaped(*processes: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kill (by PID) whichever of our subprocesses still runs when the block exits."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()


# --- checks -----------------------------------------------------------------------------


def converge(fleet: Fleet, tally: Tally, what: str) -> list[dict[str, Any]] | None:
    """Apply; count duplicates; check one RUNNING sandbox per key and a clean plan.

    Returns the live sandboxes when it converged (counted in `converged_rounds`)."""
    code, out = fleet.apply()
    if code != 0:
        tally.problems.append(f"{what}: apply exited {code}: {out[-2000:]}")
    found = fleet.live()
    tally.duplicates += duplicates_in(found)
    if sorted(set(keys_of(found))) != fleet.wanted():
        tally.problems.append(f"{what}: keys {keys_of(found)} are not the {fleet.replicas}")
        return None
    running = fleet.wait_running()
    if running is None or len(running) != fleet.replicas:
        statuses = Counter(s["status"] for s in fleet.live())
        tally.problems.append(f"{what}: not {fleet.replicas} RUNNING: {dict(statuses)}")
        return None
    code, out = fleet.fleetctl("plan", str(fleet.spec), "--detailed-exitcode")
    if code != 0:
        tally.problems.append(f"{what}: plan --detailed-exitcode exited {code}: {out}")
        return None
    tally.converged_rounds += 1
    return running


def destroy(fleet: Fleet, tally: Tally, what: str) -> None:
    code, out = fleet.fleetctl("destroy", str(fleet.spec), "--yes")
    if code != 0:
        tally.problems.append(f"{what}: destroy exited {code}: {out[-2000:]}")
    left = fleet.live()
    if left:
        tally.problems.append(f"{what}: {len(left)} sandbox(es) still listed after destroy")
        control(fleet.server, "DELETE", "/sandbox", json={"labels": fleet.labels})


def leftovers(data_dir: Path, ids: set[str]) -> list[str]:
    """What the host still holds for these sandboxes: dirs under `<data_dir>/sandboxes/`,
    cgroup dirs named by one of `ids` under a `fleetctl` group, and processes of their host
    uid ranges (each sandbox's, from its handle in the server's `state.db`)."""
    root = data_dir / "sandboxes"
    found = [f"dir {p}" for p in root.glob("*")] if root.exists() else []
    for group in CGROUP_ROOT.glob("**/fleetctl"):
        found += [f"cgroup {p}" for p in group.iterdir() if p.is_dir() and p.name in ids]
    ranges = sandbox_uids(data_dir, ids)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = (proc / "status").read_text()
            uid = int(status.split("\nUid:", 1)[1].split()[0])
            if any(low <= uid < low + ID_RANGE for low in ranges):
                found.append(f"process {proc.name} (uid {uid})")
    return found


def sandbox_uids(data_dir: Path, ids: set[str]) -> set[int]:
    """The first host uid of each sandbox's range, as its runtime handle records it."""
    with contextlib.closing(sqlite3.connect(data_dir / "state.db")) as db:
        rows = db.execute("SELECT id, runtime FROM sandboxes").fetchall()
    return {int(json.loads(runtime)["uid"]) for sandbox_id, runtime in rows
            if sandbox_id in ids and runtime and "uid" in json.loads(runtime)}  # fmt: skip


def count_leaks(
    data_dir: Path, ids: set[str], tally: Tally, what: str, timeout: float = 30
) -> None:
    """Poll until nothing is left on the host (teardown may finish after the DELETE);
    whatever remains at the deadline is counted as leaked."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(data_dir, ids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        tally.leaked += len(left)
        tally.problems.append(f"{what}: leaked {left}")


# --- scenarios --------------------------------------------------------------------------


def soak(rounds: int, sandboxes: int, workdir: Path) -> Tally:
    """`rounds` x (apply `sandboxes` replicas, check, destroy, check the host) on a server
    with injected control-plane faults and creates limited to 20/s."""
    tally = Tally()
    flags = ("--faults", FAULTS, "--rate-limit", "create=20/s")
    with own_server(*flags) as (server, _):
        for number in range(rounds):
            what = f"soak round {number}"
            fleet = Fleet.write(server, workdir, f"soak-{number}", sandboxes)
            tally.rounds += 1
            ids = {s["id"] for s in converge(fleet, tally, what) or fleet.live()}
            seen = {item.split()[0] for item in leftovers(server.data_dir, ids)}
            if seen != {"dir", "cgroup", "process"}:  # the leak probe must see live sandboxes
                tally.problems.append(f"{what}: the host probe saw only {seen} of a live fleet")
            destroy(fleet, tally, what)
            count_leaks(server.data_dir, ids, tally, what)
        tally.faults_injected += faults_injected(server)
    return tally


def crash_apply(sandboxes: int, seed: int, workdir: Path) -> Tally:
    """SIGKILL `fleetctl apply` after k created events (k seeded), re-run: it converges to
    exactly one sandbox per key, keeping every sandbox the killed run made."""
    tally = Tally(rounds=1)
    kill_after = random.Random(seed).randint(1, max(1, sandboxes - 2))
    with own_server("--rate-limit", "create=8/s") as (server, _):
        fleet = Fleet.write(server, workdir, f"crash-apply-{seed}", sandboxes)
        process = fleet.spawn_apply()
        with reaped(process):
            read_events(process, created(kill_after), 60)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        before = {s["id"] for s in fleet.live()}
        tally.notes.append(f"crash-apply: killed after {kill_after} created, {len(before)} live")
        running = converge(fleet, tally, "crash-apply")
        if running is not None:
            tally.lost += len(before - {s["id"] for s in running})
        ids = before | {s["id"] for s in fleet.live()}
        destroy(fleet, tally, "crash-apply")
        count_leaks(server.data_dir, ids, tally, "crash-apply")
        tally.faults_injected += faults_injected(server)
    return tally


def crash_server(sandboxes: int, seed: int, workdir: Path) -> Tally:
    """SIGKILL the server after k created events of an apply (k seeded), start a server
    on the same data dir, re-run the apply: exactly one sandbox per key, and every sandbox
    RUNNING before the kill still RUNNING under the same id.

    Whatever happens, a server is finally started on the data dir and SIGTERMed, so the
    sandboxes the killed server left are adopted and stopped, never orphaned."""
    tally = Tally(rounds=1)
    kill_after = random.Random(seed).randint(1, max(1, sandboxes - 2))
    ids: set[str] = set()
    with traversable_dir() as base:
        data_dir = base / "data"
        first, process = start_server(data_dir, "--rate-limit", "create=8/s")
        fleet = Fleet.write(first, workdir, f"crash-server-{seed}", sandboxes)
        try:
            apply = fleet.spawn_apply()
            with reaped(apply):
                try:
                    read_events(apply, created(kill_after), 60)
                    before = {s["id"] for s in fleet.live() if s["status"] == "RUNNING"}
                finally:
                    process.kill()  # our server, by PID
                    process.wait(timeout=30)
                killed = time.monotonic()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    apply.wait(timeout=60)  # it fails (its server is gone); not waited forever
                ended = "still running" if apply.poll() is None else f"exit {apply.returncode}"
                tally.notes.append(
                    f"crash-server: the orphaned apply: {ended} "
                    f"{time.monotonic() - killed:.1f}s after the server died"
                )
            ids |= before
            tally.notes.append(
                f"crash-server: killed after {kill_after} created, {len(before)} RUNNING"
            )
            second, process = start_server(data_dir)
            fleet = fleet.aimed_at(second)
            running = converge(fleet, tally, "crash-server")
            now = {s["id"] for s in running or [] if s["status"] == "RUNNING"}
            ids |= {s["id"] for s in fleet.live()}
            gone = sorted(before - now)
            tally.lost += len(gone)
            if gone:
                tally.problems.append(f"crash-server: RUNNING before the kill, then not: {gone}")
            destroy(fleet, tally, "crash-server")
            count_leaks(data_dir, ids, tally, "crash-server")
        finally:
            if process.poll() is not None:  # killed and not restarted: adopt, then stop
                _, process = start_server(data_dir)
            stop_server(process)
        count_leaks(data_dir, ids, tally, "crash-server, after the server stopped")
    return tally
