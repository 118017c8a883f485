"""Root in a sandbox installs packages into the image's own directories, as in a container.

The image is Debian's package manager on a static busybox: the host's `dpkg` and its
libraries copied into a layer with an empty package database, all of it root's (uid 0)
in the image, as in any Debian image. Installing a .deb writes /usr/share and
/var/lib/dpkg, directories the image's root owns: what `apt-get install` does, minus
the download (tests send no traffic past loopback).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.sandboxes import APIClient, CreateSandboxRequest, SandboxClient
from tests.conftest import Server
from tests.images.registry import Layer, Registry, busybox_layer, host_binaries

#: dpkg and what it runs (GNU tar: dpkg-deb passes it options busybox tar lacks)
DPKG = (
    "/usr/bin/dpkg",
    "/usr/bin/dpkg-deb",
    "/usr/bin/dpkg-query",
    "/usr/bin/dpkg-split",
    "/usr/bin/tar",
)
STUB = b"#!/bin/sh\nexit 0\n"


def dpkg_layer() -> Layer:
    layer = host_binaries(*DPKG)
    for directory in (
        "usr/share",
        "sbin",
        "etc/dpkg",
        "var",
        "var/lib",
        "var/lib/dpkg",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ):
        layer.dir(directory)  # fmt: skip
    for tool in ("sbin/ldconfig", "sbin/start-stop-daemon"):  # dpkg wants them in PATH
        layer.file(tool, STUB, mode=0o755)
    for empty in ("var/lib/dpkg/status", "var/lib/dpkg/available", "etc/dpkg/dpkg.cfg"):
        layer.file(empty, b"")
    return layer


@pytest.fixture
def deb(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fleetctl-hello\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tests <tests@localhost>\nDescription: a test package\n"
    )
    (root / "usr" / "share" / "fleetctl-hello").mkdir(parents=True)
    (root / "usr" / "share" / "fleetctl-hello" / "hello").write_text("installed\n")
    built = tmp_path / "h.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(built)],
                   check=True, capture_output=True)  # fmt: skip
    return built


@pytest.fixture
def sdk(puller: Server) -> Iterator[SandboxClient]:
    client = SandboxClient(APIClient(api_key=puller.token, base_url=puller.url))
    yield client
    client.close()


def test_root_installs_a_package_into_the_images_own_directories(
    sdk: SandboxClient, registry: Registry, deb: Path
) -> None:
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    registry.push("tests/debianish", "1", [busybox_layer(), dpkg_layer()], config={"Env": [path]})
    sandbox = sdk.create(
        CreateSandboxRequest(name="deb", docker_image=f"{registry.host}/tests/debianish:1")
    )
    try:
        sdk.wait_for_creation(sandbox.id)
        sdk.upload_file(sandbox.id, "/workspace/h.deb", str(deb))
        # absolute: busybox's shell runs its own applets (dpkg among them) before PATH
        installed = sdk.execute_command(sandbox.id, "/usr/bin/dpkg -i /workspace/h.deb")
        assert installed.exit_code == 0, installed.stdout + installed.stderr
        shown = sdk.execute_command(
            sandbox.id,
            "cat /usr/share/fleetctl-hello/hello; /usr/bin/dpkg -s fleetctl-hello | grep Status",
        )
        assert shown.stdout == "installed\nStatus: install ok installed\n", shown.stderr
    finally:
        sdk.delete(sandbox.id)
