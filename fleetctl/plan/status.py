"""What a fleet looks like now: per sandbox its status, age, exposures and jobs.

A read of live state, like refresh, for `status` and `wait`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import anyio

from fleetctl.contract import FINAL_STATUSES, SandboxStatus
from fleetctl.plan.identity import job_id
from fleetctl.plan.refresh import owned
from fleetctl.sandboxes import AsyncSandboxClient, BackgroundJob, SandboxFileNotFoundError
from fleetctl.spec.expand import Fleet

#: `status` of a sandbox the spec wants and nothing runs for.
MISSING = "MISSING"


class JobPhase(StrEnum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"  # the sandbox is not running, so nothing can be read inside


#: Phases of a job that has not finished (yet).
UNFINISHED = frozenset({JobPhase.NOT_STARTED, JobPhase.RUNNING, JobPhase.UNKNOWN})


@dataclass(frozen=True, slots=True)
class JobState:
    name: str
    state: JobPhase
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxState:
    fleet: str
    key: str
    id: str | None
    status: str  # a SandboxStatus, or MISSING when the spec wants it and nothing runs
    age_seconds: float | None
    exposures: tuple[str, ...]
    jobs: tuple[JobState, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and YAML-ready form, for `status -o json|yaml`."""
        data = asdict(self)
        data["jobs"] = [{**job, "state": job["state"].value} for job in data["jobs"]]
        return data

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def done(self, jobs: bool) -> bool:
        """RUNNING, and with `jobs`, every job finished."""
        if self.status != SandboxStatus.RUNNING:
            return False
        return not jobs or not any(j.state in UNFINISHED for j in self.jobs)


async def fleet_status(client: AsyncSandboxClient, fleets: list[Fleet]) -> list[SandboxState]:
    """The live state of every sandbox the fleets want (MISSING if none)."""
    live = await owned(client, [f.name for f in fleets])
    newest = {(s.fleet, s.key): s for s in sorted(live, key=lambda s: s.created_at)}
    now = datetime.now(UTC)
    states: list[SandboxState] = []

    async def one(fleet: str, key: str, jobs: tuple[str, ...]) -> None:
        found = newest.get((fleet, key))
        if found is None:
            states.append(SandboxState(fleet, key, None, MISSING, None, (), ()))
            return
        exposures: tuple[str, ...] = ()
        job_states = tuple(JobState(j, JobPhase.UNKNOWN) for j in jobs)
        if found.status == SandboxStatus.RUNNING:
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
    handle = BackgroundJob.for_id(job_id(name), sandbox_id)
    status = await client.get_background_job(sandbox_id, handle)
    if status.completed:
        phase = JobPhase.SUCCEEDED if status.exit_code == 0 else JobPhase.FAILED
        return JobState(name, phase, status.exit_code)
    try:
        await client.read_file(sandbox_id, handle.stdout_log_file, 0, 0)
    except SandboxFileNotFoundError:
        return JobState(name, JobPhase.NOT_STARTED)
    return JobState(name, JobPhase.RUNNING)
