"""Live processes: a command whose stdin, signals and output stay open while it runs
(`open_process`), over the gateway's Connect command session.

The process's state (`Session`) and what to do with it (`ProcessOps`) are free of I/O, like
every operation of the SDK; `SandboxProcess` and `AsyncSandboxProcess` run those operations
through their client. Output is pulled: whoever waits for output, or for the end, reads the
stream (one reader at a time), and output of the other stream is kept for its reader.

A process carries a session uuid. A dropped stream re-attaches by it (a repeated Start
while the pid is unknown, Connect after), at most `MAX_REATTACH` times in a row with
backoff, and the end always arrives. What the process wrote while no stream read it is
lost on today's cloud; fleetctl's server keeps the last MiB of each stream for the next
reader. Another client may attach to the same process by its uuid (`attach_process`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fleetctl.proto import command_session_pb2 as pb
from fleetctl.sandboxes import _connect, errors
from fleetctl.sandboxes._calls import Call, Close, Op, Open, Read, Sleep, Stream
from fleetctl.sandboxes._data import DataOps
from fleetctl.sandboxes.errors import ConnectFailure

#: The stream's own deadline (`connect-timeout-ms`): a day, as today's SDK asks.
STREAM_DEADLINE_S = 24 * 3600.0
#: A stream silent this long is taken for lost (the server sends keepalives every 10 s).
SILENCE_S = 35.0
MAX_REATTACH = 5
REATTACH_BACKOFF_S = 0.5
INPUT_TIMEOUT_S = 30.0
SIGNAL_TIMEOUT_S = 10.0
#: How long `stop` waits for the end after each signal.
EXIT_WAIT_S = 5.0
#: Codes after which re-attaching cannot help.
FATAL = frozenset({"not_found", "failed_precondition", "invalid_argument", "unimplemented",
                   "permission_denied", "unauthenticated"})  # fmt: skip
Signal = Literal["SIGTERM", "SIGKILL"]
#: The signals `stop` sends, in turn, until the process ends.
STOP: tuple[Signal, ...] = ("SIGTERM", "SIGKILL")


@dataclass(eq=False)
class Session:
    """What is known of one live process."""

    sandbox_id: str
    session_uuid: str
    #: The Start request (its env may hold secrets: never shown); None when attached to a
    #: process started elsewhere.
    start: pb.StartRequest | None = field(repr=False)
    pid: int | None = None
    returncode: int | None = None
    #: Why the process's end cannot be known (an APIError, or the sandbox not running).
    error: Exception | None = None
    stdout: deque[bytes] = field(default_factory=deque)
    stderr: deque[bytes] = field(default_factory=deque)
    stream: Stream | None = None
    decoder: _connect.Decoder = field(default_factory=_connect.Decoder)
    lost: int = 0
    reauthorized: bool = False

    @property
    def finished(self) -> bool:
        return self.returncode is not None or self.error is not None

    def selector(self) -> pb.CommandSessionSelector:
        return pb.CommandSessionSelector(session_uuid=self.session_uuid)


def new_session(
    sandbox_id: str,
    command: str,
    working_dir: str | None,
    env: Mapping[str, str] | None,
    user: str | None,
) -> Session:
    spec = pb.CommandSpec(cmd="/bin/sh", args=["-c", command], envs=dict(env or {}))
    if working_dir is not None:
        spec.cwd = working_dir
    if user is not None:
        if not user:
            raise ValueError("user must not be empty")
        spec.user = user
    session_uuid = str(uuid.uuid4())
    start = pb.StartRequest(command=spec, stdin=True, session_uuid=session_uuid)
    return Session(sandbox_id, session_uuid, start)


class ProcessOps(DataOps):
    def pump(self, session: Session, deadline: float = math.inf) -> Op[None]:
        """Read the stream until something new is known (output, the pid, the end, or why
        the end cannot be known, kept in `session.error`), or a read after `deadline`.
        Raises only when the API itself cannot be reached to say so."""
        while not session.finished and time.monotonic() < deadline:
            if session.stream is None:
                yield from self._attach(session)
                continue
            try:
                chunk = yield Read(session.stream)
            except errors.APIError as fault:  # the connection broke or went silent
                yield from self._lost(session, fault)
                continue
            events, failure = session.decoder.feed(chunk)
            if events:
                session.lost = 0  # the stream works again
            news = _apply(session, events)  # before any failure: no output is dropped
            cause: errors.APIError | None = failure
            if cause is None and not chunk and not session.finished:
                cause = errors.APIError("the stream ended before the process did")
            if session.finished:
                yield from self._close(session)
            elif cause is not None:
                yield from self._lost(session, cause)
                continue
            if news:
                return

    def _attach(self, session: Session) -> Op[None]:
        gateway = yield from self.gateway(session.sandbox_id)
        if session.pid is None and session.start is not None:
            method, message = "Start", session.start.SerializeToString()
        else:
            method = "Connect"
            message = pb.ConnectRequest(session=session.selector()).SerializeToString()
        call = Call("POST", f"{gateway.url}/{_connect.path(method)}", token=gateway.token,
                    content=_connect.envelope(message), timeout=SILENCE_S,
                    headers=_connect.headers(STREAM_DEADLINE_S, stream=True))  # fmt: skip
        try:
            stream = yield Open(call)
        except errors.APIError as fault:
            yield from self._lost(session, fault)
            return
        response = stream.response
        body = response.content if response.status_code != 200 else b""
        try:
            _connect.check_stream(
                response.status_code, response.headers.get("content-type", ""), body
            )
        except ConnectFailure as failure:
            yield Close(stream)
            if failure.code == "unauthenticated" and not session.reauthorized:
                session.reauthorized = True  # a token from before a restart: once, for free
                self.forget_gateway(session.sandbox_id)
                return
            if failure.code == "unimplemented":
                session.error = errors.APIError(
                    f"the gateway of sandbox {session.sandbox_id} offers no live processes "
                    "(it has no Connect command session: an API older than today's)"
                )
                return
            yield from self._lost(session, failure)
            return
        session.stream, session.decoder = stream, _connect.Decoder()
        session.reauthorized = False  # a later restart may need a new token again

    def _lost(self, session: Session, cause: errors.APIError | None) -> Op[None]:
        """The stream failed: re-attach after a backoff, or give up with the error (the
        sandbox's typed error when it is not running)."""
        yield from self._close(session)
        code = cause.code if isinstance(cause, ConnectFailure) else None
        if code == "not_found":
            try:
                yield from self.raise_unless_running(session.sandbox_id)
            except errors.SandboxNotRunningError as gone:
                session.error = gone
                return
        if code in FATAL or session.lost >= MAX_REATTACH:
            session.error = cause or errors.APIError(
                f"the stream of process {session.session_uuid} ended without its exit status"
            )
            return
        session.lost += 1
        yield Sleep(REATTACH_BACKOFF_S * 2 ** (session.lost - 1))

    def _close(self, session: Session) -> Op[None]:
        stream, session.stream = session.stream, None
        if stream is not None:
            yield Close(stream)

    def write_stdin(self, session: Session, data: bytes) -> Op[None]:
        """Write to its stdin; b"" closes stdin (end of file, on fleetctl's server).
        BrokenPipeError once the process ended or its stdin is closed."""
        if session.returncode is not None:
            raise BrokenPipeError(f"process {session.pid} has exited")
        message = pb.SendInputRequest(session=session.selector(),
                                      input=pb.CommandInput(stdin=data),
                                      input_uuid=str(uuid.uuid4()))  # fmt: skip
        try:
            yield from self.connect_unary(session.sandbox_id, "SendInput", message, INPUT_TIMEOUT_S)
        except ConnectFailure as failure:
            if failure.code == "failed_precondition":
                raise BrokenPipeError(f"process {session.pid}: {failure.message}") from None
            raise

    def send_signal(self, session: Session, signal: Signal) -> Op[None]:
        """Signal the process; nothing once it ended (or its sandbox did)."""
        if session.returncode is not None:
            return
        number = pb.SIGNAL_SIGTERM if signal == "SIGTERM" else pb.SIGNAL_SIGKILL
        message = pb.SendSignalRequest(session=session.selector(), signal=number,
                                       signal_uuid=str(uuid.uuid4()))  # fmt: skip
        try:
            yield from self.connect_unary(session.sandbox_id, "SendSignal", message,
                                          SIGNAL_TIMEOUT_S)  # fmt: skip
        except ConnectFailure as failure:
            if failure.code != "not_found":  # not_found: it ended over a minute ago
                raise
        except errors.SandboxNotRunningError:
            pass

    def stop(self, session: Session) -> Op[None]:
        """Stop the process if it runs: SIGTERM, then SIGKILL, each followed by up to
        `EXIT_WAIT_S` (plus a keepalive's wait) for its end; then stop reading.
        A process whose end cannot be observed gets SIGKILL at once."""
        try:
            for signal in STOP:
                if session.returncode is not None:
                    return
                if session.error is not None:
                    yield from self.send_signal(session, "SIGKILL")
                    return
                yield from self.send_signal(session, signal)
                deadline = time.monotonic() + EXIT_WAIT_S
                while not session.finished and time.monotonic() < deadline:
                    yield from self.pump(session, deadline)
        finally:
            yield from self._close(session)

    def detach(self, session: Session) -> Op[None]:
        """Stop reading; the process runs on (attach again by its session uuid)."""
        yield from self._close(session)


def _apply(session: Session, events: list[pb.CommandSessionEvent]) -> bool:
    """Take the events into `session`; whether any told something new."""
    news = False
    for event in events:
        which = event.WhichOneof("event")
        if which == "start" and session.pid is None:
            session.pid, news = event.start.pid, True
        elif which == "data":
            kind = event.data.WhichOneof("output")
            if kind is not None:
                queue = session.stderr if kind == "stderr" else session.stdout
                queue.append(getattr(event.data, kind))
                news = True
        elif which == "end":
            news = True
            if session.pid is None:
                session.error = errors.APIError("the process ended before reporting its pid")
            else:
                session.returncode = event.end.exit_code
            return news
    return news
