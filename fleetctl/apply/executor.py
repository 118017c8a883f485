"""The executor: carry out a Plan with anyio, concurrently, one failure not stopping the rest.

Order per run: delete what is dead or pruned, create (bounded by
`parallelism`), wait for readiness in one batch-status poller that holds no
create slot, then per ready sandbox upload files, expose ports and start jobs;
then delete what replaces superseded; with `wait_jobs`, wait for jobs and
download their artifacts. Every create carries an idempotency key derived
from fleet, key, digest and the sandbox it replaces.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from fleetctl.plan.identity import idempotency_key, labels
from fleetctl.plan.model import Action, Change, InPlace, Plan
from fleetctl.sandboxes import (
    APIError,
    AsyncSandboxClient,
    BackgroundJob,
    CreateSandboxRequest,
    SandboxNotRunningError,
)
from fleetctl.spec.expand import DesiredSandbox

Event = dict[str, Any]
Emit = Callable[[Event], None]
SDK_ERRORS = (APIError, SandboxNotRunningError, RuntimeError)
#: Inside each sandbox: "<content digest> <target>" per uploaded file of the spec.
FILES_MARKER = "/tmp/.fleetctl-files"


@dataclass(frozen=True, slots=True)
class Options:
    parallelism: int = 32
    wait_jobs: bool = False
    artifacts_dir: Path = Path("artifacts")
    job_poll_seconds: float = 0.5


@dataclass(slots=True)
class Result:
    """What a run did: per key, the action and whether it succeeded."""

    done: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(slots=True)
class _Work:
    change: Change
    digest: str
    secrets: Mapping[str, str]
    sandbox_id: str | None = None
    in_place: InPlace = field(default_factory=InPlace)
    jobs: list[tuple[str, BackgroundJob]] = field(default_factory=list)


async def execute(
    plan: Plan,
    client: AsyncSandboxClient,
    digests: Mapping[tuple[str, str], str],
    secrets: Mapping[tuple[str, str], Mapping[str, str]],
    options: Options,
    emit: Emit,
    file_digests: Mapping[str, str] | None = None,
    result: Result | None = None,
) -> Result:
    """Carry out `plan`; returns which keys succeeded and which failed (with why)."""
    started = time.monotonic()
    result = result if result is not None else Result()
    limiter = anyio.CapacityLimiter(options.parallelism)
    work = [_work(c, digests, secrets) for c in plan.changes if c.action is not Action.noop]

    def fail(item: _Work, error: BaseException) -> None:
        result.failed[_label(item.change)] = str(error)
        emit({"event": "failed", "key": item.change.key, "action": item.change.action.value,
              "error": str(error)})  # fmt: skip

    async def guarded(item: _Work, step: Callable[[_Work], Any]) -> None:
        if _label(item.change) in result.failed:
            return
        async with limiter:
            try:
                await step(item)
            except SDK_ERRORS as exc:
                fail(item, exc)

    async def remove_first(item: _Work) -> None:
        await _remove(client, item, item.change.reason, emit)

    async def create(item: _Work) -> None:
        sandbox = await client.create(_request(item))
        item.sandbox_id = sandbox.id
        emit({"event": "created", "key": item.change.key, "id": sandbox.id})

    async def configure(item: _Work) -> None:
        await _reconcile(client, item, file_digests or {}, emit)

    async def remove_old(item: _Work) -> None:
        await _remove(client, item, "replaced", emit)

    first = [w for w in work if w.change.action in (Action.delete, Action.recreate)]
    creating = [w for w in work if w.change.action in (Action.create, Action.replace,
                                                        Action.recreate)]  # fmt: skip
    async with anyio.create_task_group() as group:
        for item in first:
            group.start_soon(guarded, item, remove_first)
    async with anyio.create_task_group() as group:
        for item in creating:
            group.start_soon(guarded, item, create)
    await _wait_ready(client, [w for w in creating if w.sandbox_id and
                               _label(w.change) not in result.failed], fail, emit)  # fmt: skip
    ready = [w for w in creating if w.sandbox_id and _label(w.change) not in result.failed]
    ready += [w for w in work if w.change.action is Action.update]
    async with anyio.create_task_group() as group:
        for item in ready:
            group.start_soon(guarded, item, configure)
        for item in work:
            if item.change.action is Action.replace and item in ready:
                group.start_soon(guarded, item, remove_old)
    if options.wait_jobs:
        async with anyio.create_task_group() as group:
            for item in ready:
                if item.jobs:
                    group.start_soon(_finish_jobs, client, item, options, emit, fail)
    for item in work:
        label = _label(item.change)
        if label not in result.failed:
            result.done[label] = item.change.action.value
    result.elapsed = time.monotonic() - started
    return result


def job_handle(name: str, sandbox_id: str = "") -> BackgroundJob:
    """A spec job's files: one fixed id per job name, so `status`, `wait` and later
    applies find them again."""
    return BackgroundJob.for_id(f"fleetctl-{name}", sandbox_id)


def _work(
    change: Change,
    digests: Mapping[tuple[str, str], str],
    secrets: Mapping[tuple[str, str], Mapping[str, str]],
) -> _Work:
    ident = _ident(change)
    item = _Work(change, digests.get(ident, ""), secrets.get(ident, {}))
    if change.action is Action.update:
        assert change.before is not None
        item.sandbox_id, item.in_place = change.before.id, change.in_place
    elif change.after is not None:  # a new sandbox gets everything
        after = change.after
        item.in_place = InPlace(expose=after.expose, upload=after.files, start_jobs=after.jobs)
    return item


def _ident(change: Change) -> tuple[str, str]:
    owner = change.after.fleet if change.after else change.before.fleet if change.before else ""
    return owner, change.key


def _label(change: Change) -> str:
    fleet, key = _ident(change)
    return f"{fleet}/{key}"


def _request(item: _Work) -> CreateSandboxRequest:
    desired: DesiredSandbox | None = item.change.after
    assert desired is not None
    before = item.change.before.id if item.change.before else None
    return CreateSandboxRequest(
        name=f"{desired.fleet}-{desired.key}",
        docker_image=desired.image,
        start_command=desired.start_command or "tail -f /dev/null",
        cpu_cores=desired.cpu_cores,
        memory_gb=desired.memory_gb,
        disk_size_gb=desired.disk_size_gb,
        network_access=desired.network_access,
        timeout_minutes=desired.timeout_minutes,
        environment_vars=dict(desired.env),
        secrets=dict(item.secrets) or None,
        labels=labels(desired, item.digest),
        idempotency_key=idempotency_key(desired.fleet, desired.key, item.digest, before),
    )


async def _remove(client: AsyncSandboxClient, item: _Work, reason: str, emit: Emit) -> None:
    """Delete the change's live sandbox; one that is already gone is what we wanted."""
    before = item.change.before
    assert before is not None
    try:
        await client.delete(before.id)
    except APIError as exc:
        if exc.status_code != 404:
            raise
    emit({"event": "deleted", "key": item.change.key, "id": before.id, "reason": reason})


async def _wait_ready(
    client: AsyncSandboxClient,
    items: list[_Work],
    fail: Callable[[_Work, BaseException], None],
    emit: Emit,
) -> None:
    """One poller for every new sandbox; a failed one is reported, the rest keep waiting."""
    pending = {w.sandbox_id: w for w in items if w.sandbox_id}
    while pending:
        try:
            await client.bulk_wait_for_creation(list(pending))
        except SandboxNotRunningError as exc:
            fail(pending.pop(exc.sandbox_id), exc)
            continue
        except APIError as exc:
            for item in pending.values():
                fail(item, exc)
            return
        for sandbox_id, item in pending.items():
            emit({"event": "ready", "key": item.change.key, "id": sandbox_id})
        return


async def _reconcile(
    client: AsyncSandboxClient, item: _Work, file_digests: Mapping[str, str], emit: Emit
) -> None:
    """Make a ready sandbox match its spec in place: ports, files, jobs."""
    desired = item.change.after
    sandbox_id = item.sandbox_id
    assert desired is not None
    assert sandbox_id is not None
    todo = item.in_place
    for exposure_id in todo.unexpose:
        await client.unexpose(sandbox_id, exposure_id)
        emit({"event": "unexposed", "key": desired.key, "exposure": exposure_id})
    for exposure in todo.expose:
        exposed = await client.expose(sandbox_id, exposure.port, exposure.name, exposure.protocol)
        emit({"event": "exposed", "key": desired.key, "port": exposure.port,
              "url": exposed.external_endpoint or exposed.url})  # fmt: skip
    for spec in todo.upload:
        source = Path(spec.source)
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in files:
            target = spec.target if path == source else f"{spec.target}/{path.relative_to(source)}"
            await client.upload_file(sandbox_id, target, str(path))
        emit({"event": "uploaded", "key": desired.key, "source": spec.source,
              "target": spec.target})  # fmt: skip
    if todo.upload:
        await _record_files(client, sandbox_id, desired, file_digests)
    for job in todo.start_jobs:
        started = await client.start_background_job(
            sandbox_id,
            f"timeout {job.timeout_minutes * 60} sh -c {shlex.quote(job.command)}",
            job_id=job_handle(job.name).job_id,
        )
        item.jobs.append((job.name, started))
        emit({"event": "job-started", "key": desired.key, "job": job.name})


async def _record_files(
    client: AsyncSandboxClient,
    sandbox_id: str,
    desired: DesiredSandbox,
    file_digests: Mapping[str, str],
) -> None:
    """Leave the uploaded files' digests in the sandbox, for the next plan to compare."""
    lines = "".join(f"{file_digests.get(f.source, 'present')} {f.target}\n" for f in desired.files)
    with tempfile.TemporaryDirectory() as scratch:
        marker = Path(scratch) / "files"
        marker.write_text(lines)
        await client.upload_file(sandbox_id, FILES_MARKER, str(marker))


async def _finish_jobs(
    client: AsyncSandboxClient,
    item: _Work,
    options: Options,
    emit: Emit,
    fail: Callable[[_Work, BaseException], None],
) -> None:
    desired = item.change.after
    sandbox_id = item.sandbox_id
    assert desired is not None
    assert sandbox_id is not None
    try:
        for name, job in item.jobs:
            while not (status := await client.get_background_job(sandbox_id, job)).completed:
                await anyio.sleep(options.job_poll_seconds)
            emit({"event": "job-finished", "key": desired.key, "job": name,
                  "exit_code": status.exit_code})  # fmt: skip
            spec = next(j for j in desired.jobs if j.name == name)
            for artifact in spec.artifacts:
                local = options.artifacts_dir / desired.fleet / desired.key / artifact.lstrip("/")
                await client.download_file(sandbox_id, artifact, str(local))
                emit({"event": "artifact", "key": desired.key, "path": str(local)})
            if status.exit_code:
                raise RuntimeError(f"job {name} exited with code {status.exit_code}")
    except SDK_ERRORS as exc:
        fail(item, exc)
