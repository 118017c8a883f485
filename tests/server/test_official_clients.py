"""The official `prime-sandboxes` clients, unmodified, each in a venv of its own, pass their
suite (tests/official/) against a real fleetctl server: the guide's release (0.2.31),
the last before Connect exec (0.2.39) and today's (0.5.1).

A test the release is too old for is skipped inside the suite; any other skip, a failure
or a suite that ran nothing fails here.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import Server, needs_sandboxes
from tests.official import venvs

pytestmark = needs_sandboxes
SUITE = venvs.ROOT / "tests" / "official"


@pytest.mark.parametrize("version", venvs.VERSIONS)
def test_the_official_client_passes_its_suite(version: str, server: Server, tmp_path: Path) -> None:
    python = venvs.ensure(version)
    report = tmp_path / "report.xml"
    env = {**os.environ, "FLEETCTL_TEST_URL": server.url, "FLEETCTL_TEST_TOKEN": server.token}
    done = subprocess.run(
        [str(python), "-m", "pytest", "-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE),
         "-q", f"--junitxml={report}", str(SUITE)],
        cwd=venvs.ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    skipped = [c.find("skipped") for c in cases]
    reasons = {s.get("message", "") for s in skipped if s is not None}
    assert all("needs prime-sandboxes" in reason for reason in reasons), reasons
    ran = sum(1 for s in skipped if s is None)
    assert ran >= 10, f"prime-sandboxes {version} ran only {ran} tests"
