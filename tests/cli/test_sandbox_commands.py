"""`fleetctl get`, `logs` and `exec` against a real server, and the local server's auto-start."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from fleetctl.server import daemon
from tests.conftest import Running, Server, needs_sandboxes, traversable_dir
from tests.conftest import run_cli as run

pytestmark = needs_sandboxes


@pytest.fixture
def pointed(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("FLEETCTL_API_URL", server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    return server


def test_get_lists_by_label_as_table_and_json(
    pointed: Server, running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    record, _ = running(labels=["t-cli-get", "x"], name="cli-get")
    code, out, _ = run(capsys, "get", "-l", "t-cli-get", "-o", "json")
    assert code == 0
    assert [(s["id"], s["status"]) for s in json.loads(out)] == [(record["id"], "RUNNING")]
    code, out, _ = run(capsys, "get", "-l", "t-cli-get", "-l", "x")
    assert code == 0
    assert record["id"] in out
    assert "RUNNING" in out
    assert run(capsys, "get", "-l", "t-cli-get", "-l", "nope", "-o", "json")[1].strip() == "[]"


def test_exec_prints_output_and_returns_the_exit_code(
    pointed: Server, running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    record, _ = running()
    code, out, err = run(
        capsys, "exec", record["id"], "--", "sh", "-c", "echo out; echo err >&2; exit 5"
    )
    assert (code, out, err) == (5, "out\n", "err\n")


def test_logs_and_unknown_sandbox(
    pointed: Server, running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    record, _ = running()
    code, out, _ = run(capsys, "logs", record["id"])
    assert code == 0
    assert "starting sandbox" in out
    code, _, err = run(capsys, "logs", "no-such-sandbox")
    assert code == 1
    assert "HTTP 404" in err
    assert "Traceback" not in err


def test_local_server_starts_on_first_use_and_says_so_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FLEETCTL_API_URL", "FLEETCTL_API_KEY", "FLEETCTL_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent-fleetctl-config")
    with traversable_dir() as base:
        data_dir = base / "data"
        monkeypatch.setenv("FLEETCTL_DATA_DIR", str(data_dir))
        try:
            code, out, err = run(capsys, "get", "-o", "json")
            assert (code, out.strip()) == (0, "[]")
            assert err.count("\n") == 1
            assert err.startswith("fleetctl: started the local sandbox server on http://127.0.0.1:")
            code, _, err = run(capsys, "get")
            assert (code, err) == (0, "")
            info = daemon.running(data_dir)
            assert info is not None
            assert httpx.get(f"{info.url}/api/v1/health").status_code == 200
        finally:
            daemon.stop(Path(data_dir))
