"""The executor: carry out a Plan with anyio, concurrently, one failure not stopping the rest.

Order per run: delete what is dead or pruned, run each group's `prepare:` setup once
(or find its checkpoint), create (bounded by `parallelism`), wait for readiness in one
batch-status poller that holds no create slot, then per ready sandbox expose ports,
upload files and start jobs, and delete the sandbox it replaces; with `wait_jobs`, wait
for jobs and download their artifacts; last, delete setup checkpoints nothing uses any
more. Every create carries an idempotency key derived from fleet, key, digest and the
sandbox it replaces. The executor decides nothing: the plan says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from fleetctl.apply.events import Emit, Kind, event
from fleetctl.apply.request import sandbox_request
from fleetctl.apply.setup import checkpoint_for, release, setup_labels
from fleetctl.plan.identity import FILES_MARKER, idempotency_key, job_id, labels
from fleetctl.plan.model import Action, Change, InPlace, Plan
from fleetctl.plan.prepare import Prepared
from fleetctl.sandboxes import (
    APIError,
    AsyncSandboxClient,
    BackgroundJob,
    CreateSandboxRequest,
    SandboxNotRunningError,
)

SDK_ERRORS = (APIError, SandboxNotRunningError, RuntimeError)
#: Actions that make a new sandbox.
CREATING = frozenset({Action.create, Action.replace, Action.recreate})
Step = Callable[["_Work"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Options:
    parallelism: int = 32
    wait_jobs: bool = False
    artifacts_dir: Path = Path("artifacts")
    job_poll_seconds: float = 0.5


@dataclass(slots=True)
class Result:
    """What a run did: per fleet/key, the action done, or why it failed."""

    done: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(slots=True)
class _Work:
    change: Change
    label: str
    digest: str
    secrets: Mapping[str, str]
    #: The digest of the group's `prepare:` setup, if it has one; then its checkpoint.
    setup: str | None = None
    checkpoint: str | None = None
    sandbox_id: str | None = None
    in_place: InPlace = field(default_factory=InPlace)
    jobs: list[tuple[str, BackgroundJob]] = field(default_factory=list)


async def execute(
    plan: Plan,
    client: AsyncSandboxClient,
    prepared: Prepared,
    options: Options,
    emit: Emit,
    result: Result | None = None,
) -> Result:
    """Carry out `plan`; returns which keys succeeded and which failed (with why).
    `result` (if given) fills as work finishes, so an interrupted run can say what it did."""
    run = _Run(client, prepared, options, emit, result if result is not None else Result())
    started = time.monotonic()
    await run.all([_work(c, prepared) for c in plan.changes if c.action is not Action.noop])
    run.result.elapsed = time.monotonic() - started
    return run.result


@dataclass(slots=True)
class _Run:
    """One execution: its client and settings, and the result it fills."""

    client: AsyncSandboxClient
    prepared: Prepared
    options: Options
    emit: Emit
    result: Result
    limiter: anyio.CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = anyio.CapacityLimiter(self.options.parallelism)

    async def all(self, work: list[_Work]) -> None:
        async with anyio.create_task_group() as group:
            for item in work:
                if item.change.action in (Action.delete, Action.recreate):
                    last = item.change.action is Action.delete
                    group.start_soon(functools.partial(self.steps, item, self.remove, last=last))
        creating = [w for w in work if w.change.action in CREATING]
        await self.prepare([w for w in creating if w.setup is not None])
        async with anyio.create_task_group() as group:
            for item in creating:
                group.start_soon(functools.partial(self.steps, item, self.create, last=False))
        new = [w for w in creating if w.sandbox_id and w.label not in self.result.failed]
        await _wait_ready(self.client, new, self.fail, self.emit)
        async with anyio.create_task_group() as group:
            for item in new:
                if item.label in self.result.failed:
                    continue
                if item.change.action is Action.replace:  # the old one goes once the new is set
                    group.start_soon(self.steps, item, self.configure, self.remove_replaced)
                else:
                    group.start_soon(self.steps, item, self.configure)
            for item in work:
                if item.change.action is Action.update:
                    group.start_soon(self.steps, item, self.configure)
        if self.options.wait_jobs:
            async with anyio.create_task_group() as group:
                for item in work:
                    if item.jobs and item.label not in self.result.failed:
                        group.start_soon(_finish_jobs, self.client, item, self.options,
                                         self.emit, self.fail)  # fmt: skip
        removed = [w.change.before.labels for w in work
                   if w.change.before and w.change.action is not Action.update]  # fmt: skip
        kept = {w.checkpoint for w in creating if w.checkpoint}
        with contextlib.suppress(*SDK_ERRORS):  # the API failing now leaves a checkpoint
            await release(self.client, removed, kept, self.emit)
        for label in self.result.failed:
            self.result.done.pop(label, None)

    async def prepare(self, items: list[_Work]) -> None:
        """Each setup once (concurrently); a failed one fails every sandbox of its group."""
        by_setup: dict[str, list[_Work]] = {}
        for item in items:
            by_setup.setdefault(item.setup or "", []).append(item)

        async def one(setup: str, group: list[_Work]) -> None:
            first = group[0]
            assert first.change.after is not None
            try:
                desired, secrets = first.change.after, dict(first.secrets)
                async with self.limiter:
                    checkpoint = await checkpoint_for(self.client, desired, secrets, setup,
                                                      self.emit)  # fmt: skip
            except (*SDK_ERRORS, TimeoutError) as exc:
                for item in group:
                    self.fail(item, exc)
                return
            for item in group:
                item.checkpoint = checkpoint

        async with anyio.create_task_group() as tasks:
            for setup, group in by_setup.items():
                tasks.start_soon(one, setup, group)

    def fail(self, item: _Work, error: BaseException) -> None:
        self.result.failed[item.label] = str(error)
        self.emit(event(Kind.FAILED, item.change.key, action=item.change.action.value,
                        error=str(error)))  # fmt: skip

    async def steps(self, item: _Work, *steps: Step, last: bool = True) -> None:
        """The item's steps in order, each holding a slot; with `last`, they complete
        the change: `done`."""
        for step in steps:
            if item.label in self.result.failed:
                return
            async with self.limiter:
                try:
                    await step(item)
                except SDK_ERRORS as exc:
                    self.fail(item, exc)
                    return
        if last:
            self.result.done[item.label] = item.change.action.value
            self.emit(event(Kind.DONE, item.change.key, action=item.change.action.value))

    async def remove(self, item: _Work) -> None:
        await _remove(self.client, item, item.change.reason, self.emit)

    async def remove_replaced(self, item: _Work) -> None:
        await _remove(self.client, item, "replaced", self.emit)

    async def create(self, item: _Work) -> None:
        sandbox = await self.client.create(_request(item))
        item.sandbox_id = sandbox.id
        self.emit(event(Kind.CREATED, item.change.key, id=sandbox.id))

    async def configure(self, item: _Work) -> None:
        await _reconcile(self.client, item, self.prepared.file_digests, self.emit)


def _work(change: Change, prepared: Prepared) -> _Work:
    owner = change.after.fleet if change.after else change.before.fleet if change.before else ""
    ident = (owner, change.key)
    item = _Work(change, f"{owner}/{change.key}", prepared.digests.get(ident, ""),
                 prepared.secrets.get(ident, {}), prepared.setups.get(ident))  # fmt: skip
    if change.action is Action.update:
        assert change.before is not None
        item.sandbox_id, item.in_place = change.before.id, change.in_place
    elif change.after is not None:  # a new sandbox gets everything
        after = change.after
        item.in_place = InPlace(expose=after.expose, upload=after.files, start_jobs=after.jobs)
    return item


def _request(item: _Work) -> CreateSandboxRequest:
    desired = item.change.after
    assert desired is not None
    before = item.change.before.id if item.change.before else None
    optional = {"start_command": desired.start_command} if desired.start_command else {}
    checkpoint = item.checkpoint or desired.from_checkpoint
    own = setup_labels(item.setup, item.checkpoint) if item.setup and item.checkpoint else []
    return sandbox_request(
        desired,
        item.secrets,
        checkpoint=checkpoint,
        name=f"{desired.fleet}-{desired.key}",
        timeout_minutes=desired.timeout_minutes,
        idle_timeout_minutes=desired.idle_timeout_minutes,
        labels=[*labels(desired, item.digest), *own],
        idempotency_key=idempotency_key(desired.fleet, desired.key, item.digest, before),
        **optional,
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
    emit(event(Kind.DELETED, item.change.key, id=before.id, reason=reason))


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
            emit(event(Kind.READY, item.change.key, id=sandbox_id))
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
        emit(event(Kind.UNEXPOSED, desired.key, exposure=exposure_id))
    for exposure in todo.expose:
        exposed = await client.expose(sandbox_id, exposure.port, exposure.name, exposure.protocol)
        emit(event(Kind.EXPOSED, desired.key, port=exposure.port,
                   url=exposed.external_endpoint or exposed.url))  # fmt: skip
    for spec in todo.upload:
        source = Path(spec.source)
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in files:
            target = spec.target if path == source else f"{spec.target}/{path.relative_to(source)}"
            await client.upload_file(sandbox_id, target, str(path))
        emit(event(Kind.UPLOADED, desired.key, source=spec.source, target=spec.target))
    if todo.upload:
        lines = "".join(f"{file_digests.get(f.source, 'present')} {f.target}\n"
                        for f in desired.files)  # fmt: skip
        await _write(client, sandbox_id, FILES_MARKER, lines)
    for job in todo.start_jobs:
        started = await client.start_background_job(
            sandbox_id,
            f"timeout {job.timeout_minutes * 60} sh -c {shlex.quote(job.command)}",
            job_id=job_id(job.name),
        )
        item.jobs.append((job.name, started))
        emit(event(Kind.JOB_STARTED, desired.key, job=job.name))


async def _write(client: AsyncSandboxClient, sandbox_id: str, path: str, text: str) -> None:
    """Leave `text` in a file inside the sandbox (for the next plan to read)."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "file"
        local.write_text(text)
        await client.upload_file(sandbox_id, path, str(local))


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
            emit(event(Kind.JOB_FINISHED, desired.key, job=name, exit_code=status.exit_code))
            spec = next(j for j in desired.jobs if j.name == name)
            for artifact in spec.artifacts:
                local = options.artifacts_dir / desired.fleet / desired.key / artifact.lstrip("/")
                await client.download_file(sandbox_id, artifact, str(local))
                emit(event(Kind.ARTIFACT, desired.key, path=str(local)))
            if status.exit_code:
                raise RuntimeError(f"job {name} exited with code {status.exit_code}")
    except SDK_ERRORS as exc:
        fail(item, exc)
