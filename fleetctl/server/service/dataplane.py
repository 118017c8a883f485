"""The data plane: gateway tokens, exec, files in and out, and exposed ports.

Everything here needs a RUNNING sandbox and reaches inside only through the
runtime. Tokens and exposure listeners are held in memory and dropped when the
sandbox ends (a hook on the lifecycle).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import replace
from datetime import datetime, timedelta

import anyio
from anyio.abc import ByteReceiveStream, TaskGroup

from fleetctl.contract import ErrorType, SandboxStatus
from fleetctl.server import api
from fleetctl.server.proxy import Forwarder
from fleetctl.server.runtime.base import (
    ROOT,
    CommandLost,
    ExecResult,
    FileMissing,
    FileRefused,
    Handle,
    User,
)
from fleetctl.server.service.lifecycle import Lifecycle
from fleetctl.server.service.monitor import Monitor
from fleetctl.server.service.state import (
    Failed,
    NotFound,
    NotRunning,
    Refused,
    Shared,
)
from fleetctl.server.service.users import MAX_FILE, UnknownUser
from fleetctl.server.service.users import resolve as resolve_user
from fleetctl.server.store import ExposureRecord, SandboxRecord

log = logging.getLogger("fleetctl.server")
TOKEN_TTL = timedelta(hours=1)
READ_FILE_MAX = 16 * 1024 * 1024
ROOT_USERS = ("root", "0", "root:root", "0:0")
DEFAULT_WORKDIR = "/workspace"


def workdir(record: SandboxRecord) -> str:
    """Where a command runs unless it says: the image's WorkingDir, else /workspace."""
    image = record.request.get("image") or {}
    return str(image.get("workdir") or DEFAULT_WORKDIR)


def default_user(record: SandboxRecord) -> User:
    """Whom a command runs as unless it says: the image's User, else root."""
    text = (record.request.get("image") or {}).get("user")
    return User.decode(str(text)) if text else ROOT


class DataPlane:
    """Exec, files and exposures of running sandboxes."""

    def __init__(self, shared: Shared, lifecycle: Lifecycle, monitor: Monitor) -> None:
        self.shared = shared
        self.lifecycle = lifecycle
        self.monitor = monitor
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._forwarders: dict[str, anyio.CancelScope] = {}
        self._group: TaskGroup | None = None
        lifecycle.on_end(self._forget)

    async def run(self, group: TaskGroup) -> None:
        """Serve exposures in `group`: first the ones recorded by an earlier server."""
        self._group = group
        store = self.shared.store
        for exposure in store.exposures():
            try:
                await self._serve(exposure, self.lifecycle.running(exposure.sandbox_id)[1])
            except (OSError, NotRunning) as exc:  # e.g. its port was taken meanwhile
                log.warning("dropping exposure %s: %s", exposure.id, exc)
                store.remove_exposure(exposure.id)

    def _forget(self, sandbox_id: str) -> None:
        self.shared.used.pop(sandbox_id, None)
        for token, (owner, _) in list(self._tokens.items()):
            if owner == sandbox_id:
                del self._tokens[token]
        for exposure in self.shared.store.exposures(sandbox_id):
            self._stop_forwarder(exposure.id)
            self.shared.store.remove_exposure(exposure.id)

    def touch(self, sandbox_id: str) -> None:
        """The sandbox was just used (its idle timeout starts again)."""
        self.shared.used[sandbox_id] = self.shared.clock()

    @contextlib.contextmanager
    def in_use(self, sandbox_id: str) -> Iterator[None]:
        """A command runs in the sandbox: not idle until it ended."""
        busy = self.shared.busy
        busy[sandbox_id] = busy.get(sandbox_id, 0) + 1
        try:
            yield
        finally:
            busy[sandbox_id] -= 1
            if not busy[sandbox_id]:
                del busy[sandbox_id]
            if sandbox_id in self.shared.env:  # still alive (its state is forgotten at its end)
                self.touch(sandbox_id)

    # -- gateway tokens -----------------------------------------------------------

    def issue_token(self, sandbox_id: str) -> tuple[str, datetime]:
        self.lifecycle.get(sandbox_id)
        token = secrets.token_urlsafe(32)
        expires = self.shared.clock() + TOKEN_TTL
        self._tokens[token] = (sandbox_id, expires)
        return token, expires

    def token_valid(self, sandbox_id: str, token: str) -> bool:
        """True when `token` was issued for this sandbox and has not expired."""
        owner = self._tokens.get(token)
        return owner is not None and owner[0] == sandbox_id and owner[1] > self.shared.clock()

    # -- commands and files --------------------------------------------------------

    async def live(self, sandbox_id: str) -> Handle:
        """The handle of a sandbox that is RUNNING and really alive: one whose main process
        just ended is ended now (NotRunning), not served until the monitor's next pass."""
        return (await self.running(sandbox_id))[1]

    async def running(self, sandbox_id: str) -> tuple[SandboxRecord, Handle]:
        """`live`, with the sandbox's record (read once)."""
        record, handle = self.lifecycle.running(sandbox_id)
        if await self.monitor.check(record, handle):
            raise NotRunning(self.lifecycle.get(sandbox_id))
        self.touch(sandbox_id)
        return record, handle

    async def exec(self, sandbox_id: str, request: api.ExecRequest) -> ExecResult:
        record, handle = await self.running(sandbox_id)
        user = await self.user(record, handle, request.user)
        env = {**self.shared.env.get(sandbox_id, {}), **request.env}
        with self.in_use(sandbox_id):
            try:
                result = await self.shared.runtime.exec(
                    handle,
                    env,
                    request.command,
                    cwd=request.working_dir or workdir(record),
                    timeout=request.timeout,
                    user=user,
                )
            except CommandLost as exc:
                raise Failed(str(exc)) from None
        if await self.settle(sandbox_id, handle):
            raise NotRunning(self.lifecycle.get(sandbox_id))
        return result

    async def user(self, record: SandboxRecord, handle: Handle, asked: str | None) -> User:
        """Whom a command runs as: `asked` (a name or id, optionally with :group, resolved
        in the sandbox's own passwd and group files as they are now), else the image's."""
        if asked is None:
            return default_user(record)
        if asked in ROOT_USERS:
            return ROOT
        passwd, group = [await self._etc(handle, name) for name in ("passwd", "group")]
        try:
            return resolve_user(asked, passwd, group)
        except UnknownUser as exc:
            raise Refused(f"cannot run as user {asked!r}: {exc}") from None

    async def _etc(self, handle: Handle, name: str) -> str:
        try:
            found = await self.shared.runtime.read_file(handle, f"/etc/{name}", 0, MAX_FILE)
        except (FileMissing, FileRefused):
            return ""
        return found.content.decode("utf-8", "replace")

    async def settle(self, sandbox_id: str, handle: Handle) -> bool:
        """After a command ended: an OOM kill ends the sandbox (True), and the command's
        caller sees it not running (a command that ended the main process ran, though: its
        result stands, and the monitor ends the sandbox)."""
        if not self.shared.runtime.usage(handle).oom_kills:  # none: nothing to end it for
            return False
        record = self.lifecycle.get(sandbox_id)
        if record.status != SandboxStatus.RUNNING:  # the monitor was first
            return record.error_type == ErrorType.OOM_KILLED
        return await self.monitor.check(record, handle, oom_only=True)

    async def upload(self, sandbox_id: str, path: str, chunks: AsyncIterable[bytes]) -> int:
        """Stream `chunks` into the file `path` (parents created); returns the size written."""
        handle = await self.live(sandbox_id)
        try:
            return await self.shared.runtime.put_file(handle, path, chunks)
        except FileRefused as exc:
            raise Refused(str(exc)) from None

    @contextlib.asynccontextmanager
    async def download(
        self, sandbox_id: str, path: str
    ) -> AsyncIterator[tuple[int, ByteReceiveStream]]:
        """Yield (size, byte stream) of a file in the sandbox; NotFound when missing."""
        handle = await self.live(sandbox_id)
        try:
            async with self.shared.runtime.get_file(handle, path) as found:
                yield found
        except FileMissing:
            raise NotFound(f"file {path} not found in sandbox {sandbox_id}") from None

    async def read_file(
        self, sandbox_id: str, path: str, offset: int, length: int | None
    ) -> api.ReadFileResponse:
        handle = await self.live(sandbox_id)
        length = READ_FILE_MAX if length is None else length
        if length > READ_FILE_MAX or length < 0:
            raise Refused(f"length must be between 0 and {READ_FILE_MAX}")
        try:
            part = await self.shared.runtime.read_file(handle, path, offset, length)
        except FileMissing:
            raise NotFound(f"file {path} not found in sandbox {sandbox_id}") from None
        except FileRefused:
            raise Refused(f"cannot read {path} in sandbox {sandbox_id}") from None
        end = part.offset + len(part.content)
        return api.ReadFileResponse(
            content=part.content.decode("utf-8", "replace"),
            size=len(part.content),
            total_size=part.total,
            offset=part.offset,
            truncated=part.offset > 0 or end < part.total,
        )

    # -- exposures -----------------------------------------------------------------

    async def expose(self, sandbox_id: str, request: api.ExposeRequest) -> ExposureRecord:
        handle = await self.live(sandbox_id)
        store = self.shared.store
        if any(e.port == request.port for e in store.exposures(sandbox_id)):
            raise Refused(f"port {request.port} is already exposed for sandbox {sandbox_id}")
        exposure = ExposureRecord(
            id=secrets.token_hex(8),
            sandbox_id=sandbox_id,
            port=request.port,
            name=request.name,
            protocol=request.protocol,
            listen_port=0,
            created_at=self.shared.clock(),
        )
        exposure = replace(exposure, listen_port=await self._serve(exposure, handle))
        store.add_exposure(exposure)
        return exposure

    async def _serve(self, exposure: ExposureRecord, handle: Handle) -> int:
        """Start the host listener of an exposure (on its recorded port when it has one,
        so URLs survive a server restart); returns the port."""
        assert self._group is not None, "data plane not started"
        connect = functools.partial(self.shared.runtime.connect, handle, exposure.port)
        forwarder = Forwarder(connect, listen_port=exposure.listen_port)
        scope = anyio.CancelScope()

        async def serve(*, task_status: anyio.abc.TaskStatus[int]) -> None:
            with scope:
                await forwarder.serve(task_status=task_status)

        listen_port: int = await self._group.start(serve)
        self._forwarders[exposure.id] = scope
        return listen_port

    def exposures(self, sandbox_id: str) -> list[ExposureRecord]:
        self.lifecycle.get(sandbox_id)
        return self.shared.store.exposures(sandbox_id)

    def unexpose(self, sandbox_id: str, exposure_id: str) -> None:
        if not any(e.id == exposure_id for e in self.exposures(sandbox_id)):
            raise NotFound(f"exposure {exposure_id} not found for sandbox {sandbox_id}")
        self._stop_forwarder(exposure_id)
        self.shared.store.remove_exposure(exposure_id)

    def _stop_forwarder(self, exposure_id: str) -> None:
        scope = self._forwarders.pop(exposure_id, None)
        if scope is not None:
            scope.cancel()
