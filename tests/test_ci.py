"""CI cannot pass by skipping: under CI=true, a host that cannot run sandboxes fails the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from fleetctl.docgen import ROOT

NOBODY = 65534


def collect_as_nobody(ci: str) -> subprocess.CompletedProcess[str]:
    """pytest, collecting one module, as an unprivileged user (who cannot run sandboxes)."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    env = {**os.environ, "CI": ci, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
         "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only",
         str(ROOT / "tests" / "spec" / "test_schema.py")],
        capture_output=True, text=True, cwd="/", env=env, check=False, timeout=120,
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run pytest as another user")
def test_ci_fails_with_the_reason_where_sandboxes_cannot_run() -> None:
    refused = collect_as_nobody("true")
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR, refused.stdout + refused.stderr
    assert "CI=true, and this host cannot run sandboxes" in refused.stderr
    assert "not root" in refused.stderr
    allowed = collect_as_nobody("")  # outside CI the sandbox tests are merely skipped
    assert allowed.returncode == pytest.ExitCode.OK, allowed.stdout + allowed.stderr
