"""The local server as a background process: start, find, stop, restart; the API token.

The data dir holds everything the server keeps: `state.db`, the API `token`
(0600, unless FLEETCTL_SERVER_TOKEN is set), `server.json` (pid and URL of the
running server), `server.log`, and the sandboxes' own directories.

`local_context` is the SDK's provider of the `local` context (registered as an
entry point). Nothing here loads FastAPI or uvicorn: the server process itself
runs `fleetctl.server.serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleetctl.errors import FleetError
from fleetctl.server.options import ServerOptions, default_data_dir, restart_marker

TOKEN_ENV = "FLEETCTL_SERVER_TOKEN"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0


class ServerError(FleetError):
    """The local server cannot be started, reached or stopped; the message says why."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    pid: int
    url: str


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
    argv = [sys.executable, "-m", "fleetctl", "server", *options.argv()]
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
        restart_marker(data_dir).touch()
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


def local_context(api_key: str | None) -> tuple[str, str]:
    """The SDK's `local` context: the server of the default data dir, started in the
    background (saying so on stderr) when none answers; returns (URL, API key)."""
    data_dir = default_data_dir()
    info = running(data_dir)
    if info is None:
        try:
            info = start_background(ServerOptions(data_dir=data_dir))
        except ServerError:
            # the default port may be taken (another data dir's server): any free one
            # will do, since clients find the server through the data dir
            info = start_background(ServerOptions(data_dir=data_dir, port=0))
        print(
            f"fleetctl: started the local sandbox server on {info.url} (data dir {data_dir})",
            file=sys.stderr,
        )
    return info.url, api_key or api_token(data_dir)
