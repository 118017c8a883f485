"""The sync and async sandbox clients: identical methods, differing only in the connection
that performs their operations (`transport`): `SandboxClient` / `AsyncSandboxClient`
drive the operations of `_ops` through an `APIClient` / `AsyncAPIClient`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Concatenate, ParamSpec, Self, TypeVar

import anyio

from fleetctl.sandboxes._calls import Op
from fleetctl.sandboxes._ops import Operations
from fleetctl.sandboxes._process import Session, new_session
from fleetctl.sandboxes.process import AsyncSandboxProcess, SandboxProcess
from fleetctl.sandboxes.transport import APIClient, AsyncAPIClient

__all__ = ["APIClient", "AsyncAPIClient", "AsyncSandboxClient", "SandboxClient"]

T = TypeVar("T")
P = ParamSpec("P")


def _sync(
    operation: Callable[Concatenate[Operations, P], Op[T]],
) -> Callable[Concatenate[SandboxClient, P], T]:
    def method(self: SandboxClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.api.run(operation(self._ops, *args, **kwargs))

    return functools.update_wrapper(method, operation)  # type: ignore[return-value]


def _async(
    operation: Callable[Concatenate[Operations, P], Op[T]],
) -> Callable[Concatenate[AsyncSandboxClient, P], Awaitable[T]]:
    async def method(self: AsyncSandboxClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.api.run(operation(self._ops, *args, **kwargs))

    return functools.update_wrapper(method, operation)  # type: ignore[return-value]


class SandboxClient:
    """Sandboxes, synchronously: every method of the sandbox SDK guide, and today's API's
    batch status calls, checkpoints and live processes.

    `SandboxClient(APIClient())`, or `SandboxClient()` for the default endpoint.
    A context manager: leaving it closes the connections.
    """

    def __init__(self, api_client: APIClient | None = None) -> None:
        self.api = api_client or APIClient()
        self._ops = Operations(vm_only=self.api.endpoint.context == "prime")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.api.close()

    def clear_auth_cache(self) -> None:
        """Forget cached gateway tokens (e.g. after rotating credentials)."""
        self._ops.clear_auth_cache()

    def open_process(
        self,
        sandbox_id: str,
        command: str,
        working_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> SandboxProcess:
        """Start `command` (a shell command) with stdin open; return once it has a pid.
        See `SandboxProcess` for its stdin, signals and output."""
        session = new_session(sandbox_id, command, working_dir, env, user)
        process = SandboxProcess(self.api, self._ops, session)
        try:
            return process.started()
        except BaseException:  # it may have started: do not leave it running
            with contextlib.suppress(Exception):
                process.close()
            raise

    def attach_process(self, sandbox_id: str, session_uuid: str) -> SandboxProcess:
        """A running process (or one that ended in the last minute) by its `session_uuid`:
        from now on, its output and its end."""
        return SandboxProcess(
            self.api, self._ops, Session(sandbox_id, session_uuid, None)
        ).started()

    create = _sync(Operations.create)
    get = _sync(Operations.get)
    list = _sync(Operations.list)
    delete = _sync(Operations.delete)
    bulk_delete = _sync(Operations.bulk_delete)
    get_logs = _sync(Operations.get_logs)
    resolve_image = _sync(Operations.resolve_image)
    wait_for_creation = _sync(Operations.wait_for_creation)
    bulk_wait_for_creation = _sync(Operations.bulk_wait_for_creation)
    get_sandbox_statuses = _sync(Operations.get_sandbox_statuses)
    execute_command = _sync(Operations.execute_command)
    start_background_job = _sync(Operations.start_background_job)
    started_background_jobs = _sync(Operations.started_background_jobs)
    get_background_job = _sync(Operations.get_background_job)
    get_background_job_statuses = _sync(Operations.get_background_job_statuses)
    get_background_jobs = _sync(Operations.get_background_jobs)
    upload_file = _sync(Operations.upload_file)
    download_file = _sync(Operations.download_file)
    read_file = _sync(Operations.read_file)
    expose = _sync(Operations.expose)
    unexpose = _sync(Operations.unexpose)
    list_exposed_ports = _sync(Operations.list_exposed_ports)
    checkpoint = _sync(Operations.checkpoint)
    get_checkpoint = _sync(Operations.get_checkpoint)
    list_checkpoints = _sync(Operations.list_checkpoints)
    delete_checkpoint = _sync(Operations.delete_checkpoint)
    delete_sandbox_checkpoints = _sync(Operations.delete_sandbox_checkpoints)
    get_checkpoints = _sync(Operations.get_checkpoints)
    wait_for_checkpoint = _sync(Operations.wait_for_checkpoint)


class AsyncSandboxClient:
    """Sandboxes, asynchronously (asyncio or trio via anyio): the same methods, awaited.

    `AsyncSandboxClient()` for the default endpoint, or pass an AsyncAPIClient.
    An async context manager: leaving it closes the connections.
    """

    def __init__(
        self, api_client: AsyncAPIClient | None = None, *, api_key: str | None = None
    ) -> None:
        self.api = api_client or AsyncAPIClient(api_key)
        self._ops = Operations(vm_only=self.api.endpoint.context == "prime")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.api.aclose()

    def clear_auth_cache(self) -> None:
        """Forget cached gateway tokens (e.g. after rotating credentials)."""
        self._ops.clear_auth_cache()

    async def open_process(
        self,
        sandbox_id: str,
        command: str,
        working_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> AsyncSandboxProcess:
        """Start `command` (a shell command) with stdin open; return once it has a pid.
        See `AsyncSandboxProcess` for its stdin, signals and output."""
        session = new_session(sandbox_id, command, working_dir, env, user)
        process = AsyncSandboxProcess(self.api, self._ops, session)
        try:
            return await process.started()
        except BaseException:  # it may have started: do not leave it running
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await process.aclose()
            raise

    async def attach_process(self, sandbox_id: str, session_uuid: str) -> AsyncSandboxProcess:
        """A running process (or one that ended in the last minute) by its `session_uuid`:
        from now on, its output and its end."""
        session = Session(sandbox_id, session_uuid, None)
        return await AsyncSandboxProcess(self.api, self._ops, session).started()

    create = _async(Operations.create)
    get = _async(Operations.get)
    list = _async(Operations.list)
    delete = _async(Operations.delete)
    bulk_delete = _async(Operations.bulk_delete)
    get_logs = _async(Operations.get_logs)
    resolve_image = _async(Operations.resolve_image)
    wait_for_creation = _async(Operations.wait_for_creation)
    bulk_wait_for_creation = _async(Operations.bulk_wait_for_creation)
    get_sandbox_statuses = _async(Operations.get_sandbox_statuses)
    execute_command = _async(Operations.execute_command)
    start_background_job = _async(Operations.start_background_job)
    started_background_jobs = _async(Operations.started_background_jobs)
    get_background_job = _async(Operations.get_background_job)
    get_background_job_statuses = _async(Operations.get_background_job_statuses)
    get_background_jobs = _async(Operations.get_background_jobs)
    upload_file = _async(Operations.upload_file)
    download_file = _async(Operations.download_file)
    read_file = _async(Operations.read_file)
    expose = _async(Operations.expose)
    unexpose = _async(Operations.unexpose)
    list_exposed_ports = _async(Operations.list_exposed_ports)
    checkpoint = _async(Operations.checkpoint)
    get_checkpoint = _async(Operations.get_checkpoint)
    list_checkpoints = _async(Operations.list_checkpoints)
    delete_checkpoint = _async(Operations.delete_checkpoint)
    delete_sandbox_checkpoints = _async(Operations.delete_sandbox_checkpoints)
    get_checkpoints = _async(Operations.get_checkpoints)
    wait_for_checkpoint = _async(Operations.wait_for_checkpoint)
