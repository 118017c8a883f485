"""Warm exec: commands started by a helper that joined the sandbox once (helper.py).

The cold path costs, per command, a shell that joins the cgroup, nsenter, setpriv and a
shell that loads the environment. Here a sandbox's first command starts its helper (the
server's own Python, standard library only: nothing the image ships is needed) and goes
down the cold path while the helper joins; every command after is one message on a
socket only the server holds and one vfork and exec of `/bin/sh -c` in the helper. The
command's stdin, stdout and stderr are the server's own pipes, passed over with the
request: output never goes through the helper, and what the helper says back (a pid,
an exit code) is checked before use; the helper, the command's parent, kills it when
the server hangs up on it (a timeout, a cancelled request), so never a reused pid.

Live processes (the Connect protocol's, with stdin and signals) start the same way
(`spawn`), their output streamed as it comes.

A helper that cannot start, dies or answers nonsense costs only its own sandbox's
command: one the helper never started goes down the cold path (`Unavailable`), one it
lost while running is killed and reported (`CommandLost`). A helper ends with its
sandbox, when the server closes its socket (a server restart: the next command starts
another), or after `helper.IDLE_S` without work, so an idle sandbox pays nothing for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream

from fleetctl.server.runtime.base import CommandLost, ExecResult, Spawned, User
from fleetctl.server.runtime.bwrap import helper
from fleetctl.server.runtime.bwrap.cgroups import Cgroup
from fleetctl.server.runtime.bwrap.inside import (
    HOST_ENV,
    IN_DIR,
    SPAWN_IN_DIR,
    Capture,
    read_line,
    sandbox_env,
)
from fleetctl.server.runtime.bwrap.layout import CONTAINER_CAPS

KEEP_CAPS = ",".join(map(str, CONTAINER_CAPS.values()))
#: How long a helper may take to join its sandbox, and how long one that could not
#: waits before another is tried (its sandbox's commands go down the cold path).
READY_S = 5.0
RETRY_S = 30.0
#: The most a helper's answer may hold.
MAX_ANSWER = 4096


class Unavailable(Exception):
    """The command was never started: run it down the cold path."""


@dataclass
class Helper:
    process: subprocess.Popen[bytes]
    control: socket.socket
    pidns: str  # the sandbox's pid namespace, which every pid it reports must be in
    since: float = field(default_factory=time.monotonic)
    ready: bool = False

    def usable(self) -> bool:
        """True once it said it joined (read without waiting), and while it lives."""
        if not self.ready and self.process.poll() is None:
            with contextlib.suppress(BlockingIOError):
                self.ready = self.control.recv(MAX_ANSWER) == b"ready"
        return self.ready and self.process.poll() is None

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.control.close()


@dataclass
class WarmPath:
    """The helpers of a runtime's sandboxes, by sandbox id."""

    helpers: dict[str, Helper] = field(default_factory=dict)

    async def exec(
        self,
        sandbox: tuple[str, int, Cgroup | None],
        env: Mapping[str, str],
        command: str,
        *,
        cwd: str,
        timeout: float,
        user: User,
        detached: bool = False,
    ) -> ExecResult:
        """Run `command` as the cold path would; `Unavailable` when it was not started.
        `detached` (a job): left running whatever becomes of the server from here on."""
        request = _request(["sh", "-c", IN_DIR, "sh", cwd, command], env, user, detached)
        found = self._helper(*sandbox)
        try:
            return await _run(found, request, timeout)
        except Unavailable:
            self._gone(sandbox[0], found)
            raise

    @contextlib.asynccontextmanager
    async def spawn(
        self,
        sandbox: tuple[str, int, Cgroup | None],
        env: Mapping[str, str],
        argv: Sequence[str],
        *,
        cwd: str,
        stdin: bool,
        user: User,
    ) -> AsyncIterator[Spawned]:
        """Start `argv` in `cwd` as the cold path's `Entry.spawn` would (its pid inside on
        the first line of its stdout, read here), its stdio on pipes of the server's;
        `Unavailable` (before it is entered) when it was not started. Left before the
        command ended, the helper kills its process group."""
        request = _request(["sh", "-c", SPAWN_IN_DIR, "sh", cwd, *argv], env, user, False)
        found = self._helper(*sandbox)
        in_r, in_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), -1)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        streams = (PipeWriter(in_w) if in_w >= 0 else None, PipeReader(out_r),
                   PipeReader(err_r))  # fmt: skip
        try:
            answers = _send(found, request, (in_r, out_w, err_w))
        except Unavailable:
            await _close(*streams)
            self._gone(sandbox[0], found)
            raise
        try:
            host_pid = await _started(answers)
            if not host_pid:
                raise CommandLost("the exec helper gave no pid")
            said = await read_line(streams[1])
            pid = int(said) if said.strip().isdigit() else 0
            yield WarmProcess((host_pid, pid, found.pidns), streams, answers)
        finally:
            await _close(*streams)
            answers.close()

    def _gone(self, sandbox_id: str, found: Helper) -> None:
        if found.process.poll() is not None and self.helpers.get(sandbox_id) is found:
            self.drop(sandbox_id)

    def drop(self, sandbox_id: str) -> None:
        """End the sandbox's helper (its commands run on: they are the sandbox's)."""
        found = self.helpers.pop(sandbox_id, None)
        if found is not None:
            found.close()

    def _helper(self, sandbox_id: str, init_pid: int, cgroup: Cgroup | None) -> Helper:
        """The sandbox's helper, ready; else `Unavailable`, with one started meanwhile
        (unless one failed to join less than RETRY_S ago)."""
        found = self.helpers.get(sandbox_id)
        if found is not None and found.usable():
            return found
        ended = found is not None and found.process.poll() is not None
        if found is None or (ended and (found.ready or time.monotonic() - found.since > RETRY_S)):
            self.drop(sandbox_id)
            self.helpers[sandbox_id] = _start(init_pid, cgroup)
        elif not found.ready and time.monotonic() - found.since > READY_S:
            found.close()  # it never joined: tried again after RETRY_S
        raise Unavailable("the sandbox's exec helper is not ready")

    async def ready(self, sandbox: tuple[str, int, Cgroup | None]) -> bool:
        """Wait (up to READY_S) for the sandbox's helper; False when it cannot be had."""
        with anyio.move_on_after(READY_S):
            while True:
                with contextlib.suppress(Unavailable):
                    self._helper(*sandbox)
                    return True
                found = self.helpers.get(sandbox[0])
                if found is None or found.process.poll() is not None:
                    return False
                await anyio.sleep(0.01)  # it joins (tens of milliseconds)
        return False


def _start(init_pid: int, cgroup: Cgroup | None) -> Helper:
    control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pidns = os.readlink(f"/proc/{init_pid}/ns/pid")
        argv = [sys.executable, "-I", "-S", helper.__file__, str(theirs.fileno()),
                str(init_pid), KEEP_CAPS, str(helper.IDLE_S),
                *(cgroup.procs_files if cgroup else ())]  # fmt: skip
        process = subprocess.Popen(argv, env=HOST_ENV, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   pass_fds=(theirs.fileno(),), start_new_session=True)  # fmt: skip
    except OSError as exc:
        control.close()
        raise Unavailable(f"cannot start the exec helper: {exc}") from None
    finally:
        theirs.close()
    control.setblocking(False)
    return Helper(process, control, pidns)


def _request(argv: list[str], env: Mapping[str, str], user: User, detached: bool) -> bytes:
    try:
        request = helper.encode(user.uid, user.gid, list(user.groups), argv,
                                sandbox_env(env, user), detached=detached)  # fmt: skip
    except ValueError:
        raise Unavailable("a NUL in the request") from None
    if len(request) > helper.MAX_REQUEST:
        raise Unavailable("the request is larger than a helper takes")
    return request


def _send(found: Helper, request: bytes, stdio: tuple[int, int, int]) -> socket.socket:
    """Hand the request and the command's stdio (closed here) to the helper: the socket
    its answers come on."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        socket.send_fds(found.control, [request], [*stdio, theirs.fileno()])
    except OSError:
        mine.close()
        raise Unavailable("the exec helper is gone") from None
    finally:
        for fd in stdio:
            os.close(fd)
        theirs.close()
    mine.setblocking(False)
    return mine


async def _run(found: Helper, request: bytes, timeout: float) -> ExecResult:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    streams = (PipeReader(out_r), PipeReader(err_r))
    try:
        mine = _send(found, request, (os.open(os.devnull, os.O_RDONLY), out_w, err_w))
    except Unavailable:
        await _close(*streams)
        raise
    out, err = Capture(), Capture()
    try:
        with anyio.move_on_after(timeout):
            # the helper's end from here on: the command may have started (never rerun)
            pid = await _started(mine)
            lost: CommandLost | None = None
            async with anyio.create_task_group() as group:
                group.start_soon(_drain, streams[0], out)
                group.start_soon(_drain, streams[1], err)
                try:
                    code = await _ended(mine, pid, found.pidns)
                except CommandLost as exc:  # raised here, not as a group of one
                    lost = exc
                    group.cancel_scope.cancel()
            if lost is not None:
                raise lost
            return out.result(err, code)
        return out.result(err, -1, timed_out=True)
    finally:
        # its socket closed: the helper kills the command's process group if it still
        # runs (a timeout, a cancelled request), before reaping it
        await _close(*streams)
        mine.close()


async def _started(sock: socket.socket) -> int:
    """The helper's first answer: the pid it started the command as (0 when it said
    something else); `Unavailable` when it could not start it (e.g. no /bin/sh)."""
    kind, value = await _answer(sock, lost=True)
    if kind == "error":
        raise Unavailable(f"the exec helper did not start the command: {value}"[:300])
    return int(value) if kind == "pid" and value.isdigit() else 0


async def _ended(sock: socket.socket, pid: int, pidns: str) -> int:
    """The command's exit code, as the helper says it (waitstatus: negative for a signal).
    A helper that died first: the command (`pid` on the host) is killed here."""
    try:
        kind, value = await _answer(sock, lost=True)
    except CommandLost:
        _kill_orphan(pid, pidns)
        raise
    if kind != "code" or not value.removeprefix("-").isdigit():
        raise CommandLost("the exec helper gave no exit code")
    return int(value)


def _kill_orphan(pid: int, pidns: str) -> None:
    """Kill the process group of a command whose helper died, if `pid` is still a process
    of the sandbox (once reaped, it could be anyone's)."""
    with contextlib.suppress(OSError):
        if pid > 1 and os.readlink(f"/proc/{pid}/ns/pid") == pidns:
            os.killpg(pid, signal.SIGKILL)


async def _answer(sock: socket.socket, *, lost: bool = False) -> tuple[str, str]:
    """The helper's next answer on `sock`, as (kind, value). Its end (nothing said):
    `Unavailable`, or with `lost` (the command was started) `CommandLost`."""
    while True:
        await anyio.wait_readable(sock)
        try:
            data = sock.recv(MAX_ANSWER)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            if lost:
                raise CommandLost("the sandbox's exec helper ended before the command")
            raise Unavailable("the exec helper ended")
        kind, _, value = data.decode("ascii", "replace").partition(" ")
        return kind, value


async def _drain(stream: PipeReader, into: Capture) -> None:
    async for chunk in stream:
        into.take(chunk)


class PipeReader(ByteReceiveStream):
    """The server's end of a command's stdout or stderr pipe, read on the event loop."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while self._fd >= 0:
            try:
                chunk = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not chunk:
                raise anyio.EndOfStream
            return chunk
        raise anyio.ClosedResourceError

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PipeWriter(ByteSendStream):
    """The server's end of a command's stdin pipe."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
            except BrokenPipeError:  # it closed its stdin, or ended
                raise anyio.BrokenResourceError from None

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def _close(*streams: PipeReader | PipeWriter | None) -> None:
    for stream in streams:
        if stream is not None:
            await stream.aclose()


class WarmProcess:
    """A process the helper started (implements `runtime.base.Spawned`): its exit code
    comes on the helper's answer socket."""

    def __init__(
        self,
        pids: tuple[int, int, str],
        streams: tuple[PipeWriter | None, PipeReader, PipeReader],
        answers: socket.socket,
    ) -> None:
        """`pids`: its pid on the host and inside, and the sandbox's pid namespace."""
        (self._host_pid, self.pid, self._pidns), self._answers = pids, answers
        self.stdin, self.stdout, self.stderr = streams
        self._code: int | None = None

    async def wait(self) -> int:
        if self._code is None:
            code = await _ended(self._answers, self._host_pid, self._pidns)
            self._code = code if code >= 0 else 128 - code
        return self._code

    def signal(self, number: int) -> None:
        """Until its end is known (the helper reaps it only after saying so, and the
        server reads that first), its pid is still its own."""
        if self._code is None:
            with contextlib.suppress(OSError):
                os.kill(self._host_pid, number)
