"""The sync and async clients: identical methods, differing only in how a step is performed.

`APIClient` / `AsyncAPIClient` own one pooled httpx client each and the retry
loop (see `_retry`); `SandboxClient` / `AsyncSandboxClient` drive the
operations of `_ops` through them. No httpx or pydantic exception escapes.
"""

from __future__ import annotations

import contextlib
import functools
import mimetypes
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import anyio
import httpx

from fleetctl import __version__
from fleetctl.sandboxes import errors
from fleetctl.sandboxes._ops import Call, Op, Operations, Sleep
from fleetctl.sandboxes._retry import Pacer, RetryPolicy, RetryState, lane, retry_after
from fleetctl.sandboxes.config import Endpoint, resolve

T = TypeVar("T")
P = ParamSpec("P")
CONTROL_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CHUNK = 1024 * 1024


class _Base:
    """Endpoint, headers and the retry policy shared by both API clients."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        transport: Any = None,
    ) -> None:
        self.endpoint: Endpoint = resolve(api_key, base_url)
        self.retry = retry or RetryPolicy()
        self._transport = transport
        self._rng = random.Random()
        self.pacer = Pacer()
        self.stats = {"requests": 0, "retries": 0, "throttled": 0}

    def _client_args(self) -> dict[str, Any]:
        headers = {"User-Agent": f"fleetctl/{__version__}"}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Bearer {self.endpoint.api_key}"
        args: dict[str, Any] = {
            "base_url": f"{self.endpoint.base_url}/api/v1",
            "headers": headers,
            "timeout": CONTROL_TIMEOUT,
            "limits": httpx.Limits(max_connections=200, max_keepalive_connections=100),
        }
        if self._transport is not None:
            args["transport"] = self._transport
        return args

    def _request_args(self, call: Call) -> dict[str, Any]:
        args: dict[str, Any] = {"json": call.json, "params": call.params}
        if call.token is not None:  # the data plane takes its own token, never the API key
            args["headers"] = {"Authorization": f"Bearer {call.token}"}
        if call.timeout is not None:
            args["timeout"] = httpx.Timeout(call.timeout, connect=10.0)
        return args

    def _state(self, call: Call) -> RetryState:
        self.stats["requests"] += 1
        return RetryState(self.retry, call.retryable, self._rng, read=call.download_to is None)

    def _count(self, state: RetryState) -> None:
        self.stats["retries"] += state.failures
        self.stats["throttled"] += state.throttled

    def _pace_after(self, call: Call, response: httpx.Response) -> None:
        if response.status_code == 429:
            self.pacer.throttled(lane(call.method, call.path), retry_after(response))
        elif response.is_success:
            self.pacer.succeeded(lane(call.method, call.path))


@contextlib.contextmanager
def _translated(call: Call) -> Iterator[None]:
    """httpx errors become the SDK's, where they cross in."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise errors.APITimeoutError(f"{call.method} {call.path} timed out: {exc}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise errors.APIError(f"{call.method} {call.path} failed: {exc!r}") from None
    except OSError as exc:
        raise errors.APIError(f"{call.method} {call.path}: {exc}") from None


def _multipart(call: Call, stack: contextlib.ExitStack) -> dict[str, Any]:
    if call.upload_from is None:
        return {}
    path = Path(call.upload_from)
    handle = stack.enter_context(path.open("rb"))
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return {"files": {"file": (path.name, handle, kind)}}


class APIClient(_Base):
    """A pooled, retrying connection to the sandbox API (sync)."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, **kwargs: Any):
        super().__init__(api_key, base_url, **kwargs)
        self._http = httpx.Client(**self._client_args())

    def close(self) -> None:
        self._http.close()

    def perform(self, call: Call) -> httpx.Response:
        """Send `call`, retrying as the policy allows; the last response is returned."""
        state = self._state(call)
        with _translated(call):
            while True:
                time.sleep(self.pacer.reserve(lane(call.method, call.path)))
                try:
                    with contextlib.ExitStack() as stack:
                        args = {**self._request_args(call), **_multipart(call, stack)}
                        if call.download_to is not None:
                            response = self._download(call, args)
                        else:
                            response = self._http.request(call.method, call.path, **args)
                except httpx.TransportError as exc:
                    wait = state.after_error(exc)
                    if wait is None:
                        self._count(state)
                        raise
                    time.sleep(wait)
                    continue
                self._pace_after(call, response)
                wait = state.after_response(response)
                if wait is None:
                    self._count(state)
                    return response
                if response.status_code != 429:  # a 429's wait is the pacer's next slot
                    time.sleep(wait)

    def _download(self, call: Call, args: dict[str, Any]) -> httpx.Response:
        with self._http.stream(call.method, call.path, **args) as response:
            if response.is_success and call.download_to is not None:
                target = Path(call.download_to)
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
            else:
                response.read()
        return response

    def run(self, op: Op[T]) -> T:
        """Drive an operation to its result, performing each step it yields."""
        try:
            step = next(op)
            while True:
                try:
                    if isinstance(step, Sleep):
                        time.sleep(step.seconds)
                        result: Any = None
                    else:
                        result = self.perform(step)
                except errors.APIError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


class AsyncAPIClient(_Base):
    """A pooled, retrying connection to the sandbox API (async, anyio)."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, **kwargs: Any):
        super().__init__(api_key, base_url, **kwargs)
        self._http = httpx.AsyncClient(**self._client_args())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def perform(self, call: Call) -> httpx.Response:
        """Send `call`, retrying as the policy allows; the last response is returned."""
        state = self._state(call)
        with _translated(call):
            while True:
                await anyio.sleep(self.pacer.reserve(lane(call.method, call.path)))
                try:
                    with contextlib.ExitStack() as stack:
                        args = {**self._request_args(call), **_multipart(call, stack)}
                        if call.download_to is not None:
                            response = await self._download(call, args)
                        else:
                            response = await self._http.request(call.method, call.path, **args)
                except httpx.TransportError as exc:
                    wait = state.after_error(exc)
                    if wait is None:
                        self._count(state)
                        raise
                    await anyio.sleep(wait)
                    continue
                self._pace_after(call, response)
                wait = state.after_response(response)
                if wait is None:
                    self._count(state)
                    return response
                if response.status_code != 429:  # a 429's wait is the pacer's next slot
                    await anyio.sleep(wait)

    async def _download(self, call: Call, args: dict[str, Any]) -> httpx.Response:
        async with self._http.stream(call.method, call.path, **args) as response:
            if response.is_success and call.download_to is not None:
                target = Path(call.download_to)
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as out:
                    async for chunk in response.aiter_bytes(CHUNK):
                        out.write(chunk)
            else:
                await response.aread()
        return response

    async def run(self, op: Op[T]) -> T:
        """Drive an operation to its result, awaiting each step it yields."""
        try:
            step = next(op)
            while True:
                try:
                    if isinstance(step, Sleep):
                        await anyio.sleep(step.seconds)
                        result: Any = None
                    else:
                        result = await self.perform(step)
                except errors.APIError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


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
    """Sandboxes, synchronously: every method of the sandbox SDK guide.

    `SandboxClient(APIClient())`, or `SandboxClient()` for the default endpoint.
    A context manager: leaving it closes the connections.
    """

    def __init__(self, api_client: APIClient | None = None) -> None:
        self.api = api_client or APIClient()
        self._ops = Operations()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.api.close()

    def clear_auth_cache(self) -> None:
        """Forget cached gateway tokens (e.g. after rotating credentials)."""
        self._ops.clear_auth_cache()

    create = _sync(Operations.create)
    get = _sync(Operations.get)
    list = _sync(Operations.list)
    delete = _sync(Operations.delete)
    bulk_delete = _sync(Operations.bulk_delete)
    get_logs = _sync(Operations.get_logs)
    wait_for_creation = _sync(Operations.wait_for_creation)
    bulk_wait_for_creation = _sync(Operations.bulk_wait_for_creation)
    execute_command = _sync(Operations.execute_command)
    start_background_job = _sync(Operations.start_background_job)
    get_background_job = _sync(Operations.get_background_job)
    upload_file = _sync(Operations.upload_file)
    download_file = _sync(Operations.download_file)
    read_file = _sync(Operations.read_file)
    expose = _sync(Operations.expose)
    unexpose = _sync(Operations.unexpose)
    list_exposed_ports = _sync(Operations.list_exposed_ports)


class AsyncSandboxClient:
    """Sandboxes, asynchronously (asyncio or trio via anyio): the same methods, awaited.

    `AsyncSandboxClient()` for the default endpoint, or pass an AsyncAPIClient.
    An async context manager: leaving it closes the connections.
    """

    def __init__(
        self, api_client: AsyncAPIClient | None = None, *, api_key: str | None = None
    ) -> None:
        self.api = api_client or AsyncAPIClient(api_key)
        self._ops = Operations()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.api.aclose()

    def clear_auth_cache(self) -> None:
        """Forget cached gateway tokens (e.g. after rotating credentials)."""
        self._ops.clear_auth_cache()

    create = _async(Operations.create)
    get = _async(Operations.get)
    list = _async(Operations.list)
    delete = _async(Operations.delete)
    bulk_delete = _async(Operations.bulk_delete)
    get_logs = _async(Operations.get_logs)
    wait_for_creation = _async(Operations.wait_for_creation)
    bulk_wait_for_creation = _async(Operations.bulk_wait_for_creation)
    execute_command = _async(Operations.execute_command)
    start_background_job = _async(Operations.start_background_job)
    get_background_job = _async(Operations.get_background_job)
    upload_file = _async(Operations.upload_file)
    download_file = _async(Operations.download_file)
    read_file = _async(Operations.read_file)
    expose = _async(Operations.expose)
    unexpose = _async(Operations.unexpose)
    list_exposed_ports = _async(Operations.list_exposed_ports)
