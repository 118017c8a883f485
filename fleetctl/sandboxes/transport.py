"""The SDK's connections to the API: `APIClient` (sync) and `AsyncAPIClient` (async).

Each owns one pooled httpx client and the retry loop (see `_retry`), and drives an
operation (see `_calls`) by performing the steps it yields. No httpx exception escapes:
it becomes the SDK's error where it crosses in.
"""

from __future__ import annotations

import contextlib
import mimetypes
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx

from fleetctl import __version__
from fleetctl.sandboxes import errors
from fleetctl.sandboxes._calls import Call, Close, Op, Open, Read, Sleep, Step, Stream
from fleetctl.sandboxes._retry import Pacer, RetryPolicy, RetryState, lane, retry_after
from fleetctl.sandboxes.config import Endpoint, resolve

T = TypeVar("T")
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
        args: dict[str, Any] = {"params": call.params}
        if call.content is not None:
            args["content"] = call.content
        else:
            args["json"] = call.json
        headers = dict(call.headers or {})
        if call.token is not None:  # the data plane takes its own token, never the API key
            headers["Authorization"] = f"Bearer {call.token}"
        if headers:
            args["headers"] = headers
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
    what = f"{call.method} {call.path}"
    try:
        yield
    except httpx.TimeoutException as exc:
        raise errors.APITimeoutError(f"{what} timed out: {exc}") from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise errors.APIError(f"{what} failed: {exc!r}") from None
    except OSError as exc:
        raise errors.APIError(f"{what}: {exc}") from None


def _stream_call(step: Read | Close) -> Call:
    """The call a stream step belongs to, for messages."""
    request = step.stream.response.request
    return Call(request.method, str(request.url.copy_with(query=None)))


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
                    result = self._step(step)
                except errors.APIError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _step(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, Call):
            return self.perform(step)
        if isinstance(step, Open):
            with _translated(step.call):
                request = self._http.build_request(
                    step.call.method, step.call.path, **self._request_args(step.call)
                )
                response = self._http.send(request, stream=True)
                if response.status_code != 200:
                    with contextlib.closing(response):
                        response.read()
                return Stream(response, response.iter_raw())
        if isinstance(step, Read):
            with _translated(_stream_call(step)):
                return next(step.stream.chunks, b"")
        step.stream.response.close()
        return None


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
                    result = await self._step(step)
                except errors.APIError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _step(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            await anyio.sleep(step.seconds)
            return None
        if isinstance(step, Call):
            return await self.perform(step)
        if isinstance(step, Open):
            with _translated(step.call):
                request = self._http.build_request(
                    step.call.method, step.call.path, **self._request_args(step.call)
                )
                response = await self._http.send(request, stream=True)
                if response.status_code != 200:
                    try:
                        await response.aread()
                    finally:
                        with anyio.CancelScope(shield=True):
                            await response.aclose()
                return Stream(response, response.aiter_raw())
        if isinstance(step, Read):
            with _translated(_stream_call(step)):
                return await anext(step.stream.chunks, b"")
        with anyio.CancelScope(shield=True):
            await step.stream.response.aclose()
        return None
