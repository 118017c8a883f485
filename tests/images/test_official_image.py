"""Today's official SDK (0.5.1, unmodified, in its own venv) creates a sandbox from an image
of the test registry and runs a command in the image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import Server
from tests.images.registry import Layer, Registry, busybox_layer, host_binaries
from tests.official import venvs

SCRIPT = """
import sys
from prime_sandboxes import APIClient, CreateSandboxRequest, SandboxClient

client = SandboxClient(APIClient())
sandbox = client.create(CreateSandboxRequest(name="official", docker_image=sys.argv[1]))
try:
    client.wait_for_creation(sandbox.id)
    result = client.execute_command(sandbox.id, "cat /marker; ls /usr/bin/python3 || true")
    print(result.stderr, result.exit_code, file=sys.stderr)
    print(result.stdout, end="")
finally:
    client.delete(sandbox.id)
"""


def test_the_official_sdk_runs_an_image_of_the_registry(
    puller: Server, registry: Registry, tmp_path: Path
) -> None:
    # 0.5.1 runs commands with /bin/bash: the host's, on the busybox base
    bash = host_binaries("/usr/bin/bash").symlink("bin/bash", "/usr/bin/bash")
    registry.push(
        "tests/official", "1", [busybox_layer(), bash, Layer().file("marker", b"image\n")]
    )
    python = venvs.ensure("0.5.1")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PRIME_")}
    env |= {"PRIME_API_BASE_URL": puller.url, "PRIME_API_KEY": puller.token,
            "HOME": str(tmp_path)}  # fmt: skip
    done = subprocess.run(
        [str(python), "-c", SCRIPT, f"{registry.host}/tests/official:1"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("image\n"), done.stderr
    assert done.stdout == "image\n"  # and no python3 of the host's: ls said so on stderr
