"""Pulling from a registry that wants a password (htpasswd, Basic over plain HTTP because
the server was told the registry is HTTP-only); the password never shows."""

from __future__ import annotations

import pytest

from tests.conftest import own_server, traversable_dir, wait_for
from tests.images.registry import busybox_layer, local_registry
from tests.images.token_auth import token_service

PASSWORD = "canary-registry-password-7f3a"


@pytest.mark.parametrize("given", [PASSWORD, "wrong-password"])
def test_a_password_registry_pulls_with_the_configured_credentials(given: str) -> None:
    with traversable_dir() as base, local_registry(base, ("puller", PASSWORD)) as registry:
        registry.push("tests/private", "1", [busybox_layer()])
        env = {"FLEETCTL_REGISTRY_AUTH": f"{registry.host}=puller:{given}"}
        flags = ("--image-policy", "pull", "--insecure-registry", registry.host)
        with own_server(*flags, env=env) as (server, _), server.client() as api:
            image = f"{registry.host}/tests/private:1"
            created = api.post("/sandbox", json={"name": "p", "docker_image": image}).json()
            if given == PASSWORD:
                record = wait_for(api, created["id"], "RUNNING")
            else:
                record = wait_for(api, created["id"], "ERROR")
                assert record["errorType"] == "IMAGE_PULL_FAILED"
                assert "unauthorized" in record["errorMessage"]
            logs = api.get(f"/sandbox/{created['id']}/logs").json()["logs"]
            server_log = (server.data_dir.parent / "data.log").read_text()
            for seen in (str(record), logs, server_log):
                assert PASSWORD not in seen
                assert "wrong-password" not in seen
            api.delete(f"/sandbox/{created['id']}")


def test_a_token_registry_pulls_through_the_bearer_flow() -> None:
    with (
        traversable_dir() as base,
        token_service(base, ("puller", PASSWORD)) as tokens,
        local_registry(base, token=tokens) as registry,
    ):
        registry.push("tests/bearer", "1", [busybox_layer()])
        pushed = len(tokens.issued)
        env = {"FLEETCTL_REGISTRY_AUTH": f"{registry.host}=puller:{PASSWORD}"}
        flags = ("--image-policy", "pull", "--insecure-registry", registry.host)
        with own_server(*flags, env=env) as (server, _), server.client() as api:
            image = f"{registry.host}/tests/bearer:1"
            created = api.post("/sandbox", json={"name": "b", "docker_image": image}).json()
            wait_for(api, created["id"], "RUNNING")
            api.delete(f"/sandbox/{created['id']}")
        # the server asked for a pull token of that repository, once (it is cached)
        assert tokens.issued[pushed:] == ["repository:tests/bearer:pull"]
