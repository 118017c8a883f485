"""The REST API fuzzed from its own OpenAPI document: no 5xx, every response as documented."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, needs_sandboxes, own_server

pytestmark = [pytest.mark.reliability, needs_sandboxes]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server of its own: the fuzzer leaves hundreds of odd sandboxes behind."""
    with own_server() as (info, _):
        yield info


def test_no_input_makes_a_server_error_and_responses_match_the_schema(
    server: Server, tmp_path: Path
) -> None:
    """schemathesis (coverage, fuzzing and stateful phases, fixed seed) against the served
    document; it found a 500 on an empty idempotency key and one on a huge page number."""
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert binary, "schemathesis is a test dependency"
    result = subprocess.run(
        [binary, "run", f"{server.url}/openapi.json",
         "-H", f"Authorization: Bearer {server.token}",
         "--checks", "not_a_server_error,response_schema_conformance",
         "--max-examples", "25", "--seed", "7", "--no-color"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout
