"""Background jobs: started by the server exactly once per sandbox and job id, and kept
where the sandbox cannot touch them.

`start` records the launch in the server's database before the job runs (a second
start of the same id answers with the first: a client that retries, or an `apply`
killed between starting a job and noting it, never starts it twice), then runs it
to its end on a task of the server and records its exit code. A job may wipe /tmp,
/workspace or anything else it can write: its record stays. Its output goes to files
in /tmp as a job started through exec does (`contract.job_files`), so clients read it
the same way. Statuses come from the records, for a whole fleet in one call; a job the
server has no record of (started through exec: older clients, the cloud's way) is read
from its exit file. A job whose runner went with a server (stopped or killed) is found
again by the mark in its environment (`FLEETCTL_JOB_ID`, read from the host): while one
of its processes runs, it runs; then its exit file, if it wrote one, gives its code, and
that is recorded; with none, it is recorded as lost (exit code -1: it ended without one,
e.g. killed with the server's cold path).
"""

from __future__ import annotations

import contextlib
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
#: The environment variable that marks a job's processes (its id).
MARK = "FLEETCTL_JOB_ID"
#: The exit code recorded for a job that ended without one (its runner and it went).
LOST = -1


class Jobs:
    def __init__(self, shared: Shared, data: DataPlane) -> None:
        self.shared = shared
        self.data = data
        self.running: set[tuple[str, str]] = set()
        self._group: TaskGroup | None = None

    def run(self, group: TaskGroup) -> None:
        self._group = group

    async def start(self, sandbox_id: str, request: api.StartJob) -> api.JobStarted:
        record, handle = await self.data.running(sandbox_id)
        user = await self.data.user(record, handle, None)
        started = self.shared.store.jobs.claim(sandbox_id, request.job_id)
        if started:
            assert self._group is not None, "Jobs.run was not called"
            env = {**self.shared.env.get(sandbox_id, {}), **request.env,
                   MARK: request.job_id}  # fmt: skip
            cwd = request.working_dir or workdir(record)
            key = (sandbox_id, request.job_id)
            self.running.add(key)
            self._group.start_soon(self._run, key, handle, env, (wrapped(request), cwd, user))
        return api.JobStarted(sandbox_id=sandbox_id, job_id=request.job_id, started=started)

    async def of(self, sandbox_id: str) -> api.JobList:
        """A sandbox's jobs (those this server started), in the order they started."""
        self.data.lifecycle.get(sandbox_id)  # NotFound
        records = self.shared.store.jobs.of(sandbox_id)
        exits = {r.job_id: r.exit_code for r in records if r.finished_at is not None}
        with contextlib.suppress(NotRunning):  # a sandbox that ended: its records as they are
            orphans = [r.job_id for r in records if r.job_id not in exits]
            exits |= await self._exit_codes(sandbox_id, await self.data.live(sandbox_id),
                                            orphans, recorded=set(orphans))  # fmt: skip
        return api.JobList(jobs=[
            api.JobStatusItem(sandbox_id=sandbox_id, job_id=r.job_id,
                              completed=exits.get(r.job_id) is not None,
                              exit_code=exits.get(r.job_id))
            for r in records
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
            code = LOST
        except BaseException:  # cancelled (the server stopping): not recorded, it may run on
            self.running.discard(key)
            raise
        self.shared.store.jobs.finish(*key, code)  # first: never seen unrecorded and unrun
        self.running.discard(key)

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
                exits |= await self._exit_codes(
                    sandbox_id,
                    handle,
                    [i for i in ids if exits.get(i) is None],
                    recorded=set(known),
                )
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

    async def _exit_codes(
        self, sandbox_id: str, handle: Handle, job_ids: list[str], *, recorded: set[str]
    ) -> dict[str, int | None]:
        """The exit codes of jobs that have none recorded and no runner here: from their
        exit files; a `recorded` one (a runner of a server gone) that no process runs any
        more gets its code, or LOST, recorded."""
        job_ids = [i for i in job_ids if (sandbox_id, i) not in self.running]
        if not job_ids:
            return {}
        runtime = self.shared.runtime
        ended = [i for i in job_ids if i in recorded and not await anyio.to_thread.run_sync(
            runtime.runs_with, handle, f"{MARK}={i}")]  # fmt: skip
        codes = await self._exit_files(handle, job_ids)  # after: an ended job's file is there
        for job_id in ended:
            code = codes.get(job_id)
            codes[job_id] = code = LOST if code is None else code
            self.shared.store.jobs.finish(sandbox_id, job_id, code)
        return codes

    async def _exit_files(self, handle: Handle, job_ids: list[str]) -> dict[str, int | None]:
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
