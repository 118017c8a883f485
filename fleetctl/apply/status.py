"""What a fleet looks like now: per sandbox its status, age, exposures and jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import anyio

from fleetctl.apply import live
from fleetctl.apply.executor import job_handle
from fleetctl.sandboxes import AsyncSandboxClient, SandboxFileNotFoundError
from fleetctl.spec.expand import Fleet


@dataclass(frozen=True, slots=True)
class JobState:
    name: str
    state: str  # not started | running | succeeded | failed | unknown
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxState:
    fleet: str
    key: str
    id: str | None
    status: str  # MISSING when the spec wants it and nothing runs
    age_seconds: float | None
    exposures: tuple[str, ...]
    jobs: tuple[JobState, ...]


async def fleet_status(client: AsyncSandboxClient, fleets: list[Fleet]) -> list[SandboxState]:
    """The live state of every sandbox the fleets want (MISSING if none)."""
    owned = await live.owned(client, [f.name for f in fleets])
    newest = {}
    for sandbox in sorted(owned, key=lambda s: s.created_at):
        newest[(sandbox.fleet, sandbox.key)] = sandbox
    now = datetime.now(UTC)
    states: list[SandboxState] = []

    async def one(fleet: str, key: str, jobs: tuple[str, ...]) -> None:
        found = newest.get((fleet, key))
        if found is None:
            states.append(SandboxState(fleet, key, None, "MISSING", None, (), ()))
            return
        exposures: tuple[str, ...] = ()
        job_states = tuple(JobState(j, "unknown") for j in jobs)
        if found.status == "RUNNING":
            ports = await client.list_exposed_ports(found.id)
            exposures = tuple(f"{e.port}/{e.protocol}→{e.external_endpoint or e.url}"
                              for e in ports.exposures)  # fmt: skip
            job_states = tuple([await _job(client, found.id, j) for j in jobs])
        age = (now - found.created_at).total_seconds()
        states.append(SandboxState(fleet, key, found.id, found.status, age, exposures, job_states))

    async with anyio.create_task_group() as group:
        for fleet in fleets:
            for wanted in fleet.sandboxes:
                group.start_soon(one, fleet.name, wanted.key, tuple(j.name for j in wanted.jobs))
    return sorted(states, key=lambda s: (s.fleet, s.key))


async def _job(client: AsyncSandboxClient, sandbox_id: str, name: str) -> JobState:
    handle = job_handle(name, sandbox_id)
    status = await client.get_background_job(sandbox_id, handle)
    if status.completed:
        state = "succeeded" if status.exit_code == 0 else "failed"
        return JobState(name, state, status.exit_code)
    try:
        await client.read_file(sandbox_id, handle.stdout_log_file, 0, 0)
    except SandboxFileNotFoundError:
        return JobState(name, "not started")
    return JobState(name, "running")
