"""How a sandbox really runs: bubblewrap, a per-sandbox overlay root, cgroups.

A sandbox is a `bwrap --unshare-all --cap-drop ALL` process tree started under
`setpriv` as a host uid of the sandbox's own range, which its user namespace maps to
ids 0..65535 inside: root inside is an unprivileged user outside (host files owned by
root, like /etc/shadow, stay unreadable), and an image's user runs as itself.
Its root filesystem is an image's layers, or the host's /usr and /etc (with private
tmpfs /tmp, /root, /run), as read-only overlay lowers under a per-sandbox upper layer;
/workspace is the sandbox's own directory.

bwrap is started without --die-with-parent and in its own session, so a
sandbox outlives a server that crashed; the next server finds it through the
handle kept in the database. Commands and files go in through `inside.Entry`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path

from anyio.abc import ByteReceiveStream

from fleetctl.server.runtime.base import (
    ID_RANGE,
    ROOT,
    EgressPolicy,
    ExecResult,
    FileSlice,
    Handle,
    LaunchSpec,
    Layer,
    RuntimeFailure,
    Spawned,
    Usage,
    User,
)
from fleetctl.server.runtime.bwrap.cgroups import Cgroup
from fleetctl.server.runtime.bwrap.handle import (
    NEVER,
    SandboxHandle,
    abandon,
    exit_code,
    kill_pid,
    runs_with,
    send_signal,
    start_time,
    tree_bytes,
    until,
)
from fleetctl.server.runtime.bwrap.host import HostReport
from fleetctl.server.runtime.bwrap.idmap import mounts_under, unblock, unmount
from fleetctl.server.runtime.bwrap.inside import HOST_ENV, Entry, in_cgroup, sandbox_env
from fleetctl.server.runtime.bwrap.layout import (
    bwrap_args,
    check_traversable,
    copy_writable,
    install_bwrap,
    install_tools,
    layers_mounted,
    make_home,
    max_image_layers,
    nul_args,
    read_info,
    setenv_args,
)
from fleetctl.server.runtime.bwrap.netns import connect_in_netns
from fleetctl.server.runtime.bwrap.network import Networks, SandboxNet
from fleetctl.server.runtime.bwrap.warm import Unavailable, WarmPath

#: Host ids for sandboxes start here; each sandbox gets ID_RANGE of its own (by its seq),
#: above the single uids (1e9 to 1.1e9) of sandboxes started by older servers.
UID_BASE = 1_100_000_000
UID_SLOTS = (2**32 - 2 - UID_BASE) // ID_RANGE
Child = subprocess.Popen[bytes]
#: How this runtime keeps a sandbox with no main process of its own alive.
IDLE = "exec sleep infinity"


class BwrapRuntime:
    """Sandboxes on this machine, under `data_dir` (implements `runtime.base.Runtime`)."""

    def __init__(self, data_dir: Path, host: HostReport, networks: Networks | None) -> None:
        """`networks` None: sandboxes with network access share the host's (insecure)."""
        if not host.can_run or host.bwrap is None:
            raise RuntimeFailure("this host cannot run sandboxes: " + "; ".join(host.problems))
        self.host = host
        check_traversable(data_dir)
        self.root = data_dir / "sandboxes"
        self.meta = data_dir / "run"
        for path in (data_dir, self.root):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o711)  # traversable by sandbox uids, listable by root only
        self.meta.mkdir(mode=0o700, exist_ok=True)
        # logs outlive their sandbox (a failed start command must be explainable);
        # the service forgets them with the sandbox's record
        self.log_dir = data_dir / "logs"
        self.log_dir.mkdir(mode=0o700, exist_ok=True)
        self.checkpoints = data_dir / "checkpoints"
        self.checkpoints.mkdir(mode=0o700, exist_ok=True)
        self.bwrap = install_bwrap(data_dir, host.bwrap)
        self.tools = install_tools(data_dir, self.host_tool("setpriv"))
        self._children: dict[str, Child] = {}
        self.warm = WarmPath()
        self._stripes = [threading.Lock() for _ in range(64)]  # start/stop, by sandbox id
        self.networks = networks

    @property
    def can_limit(self) -> bool:
        return self.host.can_limit

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def log_path(self, sandbox_id: str) -> Path:
        return self.log_dir / f"{sandbox_id}.log"

    def forget(self, sandbox_id: str) -> None:
        self.log_path(sandbox_id).unlink(missing_ok=True)

    def append_log(self, sandbox_id: str, text: str) -> None:
        with open(self.log_path(sandbox_id), "a", encoding="utf-8") as log:
            log.write(text)

    def start(self, spec: LaunchSpec) -> Handle:
        """Start a sandbox and return once its main process runs (blocking). A `stop` of
        the same sandbox waits for it (or it for the stop): neither sees half the other."""
        with self._stripes[hash(spec.id) % len(self._stripes)]:
            return self._prepare(spec)

    def _prepare(self, spec: LaunchSpec) -> Handle:
        uid = UID_BASE + spec.seq % UID_SLOTS * ID_RANGE
        home, meta = self.sandbox_dir(spec.id), self.meta / spec.id
        meta.mkdir(mode=0o700, exist_ok=True)
        # its network namespace is made while its files are (undone by `stop` if need be)
        net = self.networks.setup(meta, spec) if spec.network and self.networks else None
        try:
            make_home(home, spec.image, uid, len(spec.layers))
            with layers_mounted(spec, home, uid):
                return self._start(spec, home, uid, net)
        except BaseException:  # e.g. deleted while starting: its network goes now
            if net is not None and self.networks is not None:
                futures.wait([net])
                self.networks.remove(meta)
            raise

    def _start(
        self, spec: LaunchSpec, home: Path, uid: int, net: futures.Future[SandboxNet] | None
    ) -> Handle:
        meta = self.meta / spec.id
        cgroup = None
        if spec.limits is not None:
            cgroup = Cgroup.for_sandbox(spec.id)
            cgroup.create(spec.limits)
        enter: list[str] = []
        resolvers: list[str] = []
        if net is not None and self.networks is not None:
            enter, resolvers = self.networks.wrap(net.result(), home, spec.egress)
        info_r, info_w = os.pipe()
        ready_r, ready_w = os.pipe()
        args_r, args_w = os.pipe()
        block_r, block_w = os.pipe()
        log = open(self.log_path(spec.id), "ab")  # noqa: SIM115 - handed to the child
        status = os.open(meta / "status.json", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        command = spec.start_command or IDLE
        # The main process says it runs (mounts done) on the ready pipe, then
        # closes it and becomes the start command. The pipe is handed over as
        # stdin because dash cannot name descriptors above 9.
        script = 'printf R >&0; exec </dev/null; exec /bin/sh -c "$0"'
        # bwrap runs as the host id its user becomes inside once the range is mapped
        user = spec.image.user if spec.image else ROOT
        groups = ",".join(str(uid + g) for g in user.groups)
        argv = [
            *enter, self.host_tool("setpriv"), f"--reuid={uid + user.uid}",
            f"--regid={uid + user.gid}", f"--groups={groups}" if groups else "--clear-groups",
            self.bwrap, "--userns-block-fd", str(block_r), "--args", str(args_r),
            "--info-fd", str(info_w), "--json-status-fd", str(status),
            "/bin/sh", "-c", script, command,
        ]  # fmt: skip
        child: Child | None = None
        try:
            with os.fdopen(args_w, "wb") as pairs:
                child = subprocess.Popen(
                    in_cgroup(cgroup, argv),
                    env=HOST_ENV,
                    stdin=ready_w,
                    stdout=log,
                    stderr=log,
                    pass_fds=(info_w, status, args_r, block_r),
                    start_new_session=True,
                )
                # bwrap's options (host paths) and the sandbox's environment (secrets
                # included, as --setenv pairs) reach it through a pipe: never in an argv
                # (`ps`, and /proc/1/cmdline inside) or a host process's environment.
                pairs.write(nul_args([*bwrap_args(spec, home, self.tools), *resolvers]))
                pairs.write(setenv_args(sandbox_env(spec.env, user)))
        except BaseException:
            for fd in (info_r, ready_r, block_w):
                os.close(fd)
            abandon(child, cgroup)
            raise
        finally:
            for fd in (info_w, ready_w, status, args_r, block_r):
                os.close(fd)
            log.close()
        with os.fdopen(info_r, "rb") as info_file, os.fdopen(ready_r, "rb") as ready_file:
            info = read_info(info_file)
            unblock(info, uid, child, block_w, self.host_tool("nsenter"),
                    lambda text: self.append_log(spec.id, text))  # fmt: skip
            ready = ready_file.read(1)
        if ready != b"R":
            abandon(child, cgroup)
            raise RuntimeFailure(f"sandbox failed to start: {self.logs(spec.id, 400)}")
        init_pid = int(info["child-pid"])
        self._children[spec.id] = child
        try:
            init_start = start_time(init_pid)
        except OSError:  # it ran and already ended (`exit 3`): started, and not alive
            init_start = NEVER
        return SandboxHandle(
            id=spec.id,
            uid=uid,
            bwrap_pid=child.pid,
            init_pid=init_pid,
            init_start=init_start,
            cgroup_version=cgroup.version if cgroup else None,
            cgroup_paths=tuple(str(p) for p in cgroup.paths) if cgroup else (),
        ).to_json()

    def set_egress(self, sandbox_id: str, egress: EgressPolicy | None) -> None:
        if self.networks is None:
            raise RuntimeFailure("sandboxes of this server share its network (started with "
                                 "--insecure-host-network): no egress policy applies")  # fmt: skip
        net = self.networks.set_egress(self.meta / sandbox_id, egress)
        self.networks.write_resolv(self.sandbox_dir(sandbox_id) / "resolv.conf", net, egress)

    def egress_denied(self, sandbox_id: str) -> int:
        return self.networks.denied(self.meta / sandbox_id) if self.networks else 0

    @property
    def network_problem(self) -> str | None:
        return self.networks.problem if self.networks else None

    @property
    def filters_egress(self) -> bool:
        return self.networks is not None

    def usage(self, handle: Handle) -> Usage:
        found = SandboxHandle.from_json(handle)
        alive = self._alive(found)
        oom_kills = found.cgroup.oom_kills() if found.cgroup else 0
        code = None if alive else exit_code(self.meta / found.id / "status.json")
        return Usage(alive, oom_kills, code)

    def runs_with(self, handle: Handle, env_entry: str) -> bool:
        return runs_with(SandboxHandle.from_json(handle).init_pid, env_entry.encode())

    def _alive(self, handle: SandboxHandle) -> bool:
        """True while the sandbox's init process (pid 1 inside) is the one we started."""
        child = self._children.get(handle.id)
        if child is not None and child.poll() is not None:
            return False
        try:
            return start_time(handle.init_pid) == handle.init_start
        except OSError:
            return False

    def adopt(self, handle: Handle) -> dict[str, str] | None:
        """The environment (secrets included) of a sandbox still running, read back from
        its main process after a server restart; never stored anywhere by the server."""
        found = SandboxHandle.from_json(handle)
        if not self._alive(found):
            return None
        if self.networks is not None:
            self.networks.adopt(self.meta / found.id)
        try:
            children = Path(f"/proc/{found.init_pid}/task/{found.init_pid}/children").read_text()
            raw = Path(f"/proc/{children.split()[0]}/environ").read_bytes()
        except (OSError, IndexError):
            return {}
        pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
        return {k.decode(): v.decode("utf-8", "replace") for k, _, v in pairs}

    def disk_usage(self, sandbox_id: str) -> int:
        """Bytes the sandbox wrote: its upper layer and /workspace (blocks actually used)."""
        home = self.sandbox_dir(sandbox_id)
        return tree_bytes(home / "upper") + tree_bytes(home / "workspace")

    def checkpoint(self, sandbox_id: str, handle: Handle, checkpoint_id: str) -> tuple[Layer, int]:
        found = SandboxHandle.from_json(handle)
        home, into = self.sandbox_dir(sandbox_id), self.checkpoints / checkpoint_id
        into.mkdir(parents=True)
        (into / "upper").mkdir()
        paused = found.cgroup.pids() if found.cgroup else set()
        for pid in paused:  # a consistent copy: nothing writes while it is taken
            send_signal(pid, signal.SIGSTOP)
        try:
            copy_writable(home, into, self.host_tool("cp"))
        finally:
            for pid in paused:
                send_signal(pid, signal.SIGCONT)
        return {"path": str(into), "owner": found.uid}, tree_bytes(into)

    def drop_layer(self, layer: Layer) -> None:
        path = Path(layer["path"])
        if path.parent == self.checkpoints:  # never anything else
            shutil.rmtree(path, ignore_errors=True)

    def kill(self, handle: Handle) -> None:
        self._kill(SandboxHandle.from_json(handle))

    def _kill(self, handle: SandboxHandle) -> None:
        if self._alive(handle):
            kill_pid(handle.bwrap_pid)
            kill_pid(handle.init_pid)

    def stop(self, sandbox_id: str, handle: Handle | None) -> None:
        with self._stripes[hash(sandbox_id) % len(self._stripes)]:
            self._stop(sandbox_id, handle)

    def _stop(self, sandbox_id: str, handle: Handle | None) -> None:
        self.warm.drop(sandbox_id)
        found = SandboxHandle.from_json(handle) if handle else None
        if found is not None:
            self._kill(found)
        cgroup = found.cgroup if found else Cgroup.existing(sandbox_id)
        if cgroup is not None:
            until(cgroup.remove)
        child = self._children.pop(sandbox_id, None)
        if child is not None:
            child.kill()
            child.wait()
        if self.networks is not None:
            self.networks.remove(self.meta / sandbox_id)
        home = self.sandbox_dir(sandbox_id)
        for mounted in mounts_under(home):  # a start cut short by a crash left its layers
            unmount(mounted)
        if mounts_under(home):  # removing through a mount would delete a checkpoint's files
            raise RuntimeFailure(f"cannot unmount what is mounted under {home}")
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(self.meta / sandbox_id, ignore_errors=True)

    def logs(self, sandbox_id: str, limit: int) -> str:
        try:
            with open(self.log_path(sandbox_id), "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - limit))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def leftovers(self) -> set[str]:
        return {p.name for p in self.root.iterdir()} | {p.name for p in self.meta.iterdir()}

    def max_image_layers(self) -> int:
        return max_image_layers(self.root)

    def host_tool(self, name: str) -> str:
        """Absolute path of a host tool (never looked up through a caller's PATH)."""
        found = {"nsenter": self.host.nsenter, "setpriv": self.host.setpriv}.get(name)
        path = found or shutil.which(name, path=HOST_ENV["PATH"])
        if path is None:
            raise RuntimeFailure(f"{name} is not installed on this host")
        return path

    def _entry(self, handle: Handle) -> Entry:
        found = SandboxHandle.from_json(handle)
        return Entry(self.host_tool("nsenter"), found.init_pid, found.cgroup)

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
        found = SandboxHandle.from_json(handle)
        with contextlib.suppress(Unavailable):  # then the cold path: it was never started
            sandbox = (found.id, found.init_pid, found.cgroup)
            return await self.warm.exec(sandbox, env, command, cwd=cwd, timeout=timeout, user=user)
        return await self._entry(handle).exec(env, command, cwd=cwd, timeout=timeout, user=user)

    async def run_job(
        self, handle: Handle, env: Mapping[str, str], command: str, *, cwd: str, user: User
    ) -> int:
        """Through the sandbox's exec helper (waited for), which can leave it running: on
        the cold path (no helper to be had), a server that stops kills it."""
        found = SandboxHandle.from_json(handle)
        sandbox, forever = (found.id, found.init_pid, found.cgroup), float("inf")
        if await self.warm.ready(sandbox):
            with contextlib.suppress(Unavailable):
                done = await self.warm.exec(sandbox, env, command, cwd=cwd, timeout=forever,
                                            user=user, detached=True)  # fmt: skip
                return done.exit_code
        done = await self._entry(handle).exec(env, command, cwd=cwd, timeout=forever, user=user)
        return done.exit_code

    @asynccontextmanager
    async def spawn(
        self,
        handle: Handle,
        env: Mapping[str, str],
        argv: Sequence[str],
        *,
        cwd: str,
        stdin: bool,
        user: User = ROOT,
    ) -> AsyncIterator[Spawned]:
        found = SandboxHandle.from_json(handle)
        with contextlib.suppress(Unavailable):  # raised only before it is entered
            async with self.warm.spawn((found.id, found.init_pid, found.cgroup), env, argv,
                                       cwd=cwd, stdin=stdin, user=user) as process:  # fmt: skip
                yield process
                return
        async with self._entry(handle).spawn(env, argv, cwd=cwd, stdin=stdin, user=user) as cold:
            yield cold

    async def put_file(self, handle: Handle, path: str, chunks: AsyncIterable[bytes]) -> int:
        return await self._entry(handle).put_file(path, chunks)

    @asynccontextmanager
    async def get_file(
        self, handle: Handle, path: str
    ) -> AsyncIterator[tuple[int, ByteReceiveStream]]:
        async with self._entry(handle).get_file(path) as found:
            yield found

    async def read_file(self, handle: Handle, path: str, offset: int, length: int) -> FileSlice:
        return await self._entry(handle).read_file(path, offset, length)

    def connect(self, handle: Handle, port: int) -> socket.socket:
        return connect_in_netns(SandboxHandle.from_json(handle).init_pid, port)
