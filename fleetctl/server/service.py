"""The sandbox lifecycle: PENDING → PROVISIONING → RUNNING → TERMINATED | ERROR | TIMEOUT.

`SandboxService` owns the store, the runtime and the in-memory parts that must
never be written down (each sandbox's environment, secrets included, and its
gateway tokens). Routes call it; it knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import ByteReceiveStream, TaskGroup

from fleetctl.server import api
from fleetctl.server.proxy import Forwarder
from fleetctl.server.runtime.cgroups import Limits
from fleetctl.server.runtime.sandbox import (
    MISSING_FILE,
    ExecResult,
    Handle,
    LaunchSpec,
    Runtime,
    RuntimeFailure,
)
from fleetctl.server.store import ExposureRecord, SandboxRecord, Store, utcnow

Clock = Callable[[], datetime]
log = logging.getLogger("fleetctl.server")
ImagePolicy = Literal["host", "strict"]

TOKEN_TTL = timedelta(hours=1)
DISK_CHECK_SECONDS = 2.0
DELETED_RETENTION = timedelta(hours=1)
PIDS_LIMIT = 1024
READ_FILE_MAX = 16 * 1024 * 1024
ROOT_USERS = ("root", "0", "root:root", "0:0")
#: File transfers resolve relative paths where exec runs by default.
WORKDIR = "cd /workspace 2>/dev/null;"
_IMAGE_DIR_NAME = re.compile(r"[^A-Za-z0-9._-]")


class NotFound(Exception):
    """No sandbox (or exposure) with this id."""


class NotRunning(Exception):
    """The sandbox exists but is not RUNNING; carries its record for the error context."""

    def __init__(self, record: SandboxRecord) -> None:
        super().__init__(f"sandbox {record.id} is not running (status {record.status})")
        self.record = record


class Refused(Exception):
    """A request this host cannot honour, or that conflicts with current state."""


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    image_policy: ImagePolicy = "host"
    clock: Clock = utcnow
    #: Multiplies every sandbox lifetime; tests use e.g. 0.01 (a 1-minute timeout lasts 0.6 s).
    timeout_scale: float = 1.0


class SandboxService:
    """Creates, watches, enters and removes sandboxes."""

    def __init__(self, store: Store, runtime: Runtime, settings: Settings) -> None:
        self.store = store
        self.runtime = runtime
        self.settings = settings
        self.clock = settings.clock
        self._env: dict[str, dict[str, str]] = {}
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._forwarders: dict[str, anyio.CancelScope] = {}
        self._provisioning = anyio.CapacityLimiter(8)
        self._next_disk_check = 0.0
        self._group: TaskGroup | None = None

    # -- lifetime of the service -------------------------------------------------

    async def run(self, group: TaskGroup, *, monitor_interval: float = 0.2) -> None:
        """Start background work in `group`: cleanup of leftovers, then the monitor."""
        self._group = group
        await anyio.to_thread.run_sync(self.reclaim)
        for exposure in self.store.exposures():
            try:
                await self._serve_exposure(exposure)
            except OSError as exc:  # its port was taken while the server was down
                log.warning("dropping exposure %s: %s", exposure.id, exc)
                self.store.remove_exposure(exposure.id)
        group.start_soon(self._monitor, monitor_interval)

    async def _monitor(self, interval: float) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a monitor that dies would silently freeze every status
                log.exception("monitor pass failed; retrying")
            await anyio.sleep(interval)

    def reclaim(self) -> None:
        """Take over what a previous server left (it was killed, or restarted).

        Sandboxes still running are adopted: their environment is read back from
        their main process, and their exposures are served again. Sandboxes that
        died meanwhile become TERMINATED with the reason; a create that was cut
        short is cleaned up; directories and cgroups without a record are removed.
        """
        live, _ = self.store.query(active_only=True, include_deleted=True)
        for record in live:
            handle = _handle(record)
            if record.status == "RUNNING" and handle and self.runtime.alive(handle):
                self._env[record.id] = self.runtime.environment(handle)
                continue
            reason = (
                "its processes ended while the server was down" if record.status == "RUNNING"
                else "the server stopped while it was being created"
            )  # fmt: skip
            self.runtime.destroy(handle, record.id)
            self.store.update(record.id, status="TERMINATED", terminated_at=self.clock(),
                              termination_reason=reason)  # fmt: skip
            for exposure in self.store.exposures(record.id):
                self.store.remove_exposure(exposure.id)
        for sandbox_id in self.runtime.known_ids():
            found = self.store.get(sandbox_id)
            if found is None or found.status in api.FINAL_STATUSES:
                self.runtime.destroy(_handle(found), sandbox_id)

    def restart_marker(self) -> Path:
        """While this file exists, stopping the server leaves sandboxes running."""
        return self.settings.data_dir / "restarting"

    async def shutdown(self) -> None:
        """Stop every live sandbox (the server is going away), unless it is restarting:
        then they keep running and the next server adopts them."""
        if self.restart_marker().exists():
            self.restart_marker().unlink()
            return
        records, _ = self.store.query(active_only=True)
        for record in records:
            await self._finish(record.id, "TERMINATED", reason="the server stopped")

    # -- control plane -----------------------------------------------------------

    async def create(self, request: api.CreateSandbox) -> SandboxRecord:
        """Record a new sandbox (or return the one with the same idempotency key) and
        start provisioning it in the background."""
        if not self.runtime.host.can_limit:
            raise Refused(
                "this host cannot enforce cpu, memory and process limits (see `fleetctl "
                "doctor`); refusing to create a sandbox without them"
            )
        now = self.clock()
        stored = request.model_dump(exclude={"secrets", "idempotency_key"})
        record = SandboxRecord(
            id=secrets.token_hex(10),
            seq=0,
            name=request.name,
            status="PENDING",
            request=stored,
            labels=tuple(request.labels),
            idempotency_key=request.idempotency_key,
            created_at=now,
            updated_at=now,
        )
        saved = self.store.insert(record)
        if saved.id == record.id:
            self._env[saved.id] = {**(request.environment_vars or {}), **(request.secrets or {})}
            assert self._group is not None, "service not started"
            self._group.start_soon(self._provision, saved)
        return saved

    async def _provision(self, record: SandboxRecord) -> None:
        self.store.update(record.id, status="PROVISIONING")
        request = record.request
        rootfs = self._image_rootfs(request["docker_image"])
        source = f"image rootfs {rootfs}" if rootfs else None
        if rootfs is None:
            if self.settings.image_policy == "strict":
                await self._finish(
                    record.id,
                    "ERROR",
                    error_type="IMAGE_PULL_FAILED",
                    message=f"image {request['docker_image']!r} has no local rootfs and the "
                    "server runs with --image-policy strict",
                )
                return
            source = (
                f"host root filesystem (read-only lower layer): image "
                f"{request['docker_image']!r} has no local rootfs"
            )
        spec = LaunchSpec(
            id=record.id,
            seq=record.seq,
            start_command=request.get("start_command"),
            env=self._env.get(record.id, {}),
            network=bool(request["network_access"]),
            limits=Limits(
                memory_bytes=int(float(request["memory_gb"]) * 1024**3),
                cpu_cores=float(request["cpu_cores"]),
                pids=PIDS_LIMIT,
            ),
            rootfs=rootfs,
        )
        self._log(record.id, f"[fleetctl] starting sandbox on the {source}\n")
        try:
            async with self._provisioning:
                handle = await anyio.to_thread.run_sync(self.runtime.start, spec)
        except (RuntimeFailure, OSError) as exc:
            await self._finish(record.id, "ERROR", error_type="START_FAILED", message=str(exc))
            return
        current = self.store.get(record.id)
        if current is None or current.status != "PROVISIONING":  # deleted meanwhile
            await anyio.to_thread.run_sync(self.runtime.destroy, handle, record.id)
            return
        self.store.update(
            record.id,
            status="RUNNING",
            started_at=self.clock(),
            runtime=handle.to_json(),
            image_source=source,
        )

    def _image_rootfs(self, image: str) -> Path | None:
        candidate = self.settings.data_dir / "images" / _IMAGE_DIR_NAME.sub("_", image)
        return candidate if (candidate / "usr").is_dir() else None

    def _log(self, sandbox_id: str, line: str) -> None:
        with open(self.runtime.log_path(sandbox_id), "a", encoding="utf-8") as log:
            log.write(line)

    def get(self, sandbox_id: str) -> SandboxRecord:
        record = self.store.get(sandbox_id)
        if record is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return record

    def running(self, sandbox_id: str) -> tuple[SandboxRecord, Handle]:
        record = self.get(sandbox_id)
        handle = _handle(record)
        if record.status != "RUNNING" or record.deleted_at or handle is None:
            raise NotRunning(record)
        return record, handle

    async def delete(self, sandbox_id: str) -> SandboxRecord:
        record = self.get(sandbox_id)
        if record.deleted_at is None:
            await self._finish(sandbox_id, "TERMINATED", reason="deleted", deleted=True)
        return self.get(sandbox_id)

    async def bulk_delete(
        self, ids: Sequence[str] | None, labels: Sequence[str] | None
    ) -> tuple[list[str], list[dict[str, str]]]:
        if labels:
            ids = [r.id for r in self.store.query(labels=labels)[0]]
        succeeded: list[str] = []
        failed: list[dict[str, str]] = []

        async def one(sandbox_id: str) -> None:
            try:
                await self.delete(sandbox_id)
                succeeded.append(sandbox_id)
            except NotFound as exc:
                failed.append({"sandbox_id": sandbox_id, "error": str(exc)})

        async with anyio.create_task_group() as group:
            for sandbox_id in dict.fromkeys(ids or []):
                group.start_soon(one, sandbox_id)
        return succeeded, failed

    async def _finish(
        self,
        sandbox_id: str,
        status: str,
        *,
        error_type: str | None = None,
        message: str | None = None,
        reason: str | None = None,
        deleted: bool = False,
    ) -> None:
        """Move a sandbox to a final status and remove everything it holds on the host."""
        record = self.store.get(sandbox_id)
        if record is None:
            return
        # A deleted sandbox releases its idempotency key: a later create with the same
        # key (say, applying a fleet again after destroying it) means a new sandbox.
        changes: dict[str, object] = (
            {"deleted_at": self.clock(), "idempotency_key": None} if deleted else {}
        )
        if record.status not in api.FINAL_STATUSES:
            changes.update(
                status=status,
                terminated_at=self.clock(),
                error_type=error_type,
                error_message=message,
                termination_reason=reason or message,
            )
        self.store.update(sandbox_id, **changes)
        for exposure in self.store.exposures(sandbox_id):
            self._stop_forwarder(exposure.id)
            self.store.remove_exposure(exposure.id)
        self._env.pop(sandbox_id, None)
        for token, (owner, _) in list(self._tokens.items()):
            if owner == sandbox_id:
                del self._tokens[token]
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.runtime.destroy, _handle(record), sandbox_id)

    async def tick(self) -> None:
        """One pass of the monitor: end sandboxes that exited, ran out of memory, time or
        disk."""
        now = self.clock()
        records, _ = self.store.query(status="RUNNING")
        if time.monotonic() >= self._next_disk_check:
            self._next_disk_check = time.monotonic() + DISK_CHECK_SECONDS
            for record in records:
                await self._check_disk(record)
            records, _ = self.store.query(status="RUNNING")
        for record in records:
            handle = _handle(record)
            if handle is None:
                continue
            deadline = (record.started_at or record.created_at) + timedelta(
                minutes=int(record.request["timeout_minutes"]) * self.settings.timeout_scale
            )
            if await self._end_if_oom(record.id, handle):
                continue
            if now >= deadline:
                await self._finish(
                    record.id,
                    "TIMEOUT",
                    error_type="TIMEOUT",
                    message=f"the sandbox exceeded its timeout of "
                    f"{record.request['timeout_minutes']} minutes",
                )
            elif not self.runtime.alive(handle):
                code = self.runtime.exit_code(handle)
                self.store.update(record.id, exit_code=code)
                await self._finish(
                    record.id, "TERMINATED", reason=f"the main process exited with code {code}"
                )
        retention = now - DELETED_RETENTION
        for record in self.store.query(include_deleted=True, status="TERMINATED")[0]:
            if record.deleted_at is not None and record.deleted_at < retention:
                self.store.purge(record.id)
                self.runtime.forget(record.id)

    async def kill_random_sandbox(self, rng: random.Random) -> None:
        """Fault injection: kill one running sandbox's processes out of band, as a
        crashed node would; the monitor then reports it TERMINATED."""
        records, _ = self.store.query(status="RUNNING")
        handles = [h for h in map(_handle, records) if h is not None]
        if handles:
            self.runtime.kill(rng.choice(handles))

    async def _check_disk(self, record: SandboxRecord) -> None:
        """disk_size_gb is enforced by measurement: a sandbox past it is stopped with a
        clear error (no per-sandbox filesystem quota is available on every host)."""
        limit = float(record.request["disk_size_gb"]) * 1024**3
        used = await anyio.to_thread.run_sync(self.runtime.disk_usage, record.id)
        if used > limit:
            await self._finish(
                record.id, "ERROR", error_type="DISK_LIMIT_EXCEEDED",
                message=f"the sandbox wrote {used / 1024**3:.2f} GB, past its disk_size_gb "
                f"of {record.request['disk_size_gb']}",
            )  # fmt: skip

    def logs(self, sandbox_id: str) -> str:
        self.get(sandbox_id)
        return self.runtime.tail_log(sandbox_id, 1024 * 1024)

    # -- gateway tokens -----------------------------------------------------------

    def issue_token(self, sandbox_id: str) -> tuple[str, datetime]:
        self.get(sandbox_id)
        token = secrets.token_urlsafe(32)
        expires = self.clock() + TOKEN_TTL
        self._tokens[token] = (sandbox_id, expires)
        return token, expires

    def token_valid(self, sandbox_id: str, token: str) -> bool:
        """True when `token` was issued for this sandbox and has not expired."""
        owner = self._tokens.get(token)
        return owner is not None and owner[0] == sandbox_id and owner[1] > self.clock()

    # -- data plane ----------------------------------------------------------------

    async def exec(self, sandbox_id: str, request: api.ExecRequest) -> ExecResult:
        record, handle = self.running(sandbox_id)
        if request.user not in (None, *ROOT_USERS):
            # Each sandbox's user namespace maps one user (its root); running as another
            # would need a uid range per sandbox. Refuse rather than silently run as root.
            raise Refused(
                f"cannot run as user {request.user!r}: sandboxes of this server have only "
                "their root user"
            )
        env = {**self._env.get(sandbox_id, {}), **request.env}
        result = await self.runtime.exec(
            handle,
            env,
            request.command,
            cwd=request.working_dir or "/workspace",
            timeout=request.timeout,
        )
        await self._check_oom(record, handle)
        return result

    async def _check_oom(self, record: SandboxRecord, handle: Handle) -> None:
        """After an exec: an OOM kill ends the sandbox; the caller sees it not running."""
        if await self._end_if_oom(record.id, handle):
            raise NotRunning(self.get(record.id))

    async def _end_if_oom(self, sandbox_id: str, handle: Handle) -> bool:
        """An OOM kill anywhere in the sandbox ends it as ERROR/OOM_KILLED (as the cloud's
        container does); True if it did."""
        if not self.runtime.oom_kills(handle):
            return False
        await self._finish(
            sandbox_id, "ERROR", error_type="OOM_KILLED", message="the sandbox ran out of memory"
        )
        return True

    async def upload(self, sandbox_id: str, path: str, chunks: AsyncIterable[bytes]) -> int:
        """Stream `chunks` into the file `path` (parents created); returns the size written."""
        _, handle = self.running(sandbox_id)
        script = f'{WORKDIR} mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        size = 0
        async with self.runtime.enter(handle, script, path) as process:
            assert process.stdin is not None
            assert process.stderr is not None
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    await process.stdin.send(chunk)
                await process.stdin.aclose()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the writer exited early (cannot create the file): its stderr says why
            error = b"".join([chunk async for chunk in process.stderr])
            await process.wait()
        if process.returncode:
            raise Refused(f"cannot write {path}: {_first_line(error)}")
        return size

    @contextlib.asynccontextmanager
    async def download(
        self, sandbox_id: str, path: str
    ) -> AsyncIterator[tuple[int, ByteReceiveStream]]:
        """Yield (size, byte stream) of a file in the sandbox; NotFound when missing."""
        _, handle = self.running(sandbox_id)
        script = f'{WORKDIR} [ -f "$1" ] || exit 44; wc -c < "$1"; exec cat -- "$1"'
        async with self.runtime.enter(handle, script, path) as process:
            assert process.stdout is not None
            header = await _read_line(process.stdout)
            if not header.strip().isdigit():
                await process.wait()
                raise NotFound(f"file {path} not found in sandbox {sandbox_id}")
            yield int(header), process.stdout

    async def read_file(
        self, sandbox_id: str, path: str, offset: int, length: int | None
    ) -> api.ReadFileResponse:
        _, handle = self.running(sandbox_id)
        length = READ_FILE_MAX if length is None else length
        if length > READ_FILE_MAX or length < 0:
            raise Refused(f"length must be between 0 and {READ_FILE_MAX}")
        script = (
            f'{WORKDIR} [ -f "$1" ] || exit 44; s=$(wc -c < "$1"); o=$2; '
            '[ "$o" -lt 0 ] && o=$((s + o)); [ "$o" -lt 0 ] && o=0; '
            'printf "%s %s\\n" "$s" "$o"; tail -c +$((o + 1)) -- "$1" | head -c "$3"'
        )
        async with self.runtime.enter(handle, script, path, str(offset), str(length)) as proc:
            assert proc.stdout is not None
            data = bytearray()
            async for chunk in proc.stdout:
                data += chunk
            code = await proc.wait()
        if code == MISSING_FILE:
            raise NotFound(f"file {path} not found in sandbox {sandbox_id}")
        header, _, content = bytes(data).partition(b"\n")
        fields = header.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):  # e.g. unreadable
            raise Refused(f"cannot read {path} in sandbox {sandbox_id}")
        total, start = int(fields[0]), int(fields[1])
        return api.ReadFileResponse(
            content=content.decode("utf-8", "replace"),
            size=len(content),
            total_size=total,
            offset=start,
            truncated=start > 0 or start + len(content) < total,
        )

    # -- exposures -----------------------------------------------------------------

    async def expose(self, sandbox_id: str, request: api.ExposeRequest) -> ExposureRecord:
        _, handle = self.running(sandbox_id)
        if any(e.port == request.port for e in self.store.exposures(sandbox_id)):
            raise Refused(f"port {request.port} is already exposed for sandbox {sandbox_id}")
        exposure = ExposureRecord(
            id=secrets.token_hex(8), sandbox_id=sandbox_id, port=request.port,
            name=request.name, protocol=request.protocol, listen_port=0, created_at=self.clock(),
        )  # fmt: skip
        exposure = replace(exposure, listen_port=await self._serve_exposure(exposure, handle))
        self.store.add_exposure(exposure)
        return exposure

    async def _serve_exposure(self, exposure: ExposureRecord, handle: Handle | None = None) -> int:
        """Start the host listener of an exposure (on its recorded port when it has one,
        so URLs survive a server restart); returns the port."""
        if handle is None:
            handle = self.running(exposure.sandbox_id)[1]
        assert self._group is not None
        scope = anyio.CancelScope()
        forwarder = Forwarder(handle.init_pid, exposure.port, listen_port=exposure.listen_port)

        async def serve(*, task_status: anyio.abc.TaskStatus[int]) -> None:
            with scope:
                await forwarder.serve(task_status=task_status)

        listen_port: int = await self._group.start(serve)
        self._forwarders[exposure.id] = scope
        return listen_port

    def exposures(self, sandbox_id: str) -> list[ExposureRecord]:
        self.get(sandbox_id)
        return self.store.exposures(sandbox_id)

    def unexpose(self, sandbox_id: str, exposure_id: str) -> None:
        if not any(e.id == exposure_id for e in self.exposures(sandbox_id)):
            raise NotFound(f"exposure {exposure_id} not found for sandbox {sandbox_id}")
        self._stop_forwarder(exposure_id)
        self.store.remove_exposure(exposure_id)

    def _stop_forwarder(self, exposure_id: str) -> None:
        scope = self._forwarders.pop(exposure_id, None)
        if scope is not None:
            scope.cancel()


def _handle(record: SandboxRecord | None) -> Handle | None:
    return Handle.from_json(record.runtime) if record and record.runtime else None


def _first_line(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip().splitlines()[0] if data.strip() else "failed"


async def _read_line(stream: ByteReceiveStream) -> bytes:
    """Read one short header line byte by byte, leaving the rest of the stream unread."""
    line = bytearray()
    with contextlib.suppress(anyio.EndOfStream):
        while not line.endswith(b"\n"):
            line += await stream.receive(1)
    return bytes(line)
