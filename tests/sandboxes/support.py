"""What the SDK's tests share: driving both clients from one test body, a recording
transport, and helpers that poll with deadlines (their fixtures are in conftest.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

import anyio
import httpx

from fleetctl.sandboxes import (
    APIError,
    AsyncSandboxClient,
    AsyncSandboxProcess,
    CreateSandboxRequest,
    RetryPolicy,
    Sandbox,
    SandboxClient,
    SandboxProcess,
)
from tests.conftest import Server, acontrol

P = ParamSpec("P")
T = TypeVar("T")
Flavor = Literal["sync", "async"]
#: How the SDK's exec reaches a sandbox: the Connect command session, or REST (a 0.2 API).
Dialect = Literal["connect", "rest"]


# -- driving both clients from one test body -------------------------------------------


def _threaded(method: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(functools.partial(method, *args, **kwargs))

    return call


class Threaded:
    """A SandboxClient behind awaitables: each call runs the sync client on a worker thread.

    Only the await is added; every call goes through the sync client's own code path
    (its httpx.Client, its time.sleep backoff). `test_sync_and_async_clients_*` keeps
    this list complete.
    """

    def __init__(self, client: SandboxClient) -> None:
        self.client = client
        self.api = client.api
        self.clear_auth_cache = client.clear_auth_cache
        self.create = _threaded(client.create)
        self.get = _threaded(client.get)
        self.list = _threaded(client.list)
        self.delete = _threaded(client.delete)
        self.bulk_delete = _threaded(client.bulk_delete)
        self.get_logs = _threaded(client.get_logs)
        self.resolve_image = _threaded(client.resolve_image)
        self.wait_for_creation = _threaded(client.wait_for_creation)
        self.bulk_wait_for_creation = _threaded(client.bulk_wait_for_creation)
        self.execute_command = _threaded(client.execute_command)
        self.start_background_job = _threaded(client.start_background_job)
        self.started_background_jobs = _threaded(client.started_background_jobs)
        self.get_background_job = _threaded(client.get_background_job)
        self.upload_file = _threaded(client.upload_file)
        self.download_file = _threaded(client.download_file)
        self.read_file = _threaded(client.read_file)
        self.expose = _threaded(client.expose)
        self.unexpose = _threaded(client.unexpose)
        self.list_exposed_ports = _threaded(client.list_exposed_ports)
        self.get_sandbox_statuses = _threaded(client.get_sandbox_statuses)
        self.get_background_job_statuses = _threaded(client.get_background_job_statuses)
        self.get_background_jobs = _threaded(client.get_background_jobs)
        self.checkpoint = _threaded(client.checkpoint)
        self.get_checkpoint = _threaded(client.get_checkpoint)
        self.list_checkpoints = _threaded(client.list_checkpoints)
        self.delete_checkpoint = _threaded(client.delete_checkpoint)
        self.delete_sandbox_checkpoints = _threaded(client.delete_sandbox_checkpoints)
        self.get_checkpoints = _threaded(client.get_checkpoints)
        self.wait_for_checkpoint = _threaded(client.wait_for_checkpoint)

    async def open_process(self, *args: Any, **kwargs: Any) -> ThreadedProcess:
        opened = await _threaded(self.client.open_process)(*args, **kwargs)
        return ThreadedProcess(opened)

    async def attach_process(self, sandbox_id: str, session_uuid: str) -> ThreadedProcess:
        attached = await _threaded(self.client.attach_process)(sandbox_id, session_uuid)
        return ThreadedProcess(attached)

    async def aclose(self) -> None:
        self.client.close()


class ThreadedProcess:
    """A SandboxProcess behind awaitables, as `Threaded` puts a SandboxClient."""

    def __init__(self, process: SandboxProcess) -> None:
        self.process = process
        self.write_stdin = _threaded(process.write_stdin)
        self.close_stdin = _threaded(process.close_stdin)
        self.terminate = _threaded(process.terminate)
        self.kill = _threaded(process.kill)
        self.wait = _threaded(process.wait)
        self.detach = _threaded(process.detach)
        self.aclose = _threaded(process.close)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def session_uuid(self) -> str:
        return self.process.session_uuid

    @property
    def sandbox_id(self) -> str:
        return self.process.sandbox_id

    @property
    def stdout(self) -> AsyncIterator[bytes]:
        return _chunks(self.process.stdout)

    @property
    def stderr(self) -> AsyncIterator[bytes]:
        return _chunks(self.process.stderr)


async def _chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
        yield chunk


Sdk = Threaded | AsyncSandboxClient
Process = ThreadedProcess | AsyncSandboxProcess


class Tap(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A real transport that records every request and may answer some itself."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response | None] | None = None):
        self.requests: list[httpx.Request] = []
        self._answer = answer or (lambda request: None)
        self._sync = httpx.HTTPTransport()
        self._async = httpx.AsyncHTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._answer(request) or self._sync.handle_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._answer(request) or await self._async.handle_async_request(request)

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        await self._async.aclose()

    def count(self, suffix: str) -> int:
        return sum(request.url.path.endswith(suffix) for request in self.requests)


class Connect(Protocol):
    def __call__(
        self,
        flavor: Flavor,
        target: Server | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
    ) -> Sdk: ...


New = Callable[..., CreateSandboxRequest]


# -- helpers ---------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30) -> T:
    """Await `check` until it returns something other than None; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while (result := await check()) is None:
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await anyio.sleep(0.05)
    return result


async def labelled(server: Server, label: str) -> list[str]:
    """Ids of the live sandboxes carrying `label`, as the server itself reports them."""
    response = await acontrol(server, "GET", "/sandbox", params={"labels": label, "per_page": 500})
    assert response.status_code == 200, response.text
    return sorted(item["id"] for item in response.json()["sandboxes"])


async def started(sdk: Sdk, request: CreateSandboxRequest) -> Sandbox:
    sandbox = await sdk.create(request)
    await sdk.wait_for_creation(sandbox.id)
    return sandbox


async def create_all(
    sdk: Sdk, requests: Sequence[CreateSandboxRequest], *, parallel: bool
) -> tuple[list[Sandbox], list[APIError]]:
    """Create every request (all at once, or one after another); return successes and errors."""
    created: list[Sandbox] = []
    failed: list[APIError] = []
    limiter = anyio.CapacityLimiter(len(requests) if parallel else 1)

    async def one(request: CreateSandboxRequest) -> None:
        async with limiter:
            try:
                created.append(await sdk.create(request))
            except APIError as exc:
                failed.append(exc)

    async with anyio.create_task_group() as group:
        for request in requests:
            group.start_soon(one, request)
    return created, failed


def create_bodies(tap: Tap) -> list[dict[str, Any]]:
    return [
        json.loads(request.content)
        for request in tap.requests
        if request.method == "POST" and request.url.path == "/api/v1/sandbox"
    ]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
