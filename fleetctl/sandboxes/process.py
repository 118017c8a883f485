"""Handles of live processes, as `open_process` and `attach_process` return them.

    process = client.open_process(sandbox.id, "python3 -i")
    process.write_stdin(b"print(6 * 7)\\n")
    process.close_stdin()
    for chunk in process.stdout:
        print(chunk)
    print(process.wait())

`AsyncSandboxProcess` is the same with `await` and `async for` (its methods match today's
official SDK's). The logic lives in `_process`; these classes only run it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol, Self, TypeVar

import anyio

from fleetctl.sandboxes._calls import Op
from fleetctl.sandboxes._process import ProcessOps, Session

T = TypeVar("T")
#: The longest an async close may hold off a cancellation.
CLOSE_BUDGET_S = 60.0


class _Runs(Protocol):
    def run(self, op: Op[T]) -> T: ...


class _RunsAsync(Protocol):
    async def run(self, op: Op[T]) -> T: ...


class _Handle:
    """What both handles read of the session."""

    _session: Session

    @property
    def pid(self) -> int:
        if self._session.pid is None:
            raise RuntimeError("the process has not started")
        return self._session.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process ended; None while it runs."""
        return self._session.returncode

    @property
    def session_uuid(self) -> str:
        """Names the process to `attach_process`, from this client or another."""
        return self._session.session_uuid

    @property
    def sandbox_id(self) -> str:
        return self._session.sandbox_id

    def _taken(self, queue: deque[bytes]) -> bytes | None:
        """The next chunk of `queue`; None at its end; raises the failure, once drained."""
        if queue:
            return queue.popleft()
        if self._session.error is not None:
            raise self._session.error
        if self._session.returncode is not None:
            return None
        return b""  # nothing yet: read on

    def _exit_code(self) -> int:
        if self._session.error is not None:
            raise self._session.error
        assert self._session.returncode is not None
        return self._session.returncode


class SandboxProcess(_Handle):
    """A live process (sync). Iterating `stdout` or `stderr` yields its output as it comes
    and ends when the process does; `wait()` returns the exit code. Output nobody reads
    is kept in memory until it is. A context manager: leaving it closes the process."""

    def __init__(self, api: _Runs, ops: ProcessOps, session: Session) -> None:
        self._api, self._ops, self._session = api, ops, session
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stdout(self) -> Iterator[bytes]:
        return self._output(self._session.stdout)

    @property
    def stderr(self) -> Iterator[bytes]:
        return self._output(self._session.stderr)

    def _output(self, queue: deque[bytes]) -> Iterator[bytes]:
        while (chunk := self._taken(queue)) is not None:
            if chunk:
                yield chunk
            else:
                self._pump(lambda: bool(queue))

    def _pump(self, ready: Callable[[], bool]) -> None:
        with self._lock:  # one reader of the stream; another may have read for us
            if not ready() and not self._session.finished:
                self._api.run(self._ops.pump(self._session))

    def started(self) -> Self:
        """Return once the process reported its pid (raises its failure instead)."""
        while self._session.pid is None:
            if self._session.error is not None:
                raise self._session.error
            self._pump(lambda: self._session.pid is not None)
        return self

    def wait(self) -> int:
        """The exit code, once the process ended (its output stays readable)."""
        while not self._session.finished:
            self._pump(lambda: False)
        return self._exit_code()

    def write_stdin(self, data: bytes) -> None:
        """Write `data` to its stdin; BrokenPipeError once it ended."""
        if data:
            self._api.run(self._ops.write_stdin(self._session, data))

    def close_stdin(self) -> None:
        """End its stdin (the process reads end of file); nothing if it already ended."""
        with contextlib.suppress(BrokenPipeError):
            self._api.run(self._ops.write_stdin(self._session, b""))

    def terminate(self) -> None:
        self._api.run(self._ops.send_signal(self._session, "SIGTERM"))

    def kill(self) -> None:
        self._api.run(self._ops.send_signal(self._session, "SIGKILL"))

    def detach(self) -> None:
        """Stop reading and leave the process running (re-attach by `session_uuid`)."""
        with self._lock:
            self._api.run(self._ops.detach(self._session))

    def close(self) -> None:
        """Stop the process if it runs (SIGTERM, then SIGKILL) and stop reading."""
        with self._lock:
            self._api.run(self._ops.stop(self._session))


class AsyncSandboxProcess(_Handle):
    """A live process (async): `async for` over `stdout` or `stderr`, `await wait()`.
    An async context manager: leaving it closes the process (SIGTERM, then SIGKILL)."""

    def __init__(self, api: _RunsAsync, ops: ProcessOps, session: Session) -> None:
        self._api, self._ops, self._session = api, ops, session
        self._lock = anyio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def stdout(self) -> AsyncIterator[bytes]:
        return self._output(self._session.stdout)

    @property
    def stderr(self) -> AsyncIterator[bytes]:
        return self._output(self._session.stderr)

    async def _output(self, queue: deque[bytes]) -> AsyncIterator[bytes]:
        while (chunk := self._taken(queue)) is not None:
            if chunk:
                yield chunk
            else:
                await self._pump(lambda: bool(queue))

    async def _pump(self, ready: Callable[[], bool]) -> None:
        async with self._lock:
            if ready() or self._session.finished:
                return
            try:
                await self._api.run(self._ops.pump(self._session))
            except anyio.get_cancelled_exc_class():
                # a read cut short leaves the stream unusable: the next one re-attaches
                with anyio.CancelScope(shield=True):
                    await self._api.run(self._ops.detach(self._session))
                raise

    async def started(self) -> Self:
        while self._session.pid is None:
            if self._session.error is not None:
                raise self._session.error
            await self._pump(lambda: self._session.pid is not None)
        return self

    async def wait(self) -> int:
        while not self._session.finished:
            await self._pump(lambda: False)
        return self._exit_code()

    async def write_stdin(self, data: bytes) -> None:
        if data:
            await self._api.run(self._ops.write_stdin(self._session, data))

    async def close_stdin(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            await self._api.run(self._ops.write_stdin(self._session, b""))

    async def terminate(self) -> None:
        await self._api.run(self._ops.send_signal(self._session, "SIGTERM"))

    async def kill(self) -> None:
        await self._api.run(self._ops.send_signal(self._session, "SIGKILL"))

    async def detach(self) -> None:
        async with self._lock:
            await self._api.run(self._ops.detach(self._session))

    async def aclose(self) -> None:
        """`close`, shielded from cancellation for at most `CLOSE_BUDGET_S`."""
        with anyio.move_on_after(CLOSE_BUDGET_S, shield=True):
            async with self._lock:
                await self._api.run(self._ops.stop(self._session))
