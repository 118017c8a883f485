"""The official client's suite: aimed at a fleetctl server by the environment.

    FLEETCTL_TEST_URL     the server's base URL
    FLEETCTL_TEST_TOKEN   its API key

Runs inside a venv holding one prime-sandboxes release (and no fleetctl), so it uses
only that client, httpx and pytest. Each test gets a HOME of its own, because the SDK
caches gateway tokens in ~/.prime/sandbox_auth_cache.json keyed only by sandbox id.
A test marked `since("0.5.1")` is skipped for older releases.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.official.release import RELEASE


@dataclass(frozen=True)
class Server:
    url: str
    token: str


@pytest.fixture(scope="session")
def server() -> Server:
    return Server(os.environ["FLEETCTL_TEST_URL"], os.environ["FLEETCTL_TEST_TOKEN"])


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{server.url}/api/v1",
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=60,
    ) as client:
        yield client


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("since")
        if marker is None:
            continue
        needed = tuple(int(part) for part in str(marker.args[0]).split("."))
        if needed > RELEASE:
            item.add_marker(pytest.mark.skip(reason=f"needs prime-sandboxes {marker.args[0]}"))


@pytest.fixture
def prime_home(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Aim the SDK at the server with a HOME (and auth cache) of its own."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PRIME_API_BASE_URL", server.url)
    monkeypatch.setenv("PRIME_API_KEY", server.token)
    for name in ("PRIME_BASE_URL", "PRIME_TEAM_ID", "PRIME_USER_ID"):
        monkeypatch.delenv(name, raising=False)
    return home
