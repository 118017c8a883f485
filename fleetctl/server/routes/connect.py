"""The gateway's Connect RPC: the command session of today's SDK (prime-sandboxes 0.3 on).

    POST /gw/{user_ns}/{job_id}/command_session.CommandSession/{Method}

Served by the `connectrpc` package's ASGI application (google.protobuf codecs), behind
`ConnectGateway`, which checks the sandbox's gateway token and names the sandbox for the
handlers. Errors are Connect codes: `unauthenticated` for a bad or stale token (before
any message), `not_found` for a sandbox or process that is gone (also mid-stream),
`deadline_exceeded` when `connect-timeout-ms` runs out (enforced here; a command without
a session uuid is then killed, a session's runs on), `failed_precondition` for a session
uuid reused for another command, `resource_exhausted` past a sandbox's process limit.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio
from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf.message import Message
from starlette.types import Receive, Scope, Send

from fleetctl.proto import command_session_pb2 as pb
from fleetctl.server.api import check_env
from fleetctl.server.asgi import bearer
from fleetctl.server.faults import InjectedReset
from fleetctl.server.routes import frames
from fleetctl.server.service import NotFound, NotRunning, Refused, SandboxService
from fleetctl.server.service.processes import (
    STREAMS,
    Command,
    Conflict,
    Crowded,
    Event,
    Gone,
    Reader,
)

SERVICE = "command_session.CommandSession"
#: The methods whose request is one message (the others stream theirs, or are unary).
SINGLE_MESSAGE = (f"/{SERVICE}/Start", f"/{SERVICE}/Connect")
#: Largest request message (SendInput carries stdin).
READ_MAX_BYTES = 8 * 1024 * 1024
#: Without `connect-timeout-ms`, a stream may last this long.
DEFAULT_DEADLINE_S = 24 * 3600.0
#: A stream silent this long gets a keepalive (and notices a client that went away).
KEEPALIVE_S = 10.0

M = TypeVar("M", bound=Message)
_CALLER: ContextVar[tuple[str, bool]] = ContextVar("connect_caller")


class ConnectGateway:
    """Checks the gateway token of `job_id`, then hands the call to the Connect app.

    `cut(sandbox_id)` drops the connections of the sandbox's calls in flight, as a flaky
    network would (a test's fault injection: clients must re-attach)."""

    def __init__(self, service: SandboxService) -> None:
        self.service = service
        self.app = CommandSessionApp(
            service=service,
            endpoints=lambda svc: CommandSession(svc).endpoints(),  # type: ignore[arg-type,return-value]
            codecs=[
                _Checked(google_protobuf_binary_codec()),
                _Checked(google_protobuf_json_codec()),
            ],
            read_max_bytes=READ_MAX_BYTES,
        )
        self._calls: dict[str, dict[anyio.CancelScope, anyio.Event]] = {}
        self._cut: set[anyio.CancelScope] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sandbox_id = str(scope.get("path_params", {}).get("job_id", ""))
        allowed = self.service.data.token_valid(sandbox_id, bearer(scope))
        call, done = anyio.CancelScope(), anyio.Event()
        if allowed and str(scope.get("path", "")).endswith(SINGLE_MESSAGE):
            try:  # (a caller without a token is answered unauthenticated, unread)
                body = await frames.read_single(receive, READ_MAX_BYTES)
            except frames.Refusal as refusal:
                await frames.refuse(scope, send, refusal)
                return
            # a client that goes away ends its call at once, not at the next message: its
            # process stops (or, with a session, holds its output for the next reader)
            receive = frames.replaying(body, receive, on_disconnect=call.cancel)
        token = _CALLER.set((sandbox_id, allowed))
        calls = self._calls.setdefault(sandbox_id, {})
        calls[call] = done
        try:
            with call:
                await self.app(scope, receive, send)
        except ConnectError:  # what the app makes of its cancellation
            if not call.cancel_called:
                raise
        finally:
            _CALLER.reset(token)
            del calls[call]
            if not calls:
                self._calls.pop(sandbox_id, None)
            done.set()
        if call in self._cut:
            self._cut.discard(call)
            raise InjectedReset(f"calls of sandbox {sandbox_id} cut on request")

    async def cut(self, sandbox_id: str) -> int:
        """Drop the connections of the sandbox's calls in flight; how many. Returns once
        they are gone (their processes read by nobody)."""
        calls = dict(self._calls.get(sandbox_id, {}))
        for call in calls:
            self._cut.add(call)
            call.cancel()
        for done in calls.values():
            await done.wait()
        return len(calls)


class _Checked(Codec[Message, Any]):
    """A google.protobuf codec whose undecodable input is the caller's error
    (`invalid_argument`), not the server's."""

    def __init__(self, codec: Codec[Message, Any]) -> None:
        self._codec = codec

    def name(self) -> str:
        return self._codec.name()

    def encode(self, message: Message) -> bytes:
        return self._codec.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self._codec.decode(data, message_class)
        except Exception as exc:  # DecodeError, json_format.ParseError: untrusted input
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"a message that does not parse: {exc}"
            ) from None


class CommandSessionApp(ConnectASGIApplication[SandboxService]):
    @property
    def path(self) -> str:
        return f"/{SERVICE}"


def _sandbox(service: SandboxService) -> str:
    """The sandbox of the call, once its token was accepted."""
    sandbox_id, allowed = _CALLER.get(("", False))
    if not allowed:
        raise ConnectError(Code.UNAUTHENTICATED, "invalid or expired gateway token")
    service.data.touch(sandbox_id)
    return sandbox_id


def _selector(session: pb.CommandSessionSelector) -> str | int:
    which = session.WhichOneof("selector")
    if which is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "name the session by pid or session_uuid")
    return session.pid if which == "pid" else session.session_uuid


def _failing(exc: Exception) -> ConnectError:
    """A service error as the Connect code the SDK maps."""
    if isinstance(exc, NotFound | NotRunning | Gone):
        return ConnectError(Code.NOT_FOUND, str(exc))
    if isinstance(exc, Crowded):
        return ConnectError(Code.RESOURCE_EXHAUSTED, str(exc))
    return ConnectError(Code.FAILED_PRECONDITION, str(exc))  # Conflict, Refused


def _event(event: Event) -> pb.CommandSessionEvent:
    if event.kind == "start":
        return pb.CommandSessionEvent(start=pb.CommandSessionEvent.StartEvent(pid=event.pid))
    if event.kind == "end":
        started = event.exit_code >= 0
        return pb.CommandSessionEvent(end=pb.CommandSessionEvent.EndEvent(
            exit_code=event.exit_code, exited=started, status="exit" if started else "failed",
            error=None if started else "the command could not be started",
        ))  # fmt: skip
    data = pb.CommandSessionEvent.DataEvent(**{event.kind: event.data})
    return pb.CommandSessionEvent(data=data)


def _utf8_cut(data: bytes) -> int:
    """Where the last complete UTF-8 character of `data` ends: older SDKs decode each
    chunk on its own, so a character is never split between two."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = (
                1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            )
            return len(data) if need <= back else len(data) - back
    return len(data)


async def _stream(
    reader: Reader, deadline: float, message: Callable[[pb.CommandSessionEvent], M]
) -> AsyncIterator[M]:
    """The reader's events as messages, with keepalives, until its end or the deadline.

    No yield stands inside a cancel scope: only the wait for the next event is timed."""
    held = {"stdout": b"", "stderr": b""}
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectError(Code.DEADLINE_EXCEEDED, "the command ran past its deadline")
            with anyio.move_on_after(min(left, KEEPALIVE_S)) as silent:
                try:
                    event = await reader.next()
                except Gone as exc:
                    raise _failing(exc) from None
            if silent.cancelled_caught:
                yield message(pb.CommandSessionEvent(keepalive=pb.CommandSessionEvent.KeepAlive()))
                continue
            if event is None:
                return
            for part in _whole_characters(event, held):
                yield message(_event(part))
    finally:
        reader.close()


def _whole_characters(event: Event, held: dict[str, bytes]) -> list[Event]:
    """`event`, with output cut after its last whole UTF-8 character (the rest is held
    for the next chunk of the same stream, and flushed before the end)."""
    if event.kind in held:
        data = held[event.kind] + event.data
        cut = _utf8_cut(data)
        held[event.kind] = data[cut:]
        return [Event(event.kind, data=data[:cut])] if cut else []
    if event.kind == "end":
        rest = [Event(kind, data=held[kind]) for kind in STREAMS if held[kind]]
        held.update(stdout=b"", stderr=b"")
        return [*rest, event]
    return [event]


Context = RequestContext[Any, Any]


class CommandSession:
    """The command session's handlers, over the sandbox service."""

    def __init__(self, service: SandboxService) -> None:
        self.service = service

    async def start(self, request: pb.StartRequest, ctx: Context) -> AsyncIterator[
        pb.StartResponse
    ]:  # fmt: skip
        sandbox_id = _sandbox(self.service)
        if request.HasField("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, "pty sessions are not offered by this server")
        spec = request.command
        if not spec.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "command.cmd is empty")
        try:
            check_env(dict(spec.envs))
        except ValueError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from None
        command = Command((spec.cmd, *spec.args), dict(spec.envs),
                          spec.cwd if spec.HasField("cwd") else None,
                          spec.user if spec.HasField("user") else None)  # fmt: skip
        uuid = request.session_uuid if request.HasField("session_uuid") else None
        try:
            reader = await self.service.processes.start(
                sandbox_id, command, stdin=request.stdin, session_uuid=uuid or None
            )
        except (NotFound, NotRunning, Conflict, Refused) as exc:
            raise _failing(exc) from None
        async for response in _stream(reader, _deadline(ctx), _start_response):
            yield response

    async def connect(self, request: pb.ConnectRequest, ctx: Context) -> AsyncIterator[
        pb.ConnectResponse
    ]:  # fmt: skip
        sandbox_id = _sandbox(self.service)
        try:
            reader = self.service.processes.attach(sandbox_id, _selector(request.session))
        except (NotFound, NotRunning) as exc:
            raise _failing(exc) from None
        async for response in _stream(reader, _deadline(ctx), _connect_response):
            yield response

    async def send_input(self, request: pb.SendInputRequest, ctx: Context) -> pb.SendInputResponse:
        sandbox_id = _sandbox(self.service)
        if request.input.WhichOneof("input") == "pty":
            raise ConnectError(Code.UNIMPLEMENTED, "pty sessions are not offered by this server")
        uuid = request.input_uuid if request.HasField("input_uuid") else None
        await self._input(sandbox_id, _selector(request.session), request.input.stdin, uuid)
        return pb.SendInputResponse()

    async def stream_input(
        self, requests: AsyncIterator[pb.StreamInputRequest], ctx: Context
    ) -> pb.StreamInputResponse:
        sandbox_id = _sandbox(self.service)
        selector: str | int | None = None
        async for request in requests:
            which = request.WhichOneof("event")
            if which == "start":
                selector = _selector(request.start.session)
            elif which == "data":
                if selector is None:
                    raise ConnectError(Code.INVALID_ARGUMENT, "send start before data")
                await self._input(sandbox_id, selector, request.data.input.stdin, None)
        return pb.StreamInputResponse()

    async def _input(
        self, sandbox_id: str, selector: str | int, data: bytes, uuid: str | None
    ) -> None:
        try:
            await self.service.processes.send_input(sandbox_id, selector, data, uuid)
        except (NotFound, NotRunning, Refused) as exc:
            raise _failing(exc) from None

    async def send_signal(
        self, request: pb.SendSignalRequest, ctx: Context
    ) -> pb.SendSignalResponse:
        sandbox_id = _sandbox(self.service)
        if request.signal == pb.SIGNAL_UNSPECIFIED:
            raise ConnectError(Code.INVALID_ARGUMENT, "name a signal (SIGTERM or SIGKILL)")
        uuid = request.signal_uuid if request.HasField("signal_uuid") else None
        try:
            self.service.processes.send_signal(sandbox_id, _selector(request.session),
                                               int(request.signal), uuid)  # fmt: skip
        except (NotFound, NotRunning) as exc:
            raise _failing(exc) from None
        return pb.SendSignalResponse()

    async def list(self, request: pb.ListRequest, ctx: Context) -> pb.ListResponse:
        sandbox_id = _sandbox(self.service)
        try:
            running = self.service.processes.list(sandbox_id)
        except (NotFound, NotRunning) as exc:
            raise _failing(exc) from None
        return pb.ListResponse(sessions=[
            pb.CommandSessionInfo(
                # never the environment: it may hold secrets
                command=pb.CommandSpec(cmd=p.command.argv[0], args=p.command.argv[1:],
                                       cwd=p.command.cwd),
                pid=p.pid, session_uuid=p.session_uuid,
            ) for p in running
        ])  # fmt: skip

    async def update(self, request: pb.UpdateRequest, ctx: Context) -> pb.UpdateResponse:
        sandbox_id = _sandbox(self.service)
        try:
            self.service.processes.find(sandbox_id, _selector(request.session))
        except (NotFound, NotRunning) as exc:
            raise _failing(exc) from None
        raise ConnectError(Code.FAILED_PRECONDITION, "the session has no pty to resize")

    def endpoints(self) -> Mapping[str, Endpoint[Any, Any]]:
        """Each method at `/command_session.CommandSession/{Method}`."""
        reads = IdempotencyLevel.NO_SIDE_EFFECTS
        methods = {
            "Start": Endpoint.server_stream(_info("Start", pb.StartRequest, pb.StartResponse),
                                            self.start),
            "Connect": Endpoint.server_stream(
                _info("Connect", pb.ConnectRequest, pb.ConnectResponse, reads), self.connect),
            "SendInput": Endpoint.unary(
                _info("SendInput", pb.SendInputRequest, pb.SendInputResponse), self.send_input),
            "StreamInput": Endpoint.client_stream(
                _info("StreamInput", pb.StreamInputRequest, pb.StreamInputResponse),
                self.stream_input),
            "SendSignal": Endpoint.unary(
                _info("SendSignal", pb.SendSignalRequest, pb.SendSignalResponse),
                self.send_signal),
            "List": Endpoint.unary(_info("List", pb.ListRequest, pb.ListResponse, reads),
                                   self.list),
            "Update": Endpoint.unary(_info("Update", pb.UpdateRequest, pb.UpdateResponse),
                                     self.update),
        }  # fmt: skip
        return {f"/{SERVICE}/{name}": endpoint for name, endpoint in methods.items()}


def _info(
    name: str,
    request: type[Message],
    response: type[Message],
    level: IdempotencyLevel = IdempotencyLevel.UNKNOWN,
) -> MethodInfo[Any, Any]:
    return MethodInfo(name=name, service_name=SERVICE, input=request, output=response,
                      idempotency_level=level)  # fmt: skip


def _deadline(ctx: RequestContext[Any, Any]) -> float:
    timeout_ms = ctx.timeout_ms
    return time.monotonic() + (timeout_ms / 1000 if timeout_ms else DEFAULT_DEADLINE_S)


def _start_response(event: pb.CommandSessionEvent) -> pb.StartResponse:
    return pb.StartResponse(event=event)


def _connect_response(event: pb.CommandSessionEvent) -> pb.ConnectResponse:
    return pb.ConnectResponse(event=event)
