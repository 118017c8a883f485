"""Virtual environments holding one official `prime-sandboxes` release each, unmodified.

    python tests/official/venvs.py [VERSION ...]     # make them (CI does, before pytest)

The official clients cannot share fleetctl's environment: 0.2.x depends on
`connect-python`, which installs into the same `connectrpc` package that fleetctl's
server uses at another version. Each venv gets the release, pytest, anyio and httpx,
and runs `tests/official/` inside it (see tests/server/test_official_clients.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The guide's release, one before Connect exec, and today's.
VERSIONS = ("0.2.31", "0.2.39", "0.5.1")
EXTRAS = ("pytest>=8.2,<10", "anyio>=4.4,<5", "httpx>=0.27,<1")


def path(version: str) -> Path:
    return ROOT / ".venvs" / f"prime-sandboxes-{version}"


def ensure(version: str) -> Path:
    """The venv of `version`, made (once) if missing; returns its python."""
    python = path(version) / "bin" / "python"
    marker = path(version) / "installed"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path(version))], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"prime-sandboxes=={version}", *EXTRAS],
        check=True,
    )
    marker.write_text(version)
    return python


if __name__ == "__main__":
    for wanted in sys.argv[1:] or VERSIONS:
        print(f"prime-sandboxes {wanted}: {ensure(wanted)}")
