"""Root in a Debian image does what it does in a container: `apt-get install` into the
image's own directories (apt dropping to its `_apt` user to fetch), `useradd -m` with a
home owned by the new user, and commands then run as that user by name.

The image is built from this Debian host's own packages (tests/images/debian.py): real
apt, dpkg and shadow tools with their dpkg database, no download (tests send no traffic
past loopback).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.sandboxes import APIClient, CreateSandboxRequest, SandboxClient
from tests.conftest import Server, own_server
from tests.images.conftest import NO_INTERNET
from tests.images.debian import debian_layer
from tests.images.registry import Registry

PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def puller(registry: Registry) -> Iterator[Server]:
    """This module's own server: the image unpacks past the shared one's 50 MB limit."""
    with own_server("--image-policy", "pull", "--insecure-registry", registry.host,
                    "--image-max-gb", "0.5", env=NO_INTERNET) as (info, _):  # fmt: skip
        yield info


@pytest.fixture
def deb(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fleetctl-hello\nVersion: 1.0\nArchitecture: all\nDepends: coreutils\n"
        "Maintainer: tests <tests@localhost>\nDescription: a test package\n"
    )
    (root / "usr" / "share" / "fleetctl-hello").mkdir(parents=True)
    (root / "usr" / "share" / "fleetctl-hello" / "hello").write_text("installed\n")
    built = tmp_path / "fleetctl-hello.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(built)],
                   check=True, capture_output=True)  # fmt: skip
    return built


@pytest.fixture
def sdk(puller: Server) -> Iterator[SandboxClient]:
    client = SandboxClient(APIClient(api_key=puller.token, base_url=puller.url))
    yield client
    client.close()


def test_root_in_a_debian_image_installs_packages_and_adds_users(
    sdk: SandboxClient, registry: Registry, deb: Path
) -> None:
    registry.push("tests/debian", "12", [debian_layer()], config={"Env": [PATH]})
    sandbox = sdk.create(
        CreateSandboxRequest(name="deb", docker_image=f"{registry.host}/tests/debian:12")
    )
    try:
        sdk.wait_for_creation(sandbox.id)
        sdk.upload_file(sandbox.id, "/workspace/fleetctl-hello.deb", str(deb))
        installed = sdk.execute_command(
            sandbox.id, "apt-get install -y ./fleetctl-hello.deb 2>&1", timeout=120
        )
        assert installed.exit_code == 0, installed.stdout
        assert "setgroups" not in installed.stdout  # apt's drop to _apt worked
        shown = sdk.execute_command(
            sandbox.id,
            "cat /usr/share/fleetctl-hello/hello; dpkg -s fleetctl-hello | grep Status; "
            "stat -c %U /usr/share/fleetctl-hello/hello",
        )
        assert shown.stdout == "installed\nStatus: install ok installed\nroot\n", shown.stderr
        added = sdk.execute_command(sandbox.id, "useradd -m -u 2000 -s /bin/bash bob && "
                                                "stat -c '%u %g' /home/bob")  # fmt: skip
        assert added.stdout == "2000 2000\n", added.stdout + added.stderr
        # a user added at run time is found by name (docker exec -u bob)
        as_bob = sdk.execute_command(sandbox.id, "id -un; echo $HOME; touch ~/mine", user="bob")
        assert as_bob.stdout == "bob\n/home/bob\n", as_bob.stderr
        denied = sdk.execute_command(sandbox.id, "touch /usr/share/x", user="bob")
        assert denied.exit_code != 0  # bob is no root
    finally:
        sdk.delete(sandbox.id)
