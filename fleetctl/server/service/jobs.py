"""Background jobs: started by the server exactly once per sandbox and job id, and kept
where the sandbox cannot touch them.

`start` records the launch in the server's database before the job runs (a second
start of the same id answers with the first: a client that retries, or an `apply`
killed between starting a job and noting it, never starts it twice), then runs it
to its end on a task of the server and records its exit code. A job may wipe /tmp,
/workspace or anything else it can write: its record stays. Its output goes to files
in /tmp as a job started through exec does (`contract.job_files`), so clients read it
the same way. Statuses come from the records, for a whole fleet in one call; a job the
server has no record of (started through exec: older clients, the cloud's way), or
whose runner went with a restart (the job runs on), is read from its exit file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from fleetctl.contract import job_files
from fleetctl.server import api
from fleetctl.server.runtime.base import Handle, User
from fleetctl.server.service.dataplane import DataPlane, workdir
from fleetctl.server.service.state import NotFound, NotRunning, Shared

log = logging.getLogger("fleetctl.server")


class Jobs:
    def __init__(self, shared: Shared, data: DataPlane) -> None:
        self.shared = shared
        self.data = data
        self.running: set[tuple[str, str]] = set()
        self._group: TaskGroup | None = None

    def run(self, group: TaskGroup) -> None:
        self._group = group

    async def start(self, sandbox_id: str, request: api.StartJob) -> api.JobStarted:
        handle = await self.data.live(sandbox_id)
        record = self.data.lifecycle.get(sandbox_id)
        user = await self.data.user(sandbox_id, handle, None)
        started = self.shared.store.jobs.claim(sandbox_id, request.job_id)
        if started:
            assert self._group is not None, "Jobs.run was not called"
            env = {**self.shared.env.get(sandbox_id, {}), **request.env}
            cwd = request.working_dir or workdir(record)
            key = (sandbox_id, request.job_id)
            self.running.add(key)
            self._group.start_soon(self._run, key, handle, env, (wrapped(request), cwd, user))
        return api.JobStarted(sandbox_id=sandbox_id, job_id=request.job_id, started=started)

    def of(self, sandbox_id: str) -> api.JobList:
        self.data.lifecycle.get(sandbox_id)  # NotFound
        return api.JobList(jobs=[
            api.JobStatusItem(sandbox_id=sandbox_id, job_id=r.job_id,
                              completed=r.finished_at is not None, exit_code=r.exit_code)
            for r in self.shared.store.jobs.of(sandbox_id)
        ])  # fmt: skip

    async def _run(
        self, key: tuple[str, str], handle: Handle, env: dict[str, str], how: tuple[str, str, User]
    ) -> None:
        command, cwd, user = how
        try:
            code = await self.shared.runtime.run_job(handle, env, command, cwd=cwd, user=user)
        except Exception as exc:  # its sandbox ended under it, say: never
            # may a job's failure end the server's task group (and the server)
            log.warning("background job %s of sandbox %s: %r", key[1], key[0], exc)
            code = -1
        finally:  # cancelled (the server stopping): not recorded, the job may run on
            self.running.discard(key)
        self.shared.store.jobs.finish(*key, code)

    async def statuses(self, jobs: Sequence[api.JobRef]) -> api.BatchJobStatusResponse:
        """Jobs' states: from the server's records, else from their exit files (one read
        per sandbox)."""
        statuses: list[api.JobStatusItem] = []
        errors: list[api.JobError] = []
        by_sandbox: dict[str, list[str]] = {}
        for job in jobs:
            by_sandbox.setdefault(job.sandbox_id, []).append(job.job_id)

        async def one(sandbox_id: str, ids: list[str]) -> None:
            try:
                handle = await self.data.live(sandbox_id)
                known = {r.job_id: r for r in self.shared.store.jobs.of(sandbox_id)}
                exits = {i: known[i].exit_code for i in ids if i in known}
                unknown = [i for i in ids if exits.get(i) is None
                           and (sandbox_id, i) not in self.running]  # fmt: skip
                exits |= await self._exit_codes(handle, unknown) if unknown else {}
            except (NotFound, NotRunning) as exc:
                code: Literal["NOT_FOUND", "NOT_RUNNING"] = (
                    "NOT_FOUND" if isinstance(exc, NotFound) else "NOT_RUNNING"
                )
                errors.extend(api.JobError(sandbox_id=sandbox_id, job_id=i, code=code,
                                           message=str(exc)) for i in ids)  # fmt: skip
                return
            statuses.extend(
                api.JobStatusItem(sandbox_id=sandbox_id, job_id=i, completed=exits.get(i)
                                  is not None, exit_code=exits.get(i))
                for i in ids
            )  # fmt: skip

        async with anyio.create_task_group() as group:
            for sandbox_id, ids in by_sandbox.items():
                group.start_soon(one, sandbox_id, list(dict.fromkeys(ids)))
        return api.BatchJobStatusResponse(statuses=statuses, errors=errors)

    async def _exit_codes(self, handle: Handle, job_ids: list[str]) -> dict[str, int | None]:
        """The exit code each job left in its exit file, if it did (ids are checked by the
        API model: letters, digits, - and _)."""
        script = "".join(
            f'printf "%s %s\\n" {i} "$(head -c 32 {job_files(i).exit} 2>/dev/null)"; '
            for i in job_ids
        )
        result = await self.shared.runtime.exec(handle, {}, script, cwd="/", timeout=30)
        codes: dict[str, int | None] = {}
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            job_id, _, text = line.partition(" ")
            if job_id in job_ids and text.strip().lstrip("-").isdigit():
                codes[job_id] = int(text.strip())
        return codes


def wrapped(request: api.StartJob) -> str:
    """The job's command with its output and exit code in its files, exiting with its
    code (what the server records)."""
    files = job_files(request.job_id)
    return (
        f"( {request.command}\n) > {files.stdout} 2> {files.stderr}; code=$?; "
        f"echo $code > {files.exit}.tmp && mv {files.exit}.tmp {files.exit}; exit $code"
    )
