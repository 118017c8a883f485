"""The runtime seam: what the sandbox service needs from whatever really runs sandboxes.

The service (lifecycle, monitor, data plane, adoption) talks to a runtime only
through `Runtime`; bubblewrap on this machine (`runtime.bwrap`) is one
implementation, and a cluster runtime can be another without the service
changing. A runtime knows nothing of HTTP, the store or the API's records.

A `Handle` is what a runtime needs to find a sandbox again: JSON data (no
secrets) that the service keeps in the sandbox's record and hands back on every
call, so sandboxes can be found after a server restart. Only the runtime reads it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from anyio.abc import ByteReceiveStream, ByteSendStream

Handle = Mapping[str, Any]
#: What a runtime needs to stack a checkpoint under a new sandbox again (JSON, opaque to
#: the service, kept in the checkpoint's record).
Layer = Mapping[str, Any]


#: How many checkpoints may stand on top of each other (each one an overlay lower layer).
MAX_CHECKPOINT_DEPTH = 16


class RuntimeFailure(Exception):
    """A sandbox could not be started or reached; the message says why."""


class CommandLost(RuntimeFailure):
    """A command was started and then lost track of (its exec helper died under it): it
    may have run, and was killed; the message names nothing of the host."""


class FileMissing(Exception):
    """The file asked for does not exist in the sandbox."""


class FileRefused(Exception):
    """The sandbox cannot write or read that path; the message says why."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int
    cpu_cores: float
    pids: int


#: User and group ids a sandbox has (0 to ID_RANGE - 1), as in a container.
ID_RANGE = 65536


@dataclass(frozen=True, slots=True)
class User:
    """Whom a process in a sandbox runs as, in the sandbox's own ids."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    home: str = "/root"

    def encode(self) -> str:
        """`uid:gid:groups:home`, as a sandbox's record keeps it (passwd fields hold no
        colon)."""
        return f"{self.uid}:{self.gid}:{','.join(map(str, self.groups))}:{self.home}"

    @classmethod
    def decode(cls, text: str) -> User:
        uid, gid, groups, home = text.split(":", 3)
        return cls(int(uid), int(gid), tuple(int(g) for g in groups.split(",") if g), home)


ROOT = User()


@dataclass(frozen=True, slots=True)
class ImageLayers:
    """An image's unpacked layers: directories named `layers` (bottom first) under `store`,
    whose files belong to host root; `workdir` is where its commands start (None:
    /workspace), `user` whom its start command and commands run as."""

    store: Path
    layers: tuple[str, ...]
    workdir: str | None = None
    user: User = ROOT


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Where a networked sandbox may connect: only to `entries` (allow), or anywhere but
    them (deny); entries as `fleetctl.egress` defines them."""

    mode: Literal["allow", "deny"]
    entries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What to start. `env` holds environment variables and secrets; it is never stored.
    `start_command` None keeps the sandbox idle. `image` None: the host's root filesystem.
    `layers`: checkpoints to start from, oldest first (their files under the sandbox's own
    writable layer and workspace)."""

    id: str
    seq: int
    start_command: str | None
    env: Mapping[str, str]
    network: bool
    limits: Limits | None
    image: ImageLayers | None
    layers: tuple[Layer, ...] = ()
    egress: EgressPolicy | None = None


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    #: Output past the first 16 MiB of a stream was dropped.
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """A running sandbox's state, read cheaply (the monitor asks often)."""

    alive: bool
    oom_kills: int
    exit_code: int | None = None  # of the main process, once it ended


@dataclass(frozen=True, slots=True)
class FileSlice:
    """Part of a file: `content` starts at `offset` of a file of `total` bytes."""

    content: bytes
    offset: int
    total: int


class Spawned(Protocol):
    """A process running inside a sandbox, as `Runtime.spawn` gives it."""

    @property
    def pid(self) -> int:
        """Its pid inside the sandbox."""
        ...

    @property
    def stdin(self) -> ByteSendStream | None: ...

    @property
    def stdout(self) -> ByteReceiveStream: ...

    @property
    def stderr(self) -> ByteReceiveStream: ...

    async def wait(self) -> int:
        """Its exit code once it ended; 128 + N when signal N ended it."""
        ...

    def signal(self, number: int) -> None:
        """Send signal `number` to the process (not to what it started)."""
        ...


class Runtime(Protocol):
    """Starts, enters and removes sandboxes. Blocking methods are called from a worker
    thread; async ones on the event loop."""

    @property
    def can_limit(self) -> bool:
        """True when cpu, memory and process limits are enforced."""
        ...

    def start(self, spec: LaunchSpec) -> Handle:
        """Start a sandbox; return once its main process runs (blocking)."""
        ...

    def stop(self, sandbox_id: str, handle: Handle | None) -> None:
        """Kill everything of the sandbox and remove what it holds on the host (blocking).
        Without a handle (a start cut short) the sandbox is found by its id."""
        ...

    def kill(self, handle: Handle) -> None:
        """Kill the sandbox's processes out of band, as a crashed node would."""
        ...

    def adopt(self, handle: Handle) -> dict[str, str] | None:
        """After a server restart: the environment of a sandbox still running, or None
        when it is gone."""
        ...

    def usage(self, handle: Handle) -> Usage: ...

    def runs_with(self, handle: Handle, env_entry: str) -> bool:
        """True while a process of the sandbox has `env_entry` (NAME=value) in its
        environment (blocking)."""
        ...

    def disk_usage(self, sandbox_id: str) -> int:
        """Bytes the sandbox wrote (blocking; may walk its files)."""
        ...

    async def exec(
        self,
        handle: Handle,
        env: Mapping[str, str],
        command: str,
        *,
        cwd: str,
        timeout: float,
        user: User = ROOT,
    ) -> ExecResult:
        """Run a shell command as `user`; past `timeout`, kill it and everything it started
        and answer `timed_out`."""
        ...

    async def run_job(
        self, handle: Handle, env: Mapping[str, str], command: str, *, cwd: str, user: User
    ) -> int:
        """Run a background job's shell command to its end: its exit code. Cancelled (the
        server stopping), the command runs on where the runtime can leave it running."""
        ...

    def spawn(
        self,
        handle: Handle,
        env: Mapping[str, str],
        argv: Sequence[str],
        *,
        cwd: str,
        stdin: bool,
        user: User = ROOT,
    ) -> AbstractAsyncContextManager[Spawned]:
        """Start `argv` as `user`, streaming its output; leaving the block kills it and
        everything it started, if still running."""
        ...

    async def put_file(self, handle: Handle, path: str, chunks: AsyncIterable[bytes]) -> int:
        """Write `chunks` to `path` (parents made); the bytes written. Raises FileRefused."""
        ...

    def get_file(
        self, handle: Handle, path: str
    ) -> AbstractAsyncContextManager[tuple[int, ByteReceiveStream]]:
        """(size, stream) of a file. Raises FileMissing."""
        ...

    async def read_file(self, handle: Handle, path: str, offset: int, length: int) -> FileSlice:
        """`length` bytes from `offset` (negative: from the end). Raises FileMissing or
        FileRefused."""
        ...

    def checkpoint(self, sandbox_id: str, handle: Handle, checkpoint_id: str) -> tuple[Layer, int]:
        """Freeze the sandbox's writable layer and workspace (the sandbox paused while it
        is copied) as a layer that new sandboxes can start from; the layer and its size
        in bytes (blocking)."""
        ...

    def drop_layer(self, layer: Layer) -> None:
        """Remove a checkpoint's files (blocking)."""
        ...

    def connect(self, handle: Handle, port: int) -> socket.socket:
        """A connection to 127.0.0.1:`port` inside the sandbox (blocking): exposures."""
        ...

    def append_log(self, sandbox_id: str, text: str) -> None:
        """Add a line of the server's own to the sandbox's log."""
        ...

    def logs(self, sandbox_id: str, limit: int) -> str:
        """The last `limit` bytes of the sandbox's log (its start command's output)."""
        ...

    def forget(self, sandbox_id: str) -> None:
        """Remove what outlives a stopped sandbox (its log)."""
        ...

    def leftovers(self) -> set[str]:
        """Ids of sandboxes that have something on the host, e.g. left by a killed server."""
        ...

    def max_image_layers(self) -> int:
        """How many image layers one sandbox can stack (more are merged first)."""
        ...

    @property
    def network_problem(self) -> str | None:
        """Why sandboxes with network access cannot be started here (None: they can)."""
        ...

    @property
    def filters_egress(self) -> bool:
        """True when egress lists are enforced (sandboxes do not share the host's network)."""
        ...

    def set_egress(self, sandbox_id: str, egress: EgressPolicy | None) -> None:
        """Replace a running sandbox's egress policy (blocking); RuntimeFailure when it has
        no network of its own."""
        ...

    def egress_denied(self, sandbox_id: str) -> int:
        """Connections the sandbox was refused by its egress policy and the blocked ranges."""
        ...
