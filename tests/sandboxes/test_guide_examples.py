"""Every code example of the sandbox SDK guide, run against the session's real server.

Each example is embedded verbatim, as the guide prints it (written against
`prime_sandboxes`); `sdk()` swaps that import for `fleetctl.sandboxes` and changes
nothing else. The example then runs with FLEETCTL_API_URL / FLEETCTL_API_KEY
pointing at the session's server, is called the way the guide's comment shows,
and the test checks what it printed and what it did to the server.

Preconditions the guide implies (local files, files inside a sandbox, an
existing sandbox id) are set up first. Where an example creates its own sandbox
and needs a file inside it, nothing can put the file there in time; its test
says so and pins the typed error the example raises instead.

Every example that runs `python` inside a python:3.11-slim sandbox needs the
image's `python`. On a host without a local rootfs for that image the server
runs it over the host's /usr; where that has no `python` (only python3) those
checks are a strict xfail (see `NO_PYTHON`), raised last in each test, after
every check that does not depend on it. Sandboxes an example creates are seen
by a spy on the SDK's `create` and deleted after the test even if it failed.

Async examples run under `asyncio.run`, as the guide calls them, rather than
through the anyio plugin: the point is to run the guide's code as its readers do.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType
from typing import Any

import httpx
import pytest

import fleetctl.sandboxes
from fleetctl.sandboxes import (
    APIError,
    AsyncSandboxClient,
    CommandResponse,
    CreateSandboxRequest,
    Sandbox,
    SandboxClient,
)
from tests.conftest import Connect, Create, Gateway, Running, Server, wait_for

NO_PYTHON = (
    "server gap: a python:3.11-slim sandbox with no local image rootfs runs over the "
    "host's /usr, which here has no `python` (only python3), so every guide command "
    "`python ...` exits 127 with 'sh: 1: python: not found' instead of running Python 3.11"
)


class NoPythonInSandbox(AssertionError):
    """A check that can only fail because `python` does not run in the sandbox."""


def expect_python(ok: bool, detail: str) -> None:
    """Assert a check that depends on the image's `python` (xfail where it is missing)."""
    if not ok:
        raise NoPythonInSandbox(detail)


# -- running the guide's code -----------------------------------------------------------


def sdk(example: str) -> str:
    """The example with its `prime_sandboxes` imports aimed at fleetctl: the only change."""
    return example.replace("prime_sandboxes", "fleetctl.sandboxes")


def run(example: str, namespace: dict[str, Any]) -> None:
    """Execute a whole example (definitions, and any top-level call it makes)."""
    exec(compile(sdk(example), "<guide example>", "exec"), namespace)


def fragment(example: str) -> CodeType:
    """Compile a snippet that uses `await` at top level (the guide's inline fragments)."""
    code: CodeType = compile(
        sdk(example), "<guide fragment>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    return code


async def run_fragment(code: CodeType, namespace: dict[str, Any]) -> None:
    """Run compiled top-level-await code in `namespace` (as the asyncio REPL does)."""
    result = eval(code, namespace)
    if inspect.iscoroutine(result):
        await result


def prelude() -> dict[str, Any]:
    """What the guide's later snippets take from the Async Client example's imports."""
    namespace: dict[str, Any] = {}
    imports = [line for line in ASYNC_CLIENT.splitlines() if line.startswith(("import", "from"))]
    run("\n".join(imports), namespace)
    return namespace


# -- fixtures -----------------------------------------------------------------------------


@dataclass
class Guide:
    """The session's server as the examples see it, and what they created on it."""

    api: httpx.Client
    created: list[Sandbox] = field(default_factory=list)
    commands: list[CommandResponse] = field(default_factory=list)

    def record(self, sandbox_id: str) -> dict[str, Any]:
        response = self.api.get(f"/sandbox/{sandbox_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def only(self, name: str) -> Sandbox:
        """The one sandbox the example created, checking its name."""
        assert [s.name for s in self.created] == [name]
        return self.created[0]


@pytest.fixture
def guide(
    server: Server, api: httpx.Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Guide]:
    """Aim the SDK at the session's server from a fresh working directory, record every
    sandbox created and command run through it, and delete those sandboxes afterwards."""
    monkeypatch.setenv("FLEETCTL_API_URL", server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    monkeypatch.chdir(tmp_path)
    spy = Guide(api)
    sync_create = SandboxClient.create
    async_create = AsyncSandboxClient.create
    async_execute = AsyncSandboxClient.execute_command

    def create(self: SandboxClient, request: CreateSandboxRequest) -> Sandbox:
        sandbox = sync_create(self, request)
        spy.created.append(sandbox)
        return sandbox

    async def acreate(self: AsyncSandboxClient, request: CreateSandboxRequest) -> Sandbox:
        sandbox = await async_create(self, request)
        spy.created.append(sandbox)
        return sandbox

    async def execute(self: AsyncSandboxClient, *args: Any, **kwargs: Any) -> CommandResponse:
        result = await async_execute(self, *args, **kwargs)
        spy.commands.append(result)
        return result

    monkeypatch.setattr(SandboxClient, "create", create)
    monkeypatch.setattr(AsyncSandboxClient, "create", acreate)
    monkeypatch.setattr(AsyncSandboxClient, "execute_command", execute)
    yield spy
    if spy.created:
        response = api.request(
            "DELETE", "/sandbox", json={"sandbox_ids": [s.id for s in spy.created]}
        )
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def image_has_python(server: Server) -> bool:
    """Whether `python` runs in a python:3.11-slim sandbox of the session's server."""
    with server.client() as api:
        body = {"name": "probe-python", "docker_image": "python:3.11-slim", "memory_gb": 0.5}
        sandbox_id = api.post("/sandbox", json=body).json()["id"]
        try:
            wait_for(api, sandbox_id, "RUNNING")
            auth = api.post(f"/sandbox/{sandbox_id}/auth").json()
            result = httpx.post(
                f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/exec",
                json={"command": "python -c 'print(1)'"},
                headers={"Authorization": f"Bearer {auth['token']}"},
                timeout=60,
            ).json()
        finally:
            api.delete(f"/sandbox/{sandbox_id}")
    return bool(result["exit_code"] == 0)


@pytest.fixture
def guide_python(request: pytest.FixtureRequest, image_has_python: bool) -> None:
    """Expect the test's `expect_python` checks to fail where the sandbox has no python."""
    if not image_has_python:
        request.applymarker(
            pytest.mark.xfail(raises=NoPythonInSandbox, strict=True, reason=NO_PYTHON)
        )


# -- helpers ------------------------------------------------------------------------------


def exec_ok(gw: Gateway, command: str) -> str:
    """Run `command` through the data plane; it must succeed; returns its stdout."""
    response = gw.exec(command)
    assert response.status_code == 200, response.text
    assert response.json()["exit_code"] == 0, response.json()
    return str(response.json()["stdout"])


def put(gw: Gateway, path: str, data: bytes) -> None:
    response = gw.client.post(
        "upload", params={"path": path}, files={"file": (Path(path).name, data)}
    )
    assert response.status_code == 200, response.text


def fetch(gw: Gateway, path: str) -> bytes:
    response = gw.client.get("download", params={"path": path})
    assert response.status_code == 200, response.text
    return response.content


def get_until(url: str, deadline_s: float) -> httpx.Response | None:
    """GET `url` until it answers or the deadline passes; the last answer, or None."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


# -- Sync Client --------------------------------------------------------------------------

SYNC_CLIENT = r"""from prime_sandboxes import SandboxClient, CreateSandboxRequest, APIClient

client = SandboxClient(APIClient())

# Create and wait
sandbox = client.create(
    CreateSandboxRequest(
        name="sdk-demo",
        docker_image="python:3.11-slim",
        labels=["experiment"],
        timeout_minutes=120,
        environment_vars={"LOG_LEVEL": "debug"},
        secrets={"API_KEY": "sk-abc123"},
    )
)
client.wait_for_creation(sandbox.id)

# Run a command
result = client.execute_command(sandbox.id, "python -c 'print(42)'")
print(result.stdout.strip())

# Upload / download files
client.upload_file(sandbox.id, "/workspace/data.csv", "./data.csv")
client.download_file(sandbox.id, "/workspace/output.csv", "./output.csv")

# Expose a port
exposed = client.expose(sandbox.id, port=8000, name="web")
print(exposed.url)

# Clean up
client.delete(sandbox.id)
"""


@pytest.mark.usefixtures("guide_python")
def test_sync_client(guide: Guide, gateway: Connect, capsys: pytest.CaptureFixture[str]) -> None:
    """Creates `sdk-demo` with labels, timeout, env and secret, prints 42, uploads
    ./data.csv; then stops at the download, with APIError 404: the example creates its
    own sandbox and downloads /workspace/output.csv right after its upload, so no step of
    the test can put that file there first (the expose and delete are never reached)."""
    data = b"id,value\n1,2\n"
    Path("data.csv").write_bytes(data)
    namespace: dict[str, Any] = {}
    try:
        with pytest.raises(APIError) as caught:
            run(SYNC_CLIENT, namespace)
    finally:
        if "client" in namespace:  # the example never closes its client
            namespace["client"].close()

    sandbox = guide.only("sdk-demo")
    assert caught.value.status_code == 404
    assert str(caught.value) == (
        f"HTTP 404: file /workspace/output.csv not found in sandbox {sandbox.id}"
    )
    assert not Path("output.csv").exists()
    record = guide.record(sandbox.id)
    assert (record["status"], record["labels"], record["timeoutMinutes"]) == (
        "RUNNING",
        ["experiment"],
        120,
    )
    assert record["environmentVars"] == {"LOG_LEVEL": "debug"}
    assert "sk-abc123" not in guide.api.get(f"/sandbox/{sandbox.id}").text
    gw = gateway(sandbox.id)
    assert fetch(gw, "/workspace/data.csv") == data
    assert exec_ok(gw, 'echo "$LOG_LEVEL $API_KEY"') == "debug sk-abc123\n"

    out = capsys.readouterr().out
    expect_python(out == "42\n", f"printed {out!r}")


# -- Async Client -------------------------------------------------------------------------

ASYNC_CLIENT = r"""import asyncio
from prime_sandboxes import AsyncSandboxClient, CreateSandboxRequest

async def launch_demo() -> None:
    async with AsyncSandboxClient() as sandboxes:
        request = CreateSandboxRequest(
            name="sdk-demo",
            docker_image="python:3.11-slim",
            labels=["experiment", "ml-pipeline", "team-research"],
            timeout_minutes=120,
        )
        sandbox = await sandboxes.create(request)
        await sandboxes.wait_for_creation(sandbox.id)
        result = await sandboxes.execute_command(sandbox.id, "python -c 'print(42)'")
        print(result.stdout.strip())
        await sandboxes.delete(sandbox.id)

asyncio.run(launch_demo())
"""


@pytest.mark.usefixtures("guide_python")
def test_async_client_launch_demo(guide: Guide, capsys: pytest.CaptureFixture[str]) -> None:
    """The example's own `asyncio.run(launch_demo())` creates `sdk-demo` with its three
    labels, prints 42 and deletes the sandbox."""
    run(ASYNC_CLIENT, {})

    record = guide.record(guide.only("sdk-demo").id)
    assert record["labels"] == ["experiment", "ml-pipeline", "team-research"]
    assert (record["timeoutMinutes"], record["status"]) == (120, "TERMINATED")
    out = capsys.readouterr().out
    expect_python(out == "42\n", f"printed {out!r}")


# -- Launch a Fleet -----------------------------------------------------------------------

LAUNCH_A_FLEET = r"""async def create_many(images: list[str]) -> None:
    async with AsyncSandboxClient() as sandboxes:
        requests = [
            CreateSandboxRequest(name=f"batch-{i}", docker_image=image)
            for i, image in enumerate(images, start=1)
        ]
        created = await asyncio.gather(*[sandboxes.create(req) for req in requests])
        await sandboxes.bulk_wait_for_creation([sbx.id for sbx in created])
        print("Ready:", ", ".join(sbx.name for sbx in created))

# asyncio.run(create_many(["python:3.11-slim", "node:20-slim"]))
"""


def test_launch_a_fleet_create_many(guide: Guide, capsys: pytest.CaptureFixture[str]) -> None:
    """create_many(["python:3.11-slim", "node:20-slim"]) creates batch-1 and batch-2
    concurrently, waits for both and prints "Ready: batch-1, batch-2"."""
    namespace = prelude()
    run(LAUNCH_A_FLEET, namespace)
    asyncio.run(namespace["create_many"](["python:3.11-slim", "node:20-slim"]))

    assert capsys.readouterr().out == "Ready: batch-1, batch-2\n"
    records = sorted((guide.record(s.id) for s in guide.created), key=lambda r: r["name"])
    assert [(r["name"], r["dockerImage"], r["status"]) for r in records] == [
        ("batch-1", "python:3.11-slim", "RUNNING"),
        ("batch-2", "node:20-slim", "RUNNING"),
    ]


# -- Run Commands & Collect Logs ----------------------------------------------------------

RUN_COMMANDS = r"""async def smoke_test(sandbox_id: str) -> None:
    async with AsyncSandboxClient() as sandboxes:
        results = await sandboxes.execute_command(
            sandbox_id,
            "python -c 'import platform; print(platform.python_version())'",
        )
        print("stdout:", results.stdout.strip())
        logs = await sandboxes.get_logs(sandbox_id)
        print("logs snippet:", logs[:120])
"""


@pytest.mark.usefixtures("guide_python")
def test_run_commands_smoke_test(
    guide: Guide, running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """smoke_test(id) of a running python:3.11-slim sandbox prints the Python version
    (3.11.x) and the first 120 characters of the sandbox's logs."""
    record, _ = running()
    namespace = prelude()
    run(RUN_COMMANDS, namespace)
    asyncio.run(namespace["smoke_test"](record["id"]))

    out = capsys.readouterr().out
    logs = guide.api.get(f"/sandbox/{record['id']}/logs").json()["logs"]
    assert logs
    snippet = f"logs snippet: {logs[:120]}\n"
    assert out.endswith(snippet), out
    first = out.removesuffix(snippet)
    expect_python(re.fullmatch(r"stdout: 3\.11\.\d+\n", first) is not None, f"printed {first!r}")


# -- Move Data In and Out -----------------------------------------------------------------

MOVE_DATA = r"""async def sync_artifacts(sandbox_id: str) -> None:
    async with AsyncSandboxClient() as sandboxes:
        await sandboxes.upload_file(sandbox_id, "/workspace/model.bin", "./artifacts/model.bin")
        await sandboxes.download_file(sandbox_id, "/workspace/report.csv", "./reports/report.csv")
"""


def test_move_data_sync_artifacts(
    guide: Guide, running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """sync_artifacts(id) uploads ./artifacts/model.bin to /workspace/model.bin and
    downloads /workspace/report.csv (put there first) to ./reports/report.csv, creating
    ./reports."""
    record, gw = running()
    model = secrets.token_bytes(256 * 1024)
    report = b"metric,value\naccuracy,0.93\n"
    Path("artifacts").mkdir()
    Path("artifacts/model.bin").write_bytes(model)
    put(gw, "/workspace/report.csv", report)
    namespace = prelude()
    run(MOVE_DATA, namespace)
    asyncio.run(namespace["sync_artifacts"](record["id"]))

    assert Path("reports/report.csv").read_bytes() == report
    assert fetch(gw, "/workspace/model.bin") == model
    assert capsys.readouterr().out == ""


# -- Expose Ports -------------------------------------------------------------------------

EXPOSE_HTTP = r"""async def run_web_server() -> None:
    async with AsyncSandboxClient() as sandboxes:
        sandbox = await sandboxes.create(
            CreateSandboxRequest(name="web-server", docker_image="python:3.11-slim")
        )
        await sandboxes.wait_for_creation(sandbox.id)

        # Start the server as a background job so it keeps running
        await sandboxes.start_background_job(
            sandbox.id, "python -m http.server 8000 --bind 0.0.0.0"
        )

        exposed = await sandboxes.expose(sandbox.id, port=8000, name="web-server")

        await asyncio.sleep(10)
        print(f"Server available at: {exposed.url}")
"""


@pytest.mark.usefixtures("guide_python")
def test_expose_http_run_web_server(guide: Guide, capsys: pytest.CaptureFixture[str]) -> None:
    """run_web_server() starts `python -m http.server 8000` as a background job, exposes
    port 8000, waits its 10 s and prints the URL, which serves the directory listing."""
    namespace = prelude()
    run(EXPOSE_HTTP, namespace)
    asyncio.run(namespace["run_web_server"]())

    sandbox = guide.only("web-server")
    out = capsys.readouterr().out
    match = re.fullmatch(r"Server available at: (http://127\.0\.0\.1:\d+)\n", out)
    assert match, out
    exposures = guide.api.get(f"/sandbox/{sandbox.id}/expose").json()["exposures"]
    assert [(e["port"], e["name"], e["url"]) for e in exposures] == [(8000, "web-server", match[1])]
    response = get_until(match[1], deadline_s=5)
    expect_python(
        response is not None
        and response.status_code == 200
        and "Directory listing for /" in response.text,
        f"GET {match[1]} answered {response and (response.status_code, response.text[:200])}",
    )


EXPOSE_TCP = r"""async def run_tcp_server() -> None:
    async with AsyncSandboxClient() as sandboxes:
        sandbox = await sandboxes.create(
            CreateSandboxRequest(name="tcp-server", docker_image="python:3.11-slim")
        )
        await sandboxes.wait_for_creation(sandbox.id)

        # Start a TCP echo server as a background job
        await sandboxes.start_background_job(
            sandbox.id,
            "python -c \"import socketserver; "
            "socketserver.TCPServer(('0.0.0.0', 9000), socketserver.StreamRequestHandler).serve_forever()\"",
        )

        exposed = await sandboxes.expose(sandbox.id, port=9000, name="tcp-server", protocol="TCP")
        print(f"TCP endpoint: {exposed.external_endpoint}")
        print(f"External port: {exposed.external_port}")
"""  # noqa: E501


@pytest.mark.usefixtures("guide_python")
def test_expose_tcp_run_tcp_server(
    guide: Guide, gateway: Connect, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_tcp_server() exposes port 9000 over TCP and prints a host:port endpoint and its
    port, which accepts connections; the example's server listens on 9000 inside."""
    namespace = prelude()
    run(EXPOSE_TCP, namespace)
    asyncio.run(namespace["run_tcp_server"]())

    sandbox = guide.only("tcp-server")
    out = capsys.readouterr().out
    match = re.fullmatch(r"TCP endpoint: (127\.0\.0\.1):(\d+)\nExternal port: (\d+)\n", out)
    assert match, out
    assert match[2] == match[3]
    exposures = guide.api.get(f"/sandbox/{sandbox.id}/expose").json()["exposures"]
    assert [(e["port"], e["name"], e["protocol"]) for e in exposures] == [
        (9000, "tcp-server", "TCP")
    ]
    with socket.create_connection((match[1], int(match[2])), timeout=5):
        pass

    # From outside, a forwarder with nothing behind it also accepts and then closes;
    # whether the example's server listens shows only from inside the sandbox.
    gw = gateway(sandbox.id)
    probe = "python3 -c \"import socket; socket.create_connection(('127.0.0.1', 9000), 2)\""
    deadline = time.monotonic() + 5
    while (result := gw.exec(probe).json())["exit_code"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    expect_python(result["exit_code"] == 0, f"nothing listens on 9000 inside: {result}")


# -- Start Command ------------------------------------------------------------------------

START_COMMAND = r"""sandbox = await sandboxes.create(
    CreateSandboxRequest(
        name="api-server",
        docker_image="python:3.11-slim",
        start_command="python serve.py --port 8000",
    )
)
"""


@pytest.mark.usefixtures("guide_python")
def test_start_command(guide: Guide) -> None:
    """The sandbox runs `python serve.py --port 8000` as its main process instead of
    idling: there is no serve.py in a sandbox the snippet itself creates (nothing can put
    one there before it starts), so python exits 2 and the sandbox ends TERMINATED."""

    async def main() -> Sandbox:
        async with AsyncSandboxClient() as sandboxes:
            namespace = {**prelude(), "sandboxes": sandboxes}
            await run_fragment(fragment(START_COMMAND), namespace)
            sandbox: Sandbox = namespace["sandbox"]
            return sandbox

    sandbox = asyncio.run(main())

    assert sandbox is guide.only("api-server")
    assert sandbox.start_command == "python serve.py --port 8000"
    record = wait_for(guide.api, sandbox.id, "TERMINATED")
    assert record["startCommand"] == "python serve.py --port 8000"
    assert record["exitCode"] not in (None, 0), record
    expect_python(
        record["terminationReason"] == "the main process exited with code 2",
        f"{record['terminationReason']!r}",
    )


# -- Environment Variables & Secrets ------------------------------------------------------

ENV_AND_SECRETS = r"""sandbox = await sandboxes.create(
    CreateSandboxRequest(
        name="configured-runner",
        docker_image="python:3.11-slim",
        environment_vars={
            "APP_ENV": "staging",
            "LOG_LEVEL": "debug",
        },
        secrets={
            "DB_PASSWORD": "hunter2",
            "API_KEY": "sk-abc123",
        },
    )
)
"""


def test_environment_variables_and_secrets(guide: Guide) -> None:
    """Both environment variables and secrets reach commands as environment variables;
    the variables are returned by the API, the secrets never."""

    async def main() -> tuple[Sandbox, CommandResponse]:
        async with AsyncSandboxClient() as sandboxes:
            namespace = {**prelude(), "sandboxes": sandboxes}
            await run_fragment(fragment(ENV_AND_SECRETS), namespace)
            sandbox: Sandbox = namespace["sandbox"]
            await sandboxes.wait_for_creation(sandbox.id)
            result = await sandboxes.execute_command(
                sandbox.id, 'echo "$APP_ENV $LOG_LEVEL $DB_PASSWORD $API_KEY"'
            )
            return sandbox, result

    sandbox, result = asyncio.run(main())

    assert sandbox is guide.only("configured-runner")
    assert (result.stdout, result.exit_code) == ("staging debug hunter2 sk-abc123\n", 0)
    expected_vars = {"APP_ENV": "staging", "LOG_LEVEL": "debug"}
    assert sandbox.environment_vars == expected_vars
    assert guide.record(sandbox.id)["environmentVars"] == expected_vars
    for text in (
        guide.api.get(f"/sandbox/{sandbox.id}").text,
        guide.api.get("/sandbox", params={"per_page": 500}).text,
    ):
        assert "hunter2" not in text
        assert "sk-abc123" not in text


PER_COMMAND_ENV = r"""result = await sandboxes.execute_command(
    sandbox.id,
    "echo $CUSTOM_VAR",
    env={"CUSTOM_VAR": "hello"},
)
"""


def test_per_command_environment(guide: Guide, running: Running) -> None:
    """execute_command(..., env={"CUSTOM_VAR": "hello"}) echoes hello; the variable is
    set for that command only."""
    record, _ = running()

    async def main() -> tuple[CommandResponse, CommandResponse]:
        async with AsyncSandboxClient() as sandboxes:
            namespace = {
                **prelude(),
                "sandboxes": sandboxes,
                "sandbox": await sandboxes.get(record["id"]),
            }
            await run_fragment(fragment(PER_COMMAND_ENV), namespace)
            after = await sandboxes.execute_command(record["id"], 'echo "[$CUSTOM_VAR]"')
            result: CommandResponse = namespace["result"]
            return result, after

    result, after = asyncio.run(main())

    assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "", 0)
    assert after.stdout == "[]\n"


# -- Network Isolation --------------------------------------------------------------------

NETWORK_ISOLATION = r"""async def isolated_sandbox() -> None:
    async with AsyncSandboxClient() as sandboxes:
        # Create a sandbox without outbound internet access
        request = CreateSandboxRequest(
            name="isolated-runner",
            docker_image="python:3.11-slim",
            network_access=False,  # Disable outbound internet
        )
        sandbox = await sandboxes.create(request)
        await sandboxes.wait_for_creation(sandbox.id)

        # Code runs in isolation - no external network calls possible
        result = await sandboxes.execute_command(
            sandbox.id,
            "python -c 'import urllib.request; urllib.request.urlopen(\"https://example.com\")'",
        )
        # This will fail with a network error

        await sandboxes.delete(sandbox.id)
"""


@pytest.mark.usefixtures("guide_python")
def test_network_isolation_isolated_sandbox(
    guide: Guide, capsys: pytest.CaptureFixture[str]
) -> None:
    """isolated_sandbox() creates `isolated-runner` without network access, whose
    urlopen of https://example.com fails with a network error (URLError), then deletes
    it. The command's result is seen through the spy on execute_command."""
    namespace = prelude()
    run(NETWORK_ISOLATION, namespace)
    asyncio.run(namespace["isolated_sandbox"]())

    record = guide.record(guide.only("isolated-runner").id)
    assert (record["networkAccess"], record["status"]) == (False, "TERMINATED")
    assert capsys.readouterr().out == ""
    [result] = guide.commands
    assert result.exit_code != 0
    expect_python(
        result.exit_code == 1 and "urllib.error.URLError" in result.stderr,
        f"exit {result.exit_code}: {result.stderr[-300:]!r}",
    )


# -- Long-Running Commands ----------------------------------------------------------------

LONG_RUNNING = r"""async def run_long_command(sandbox_id: str) -> None:
    async with AsyncSandboxClient() as sandboxes:
        # Run a command that takes up to 15 minutes
        result = await sandboxes.execute_command(
            sandbox_id,
            "python preprocessing.py --dataset large",
            timeout=900,  # 15 minutes max
        )
        print(f"Exit code: {result.exit_code}")
"""


@pytest.mark.usefixtures("guide_python")
def test_long_running_command(
    guide: Guide, running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_long_command(id) runs preprocessing.py (put in /workspace first) with a 900 s
    timeout and prints "Exit code: 0"."""
    record, gw = running()
    script = (
        "import sys\n"
        "assert sys.argv[1:] == ['--dataset', 'large'], sys.argv\n"
        "open('/workspace/preprocessed', 'w').write('large')\n"
    )
    put(gw, "/workspace/preprocessing.py", script.encode())
    namespace = prelude()
    run(LONG_RUNNING, namespace)
    asyncio.run(namespace["run_long_command"](record["id"]))

    [result] = guide.commands
    out = capsys.readouterr().out
    assert out == f"Exit code: {result.exit_code}\n"
    expect_python(out == "Exit code: 0\n", f"printed {out!r}; stderr {result.stderr!r}")
    assert fetch(gw, "/workspace/preprocessed") == b"large"


# -- Background Jobs ----------------------------------------------------------------------

BACKGROUND_JOBS = r"""async def run_training_job() -> None:
    async with AsyncSandboxClient() as sandboxes:
        sandbox = await sandboxes.create(
            CreateSandboxRequest(
                name="training-job",
                docker_image="python:3.11-slim",
                timeout_minutes=1440,  # 24 hours
                cpu_cores=4,
                memory_gb=16,
            )
        )
        await sandboxes.wait_for_creation(sandbox.id)

        # Start a long-running job in the background
        job = await sandboxes.start_background_job(
            sandbox.id,
            "python train.py --epochs 100"
        )
        print(f"Job started: {job.job_id}")

        # Poll for completion
        while True:
            status = await sandboxes.get_background_job(sandbox.id, job)
            if status.completed:
                print(f"Exit code: {status.exit_code}")
                print(status.stdout)
                break
            print("Still running...")
            await asyncio.sleep(30)

        # Download results
        await sandboxes.download_file(sandbox.id, "/app/model.pt", "./model.pt")
        await sandboxes.delete(sandbox.id)
"""


@pytest.mark.usefixtures("guide_python")
def test_background_jobs_run_training_job(guide: Guide, capsys: pytest.CaptureFixture[str]) -> None:
    """run_training_job() creates `training-job` (4 cores, 16 GB, 24 h), starts
    `python train.py --epochs 100` in the background, polls it to completion and prints
    its exit code and stdout; then fails to download /app/model.pt with APIError 404.

    The example creates its own sandbox and starts the job right after it runs, so no
    train.py can be there first: python exits 2 (can't open file) and writes no
    /app/model.pt, and the sandbox is left for the test to delete. The job usually ends
    before the first poll; if not, the example prints "Still running..." and sleeps its
    30 s, which the expected output allows.
    """
    namespace = prelude()
    run(BACKGROUND_JOBS, namespace)
    with pytest.raises(APIError) as caught:
        asyncio.run(namespace["run_training_job"]())

    sandbox = guide.only("training-job")
    assert caught.value.status_code == 404
    assert str(caught.value) == f"HTTP 404: file /app/model.pt not found in sandbox {sandbox.id}"
    record = guide.record(sandbox.id)
    assert (record["cpuCores"], record["memoryGB"], record["timeoutMinutes"]) == (4, 16, 1440)
    assert record["status"] == "RUNNING"
    out = capsys.readouterr().out
    match = re.fullmatch(
        r"Job started: ([0-9a-f]{12})\n(?:Still running...\n)*Exit code: (\d+)\n\n", out
    )
    assert match, out
    expect_python(match[2] == "2", f"printed {out!r}")


# -- Error Handling -----------------------------------------------------------------------

ERROR_HANDLING = r"""from prime_sandboxes import (
    # Sandbox lifecycle errors
    SandboxNotRunningError,
    SandboxOOMError,
    SandboxTimeoutError,
    SandboxImagePullError,
    # Operation errors
    CommandTimeoutError,
    UploadTimeoutError,
    DownloadTimeoutError,
    # API errors
    APIError,
    UnauthorizedError,
    PaymentRequiredError,
    APITimeoutError,
)
"""


def test_error_handling_imports() -> None:
    """Every exception the guide imports is importable from fleetctl.sandboxes, in the
    hierarchy the guide describes."""
    namespace: dict[str, Any] = {}
    run(ERROR_HANDLING, namespace)

    names = [n for n in namespace if n != "__builtins__"]
    assert len(names) == 11
    for name in names:
        assert namespace[name] is getattr(fleetctl.sandboxes, name)
    for name in ("SandboxOOMError", "SandboxTimeoutError", "SandboxImagePullError"):
        assert issubclass(namespace[name], namespace["SandboxNotRunningError"])
    for name in ("UnauthorizedError", "PaymentRequiredError", "APITimeoutError"):
        assert issubclass(namespace[name], namespace["APIError"])


# -- Clean Exit ---------------------------------------------------------------------------

CLEAN_EXIT = r"""async def teardown() -> None:
    async with AsyncSandboxClient() as sandboxes:
        # Delete one sandbox
        await sandboxes.delete("sbx_123")

        # Bulk delete by IDs
        result = await sandboxes.bulk_delete(sandbox_ids=["sbx_456", "sbx_789"])
        print(f"Deleted: {result.succeeded}, Failed: {result.failed}")

        # Bulk delete by labels — removes all sandboxes matching ALL given labels
        result = await sandboxes.bulk_delete(labels=["experiment", "staging"])
        print(f"Deleted: {result.succeeded}, Failed: {result.failed}")
"""


def teardown_statements(first: int, last: int) -> CodeType:
    """Statements `first`..`last` (exclusive) of teardown()'s `async with` body, compiled
    to run at top level: the guide's own lines, not a transcription."""
    tree = ast.parse(sdk(CLEAN_EXIT))
    [function] = [n for n in tree.body if isinstance(n, ast.AsyncFunctionDef)]
    [block] = function.body
    assert isinstance(block, ast.AsyncWith)
    module = ast.Module(body=block.body[first:last], type_ignores=[])
    code: CodeType = compile(
        module, "<guide teardown>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    return code


def run_teardown_statements(first: int, last: int) -> None:
    async def main() -> None:
        async with AsyncSandboxClient() as sandboxes:
            await run_fragment(teardown_statements(first, last), {"sandboxes": sandboxes})

    asyncio.run(main())


def test_clean_exit_teardown(guide: Guide, capsys: pytest.CaptureFixture[str]) -> None:
    """teardown() stops at its first line: sbx_123 does not exist (ids are the server's
    to choose), and delete of a missing id raises APIError 404."""
    namespace = prelude()
    run(CLEAN_EXIT, namespace)
    with pytest.raises(APIError) as caught:
        asyncio.run(namespace["teardown"]())

    assert caught.value.status_code == 404
    assert str(caught.value) == "HTTP 404: sandbox sbx_123 not found"
    assert capsys.readouterr().out == ""


def test_clean_exit_bulk_delete_by_ids(guide: Guide, capsys: pytest.CaptureFixture[str]) -> None:
    """teardown()'s bulk delete of sbx_456 and sbx_789 reports both as failed (not found)."""
    run_teardown_statements(1, 3)

    match = re.fullmatch(r"Deleted: \[\], Failed: (\[.*\])\n", capsys.readouterr().out)
    assert match
    failed = ast.literal_eval(match[1])
    assert sorted(failed, key=lambda f: f["sandbox_id"]) == [
        {"sandbox_id": "sbx_456", "error": "sandbox sbx_456 not found"},
        {"sandbox_id": "sbx_789", "error": "sandbox sbx_789 not found"},
    ]


def test_clean_exit_bulk_delete_by_labels(
    guide: Guide, sandboxes: Create, capsys: pytest.CaptureFixture[str]
) -> None:
    """teardown()'s bulk delete by labels ["experiment", "staging"] deletes every
    sandbox with both labels and prints their ids, and spares one with only one of them."""
    both = [sandboxes(labels=["experiment", "staging"])["id"] for _ in range(2)]
    spared = sandboxes(labels=["experiment"])["id"]
    run_teardown_statements(3, 5)

    match = re.fullmatch(r"Deleted: (\[.*\]), Failed: \[\]\n", capsys.readouterr().out)
    assert match
    assert sorted(ast.literal_eval(match[1])) == sorted(both)
    for sandbox_id in both:
        assert guide.record(sandbox_id)["status"] == "TERMINATED"
    assert guide.record(spared)["status"] in ("PENDING", "PROVISIONING", "RUNNING")
