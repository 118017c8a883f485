"""Live processes: commands whose output streams as it comes, with stdin, signals and
re-attach (what today's SDK's command session and `open_process` need).

A process started with a `session_uuid` is detached from the request that started it:
it runs in the service's task group, another stream can attach to it (`attach`: a start
event, then new output, then its end), and a repeated start with the same uuid attaches
instead of starting it again. Output written while no stream reads it (the last one was
dropped) is held, up to `HOLD` bytes per stream, for the next one to attach. Without a
uuid, a process belongs to its stream: it is killed when the stream goes away. Inputs
and signals carry ids of their own, and a repeated id is done once. An ended process is
remembered for `RETAIN` (its end event), and a sandbox that ends ends its processes'
streams with `Gone`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import anyio
from anyio.abc import ByteReceiveStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from fleetctl.server.runtime.base import Handle, RuntimeFailure, Spawned
from fleetctl.server.service.dataplane import DataPlane, workdir
from fleetctl.server.service.lifecycle import Lifecycle
from fleetctl.server.service.state import NotFound, Refused, Shared

log = logging.getLogger("fleetctl.server")
#: How long an ended process's end event stays available to re-attach.
RETAIN = 60.0
#: Events a slow reader may lag behind before the process waits for it.
BUFFER = 64
#: Output read at once from a process.
CHUNK = 64 * 1024
#: Output of a process kept per stream while no reader is attached (the latest).
HOLD = 1024 * 1024
#: Live processes one sandbox may have at once.
MAX_PER_SANDBOX = 256
#: Ended processes kept per sandbox for re-attach (the latest), whatever their age.
MAX_ENDED = 256
#: Input and signal ids remembered per process, for de-duplication.
MAX_SEEN = 10_000

Kind = Literal["start", "stdout", "stderr", "end"]
STREAMS: tuple[Kind, ...] = ("stdout", "stderr")


@dataclass(frozen=True, slots=True)
class Event:
    kind: Kind
    pid: int = 0
    data: bytes = b""
    exit_code: int = 0


class Gone(Exception):
    """The sandbox ended while the process was streaming."""


class Conflict(Exception):
    """A session id already names another command."""


class Crowded(Refused):
    """The sandbox already runs as many live processes as it may."""


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None  # None: the image's WorkingDir, else /workspace
    user: str | None = None  # None: the image's User, else root


@dataclass(eq=False, slots=True)
class Process:
    sandbox_id: str
    key: str
    command: Command
    session_uuid: str | None
    spawned: Spawned | None = None
    started: anyio.Event = field(default_factory=anyio.Event)
    ended: Event | None = None
    ended_at: float = 0.0
    gone: bool = False
    readers: list[MemoryObjectSendStream[Event]] = field(default_factory=list)
    #: Output nobody read, by stream, for the next reader.
    held: dict[Kind, bytes] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    stop: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    @property
    def pid(self) -> int:
        return self.spawned.pid if self.spawned else 0


class Reader:
    """One stream's view of a process: its start first, then new output, then its end
    (Gone instead, when its sandbox ended). `next` may be cancelled without losing an
    event; `close` when done (it stops the process if this reader owns it)."""

    def __init__(
        self,
        process: Process,
        send: MemoryObjectSendStream[Event],
        receive: MemoryObjectReceiveStream[Event],
        owner: bool,
    ) -> None:
        self.process = process
        self._send = send
        self._receive = receive
        self._owner = owner
        self._said_start = False
        self._done = False

    async def next(self) -> Event | None:
        """The next event; None after the end."""
        process = self.process
        if not self._said_start:
            await process.started.wait()
            self._said_start = True
            return Event("start", pid=process.pid)
        if self._done:
            return None
        try:
            event = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            event = process.ended or Event("end", pid=process.pid, exit_code=-1)
        if event.kind == "start":
            return await self.next()  # said already, to this reader
        if event.kind == "end":
            self._done = True
            if process.gone:
                raise Gone(f"sandbox {process.sandbox_id} ended")
        return event

    def close(self) -> None:
        if self._send in self.process.readers:
            self.process.readers.remove(self._send)
        self._send.close()
        self._receive.close()
        if self._owner and self.process.ended is None:
            self.process.stop.cancel()


class Processes:
    """The live processes of every sandbox."""

    def __init__(self, shared: Shared, lifecycle: Lifecycle, data: DataPlane) -> None:
        self.shared = shared
        self.lifecycle = lifecycle
        self.data = data
        self._by_sandbox: dict[str, dict[str, Process]] = {}
        self._group: TaskGroup | None = None
        lifecycle.on_end(self._sandbox_ended)

    def run(self, group: TaskGroup) -> None:
        self._group = group

    def _sandbox_ended(self, sandbox_id: str) -> None:
        for process in self._by_sandbox.pop(sandbox_id, {}).values():
            process.gone = True  # its reader sees Gone once the runtime has killed it

    async def start(
        self,
        sandbox_id: str,
        command: Command,
        *,
        stdin: bool,
        session_uuid: str | None,
    ) -> Reader:
        """Start `command` (or, for a known `session_uuid` of the same command, attach to
        it); its events come through the reader. Raises NotFound/NotRunning, Conflict or
        Refused. Every process runs in the service's task group; one without a uuid is
        stopped when its reader closes."""
        record, handle = await self.data.running(sandbox_id)
        processes = self._by_sandbox.setdefault(sandbox_id, {})
        self._forget_ended(processes)
        known = processes.get(session_uuid) if session_uuid else None
        if known is not None:
            if known.command != command:
                raise Conflict(f"session {session_uuid} runs another command")
            return self._subscribe(known, owner=False)
        if sum(1 for p in processes.values() if p.ended is None) >= MAX_PER_SANDBOX:
            raise Crowded(f"sandbox {sandbox_id} already runs {MAX_PER_SANDBOX} processes")
        user = await self.data.user(record, handle, command.user)
        process = Process(sandbox_id, session_uuid or uuid.uuid4().hex, command, session_uuid)
        processes[process.key] = process
        env = {**self.shared.env.get(sandbox_id, {}), **command.env}  # the sandbox's, then its own
        cwd = command.cwd or workdir(record)
        spawn = self.shared.runtime.spawn(
            handle, env, command.argv, cwd=cwd, stdin=stdin, user=user
        )
        reader = self._subscribe(process, owner=session_uuid is None)  # before any output
        assert self._group is not None, "processes not started"
        try:
            await self._group.start(self._run, process, spawn, handle)
        except BaseException:  # cancelled while starting: its owner is gone, so is it
            reader.close()
            raise
        return reader

    def attach(self, sandbox_id: str, selector: str | int) -> Reader:
        """A reader of a known process from now on (its start again, new output, its end)."""
        return self._subscribe(self.find(sandbox_id, selector), owner=False)

    async def _run(
        self,
        process: Process,
        spawn: contextlib.AbstractAsyncContextManager[Spawned],
        handle: Handle,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the process and fan its output out to its readers, until it ends. Never
        raises: a process that cannot start just ends (its readers see the end)."""
        code = -1
        with process.stop, self.data.in_use(process.sandbox_id):
            try:
                async with spawn as spawned:
                    process.spawned = spawned
                    process.started.set()
                    task_status.started()
                    async with anyio.create_task_group() as pumps:
                        pumps.start_soon(self._pump, process, spawned.stdout, "stdout")
                        pumps.start_soon(self._pump, process, spawned.stderr, "stderr")
                    code = await spawned.wait()
                # an OOM kill ends the sandbox: its streams then end with Gone, not the end
                await self.data.settle(process.sandbox_id, handle)
            except (OSError, RuntimeFailure, anyio.BrokenResourceError) as exc:
                log.warning("process in sandbox %s failed: %s", process.sandbox_id, exc)
            finally:
                if not process.started.is_set():
                    process.started.set()
                    task_status.started()
        process.ended = Event("end", pid=process.pid, exit_code=code)
        process.ended_at = time.monotonic()
        with anyio.CancelScope(shield=True):
            await self._broadcast(process, process.ended)
        for reader in process.readers:
            reader.close()
        process.readers.clear()

    async def _pump(self, process: Process, stream: ByteReceiveStream, kind: Kind) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                                 anyio.BrokenResourceError):  # fmt: skip
            while True:
                await self._broadcast(process, Event(kind, data=await stream.receive(CHUNK)))

    async def _broadcast(self, process: Process, event: Event) -> None:
        if not process.readers and event.kind in STREAMS:
            process.held[event.kind] = (process.held.get(event.kind, b"") + event.data)[-HOLD:]
        for reader in list(process.readers):
            try:
                await reader.send(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                if reader in process.readers:
                    process.readers.remove(reader)

    def _subscribe(self, process: Process, *, owner: bool) -> Reader:
        send, receive = anyio.create_memory_object_stream[Event](BUFFER)
        for kind, data in process.held.items():  # what came while nobody read
            send.send_nowait(Event(kind, data=data))
        process.held = {}
        if process.ended is None:
            process.readers.append(send)
        else:
            send.send_nowait(process.ended)
            send.close()
        return Reader(process, send, receive, owner)

    def find(self, sandbox_id: str, selector: str | int) -> Process:
        """A live (or recently ended) process by session uuid or by pid; NotFound."""
        self.lifecycle.running(sandbox_id)
        processes = self._by_sandbox.get(sandbox_id, {})
        self._forget_ended(processes)
        for process in processes.values():
            if selector in (process.session_uuid, process.pid) and selector not in ("", 0):
                return process
        raise NotFound(f"no process {selector} in sandbox {sandbox_id}")

    def list(self, sandbox_id: str) -> list[Process]:
        self.lifecycle.running(sandbox_id)
        return [p for p in self._by_sandbox.get(sandbox_id, {}).values() if p.ended is None]

    async def send_input(
        self, sandbox_id: str, selector: str | int, data: bytes, input_id: str | None
    ) -> None:
        """Write `data` to the process's stdin; empty `data` closes it. A repeated
        `input_id` is written once."""
        process = self.find(sandbox_id, selector)
        if not self._first_time(process, input_id):
            return
        stdin = process.spawned.stdin if process.spawned else None
        if stdin is None or process.ended is not None:
            raise Refused(f"process {selector} takes no input (its stdin is closed)")
        try:
            if data:
                await stdin.send(data)
            else:
                await stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise Refused(f"process {selector} takes no input (its stdin is closed)") from None

    def send_signal(
        self, sandbox_id: str, selector: str | int, number: int, signal_id: str | None
    ) -> None:
        """Signal the process (once per `signal_id`); an ended one is left alone."""
        process = self.find(sandbox_id, selector)
        if self._first_time(process, signal_id) and process.spawned and not process.ended:
            process.spawned.signal(number)

    @staticmethod
    def _first_time(process: Process, request_id: str | None) -> bool:
        if not request_id:
            return True
        if request_id in process.seen:
            return False
        if len(process.seen) < MAX_SEEN:
            process.seen.add(request_id)
        return True

    @staticmethod
    def _forget_ended(processes: dict[str, Process]) -> None:
        """Drop ended processes after RETAIN seconds, and the oldest past MAX_ENDED."""
        horizon = time.monotonic() - RETAIN
        ended = sorted((p.ended_at, k) for k, p in processes.items() if p.ended)
        for index, (ended_at, key) in enumerate(ended):
            if ended_at < horizon or index < len(ended) - MAX_ENDED:
                del processes[key]
