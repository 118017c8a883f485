"""apply / destroy stay exact when interrupted, raced, throttled and faulted, on real servers.

Each scenario counts the fleet's sandboxes through the API by fleetctl's own
label (`fleetctl.fleet=<fleet>`), so a duplicate or a leftover shows up as a
wrong count. The servers here are extra ones with a rate limit (and faults),
started for this module; the session server is not touched. The oracle
(`control`) retries injected 5xx and resets itself, so it never shares a retry
bug with the SDK under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from fleetctl.server.faults import FaultMiddleware, parse_faults
from tests.conftest import Server, control, faults, needs_sandboxes, own_server
from tests.conftest import run_cli as run
from tests.reliability.scenarios import Fleet, read_events, reaped

pytestmark = needs_sandboxes
Event = dict[str, Any]
FAULTS = "error=0.1,reset=0.05,seed=7,scope=control"


@pytest.fixture(scope="module")
def throttled() -> Iterator[Server]:
    """Creates limited to 4/s: an apply of a dozen sandboxes takes seconds, not milliseconds."""
    with own_server("--rate-limit", "create=4/s") as (info, _):
        yield info


@pytest.fixture(scope="module")
def faulty() -> Iterator[Server]:
    """Creates limited to 5/s, and 15% of control-plane requests answered 5xx or reset."""
    with own_server("--rate-limit", "create=5/s", "--faults", FAULTS) as (info, _):
        yield info


async def _never_called(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("only the fault decisions are replayed, no request is served")


class FaultSequence:
    """The `faulty` server's seeded decisions, replayed here: whether its request number
    `index` (0-based, in arrival order) gets an injected error or reset."""

    def __init__(self) -> None:
        self._replay = FaultMiddleware(_never_called, parse_faults(FAULTS))
        self._faulted: list[bool] = []

    def faulted(self, index: int) -> bool:
        while len(self._faulted) <= index:
            # the server's own decision function, so the draws cannot drift from it
            self._faulted.append(self._replay._decide().fault is not None)
        return self._faulted[index]


def steer(server: Server, *pattern: bool) -> int:
    """Spend control-plane requests (fault-stats reads) until the server's next requests
    will be faulted as `pattern` says (True: error or reset); the faults injected so far.

    Only valid while nothing else talks to the server: each request draws the next fault.
    """
    sequence = FaultSequence()
    deadline = time.monotonic() + 30
    while True:
        stats = faults(server, everyone=True)  # the read counts itself in `requests`
        upcoming = [sequence.faulted(stats["requests"] + i) for i in range(len(pattern))]
        if upcoming == list(pattern):
            return int(stats["error"] + stats["reset"])
        assert time.monotonic() < deadline, f"no {pattern} in the fault sequence within 30s"


MakeFleet = Callable[[Server, str, int], Fleet]


@pytest.fixture
def fleets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeFleet]:
    """Write a fleet spec aimed at a server (env set for in-process CLI calls too); every
    sandbox labelled for the fleets made is deleted after the test."""
    made: list[Fleet] = []
    monkeypatch.chdir(tmp_path)

    def make(server: Server, name: str, replicas: int) -> Fleet:
        monkeypatch.setenv("FLEETCTL_API_URL", server.url)
        monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
        made.append(Fleet.write(server, tmp_path, name, replicas))
        return made[-1]

    yield make
    for fleet in made:
        control(fleet.server, "DELETE", "/sandbox", json={"labels": fleet.labels})


def ndjson(out: str) -> list[Event]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def summary(events: list[Event]) -> Event:
    assert events, "apply printed no events"
    assert events[-1]["event"] == "summary", events[-1]
    return events[-1]


def running(fleet: Fleet) -> list[dict[str, Any]]:
    """The fleet's sandboxes once all are RUNNING; fail if one failed or at the deadline."""
    found = fleet.wait_running(timeout=30)
    assert found is not None, [s["status"] for s in fleet.live()]
    return found


def finish(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, list[Event]]:
    """Wait for a subprocess apply; its exit code and every event it printed."""
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, ndjson(out.decode())


def test_apply_killed_midway_then_rerun_converges_to_exactly_the_replicas(
    throttled: Server, fleets: MakeFleet, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """SIGKILL while creates are in flight leaves a partial fleet; the re-run creates only
    what is missing (idempotency keys and live labels), so no key gets two sandboxes."""
    fleet = fleets(throttled, "t-resil-kill", 12)
    process = fleet.spawn_apply(tmp_path / "killed.log")
    with reaped(process):
        seen = read_events(process, lambda e: any(x["event"] == "created" for x in e), 30)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    assert all(e["event"] != "summary" for e in seen), seen
    partial = len(fleet.live())
    assert 1 <= partial < fleet.replicas, f"the kill did not land midway: {partial} live"

    code, out, err = run(capsys, "apply", str(fleet.spec), "--yes", "-o", "json")
    assert code == 0, out + err
    assert summary(ndjson(out))["failed"] == 0
    assert fleet.keys() == fleet.wanted()  # each key exactly once: no duplicate
    assert len(running(fleet)) == fleet.replicas
    assert run(capsys, "plan", str(fleet.spec), "--detailed-exitcode")[:2] == (
        0, "Plan: no changes.\n")  # fmt: skip


def test_two_concurrent_applies_of_one_spec_make_each_sandbox_once(
    throttled: Server, fleets: MakeFleet, tmp_path: Path
) -> None:
    """Two applies racing on one fleet (creates throttled, so their creates of the same
    keys overlap) get the same sandbox per key back; whatever either reported still exists."""
    fleet = fleets(throttled, "t-resil-race", 8)
    first = fleet.spawn_apply(tmp_path / "first.log")
    second = fleet.spawn_apply(tmp_path / "second.log")
    with reaped(first, second):
        results = [finish(first, 60), finish(second, 60)]
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("first", "second")]
    assert [code for code, _ in results] == [0, 0], (results, logs)
    for _, events in results:
        assert not events or summary(events)["failed"] == 0, events  # no events: no changes
    assert fleet.keys() == fleet.wanted()  # each key exactly once: no duplicate
    live = {s["id"] for s in running(fleet)}
    created = [(e["key"], e["id"]) for _, events in results for e in events
               if e["event"] == "created"]  # fmt: skip
    assert {sandbox_id for _, sandbox_id in created} <= live, (created, live)
    assert len(dict(created)) == len(set(created)), f"a key got two ids: {created}"


def test_apply_under_throttling_and_faults_creates_every_sandbox_once(
    faulty: Server, fleets: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """429s and injected 5xx/resets are retried (creates are keyed), so the apply fully
    succeeds with exactly one sandbox per key, and says it had to retry or wait."""
    fleet = fleets(faulty, "t-resil-faults", 20)
    code, out, err = run(capsys, "apply", str(fleet.spec), "--yes", "-o", "json")
    assert code == 0, out + err
    events = ndjson(out)
    done = summary(events)
    assert done["failed"] == 0, [e for e in events if e["event"] == "failed"]
    assert done["changed"] == 20
    assert done["throttled"] > 0 or done["retries"] > 0, done
    assert sorted(e["key"] for e in events if e["event"] == "created") == fleet.wanted()
    assert fleet.keys() == fleet.wanted()
    assert len(running(fleet)) == 20
    code, out, err = run(capsys, "plan", str(fleet.spec), "--detailed-exitcode")
    assert (code, out) == (0, "Plan: no changes.\n"), err
    suffered = faults(faulty)
    assert suffered["error"] + suffered["reset"] > 0, suffered  # the faults really struck


def test_destroy_by_spec_and_by_label_leave_nothing_under_faults(
    faulty: Server, fleets: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """destroy SPEC and destroy -l LABEL each delete every sandbox of the fleet though a
    fault strikes their listing (by spec) or their bulk delete (by label): both retried."""
    fleet = fleets(faulty, "t-resil-destroy", 5)
    by_spec = ([str(fleet.spec)], (True,))  # the list of the fleet's sandboxes is faulted
    by_label = (["-l", f"{fleet.name}-fleet"], (False, True))  # the bulk delete is faulted
    for target, pattern in (by_spec, by_label):
        code, out, err = run(capsys, "apply", str(fleet.spec), "--yes")
        assert code == 0, out + err
        assert fleet.keys() == fleet.wanted()
        struck = steer(faulty, *pattern)
        code, out, err = run(capsys, "destroy", *target, "--yes")
        seen = faults(faulty, everyone=True)
        assert seen["error"] + seen["reset"] >= struck + sum(pattern), "no fault struck"
        assert code == 0, out + err
        assert "Destroy: 5 sandbox(es)." in out
        assert "Destroyed 5; 0 failed." in out
        assert fleet.live() == [], target
