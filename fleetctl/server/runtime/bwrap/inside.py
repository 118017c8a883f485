"""Running things inside a bubblewrap sandbox: commands and file transfers.

`nsenter` joins every namespace of the sandbox's init process, `setpriv` drops every
capability a container's root would not have (and, for another user, switches to it),
then a shell runs as the sandbox's root or that user. Files move in and
out the same way, as the sandbox's own root, so a symlink a sandbox plants can
never point a host-side open() outside it. Host-side processes get a fixed
environment and absolute tool paths: nothing a caller chooses may steer a tool
that runs as host root.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, Process

from fleetctl.server.runtime.base import (
    ROOT,
    ExecResult,
    FileMissing,
    FileRefused,
    FileSlice,
    User,
)
from fleetctl.server.runtime.bwrap.cgroups import Cgroup
from fleetctl.server.runtime.bwrap.layout import CONTAINER_CAPS, tools_argv

SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Commands keep what the sandbox's root may do (a root shell has it, another user none).
BOUNDING_SET = "--bounding-set=-all," + ",".join(f"+{c.lower()}" for c in CONTAINER_CAPS)
#: The whole environment of every host-side process (shim, setpriv, bwrap, nsenter).
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
MAX_CAPTURE = 16 * 1024 * 1024
#: Runs a command ("$2") in its directory ("$1"), the cold path and the warm alike.
IN_DIR = 'cd -- "$1" || exit 1; shift; eval "$1"'
#: Says its pid (inside) on stdout's first line, then runs argv ("$2"...) in "$1" as itself.
SPAWN_IN_DIR = 'printf "%s\\n" "$$"; cd -- "$1" || exit 1; shift; exec "$@"'
#: Exit code of the transfer scripts for a file that does not exist.
MISSING_FILE = 44
#: File transfers resolve relative paths where exec runs by default.
WORKDIR = "cd /workspace 2>/dev/null;"


@dataclass(frozen=True, slots=True)
class Entry:
    """How to enter one sandbox: through its init process, joining its cgroups."""

    nsenter: str
    init_pid: int
    cgroup: Cgroup | None

    def argv(self, script: str, *args: str, user: User = ROOT) -> list[str]:
        # setpriv runs inside (after nsenter -r), from the read-only /.fleetctl
        argv = [
            self.nsenter, "-t", str(self.init_pid), "-a", "-r",
            *tools_argv("setpriv", *as_user(user), "--inh-caps=-all", BOUNDING_SET,
                        "--no-new-privs"),
            "/bin/sh", "-c", script, "sh", *args,
        ]  # fmt: skip
        return in_cgroup(self.cgroup, argv)

    @asynccontextmanager
    async def enter(self, script: str, *args: str, user: User = ROOT) -> AsyncIterator[Process]:
        """Run a shell script inside as `user` (the sandbox's root), capabilities dropped.

        The script sees only the base sandbox environment. The process leads its own
        process group, which is killed on exit from the block if still running
        (timeouts, cancelled requests).
        """
        process = await anyio.open_process(
            self.argv(script, *args, user=user),
            env=HOST_ENV,
            start_new_session=True,
            extra_groups=[],  # no host supplementary groups (gid 0) inside
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                kill_group(process.pid)
            with anyio.CancelScope(shield=True):
                await process.aclose()

    async def exec(
        self, env: Mapping[str, str], command: str, *, cwd: str, timeout: float, user: User
    ) -> ExecResult:
        """Run `command` in `cwd` as `user`; past `timeout` its process group is killed."""
        # eval in the shell that loaded the environment and changed directory (one exec
        # fewer than `sh -c`)
        script = f"{LOAD_ENV}; {IN_DIR}"
        async with self.enter(script, cwd, command, user=user) as process:
            out, err = Capture(), Capture()
            with anyio.move_on_after(timeout) as scope:
                async with anyio.create_task_group() as group:
                    assert process.stdout is not None
                    assert process.stderr is not None
                    group.start_soon(_collect, process.stdout, out)
                    group.start_soon(_collect, process.stderr, err)
                    if process.stdin is not None:
                        await process.stdin.send(env_lines(sandbox_env(env, user)))
                        await process.stdin.aclose()
                await process.wait()
            if scope.cancelled_caught:
                kill_group(process.pid)
                return out.result(err, -1, timed_out=True)
            return out.result(err, process.returncode or 0)

    @asynccontextmanager
    async def spawn(
        self, env: Mapping[str, str], argv: Sequence[str], *, cwd: str, stdin: bool, user: User
    ) -> AsyncIterator[Started]:
        """Start `argv` in `cwd` as `user`, its output on pipes (and its stdin, with `stdin`).

        The shell inside loads the environment, says its pid on the first line of stdout,
        changes directory and execs `argv`, so the pid is the command's own."""
        script = f"{LOAD_ENV}; {SPAWN_IN_DIR}"
        async with self.enter(script, cwd, *argv, user=user) as process:
            assert process.stdin is not None
            assert process.stdout is not None
            await process.stdin.send(env_lines(sandbox_env(env, user)))
            if not stdin:
                await process.stdin.aclose()
            said = await read_line(process.stdout)
            pid = int(said) if said.strip().isdigit() else 0
            yield Started(process, pid)

    async def put_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        script = f'{WORKDIR} mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        size = 0
        async with self.enter(script, path) as process:
            assert process.stdin is not None
            assert process.stderr is not None
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    await process.stdin.send(chunk)
                await process.stdin.aclose()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the writer exited early (cannot create the file): its stderr says why
            error = b"".join([chunk async for chunk in process.stderr])
            await process.wait()
        if process.returncode:
            raise FileRefused(f"cannot write {path}: {_first_line(error)}")
        return size

    @asynccontextmanager
    async def get_file(self, path: str) -> AsyncIterator[tuple[int, ByteReceiveStream]]:
        script = f'{WORKDIR} [ -f "$1" ] || exit {MISSING_FILE}; wc -c < "$1"; exec cat -- "$1"'
        async with self.enter(script, path) as process:
            assert process.stdout is not None
            header = await read_line(process.stdout)
            if not header.strip().isdigit():
                await process.wait()
                raise FileMissing(path)
            yield int(header), process.stdout

    async def read_file(self, path: str, offset: int, length: int) -> FileSlice:
        script = (
            f'{WORKDIR} [ -f "$1" ] || exit {MISSING_FILE}; s=$(wc -c < "$1"); o=$2; '
            '[ "$o" -lt 0 ] && o=$((s + o)); [ "$o" -lt 0 ] && o=0; '
            'printf "%s %s\\n" "$s" "$o"; tail -c +$((o + 1)) -- "$1" | head -c "$3"'
        )
        async with self.enter(script, path, str(offset), str(length)) as process:
            assert process.stdout is not None
            data = bytearray()
            async for chunk in process.stdout:
                data += chunk
            code = await process.wait()
        if code == MISSING_FILE:
            raise FileMissing(path)
        header, _, content = bytes(data).partition(b"\n")
        fields = header.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):  # e.g. unreadable
            raise FileRefused(f"cannot read {path}")
        return FileSlice(content, offset=int(fields[1]), total=int(fields[0]))


class Started:
    """A process started by `Entry.spawn` (implements `runtime.base.Spawned`)."""

    def __init__(self, process: Process, pid: int) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        self._process = process
        self.pid = pid
        self.stdin = process.stdin
        self.stdout: ByteReceiveStream = process.stdout
        self.stderr: ByteReceiveStream = process.stderr

    async def wait(self) -> int:
        code = await self._process.wait()
        return code if code >= 0 else 128 - code

    def signal(self, number: int) -> None:
        """nsenter forked the command into the sandbox's pid namespace: signal that child,
        not nsenter."""
        leader = self._process.pid
        with contextlib.suppress(OSError, ValueError, IndexError):
            child = int(Path(f"/proc/{leader}/task/{leader}/children").read_text().split()[0])
            os.kill(child, number)


#: Reads `env_lines` from stdin, up to the end marker; what follows is the command's.
LOAD_ENV = (
    "while IFS= read -r __fleetctl_line; do "
    '[ "$__fleetctl_line" = __env_end__ ] && break; eval "$__fleetctl_line"; done'
)


def env_lines(env: Mapping[str, str]) -> bytes:
    """Shell lines exporting `env`, one a variable, then the end marker `LOAD_ENV` stops at.

    Values are quoted so none is ever evaluated; one that holds a newline is written with
    printf escapes, so every variable stays on one line (and stdin after the marker is
    left to the command)."""
    lines = []
    for name, value in env.items():
        if "\n" in value:
            escaped = value.replace("\\", "\\\\").replace("\n", "\\n")
            # the X keeps the command substitution from eating trailing newlines
            lines.append(f'{name}="$(printf %bX {shlex.quote(escaped)})"; '
                         f'export {name}="${{{name}%X}}"')  # fmt: skip
        else:
            lines.append(f"export {name}={shlex.quote(value)}")
    return ("\n".join([*lines, "__env_end__"]) + "\n").encode()


def sandbox_env(extra: Mapping[str, str], user: User = ROOT) -> dict[str, str]:
    """The environment every process of a sandbox starts from, then `extra`."""
    return {"PATH": SANDBOX_PATH, "HOME": user.home, "LANG": "C.UTF-8", **extra}


def as_user(user: User) -> list[str]:
    """setpriv's options that switch to `user` (none for root: nsenter made it root)."""
    if user == ROOT:
        return []
    groups = f"--groups={','.join(map(str, user.groups))}" if user.groups else "--clear-groups"
    return [f"--reuid={user.uid}", f"--regid={user.gid}", groups]


def in_cgroup(cgroup: Cgroup | None, argv: list[str]) -> list[str]:
    """Prefix argv with a shell that moves itself into the cgroup before exec.

    Joining in the child (rather than writing the pid from the parent after
    spawn) means no forked descendant can escape the limits through a race.
    """
    if cgroup is None:
        return argv
    files = cgroup.procs_files
    joins = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(files)))
    return ["/bin/sh", "-c", f'{joins} && shift {len(files)} && exec "$@"', "sh", *files, *argv]


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


class Capture(bytearray):
    """A command's output stream, up to MAX_CAPTURE bytes (what comes after is dropped,
    and said)."""

    truncated = False

    def take(self, chunk: bytes) -> None:
        room = MAX_CAPTURE - len(self)
        self.truncated = self.truncated or len(chunk) > room
        self.extend(chunk[:room])

    def result(self, stderr: Capture, code: int, *, timed_out: bool = False) -> ExecResult:
        """The command's result, this being its stdout."""
        cut = {"stdout_truncated": self.truncated, "stderr_truncated": stderr.truncated}
        return ExecResult(code, bytes(self), bytes(stderr), timed_out=timed_out, **cut)


async def _collect(stream: Any, into: Capture) -> None:
    async for chunk in stream:
        into.take(chunk)


def _first_line(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip().splitlines()[0] if data.strip() else "failed"


async def read_line(stream: ByteReceiveStream) -> bytes:
    """Read one short header line byte by byte, leaving the rest of the stream unread."""
    line = bytearray()
    with contextlib.suppress(anyio.EndOfStream):
        while not line.endswith(b"\n"):
            line += await stream.receive(1)
    return bytes(line)
