"""fleetctl.sandboxes, sync and async, against real local servers.

Most tests run once per client (`flavor`): `sdk` is an `AsyncSandboxClient`, or a
`SandboxClient` whose calls run on a worker thread (`Threaded`), so a single test
body pins both clients. Every sandbox a test creates carries the test's unique
label and is deleted after it through a plain httpx client that retries by
itself. Servers with special flags (faults, a rate limit, a fast clock, strict
images) are module-scoped and stopped at the end. Unusual servers are replaced by
an in-test `httpx.MockTransport` only where a real one cannot answer (402,
malformed bodies).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
import httpx
import pytest

from fleetctl.sandboxes import (
    APIClient,
    APIError,
    AsyncAPIClient,
    AsyncSandboxClient,
    AsyncSandboxProcess,
    BackgroundJobStatus,
    CommandTimeoutError,
    CreateSandboxRequest,
    PaymentRequiredError,
    RetryPolicy,
    SandboxClient,
    SandboxFileNotFoundError,
    SandboxImagePullError,
    SandboxNotRunningError,
    SandboxOOMError,
    SandboxProcess,
    SandboxTimeoutError,
    UnauthorizedError,
)
from fleetctl.sandboxes._ops import Operations
from fleetctl.sandboxes._process import Session
from fleetctl.sandboxes.config import PRIME_DEFAULT_URL, Endpoint, resolve
from fleetctl.server import daemon
from tests.conftest import Server, acontrol, faults, needs_sandboxes, traversable_dir
from tests.sandboxes.support import (
    Connect,
    Dialect,
    Flavor,
    New,
    Sdk,
    Tap,
    Threaded,
    ThreadedProcess,
    closed_port,
    create_all,
    create_bodies,
    eventually,
    labelled,
    sha256,
    started,
)

P = ParamSpec("P")
T = TypeVar("T")

MB = 1024 * 1024
NOWHERE = "http://sdk-test.invalid"
HTTP_SERVER = "python3 -m http.server 8000 --bind 127.0.0.1 --directory /workspace"
ECHO_SERVER = (
    "python3 -c \"import socketserver as s; H = type('H', (s.StreamRequestHandler,), "
    "{'handle': lambda h: h.wfile.write(h.rfile.readline().upper())}); "
    "s.TCPServer(('127.0.0.1', 9000), H).serve_forever()\""
)
ALLOCATE_256_MB = "python3 -c 'b = b\"x\" * (256 * 1024 * 1024)'"
#: Half of the faulty server's requests fail; six attempts would give up on ~1.6% of calls.
PATIENT = RetryPolicy(attempts=12, wait_initial=0.01, wait_max=0.2)
FAST = RetryPolicy(attempts=2, wait_initial=0.01, wait_max=0.01)
#: A sandbox as the API returns it, for MockTransport answers.
SANDBOX_JSON = {
    "id": "sbx-mock",
    "name": "mock",
    "dockerImage": "python:3.11-slim",
    "cpuCores": 1.0,
    "memoryGB": 0.25,
    "diskSizeGB": 5.0,
    "status": "PENDING",
    "timeoutMinutes": 60,
    "labels": [],
    "createdAt": "2025-01-01T00:00:00Z",
}


# -- every method, both clients --------------------------------------------------------


def _surface(cls: type, *skip: str) -> dict[str, inspect.Signature]:
    """Public methods and their signatures, return types aside (each flavor has its own)."""
    return {
        name: inspect.signature(getattr(cls, name)).replace(return_annotation="")
        for name in dir(cls)
        if not name.startswith("_") and name not in skip and callable(getattr(cls, name))
    }


def test_sync_and_async_clients_offer_the_same_methods_with_the_same_signatures() -> None:
    methods = _surface(SandboxClient, "close", "aclose")
    assert methods == _surface(AsyncSandboxClient, "close", "aclose")
    process = _surface(SandboxProcess, "close", "aclose", "started")
    assert process == _surface(AsyncSandboxProcess, "close", "aclose", "started")
    with SandboxClient(APIClient("k", NOWHERE)) as client:
        wrapped = {name for name in dir(Threaded(client)) if not name.startswith("_")}
        handle = SandboxProcess(client.api, Operations(), Session("sbx", "uuid", None))
        wrapped_process = {name for name in dir(ThreadedProcess(handle)) if name[0] != "_"}
    assert set(methods) == wrapped - {"client", "api", "aclose"}, "Threaded must wrap every method"
    assert set(process) | {
        "pid",
        "returncode",
        "session_uuid",
        "sandbox_id",
        "stdout",
        "stderr",
    } == (wrapped_process - {"process", "aclose"}), "ThreadedProcess must wrap every method"


@pytest.mark.anyio
async def test_create_echoes_the_request_and_wait_for_creation_returns_once_running(
    sdk: Sdk, new: New, label: str
) -> None:
    created = await sdk.create(
        new("extra", name="sdk-create", environment_vars={"A": "1"}, timeout_minutes=30)
    )
    assert created.status in ("PENDING", "PROVISIONING", "RUNNING")
    assert (created.name, created.labels, created.memory_gb) == (
        "sdk-create",
        [label, "extra"],
        0.25,
    )
    assert (created.environment_vars, created.timeout_minutes) == ({"A": "1"}, 30)
    await sdk.wait_for_creation(created.id)
    current = await sdk.get(created.id)
    assert (current.id, current.status) == (created.id, "RUNNING")
    assert current.started_at is not None


@pytest.mark.anyio
async def test_get_of_an_unknown_sandbox_is_an_api_error_404(sdk: Sdk) -> None:
    with pytest.raises(APIError) as caught:
        await sdk.get("no-such-sandbox")
    assert caught.value.status_code == 404


@pytest.mark.anyio
async def test_list_returns_sandboxes_having_every_label_and_paginates(
    sdk: Sdk, new: New, label: str
) -> None:
    ids = [(await sdk.create(new(f"n{i % 2}"))).id for i in range(5)]
    everything = await sdk.list(labels=[label])
    assert (sorted(s.id for s in everything.sandboxes), everything.total) == (sorted(ids), 5)
    even = await sdk.list(labels=[label, "n0"])
    assert sorted(s.id for s in even.sandboxes) == sorted(ids[0::2])
    assert all({label, "n0"} <= set(s.labels) for s in even.sandboxes)
    assert (await sdk.list(labels=[label, "n0", "n1"])).sandboxes == []
    pages = [await sdk.list(labels=[label], page=page, per_page=2) for page in (1, 2, 3)]
    assert [len(p.sandboxes) for p in pages] == [2, 2, 1]
    assert [p.has_next for p in pages] == [True, True, False]
    assert [(p.page, p.per_page, p.total) for p in pages] == [(1, 2, 5), (2, 2, 5), (3, 2, 5)]
    paged = [s.id for p in pages for s in p.sandboxes]
    assert sorted(paged) == sorted(ids), "pages overlap or miss sandboxes"


@pytest.mark.anyio
async def test_delete_terminates_the_sandbox(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    deleted = await sdk.delete(sandbox.id)
    assert (deleted["success"], deleted["id"]) == (True, sandbox.id)
    assert (await sdk.get(sandbox.id)).status == "TERMINATED"


@pytest.mark.anyio
async def test_bulk_delete_by_ids_and_by_labels_that_must_all_match(
    sdk: Sdk, new: New, label: str
) -> None:
    by_id = [(await sdk.create(new())).id for _ in range(2)]
    doomed = [(await sdk.create(new("doomed"))).id for _ in range(2)]
    survivor = (await sdk.create(new())).id
    result = await sdk.bulk_delete(sandbox_ids=by_id)
    assert (sorted(result.succeeded), result.failed) == (sorted(by_id), [])
    result = await sdk.bulk_delete(labels=[label, "doomed"])
    assert (sorted(result.succeeded), result.failed) == (sorted(doomed), [])
    assert [s.id for s in (await sdk.list(labels=[label])).sandboxes] == [survivor]


@pytest.mark.anyio
async def test_bulk_delete_takes_exactly_one_of_ids_or_labels_before_any_request(
    connect: Connect, flavor: Flavor
) -> None:
    tap = Tap()
    sdk = connect(flavor, transport=tap)
    with pytest.raises(ValueError, match="exactly one"):
        await sdk.bulk_delete()
    with pytest.raises(ValueError, match="exactly one"):
        await sdk.bulk_delete(sandbox_ids=["a"], labels=["b"])
    assert tap.requests == []


@pytest.mark.anyio
async def test_bulk_delete_with_an_empty_label_list_deletes_nothing(
    sdk: Sdk, new: New, label: str
) -> None:
    sandbox = await sdk.create(new())
    with pytest.raises((ValueError, APIError)):
        await sdk.bulk_delete(labels=[])
    assert [s.id for s in (await sdk.list(labels=[label])).sandboxes] == [sandbox.id]


@pytest.mark.anyio
async def test_execute_command_honours_working_dir_env_and_timeout(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new(environment_vars={"BASE": "b"}))
    result = await sdk.execute_command(
        sandbox.id,
        "pwd; echo $BASE $EXTRA; echo oops >&2; exit 7",
        working_dir="/tmp",
        env={"EXTRA": "e"},
        timeout=30,
    )
    assert (result.stdout, result.stderr, result.exit_code) == ("/tmp\nb e\n", "oops\n", 7)
    again = await sdk.execute_command(sandbox.id, "pwd; echo ${EXTRA:-unset}")
    assert (again.stdout, again.exit_code) == ("/workspace\nunset\n", 0)
    within = await sdk.execute_command(sandbox.id, "sleep 0.2; echo done", timeout=5)
    assert within.stdout == "done\n"
    for timeout in (0, 901):
        with pytest.raises(ValueError, match="timeout"):
            await sdk.execute_command(sandbox.id, "true", timeout=timeout)


@pytest.mark.anyio
async def test_background_job_returns_at_once_and_reports_output_and_exit_code(
    sdk: Sdk, new: New
) -> None:
    sandbox = await started(sdk, new())
    job = await sdk.start_background_job(
        sandbox.id,
        "while [ ! -e /tmp/go ]; do sleep 0.05; done; pwd; echo $X; echo err >&2; exit 3",
        working_dir="/tmp",
        env={"X": "y"},
    )
    assert job.sandbox_id == sandbox.id
    waiting = await sdk.get_background_job(sandbox.id, job)
    assert (waiting.job_id, waiting.completed, waiting.exit_code) == (job.job_id, False, None)
    await sdk.execute_command(sandbox.id, "touch /tmp/go")

    async def finished() -> BackgroundJobStatus | None:
        status = await sdk.get_background_job(sandbox.id, job)
        return status if status.completed else None

    done = await eventually(finished, "background job completion")
    assert (done.exit_code, done.stdout, done.stderr) == (3, "/tmp\ny\n", "err\n")


@pytest.mark.anyio
async def test_upload_read_and_download_files(sdk: Sdk, new: New, tmp_path: Path) -> None:
    sandbox = await started(sdk, new())
    source = tmp_path / "in.txt"
    source.write_text("line1\nline2\n")
    uploaded = await sdk.upload_file(sandbox.id, "nested/dir/in.txt", str(source))
    assert (uploaded.success, uploaded.path, uploaded.size) == (True, "nested/dir/in.txt", 12)
    listed = await sdk.execute_command(sandbox.id, "cat /workspace/nested/dir/in.txt")
    assert listed.stdout == "line1\nline2\n", "relative paths resolve under /workspace"
    whole = await sdk.read_file(sandbox.id, "nested/dir/in.txt")
    assert (whole["content"], whole["total_size"], whole["truncated"]) == (
        "line1\nline2\n",
        12,
        False,
    )
    part = await sdk.read_file(sandbox.id, "/workspace/nested/dir/in.txt", offset=6, length=5)
    assert (part["content"], part["truncated"]) == ("line2", True)
    target = tmp_path / "out" / "copy.txt"
    await sdk.download_file(sandbox.id, "nested/dir/in.txt", str(target))
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(SandboxFileNotFoundError):
        await sdk.read_file(sandbox.id, "missing.txt")
    with pytest.raises(APIError) as caught:
        await sdk.download_file(sandbox.id, "missing.txt", str(tmp_path / "missing.txt"))
    assert caught.value.status_code == 404
    assert not (tmp_path / "missing.txt").exists()


@pytest.mark.anyio
async def test_http_exposure_serves_its_url_until_unexposed(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new(start_command=HTTP_SERVER, network_access=False))
    await sdk.execute_command(sandbox.id, "echo exposed > /workspace/index.txt")
    exposure = await sdk.expose(sandbox.id, 8000, name="web")
    assert (exposure.sandbox_id, exposure.port, exposure.name) == (sandbox.id, 8000, "web")
    assert exposure.protocol == "HTTP"
    assert exposure.url.startswith("http://")
    async with httpx.AsyncClient(timeout=5) as http:

        async def served() -> str | None:
            with contextlib.suppress(httpx.TransportError):
                response = await http.get(f"{exposure.url}/index.txt")
                if response.status_code == 200:
                    return response.text
            return None

        async def refused() -> bool | None:
            try:
                await http.get(f"{exposure.url}/index.txt")
            except httpx.TransportError:
                return True
            return None

        assert await eventually(served, "the exposed HTTP server") == "exposed\n"
        listed = await sdk.list_exposed_ports(sandbox.id)
        assert [e.exposure_id for e in listed.exposures] == [exposure.exposure_id]
        await sdk.unexpose(sandbox.id, exposure.exposure_id)
        assert (await sdk.list_exposed_ports(sandbox.id)).exposures == []
        await eventually(refused, "the unexposed port closing")


@pytest.mark.anyio
async def test_tcp_exposure_gives_an_external_endpoint_for_raw_sockets(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new(start_command=ECHO_SERVER, network_access=False))
    exposure = await sdk.expose(sandbox.id, 9000, protocol="TCP")
    assert exposure.protocol == "TCP"
    assert exposure.external_endpoint is not None
    host, port = exposure.external_endpoint.rsplit(":", 1)
    assert int(port) == exposure.external_port

    async def echoed() -> bytes | None:
        try:
            with anyio.fail_after(5):
                async with await anyio.connect_tcp(host, int(port)) as stream:
                    await stream.send(b"ping\n")
                    return await stream.receive()
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            return None  # nothing listens inside yet: the proxy closes the connection

    assert await eventually(echoed, "the exposed TCP echo server") == b"PING\n"
    listed = await sdk.list_exposed_ports(sandbox.id)
    assert [(e.exposure_id, e.external_port) for e in listed.exposures] == [
        (exposure.exposure_id, exposure.external_port)
    ]


@pytest.mark.anyio
async def test_get_logs_returns_the_start_commands_output(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new(start_command="echo hello-from-main; exec sleep infinity"))

    async def logged() -> str | None:
        logs = await sdk.get_logs(sandbox.id)
        return logs if "hello-from-main" in logs else None

    await eventually(logged, "the start command's output in the logs")


@pytest.mark.anyio
async def test_gateway_tokens_are_cached_until_clear_auth_cache(
    connect: Connect, flavor: Flavor, new: New
) -> None:
    tap = Tap()
    sdk = connect(flavor, transport=tap)
    sandbox = await started(sdk, new())
    auth = f"/sandbox/{sandbox.id}/auth"
    await sdk.execute_command(sandbox.id, "true")
    await sdk.read_file(sandbox.id, "/etc/hostname")
    assert tap.count(auth) == 1
    sdk.clear_auth_cache()
    assert (await sdk.execute_command(sandbox.id, "echo ok")).stdout == "ok\n"
    assert tap.count(auth) == 2


@pytest.mark.anyio
async def test_a_refused_gateway_token_is_replaced_once_then_unauthorized(
    connect: Connect, flavor: Flavor, new: New, target: Server, dialect: Dialect
) -> None:
    refusals = {"left": 0}

    def refuse(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.startswith("/gw/") and refusals["left"] > 0:
            refusals["left"] -= 1
            return httpx.Response(401, json={"detail": "expired gateway token"})
        return None

    tap = Tap(refuse)
    sdk = connect(flavor, target, transport=tap)
    sandbox = await started(sdk, new())
    await sdk.execute_command(sandbox.id, "true")  # the client learns the gateway's dialect
    auth, calls = f"/sandbox/{sandbox.id}/auth", "/exec" if dialect == "rest" else "/Start"
    tap.requests.clear()
    refusals["left"] = 1
    assert (await sdk.execute_command(sandbox.id, "echo ok")).stdout == "ok\n"
    assert (tap.count(auth), tap.count(calls), len(tap.requests)) == (1, 2, 3)
    refusals["left"] = 2
    sdk.clear_auth_cache()
    with pytest.raises(UnauthorizedError):
        await sdk.execute_command(sandbox.id, "true")
    assert (tap.count(auth), tap.count(calls)) == (3, 4), "retried more than once"


def test_sync_client_as_context_manager_closes_its_connections(server: Server) -> None:
    with SandboxClient(APIClient(api_key=server.token, base_url=server.url)) as client:
        client.list(per_page=1)
        assert not client.api._http.is_closed
    assert client.api._http.is_closed


@pytest.mark.anyio
async def test_async_client_as_async_context_manager_closes_its_connections(
    server: Server,
) -> None:
    api = AsyncAPIClient(api_key=server.token, base_url=server.url)
    async with AsyncSandboxClient(api) as client:
        await client.list(per_page=1)
        assert not client.api._http.is_closed
    assert client.api._http.is_closed


# -- typed errors ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_exec_that_exhausts_memory_raises_sandbox_oom_error(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new(memory_gb=0.0625))
    with pytest.raises(SandboxOOMError) as caught:
        await sdk.execute_command(sandbox.id, ALLOCATE_256_MB, timeout=60)
    assert (caught.value.sandbox_id, caught.value.status, caught.value.error_type) == (
        sandbox.id,
        "ERROR",
        "OOM_KILLED",
    )
    with pytest.raises(SandboxOOMError):
        await sdk.execute_command(sandbox.id, "true")


@pytest.mark.anyio
async def test_sandbox_past_its_lifetime_raises_sandbox_timeout_error(
    connect: Connect, flavor: Flavor, fast_clock: Server, new: New
) -> None:
    sdk = connect(flavor, fast_clock)
    sandbox = await sdk.create(new(timeout_minutes=1))

    async def use_until_stopped() -> None:
        await sdk.wait_for_creation(sandbox.id)
        deadline = time.monotonic() + 30
        while True:
            await sdk.execute_command(sandbox.id, "true")
            assert time.monotonic() < deadline, "the sandbox outlived its 0.6 s lifetime"
            await anyio.sleep(0.05)

    with pytest.raises(SandboxTimeoutError) as caught:
        await use_until_stopped()
    assert (caught.value.sandbox_id, caught.value.status, caught.value.error_type) == (
        sandbox.id,
        "TIMEOUT",
        "TIMEOUT",
    )


@pytest.mark.anyio
async def test_command_past_its_timeout_raises_command_timeout_error(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    with pytest.raises(CommandTimeoutError) as caught:
        await sdk.execute_command(sandbox.id, "sleep 30", timeout=1)
    assert caught.value.sandbox_id == sandbox.id
    assert (await sdk.execute_command(sandbox.id, "echo alive")).stdout == "alive\n"


@pytest.mark.anyio
async def test_unpullable_image_raises_sandbox_image_pull_error(
    connect: Connect, flavor: Flavor, strict_images: Server, new: New
) -> None:
    sdk = connect(flavor, strict_images)
    sandbox = await sdk.create(new())
    with pytest.raises(SandboxImagePullError) as caught:
        await sdk.wait_for_creation(sandbox.id)
    assert (caught.value.sandbox_id, caught.value.status, caught.value.error_type) == (
        sandbox.id,
        "ERROR",
        "IMAGE_PULL_FAILED",
    )
    assert "python:3.11-slim" in str(caught.value)
    with pytest.raises(SandboxImagePullError):
        await sdk.bulk_wait_for_creation([sandbox.id])


@pytest.mark.anyio
async def test_wait_for_creation_raises_not_running_once_the_main_process_exited(
    sdk: Sdk, new: New
) -> None:
    sandbox = await sdk.create(new(start_command="exit 3"))

    async def wait_until_refused() -> None:
        # RUNNING is true for an instant, until the server's monitor sees the exit
        deadline = time.monotonic() + 30
        while True:
            await sdk.wait_for_creation(sandbox.id)
            assert time.monotonic() < deadline, "the exit was never reported"
            await anyio.sleep(0.05)

    with pytest.raises(SandboxNotRunningError) as caught:
        await wait_until_refused()
    assert (type(caught.value), caught.value.status) == (SandboxNotRunningError, "TERMINATED")
    with pytest.raises(SandboxNotRunningError):
        await sdk.bulk_wait_for_creation([sandbox.id])
    assert (await sdk.get(sandbox.id)).exit_code == 3


@pytest.mark.anyio
async def test_data_plane_calls_on_a_deleted_sandbox_raise_not_running(
    sdk: Sdk, new: New, target: Server, tmp_path: Path
) -> None:
    through_sdk, behind_its_back = [await started(sdk, new()) for _ in range(2)]
    for sandbox in (through_sdk, behind_its_back):  # caches a gateway token for each
        await sdk.execute_command(sandbox.id, "echo kept > kept.txt")
    await sdk.delete(through_sdk.id)
    await acontrol(target, "DELETE", f"/sandbox/{behind_its_back.id}")
    source = tmp_path / "up.txt"
    source.write_text("x")
    sandbox_id = behind_its_back.id
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: sdk.execute_command(through_sdk.id, "true"),
        lambda: sdk.execute_command(sandbox_id, "true"),
        lambda: sdk.read_file(sandbox_id, "kept.txt"),
        lambda: sdk.upload_file(sandbox_id, "up.txt", str(source)),
        lambda: sdk.download_file(sandbox_id, "kept.txt", str(tmp_path / "down.txt")),
    ]
    for call in calls:
        with pytest.raises(SandboxNotRunningError) as caught:
            await call()
        assert (type(caught.value), caught.value.status) == (SandboxNotRunningError, "TERMINATED")


@pytest.mark.anyio
async def test_wrong_api_key_raises_unauthorized(connect: Connect, flavor: Flavor) -> None:
    sdk = connect(flavor, api_key="not-the-key")
    with pytest.raises(UnauthorizedError) as caught:
        await sdk.list()
    assert caught.value.status_code == 401


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment with no endpoint settings; returns the config file's path (unwritten)."""
    for name in (
        "FLEETCTL_API_URL",
        "FLEETCTL_API_KEY",
        "FLEETCTL_CONTEXT",
        "FLEETCTL_SERVER_TOKEN",
        "PRIME_API_KEY",
        "PRIME_BASE_URL",
        "PRIME_API_BASE_URL",
        "STAGING_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    # a resolution that wrongly reaches the local context must not use the real data dir
    monkeypatch.setenv("FLEETCTL_DATA_DIR", str(tmp_path / "no-local-server"))
    return tmp_path / "config" / "fleetctl" / "config.yaml"


@pytest.mark.parametrize("api_class", [APIClient, AsyncAPIClient])
def test_prime_context_without_a_key_is_unauthorized_before_any_request(
    config: Path, monkeypatch: pytest.MonkeyPatch, api_class: type[APIClient | AsyncAPIClient]
) -> None:
    monkeypatch.setenv("FLEETCTL_CONTEXT", "prime")
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=SANDBOX_JSON)

    with pytest.raises(UnauthorizedError, match="PRIME_API_KEY"):
        api_class(transport=httpx.MockTransport(record))
    assert sent == []


@pytest.mark.anyio
async def test_http_402_raises_payment_required(connect: Connect, flavor: Flavor, new: New) -> None:
    def broke(request: httpx.Request) -> httpx.Response:
        return httpx.Response(402, json={"detail": "insufficient balance"})

    sdk = connect(flavor, base_url=NOWHERE, transport=httpx.MockTransport(broke))
    with pytest.raises(PaymentRequiredError) as caught:
        await sdk.create(new())
    assert caught.value.status_code == 402
    assert "insufficient balance" in str(caught.value)
    with pytest.raises(PaymentRequiredError):
        await sdk.execute_command("sbx-mock", "true")


SdkCall = Callable[[Sdk], Awaitable[object]]
MODEL_CALLS = [
    pytest.param(
        lambda sdk: sdk.create(CreateSandboxRequest(name="m", docker_image="i")), id="create"
    ),
    pytest.param(lambda sdk: sdk.get("sbx-mock"), id="get"),
    pytest.param(lambda sdk: sdk.list(labels=["a"]), id="list"),
    pytest.param(lambda sdk: sdk.wait_for_creation("sbx-mock"), id="wait_for_creation"),
    pytest.param(lambda sdk: sdk.bulk_delete(labels=["a"]), id="bulk_delete"),
    pytest.param(lambda sdk: sdk.expose("sbx-mock", 8000), id="expose"),
    pytest.param(lambda sdk: sdk.list_exposed_ports("sbx-mock"), id="list_exposed_ports"),
    pytest.param(lambda sdk: sdk.get_logs("sbx-mock"), id="get_logs"),
    pytest.param(lambda sdk: sdk.bulk_wait_for_creation(["sbx-mock"]), id="bulk_wait"),
    pytest.param(lambda sdk: sdk.execute_command("sbx-mock", "true"), id="execute_command"),
    pytest.param(lambda sdk: sdk.read_file("sbx-mock", "f"), id="read_file"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "call", [*MODEL_CALLS, pytest.param(lambda sdk: sdk.delete("sbx-mock"), id="delete")]
)
async def test_a_body_that_is_not_json_raises_api_error(
    connect: Connect, flavor: Flavor, call: SdkCall
) -> None:
    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"{not json", headers={"content-type": "text/plain"})

    sdk = connect(flavor, base_url=NOWHERE, transport=httpx.MockTransport(garbled), retry=FAST)
    with pytest.raises(APIError):
        await call(sdk)


@pytest.mark.anyio
@pytest.mark.parametrize("call", MODEL_CALLS)  # delete returns the raw dict, so no shape
async def test_a_json_body_of_the_wrong_shape_raises_api_error(
    connect: Connect, flavor: Flavor, call: SdkCall
) -> None:
    def odd(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"unexpected": True})

    sdk = connect(flavor, base_url=NOWHERE, transport=httpx.MockTransport(odd), retry=FAST)
    with pytest.raises(APIError):
        await call(sdk)


@pytest.mark.anyio
async def test_a_sandbox_id_is_one_path_segment_and_a_bad_one_an_api_error(
    connect: Connect, flavor: Flavor
) -> None:
    """An id holding `/` cannot reach another endpoint (delete → unexpose); one holding a
    control character is refused as the SDK's own error, not httpx's."""
    paths: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"detail": "not found"})

    sdk = connect(flavor, base_url=NOWHERE, transport=httpx.MockTransport(record), retry=FAST)
    with pytest.raises(APIError) as caught:
        await sdk.delete("abc/expose/xyz")
    assert caught.value.status_code == 404
    assert paths == ["/api/v1/sandbox/abc%2Fexpose%2Fxyz"]
    with pytest.raises(APIError):
        await sdk.get_logs("\x1f")


@pytest.mark.anyio
async def test_connection_refused_is_retried_then_raises_api_error(
    connect: Connect, flavor: Flavor, new: New
) -> None:
    sdk = connect(flavor, base_url=f"http://127.0.0.1:{closed_port()}", retry=FAST)
    with pytest.raises(APIError) as caught:
        await sdk.list()
    assert caught.value.status_code is None
    assert sdk.api.stats["retries"] >= 1
    with pytest.raises(APIError):
        await sdk.create(new())


# -- faults and throttling -------------------------------------------------------------


@pytest.mark.anyio
async def test_a_garbled_json_answer_is_retried_for_keyed_creates_but_not_for_exec(
    connect: Connect, flavor: Flavor, new: New
) -> None:
    """A 2xx whose JSON does not parse was damaged on the way: the work may be done, so only
    a call that is safe to repeat asks again (with its idempotency key)."""
    bodies: list[dict[str, Any]] = []
    garbage = httpx.Response(
        200, content=b"\x00garbled", headers={"content-type": "application/json"}
    )

    def garble_once(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/auth"):
            return httpx.Response(200, json={"token": "t", "gateway_url": NOWHERE,
                                             "user_ns": "ns", "job_id": "sbx-mock",
                                             "expires_at": "2999-01-01T00:00:00Z"})  # fmt: skip
        if "CommandSession" in request.url.path:  # a 0.2 API: exec is REST only
            return httpx.Response(404, json={"detail": "Not Found"})
        bodies.append(json.loads(request.content))
        return garbage if len(bodies) in (1, 3) else httpx.Response(200, json=SANDBOX_JSON)

    sdk = connect(flavor, base_url=NOWHERE, transport=httpx.MockTransport(garble_once), retry=FAST)
    assert (await sdk.create(new())).id == "sbx-mock"
    assert len(bodies) == 2
    assert bodies[0]["idempotency_key"] == bodies[1]["idempotency_key"]
    with pytest.raises(APIError, match="malformed"):
        await sdk.execute_command("sbx-mock", "true")
    assert len(bodies) == 3, "an exec was sent twice"


@pytest.mark.anyio
async def test_a_create_answered_http_500_is_retried_with_the_same_idempotency_key(
    connect: Connect, flavor: Flavor, new: New
) -> None:
    bodies: list[dict[str, Any]] = []

    def fail_once(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) == 1:
            return httpx.Response(500, json={"detail": "injected fault: HTTP 500"})
        return httpx.Response(200, json=SANDBOX_JSON)

    sdk = connect(flavor, base_url=NOWHERE, transport=httpx.MockTransport(fail_once), retry=FAST)
    assert (await sdk.create(new())).id == "sbx-mock"
    assert len({body["idempotency_key"] for body in bodies}) == 1 < len(bodies)


@pytest.mark.anyio
async def test_creates_through_faults_all_return_and_retries_never_duplicate(
    connect: Connect, flavor: Flavor, faulty: Server, new: New, label: str
) -> None:
    """Sync creates one at a time, async all at once; each retry reuses its create's key."""
    tap = Tap()
    sdk = connect(flavor, faulty, transport=tap, retry=PATIENT)
    requests = [new(f"n{i}") for i in range(30)]
    created, failed = await create_all(sdk, requests, parallel=flavor == "async")
    assert ([str(error) for error in failed], len(created)) == ([], 30)
    assert await labelled(faulty, label) == sorted(s.id for s in created), "duplicates or losses"
    keys_by_create: dict[str, set[str]] = {}
    bodies = create_bodies(tap)
    for body in bodies:
        keys_by_create.setdefault(body["labels"][1], set()).add(body["idempotency_key"])
    assert len(keys_by_create) == 30
    assert all(len(keys) == 1 for keys in keys_by_create.values()), keys_by_create
    assert len(set.union(*keys_by_create.values())) == 30, "two creates shared a key"
    assert len(bodies) > 30, "no create was retried: the faults never struck"
    suffered = await anyio.to_thread.run_sync(faults, faulty)
    assert suffered["error"] + suffered["reset"] > 0


@pytest.mark.anyio
async def test_a_create_whose_response_was_lost_after_the_work_is_not_duplicated_by_its_retry(
    connect: Connect, flavor: Flavor, lossy: Server, new: New, label: str
) -> None:
    """The server creates the sandbox, then the answer is cut or garbled on the way: the SDK
    retries with the same idempotency key and gets the same sandbox, never a second one."""
    tap = Tap()
    sdk = connect(flavor, lossy, transport=tap, retry=PATIENT)
    created, failed = await create_all(sdk, [new() for _ in range(12)], parallel=flavor == "async")
    assert ([str(error) for error in failed], len(created)) == ([], 12)
    assert await labelled(lossy, label) == sorted(s.id for s in created), "a retry duplicated"
    sent = Counter(body["idempotency_key"] for body in create_bodies(tap))
    assert len(sent) == 12
    assert max(sent.values()) > 1, "no create was retried: no response was lost"
    suffered = await anyio.to_thread.run_sync(faults, lossy)
    assert suffered["after"] > 0, suffered


@pytest.mark.anyio
async def test_a_job_start_whose_response_was_lost_is_retried_and_runs_once(
    connect: Connect, flavor: Flavor, lossy: Server, new: New
) -> None:
    """The server starts the job, then its answer is lost: the SDK sends the start again
    (safe: the server starts a job id once), and every job ran exactly once."""
    tap = Tap()
    sdk = connect(flavor, lossy, transport=tap, retry=PATIENT)
    sandbox = await started(sdk, new())
    ids = [f"once-{i}" for i in range(12)]
    jobs = [await sdk.start_background_job(sandbox.id, f"echo {i} >> /root/runs", job_id=i)
            for i in ids]  # fmt: skip
    deadline = time.monotonic() + 30
    while not all(s.completed for s in await sdk.get_background_job_statuses(jobs)):
        assert time.monotonic() < deadline, "the jobs never completed"
        await anyio.sleep(0.05)
    runs = (await sdk.execute_command(sandbox.id, "sort /root/runs")).stdout.split()
    assert runs == sorted(ids)
    sent = [r for r in tap.requests if r.method == "POST" and r.url.path.endswith("-jobs")]
    assert len(sent) > 12, "no start was retried: no response was lost"


@pytest.mark.anyio
async def test_creates_beyond_the_rate_limit_wait_for_retry_after_and_all_succeed(
    connect: Connect, flavor: Flavor, throttled: Server, new: New, label: str
) -> None:
    sdk = connect(flavor, throttled)
    created, failed = await create_all(sdk, [new() for _ in range(15)], parallel=True)
    assert ([str(error) for error in failed], len(created)) == ([], 15)
    assert sdk.api.stats["throttled"] > 0
    assert await labelled(throttled, label) == sorted(s.id for s in created)


# -- scale -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_bulk_wait_for_creation_over_150_sandboxes_then_bulk_delete_by_label(
    connect: Connect, new: New, label: str
) -> None:
    sdk = connect("async")
    created, failed = await create_all(
        sdk, [new(name=f"sdk-fleet-{i}") for i in range(150)], parallel=True
    )
    assert ([str(error) for error in failed], len(created)) == ([], 150)
    ids = [sandbox.id for sandbox in created]
    assert await sdk.bulk_wait_for_creation(ids) == dict.fromkeys(ids, "RUNNING")
    running = await sdk.list(labels=[label], status="RUNNING", per_page=200)
    assert running.total == 150
    deleted = await sdk.bulk_delete(labels=[label])
    assert (sorted(deleted.succeeded), deleted.failed) == (sorted(ids), [])
    assert (await sdk.list(labels=[label])).total == 0


@pytest.mark.anyio
async def test_100_mb_upload_and_download_round_trip_byte_for_byte(
    sdk: Sdk, new: New, tmp_path: Path
) -> None:
    source, target = tmp_path / "big.bin", tmp_path / "back" / "big.bin"
    digest = hashlib.sha256()
    with source.open("wb") as out:
        for _ in range(100):
            chunk = os.urandom(MB)
            digest.update(chunk)
            out.write(chunk)
    sandbox = await started(sdk, new(memory_gb=0.5))
    uploaded = await sdk.upload_file(sandbox.id, "/workspace/big.bin", str(source))
    assert (uploaded.success, uploaded.size) == (True, 100 * MB)
    inside = await sdk.execute_command(sandbox.id, "sha256sum /workspace/big.bin", timeout=120)
    assert inside.stdout.split()[0] == digest.hexdigest()
    await sdk.download_file(sandbox.id, "/workspace/big.bin", str(target))
    assert sha256(target) == digest.hexdigest()
    source.unlink()
    target.unlink()


# -- endpoint resolution ---------------------------------------------------------------


def test_explicit_base_url_wins_over_environment_and_context(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETCTL_API_URL", "http://from-env.invalid")
    monkeypatch.setenv("FLEETCTL_API_KEY", "env-key")
    monkeypatch.setenv("FLEETCTL_CONTEXT", "prime")
    monkeypatch.setenv("PRIME_API_KEY", "prime-key")
    endpoint = resolve(api_key="mine", base_url="http://explicit.invalid:9/api/v1/")
    assert endpoint == Endpoint("http://explicit.invalid:9", "mine", "explicit")


def test_fleetctl_api_url_and_key_from_the_environment_reach_the_server(
    config: Path, monkeypatch: pytest.MonkeyPatch, server: Server
) -> None:
    monkeypatch.setenv("FLEETCTL_API_URL", f"{server.url}/api/v1")
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    monkeypatch.setenv("FLEETCTL_CONTEXT", "prime")  # the environment wins over any context
    assert resolve() == Endpoint(server.url, server.token, "environment")
    with SandboxClient(APIClient()) as client:
        assert client.list(labels=["t-sdk-nothing-has-this"]).total == 0


def test_fleetctl_api_url_without_a_key_is_unauthorized_naming_fleetctl_api_key(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETCTL_API_URL", "http://from-env.invalid")
    with pytest.raises(UnauthorizedError, match="FLEETCTL_API_KEY"):
        resolve()
    assert resolve(api_key="given").api_key == "given"


def test_prime_context_reads_prime_api_key_and_base_url(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETCTL_CONTEXT", "prime")
    with pytest.raises(UnauthorizedError, match="PRIME_API_KEY"):
        resolve()
    monkeypatch.setenv("PRIME_API_KEY", "prime-key")
    assert resolve() == Endpoint(PRIME_DEFAULT_URL, "prime-key", "prime")
    monkeypatch.setenv("PRIME_BASE_URL", "https://prime.invalid/")
    assert resolve() == Endpoint("https://prime.invalid", "prime-key", "prime")


def test_custom_context_from_the_config_file_reaches_the_server(
    config: Path, monkeypatch: pytest.MonkeyPatch, server: Server
) -> None:
    config.parent.mkdir(parents=True)
    config.write_text(
        f"contexts:\n  staging:\n    url: {server.url}\n    api_key_env: STAGING_KEY\n"
        "current-context: staging\n"
    )
    with pytest.raises(UnauthorizedError, match="STAGING_KEY"):
        resolve()
    monkeypatch.setenv("STAGING_KEY", server.token)
    assert resolve() == Endpoint(server.url, server.token, "staging")
    with SandboxClient(APIClient()) as client:
        assert client.list(labels=["t-sdk-nothing-has-this"]).total == 0
    monkeypatch.setenv("FLEETCTL_CONTEXT", "prime")  # the variable wins over current-context
    monkeypatch.setenv("PRIME_API_KEY", "prime-key")
    assert resolve().context == "prime"


def test_unknown_context_is_an_api_error_listing_the_known_ones(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.parent.mkdir(parents=True)
    config.write_text("contexts:\n  staging:\n    url: http://staging.invalid\n")
    monkeypatch.setenv("FLEETCTL_CONTEXT", "nowhere")
    with pytest.raises(APIError) as caught:
        resolve()
    assert type(caught.value) is APIError
    assert all(name in str(caught.value) for name in ("'nowhere'", "local", "prime", "staging"))


def test_unparsable_config_file_is_an_api_error_naming_it(config: Path) -> None:
    config.parent.mkdir(parents=True)
    config.write_text("contexts: [\n")
    with pytest.raises(APIError, match=re.escape(str(config))):
        resolve()


@pytest.mark.parametrize(
    "text",
    [
        "contexts: {staging: {api_key_env: STAGING_KEY}}\n",
        "contexts: [staging]\n",
        "contexts: {staging: http://staging.invalid}\n",
    ],
    ids=["no-url", "list", "string-entry"],
)
def test_malformed_context_entry_is_an_api_error_naming_the_file(
    config: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    config.parent.mkdir(parents=True)
    config.write_text(text + "current-context: staging\n")
    monkeypatch.setenv("STAGING_KEY", "key")
    with pytest.raises(APIError, match=re.escape(str(config))):
        resolve()


@needs_sandboxes
def test_local_context_starts_the_server_once_saying_so_in_one_line(
    config: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    with traversable_dir() as base:
        data_dir = base / "data"
        monkeypatch.setenv("FLEETCTL_DATA_DIR", str(data_dir))
        capfd.readouterr()
        try:
            first = resolve()
            announced = capfd.readouterr().err
            second = resolve()
            repeated = capfd.readouterr().err
            with SandboxClient(APIClient()) as client:
                listed = client.list()
            token = (data_dir / "token").read_text().strip()
        finally:
            stopped = daemon.stop(data_dir)
    assert stopped is not None
    assert (first.context, first.api_key) == ("local", token)
    assert announced.count("\n") == 1
    assert announced.startswith("fleetctl: started")
    assert first.base_url in announced
    assert (second, repeated) == (first, "")
    assert listed.total == 0
