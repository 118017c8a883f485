"""Fixtures of the SDK's tests: clients of both flavors (`flavor`), both exec transports
(`dialect`: every test of an `sdk` runs over Connect and over REST), and servers with
special flags, each started once and stopped at the end."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest

from fleetctl.sandboxes import (
    APIClient,
    AsyncAPIClient,
    AsyncSandboxClient,
    CreateSandboxRequest,
    RetryPolicy,
    SandboxClient,
)
from tests.conftest import Server, acontrol, own_server
from tests.sandboxes.support import Connect, Dialect, Flavor, New, Sdk, Threaded

FAULTS = "error=0.3,reset=0.2,seed=11,scope=control"
#: A third of control-plane responses are lost after the server did the work.
LOST = "after=0.35,seed=3,scope=control"
DIALECTS: tuple[Dialect, ...] = ("connect", "rest")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that asks for a dialect (an `sdk` does) runs in each one its module names
    (`DIALECTS`, by default both), unless it parametrizes `dialect` itself."""
    if "dialect" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if "dialect" in (names.split(",") if isinstance(names, str) else names):
            return
    metafunc.parametrize("dialect", getattr(metafunc.module, "DIALECTS", DIALECTS))


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> Flavor:
    return cast(Flavor, request.param)


@pytest.fixture
def label() -> str:
    return f"t-sdk-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def new(label: str) -> New:
    """A small sandbox request carrying the test's label (plus `extra` labels)."""

    def make(*extra: str, **fields: Any) -> CreateSandboxRequest:
        defaults = {"name": "sdk-test", "docker_image": "python:3.11-slim", "memory_gb": 0.25}
        return CreateSandboxRequest(**{**defaults, **fields, "labels": [label, *extra]})

    return make


@pytest.fixture
async def connect(server: Server, label: str) -> AsyncIterator[Connect]:
    """Open SDK clients (closed after the test); the test's sandboxes are deleted after it."""
    opened: list[Sdk] = []
    used: dict[str, Server] = {}

    def open_client(
        flavor: Flavor,
        target: Server | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
    ) -> Sdk:
        target = target or server
        if base_url is None:
            used[target.url] = target
        key, url = api_key or target.token, base_url or target.url
        sdk: Sdk
        if flavor == "sync":
            sdk = Threaded(SandboxClient(APIClient(key, url, transport=transport, retry=retry)))
        else:
            sdk = AsyncSandboxClient(AsyncAPIClient(key, url, transport=transport, retry=retry))
        opened.append(sdk)
        return sdk

    yield open_client
    for sdk in opened:
        await sdk.aclose()
    for target in used.values():
        response = await acontrol(target, "DELETE", "/sandbox", json={"labels": [label]})
        assert response.status_code == 200, response.text


@pytest.fixture
def target(dialect: Dialect, server: Server, request: pytest.FixtureRequest) -> Server:
    """The server of this test's dialect: the session's, or one without the command session."""
    return server if dialect == "connect" else cast(Server, request.getfixturevalue("rest_only"))


@pytest.fixture
def sdk(connect: Connect, flavor: Flavor, target: Server) -> Sdk:
    """An SDK client of this test's flavor on the server of its dialect."""
    return connect(flavor, target)


@pytest.fixture(scope="session")
def rest_only() -> Iterator[Server]:
    """A server whose gateway has no Connect command session: exec is REST, as on 0.2 APIs."""
    with own_server("--no-command-session") as (info, _):
        yield info


@pytest.fixture(scope="module")
def faulty() -> Iterator[Server]:
    """Half the control-plane requests fail: 30% answer 500/502/503, 20% drop mid-response."""
    with own_server("--faults", FAULTS) as (info, _):
        yield info


@pytest.fixture(scope="module")
def lossy() -> Iterator[Server]:
    with own_server("--faults", LOST) as (info, _):
        yield info


@pytest.fixture(scope="module")
def throttled() -> Iterator[Server]:
    with own_server("--rate-limit", "create=5/s") as (info, _):
        yield info


@pytest.fixture(scope="module")
def fast_clock() -> Iterator[Server]:
    """Lifetimes run 100x fast: timeout_minutes=1 ends a sandbox after 0.6 s."""
    with own_server("--timeout-scale", "0.01") as (info, _):
        yield info


#: An HTTPS proxy on a loopback port nothing listens on (port 9, discard: closed here).
NO_INTERNET = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def strict_images() -> Iterator[Server]:
    """Images are pulled, with no fallback, through a proxy that refuses every connection:
    every sandbox fails with IMAGE_PULL_FAILED (and nothing reaches the internet)."""
    with own_server("--image-policy", "pull", env=NO_INTERNET) as (info, _):
        yield info
