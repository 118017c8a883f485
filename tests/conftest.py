"""Fixtures shared by every test package: a real local server with real sandboxes.

The session's server runs as a subprocess on a free loopback port with its own
data dir; tests create sandboxes through `sandboxes` (deleted after each test)
and poll with deadlines, never sleeps. At the end the server is stopped and
the host is checked for anything it left behind.

Every server the tests start accepts a second API key, the oracle's (`control`
uses it): what the tests observe through it is rate-limited and fault-counted
apart from the client under test.

Under CI=true, a host that cannot run sandboxes fails the run with the reason,
instead of skipping every test that needs one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from fleetctl.cli import main
from fleetctl.sandboxes import APIClient, SandboxClient
from fleetctl.server.asgi import key_id
from fleetctl.server.runtime.bwrap.host import probe
from tests.network.fakenet import netns_names

#: The official clients' suite runs in venvs of its own (tests/server/test_official_clients.py).
collect_ignore = ["official"]
#: Every server a test starts (the CLI's too) runs images on the host's root filesystem and
#: never reaches for a registry on the internet; tests/images/ runs its own with a registry.
os.environ.setdefault("FLEETCTL_IMAGE_POLICY", "host")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-long",
        action="store_true",
        default=False,
        help="run the reliability scenarios at full size (10 rounds of 100 sandboxes)",
    )


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def pytest_sessionstart(session: pytest.Session) -> None:
    report = probe()
    if os.environ.get("CI") == "true" and not report.can_run:
        raise pytest.UsageError(
            "CI=true, and this host cannot run sandboxes, so the sandbox tests would be "
            "skipped: " + "; ".join(report.problems)
        )


needs_sandboxes = pytest.mark.skipif(
    not probe().can_run, reason="this host cannot run sandboxes (see fleetctl doctor)"
)


#: The rest of an exec's answer when no output was cut.
WHOLE = {"stdout_truncated": False, "stderr_truncated": False}


@dataclass(frozen=True)
class Server:
    url: str
    token: str
    data_dir: Path
    pid: int
    #: A second API key the server accepts: the oracle's, see `control`.
    oracle_token: str = ""

    def client(self, *, oracle: bool = False, **kwargs: Any) -> httpx.Client:
        token = self.oracle_token if oracle else self.token
        return httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            **kwargs,
        )


def start_server(
    data_dir: Path, *extra: str, env: Mapping[str, str] | None = None
) -> tuple[Server, subprocess.Popen[bytes]]:
    """Start `fleetctl server` on a free port (with `env` added to its environment);
    return once it answers /health."""
    data_dir.mkdir(parents=True, exist_ok=True)
    oracle_key = data_dir.parent / f"{data_dir.name}.oracle-key"
    if not oracle_key.exists():
        oracle_key.write_text(f"oracle-{os.urandom(16).hex()}\n")
    argv = ["server", "--port", "0", "--data-dir", str(data_dir),
            "--api-key-file", str(oracle_key), *extra]  # fmt: skip
    with open(data_dir.parent / f"{data_dir.name}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetctl", *argv],
            stdout=log,
            stderr=log,
            env={**os.environ, "FLEETCTL_SERVER_TOKEN": "", **(env or {})},
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, (data_dir.parent / f"{data_dir.name}.log").read_text()
        try:
            info = json.loads((data_dir / "server.json").read_text())
            token = (data_dir / "token").read_text().strip()
            if httpx.get(f"{info['url']}/api/v1/health", timeout=2).status_code == 200:
                oracle = oracle_key.read_text().strip()
                return Server(info["url"], token, data_dir, process.pid, oracle), process
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError("server did not start within 30s")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`fleetctl ARGV` in this process: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def control(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One control-plane call by the oracle: its own API key, retried through injected 5xx,
    429s, resets and garbled answers, so it never shares a retry bug with the SDK under
    test. Every answer of the control plane is JSON."""
    deadline = time.monotonic() + 30
    with server.client(oracle=True) as client:
        while True:
            with contextlib.suppress(httpx.TransportError, ValueError):
                response = client.request(method, path, **kwargs)
                if response.is_success:
                    response.json()  # a garbled answer (fault `after`) raises: ask again
                if response.status_code < 500 and response.status_code != 429:
                    return response
            assert time.monotonic() < deadline, f"{method} {path} kept failing for 30s"
            time.sleep(0.02)


def faults(server: Server, *, everyone: bool = False) -> dict[str, int]:
    """What the server's fault injection did to the client under test (the API key
    `server.token`), or, with `everyone`, to every request, the oracle's included."""
    stats = control(server, "GET", "/_fleetctl/faults").json()
    if everyone:
        return dict(stats["total"])
    return dict(stats["by_key"].get(key_id(server.token), {}))


async def acontrol(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """`control` from async code (on a worker thread)."""
    return await anyio.to_thread.run_sync(lambda: control(server, method, path, **kwargs))


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def sandbox_namespaces() -> set[str]:
    """The network namespaces of sandboxes on this host (any server's)."""
    return {n for n in netns_names() if n.startswith("fleetctl-")}


def sandbox_rules() -> set[str]:
    """The per-sandbox chains and sets of the host's sandbox table (`nft`), by name."""
    listed = subprocess.run(["nft", "-t", "list", "table", "inet", "fleetctl_v1"],
                            capture_output=True, text=True, check=False).stdout  # fmt: skip
    words = (line.split() for line in listed.splitlines())
    return {w[1] for w in words if len(w) > 1 and w[0] in ("chain", "set") and "fcv" in w[1]}


def orphans(before: tuple[set[str], set[str]]) -> tuple[set[str], set[str]]:
    """What appeared since `before` and belongs to no live sandbox (any server's, another
    test session's too): namespaces no process runs in, rules whose slot has none."""
    names = {n for n in sandbox_namespaces() - before[0]
             if not subprocess.run(["ip", "netns", "pids", n], capture_output=True,
                                   text=True, check=False).stdout.strip()}  # fmt: skip
    slots = {f"fcv{n.split('-')[1]}" for n in sandbox_namespaces()}
    rules = {r for r in sandbox_rules() - before[1] if r.rpartition("_")[2] not in slots}
    return names, rules


@pytest.fixture(scope="session", autouse=True)
def nothing_left_on_the_network() -> Iterator[None]:
    """Every sandbox namespace, chain and set the session's servers made is gone at its
    end (torn down after them). What is left fails the run, and is removed."""
    before = (sandbox_namespaces(), sandbox_rules())
    yield
    deadline = time.monotonic() + 3  # another session's sandbox may be mid-start or -stop
    while (left := orphans(before)) != (set(), set()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name in left[0]:
        link = f"fcv{name.split('-')[1]}"
        subprocess.run(["nft", f"delete element inet fleetctl_v1 sandboxes {{ {link} }}"],
                       capture_output=True, check=False)  # fmt: skip
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
    for name in sorted(left[1], key=lambda n: not n.startswith("s_")):  # chains first
        kind = "chain" if name.startswith("s_") else "set"
        subprocess.run(["nft", "delete", kind, "inet", "fleetctl_v1", name],
                       capture_output=True, check=False)  # fmt: skip
    assert left == (set(), set()), f"left behind on the host's network: {left}"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not probe().can_run:
        pytest.skip("this host cannot run sandboxes (see fleetctl doctor)")
    with traversable_dir() as base:
        data_dir = base / "data"
        info, process = start_server(data_dir)
        try:
            yield info
        finally:
            stop_server(process)
            log = (base / "data.log").read_text()
            if "Traceback" in log:  # shown with the session's output, kept for diagnosis
                print(f"server log of the session:\n{log}")
        assert not list((data_dir / "sandboxes").glob("*")), "server stop left sandbox dirs"


@contextlib.contextmanager
def own_server(
    *flags: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[Server, subprocess.Popen[bytes]]]:
    """A server of a test's own on a fresh data dir, stopped by its PID after (unless the
    test already killed it); its stop must leave no sandbox behind."""
    if not probe().can_run:
        pytest.skip("this host cannot run sandboxes (see fleetctl doctor)")
    with traversable_dir() as base:
        info, process = start_server(base / "data", *flags, env=env)
        stopped_here = False
        try:
            yield info, process
        finally:
            if process.poll() is None:
                stop_server(process)
                stopped_here = True
        if stopped_here:
            assert not list((info.data_dir / "sandboxes").glob("*")), "server stop left sandboxes"


@contextlib.contextmanager
def traversable_dir() -> Iterator[Path]:
    """A temp dir sandbox uids can traverse (pytest's own base is 0700), removed after."""
    path = Path(tempfile.mkdtemp(prefix="fleetctl-test-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


Create = Callable[..., dict[str, Any]]


@pytest.fixture
def sandboxes(api: httpx.Client) -> Iterator[Create]:
    """Create sandboxes (POST body fields as keyword arguments); all deleted after the test."""
    made: list[str] = []

    def create(**fields: Any) -> dict[str, Any]:
        body = {"name": "test", "docker_image": "python:3.11-slim", "memory_gb": 0.5, **fields}
        response = api.post("/sandbox", json=body)
        assert response.status_code == 200, response.text
        made.append(response.json()["id"])
        return dict(response.json())

    yield create
    if made:
        api.request("DELETE", "/sandbox", json={"sandbox_ids": made})


def wait_for(
    api: httpx.Client, sandbox_id: str, *statuses: str, timeout: float = 30
) -> dict[str, Any]:
    """Poll until the sandbox has one of `statuses`; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        record = dict(api.get(f"/sandbox/{sandbox_id}").json())
        if record["status"] in statuses:
            return record
        assert record["status"] not in ("TERMINATED", "ERROR", "TIMEOUT"), record
        assert time.monotonic() < deadline, f"still {record['status']} after {timeout}s: {record}"
        time.sleep(0.02)


@dataclass(frozen=True)
class Gateway:
    """The data plane of one sandbox, authenticated with its gateway token."""

    client: httpx.Client

    def exec(self, command: str, **fields: Any) -> httpx.Response:
        return self.client.post("exec", json={"command": command, **fields})


Connect = Callable[[str], Gateway]
Running = Callable[..., tuple[dict[str, Any], Gateway]]


@pytest.fixture
def gateway(api: httpx.Client) -> Iterator[Connect]:
    """Open the data plane of a sandbox by id (clients closed after the test)."""
    opened: list[httpx.Client] = []

    def connect(sandbox_id: str) -> Gateway:
        auth = api.post(f"/sandbox/{sandbox_id}/auth").json()
        base = f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/"
        opened.append(
            httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {auth['token']}"}, timeout=120
            )
        )
        return Gateway(opened[-1])

    yield connect
    for client in opened:
        client.close()


@pytest.fixture
def running(api: httpx.Client, sandboxes: Create, gateway: Connect) -> Running:
    """Create a sandbox, wait until RUNNING, and open its data plane."""

    def start(**fields: Any) -> tuple[dict[str, Any], Gateway]:
        record = sandboxes(**fields)
        return wait_for(api, record["id"], "RUNNING"), gateway(record["id"])

    return start


@contextlib.contextmanager
def tidy_client(server: Server) -> Iterator[SandboxClient]:
    """An SDK client of `server`; the sandboxes still live at the end are deleted."""
    client = SandboxClient(APIClient(api_key=server.token, base_url=server.url))
    try:
        yield client
        live = [s.id for s in client.list(per_page=100).sandboxes if s.status != "TERMINATED"]
        if live:
            client.bulk_delete(sandbox_ids=live)
    finally:
        client.close()
