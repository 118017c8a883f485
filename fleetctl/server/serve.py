"""The server process: assemble store, runtime, service and app, and serve them with uvicorn.

This is the composition root: the only module that names a concrete runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from fleetctl.server.app import create_app
from fleetctl.server.daemon import ServerError, api_token
from fleetctl.server.images.pull import Puller
from fleetctl.server.images.registry import Registry, RegistrySettings
from fleetctl.server.images.store import Store as ImageStore
from fleetctl.server.options import ServerOptions
from fleetctl.server.runtime.base import RuntimeFailure
from fleetctl.server.runtime.bwrap import BwrapRuntime
from fleetctl.server.runtime.bwrap.host import probe
from fleetctl.server.runtime.bwrap.network import Networks, host_resolvers
from fleetctl.server.service import SandboxService, Settings
from fleetctl.server.store import Store


def serve(options: ServerOptions, *, announce: bool = True) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM, then stop its sandboxes."""
    data_dir = options.directory
    with _exclusive(data_dir):
        try:
            networks = (
                None
                if options.insecure_host_network
                else Networks(options.sandbox_dns or host_resolvers())
            )
            runtime = BwrapRuntime(data_dir, probe(), networks)
        except RuntimeFailure as exc:
            raise ServerError(f"{exc} (`fleetctl doctor` explains)") from None
        keys = (api_token(data_dir), *(_key_from(path) for path in options.api_key_files))
        store = Store(data_dir / "state.db")
        settings = Settings(
            data_dir=data_dir,
            image_policy=options.image_policy,
            timeout_scale=options.timeout_scale,
        )
        registry = Registry(RegistrySettings.load(
            options.insecure_registries, options.registry_mirrors, os.environ))  # fmt: skip
        puller = Puller(ImageStore(data_dir / "images"), registry,
                        max_unpacked=int(options.image_max_gb * 2**30))  # fmt: skip
        service = SandboxService(store, runtime, settings, puller)
        try:
            app = create_app(service, keys, rate_limits=options.rate_limit, faults=options.faults,
                             command_session=options.command_session)  # fmt: skip
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
            puller.close()
            if networks is not None:
                networks.close()


def _key_from(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ServerError(f"cannot read the API key file {path}: {exc.strerror}") from None
    if not key:
        raise ServerError(f"the API key file {path} is empty")
    return key


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


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it a response written as
    # headers then body waits ~40 ms for the client's delayed ACK (Nagle).
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
