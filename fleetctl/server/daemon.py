"""Running the local server: in the foreground, or in the background with a pid file.

The data dir holds everything the server keeps: `state.db`, the API `token`
(0600, unless FLEETCTL_SERVER_TOKEN is set), `server.json` (pid and URL of the
running server), `server.log`, and the sandboxes' own directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from fleetctl.errors import FleetError
from fleetctl.server.app import create_app
from fleetctl.server.runtime.host import probe
from fleetctl.server.runtime.sandbox import Runtime, RuntimeFailure
from fleetctl.server.service import ImagePolicy, SandboxService, Settings
from fleetctl.server.store import Store

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7431
TOKEN_ENV = "FLEETCTL_SERVER_TOKEN"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0


class ServerError(FleetError):
    """The local server cannot be started, reached or stopped; the message says why."""


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path | None = None
    image_policy: ImagePolicy = "host"
    rate_limit: str = ""
    faults: str = ""
    timeout_scale: float = 1.0

    @property
    def directory(self) -> Path:
        return self.data_dir or default_data_dir()


@dataclass(frozen=True, slots=True)
class ServerInfo:
    pid: int
    url: str


def default_data_dir() -> Path:
    """FLEETCTL_DATA_DIR, else /var/lib/fleetctl for root, else ~/.local/share/fleetctl.

    Root's default is outside /root on purpose: sandbox uids must traverse it.
    """
    if "FLEETCTL_DATA_DIR" in os.environ:
        return Path(os.environ["FLEETCTL_DATA_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/fleetctl")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fleetctl"


def api_token(data_dir: Path) -> str:
    """The API key: FLEETCTL_SERVER_TOKEN when set, else one kept in the data dir (0600)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = data_dir / "token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "server.lock", "w")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ServerError(
            f"another fleetctl server already uses {data_dir}; `fleetctl server status` "
            "shows it, `fleetctl server stop` stops it"
        ) from None
    try:
        yield
    finally:
        lock.close()


def serve(options: ServerOptions, *, announce: bool = True) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM, then stop its sandboxes."""
    data_dir = options.directory
    with _exclusive(data_dir):
        try:
            runtime = Runtime(data_dir, probe())
        except RuntimeFailure as exc:
            raise ServerError(f"{exc} (`fleetctl doctor` explains)") from None
        store = Store(data_dir / "state.db")
        settings = Settings(
            data_dir=data_dir,
            image_policy=options.image_policy,
            timeout_scale=options.timeout_scale,
        )
        service = SandboxService(store, runtime, settings)
        try:
            app = create_app(
                service, api_token(data_dir), rate_limits=options.rate_limit, faults=options.faults
            )
        except ValueError as exc:
            raise ServerError(str(exc)) from None
        sock = _bind(options.host, options.port)
        url = f"http://{_url_host(options.host)}:{sock.getsockname()[1]}"
        info = data_dir / "server.json"
        info.write_text(json.dumps({"pid": os.getpid(), "url": url}))
        if announce:
            print(f"fleetctl server listening on {url} (data dir {data_dir})", flush=True)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=30
        )
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            info.unlink(missing_ok=True)
            store.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it a response written as
    # headers then body waits ~40 ms for the client's delayed ACK (Nagle).
    if family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def running(data_dir: Path) -> ServerInfo | None:
    """The server recorded in the data dir, if its process is alive and answers."""
    try:
        data = json.loads((data_dir / "server.json").read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    info = ServerInfo(int(data["pid"]), str(data["url"]))
    return info if healthy(info.url) else None


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start_background(options: ServerOptions) -> ServerInfo:
    """Start the server detached from this terminal; return once it answers."""
    data_dir = options.directory
    existing = running(data_dir)
    if existing is not None:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "fleetctl",
        "server",
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--data-dir",
        str(data_dir),
        "--image-policy",
        options.image_policy,
    ]
    if options.rate_limit:
        argv += ["--rate-limit", options.rate_limit]
    if options.faults:
        argv += ["--faults", options.faults]
    if options.timeout_scale != 1.0:
        argv += ["--timeout-scale", str(options.timeout_scale)]
    # posix_spawn, not Popen: the server outlives this process, which must
    # neither wait for it nor hold an object that warns when it is collected.
    with open(data_dir / "server.log", "ab") as log, open(os.devnull, "rb") as null:
        pid = os.posix_spawn(
            sys.executable,
            argv,
            dict(os.environ),
            setsid=True,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null.fileno(), 0),
                (os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, log.fileno(), 2),
            ],
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = running(data_dir)
        if info is not None and info.pid == pid:
            return info
        if not _alive(pid):
            raise ServerError(f"the server exited at start; see {data_dir / 'server.log'}")
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    raise ServerError(
        f"the server did not answer within {START_TIMEOUT_S:.0f}s; see {data_dir / 'server.log'}"
    )


def restart(options: ServerOptions) -> ServerInfo:
    """Stop the background server without stopping its sandboxes, and start it again:
    the new server adopts every sandbox still running (e.g. after an upgrade)."""
    data_dir = options.directory
    if running(data_dir) is not None:
        (data_dir / "restarting").touch()
        stop(data_dir)
    return start_background(options)


def stop(data_dir: Path) -> ServerInfo | None:
    """Stop the background server (it stops and removes all its sandboxes first)."""
    try:
        data = json.loads((data_dir / "server.json").read_text())
        pid = int(data["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        return None
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return ServerInfo(pid, str(data["url"]))
        time.sleep(0.05)
    raise ServerError(f"the server (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f}s")


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child (started from this process)
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
