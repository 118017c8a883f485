"""A loopback registry for the image tests, and a server that pulls from it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, own_server, traversable_dir
from tests.images.registry import Registry, local_registry

#: Registries other than the test's (on loopback) are reached through a proxy that
#: refuses every connection: nothing goes to the internet, and such pulls are Unreachable.
NO_INTERNET = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with traversable_dir() as base, local_registry(base) as found:
        yield found


@pytest.fixture(scope="module")
def puller(registry: Registry) -> Iterator[Server]:
    """A server that pulls (no fallback) and speaks plain HTTP to the test registry."""
    with own_server("--image-policy", "pull", "--insecure-registry", registry.host,
                    "--image-max-gb", "0.05", env=NO_INTERNET) as (info, _):  # fmt: skip
        yield info


@pytest.fixture
def api(puller: Server) -> Iterator[httpx.Client]:
    with puller.client() as client:
        yield client
