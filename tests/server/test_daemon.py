"""`fleetctl server start|stop|status`, the API token, rate limits and doctor, end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetctl.cli import main
from tests.conftest import needs_sandboxes, traversable_dir

pytestmark = needs_sandboxes


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with traversable_dir() as base:
        yield base / "data"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_background_server_lifecycle_with_rate_limit_and_token(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEETCTL_SERVER_TOKEN", raising=False)
    code, out, _ = run(
        capsys,
        "server",
        "start",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--rate-limit",
        "create=2/s",
    )
    assert code == 0, out
    try:
        info = json.loads((data_dir / "server.json").read_text())
        assert info["url"].startswith("http://127.0.0.1:")
        token_file = data_dir / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert run(capsys, "server", "status", "--data-dir", str(data_dir))[0] == 0
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        body = {"name": "rl", "docker_image": "x", "memory_gb": 0.5, "labels": ["t-daemon"]}
        with httpx.Client(base_url=f"{info['url']}/api/v1", headers=headers) as api:
            statuses = [api.post("/sandbox", json=body) for _ in range(3)]
            assert [r.status_code for r in statuses] == [200, 200, 429]
            assert int(statuses[2].headers["Retry-After"]) >= 1
            assert int(statuses[2].headers["retry-after-ms"]) >= 1
            assert "rate limit exceeded for create" in statuses[2].json()["detail"]
            ids = [r.json()["id"] for r in statuses[:2]]
    finally:
        code, out, _ = run(capsys, "server", "stop", "--data-dir", str(data_dir))
    assert code == 0
    assert "stopped the server" in out
    assert not list((data_dir / "sandboxes").iterdir()), "stop left sandbox directories"
    assert all(not (data_dir / "run" / i).exists() for i in ids)
    code, out, _ = run(capsys, "server", "status", "--data-dir", str(data_dir))
    assert code == 1
    assert "no server is running" in out


def test_token_from_environment_wins(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETCTL_SERVER_TOKEN", "env-token-123")
    assert run(capsys, "server", "start", "--port", "0", "--data-dir", str(data_dir))[0] == 0
    try:
        url = json.loads((data_dir / "server.json").read_text())["url"]
        with httpx.Client(base_url=f"{url}/api/v1") as api:
            ok = api.get("/sandbox", headers={"Authorization": "Bearer env-token-123"})
            assert ok.status_code == 200
            assert not (data_dir / "token").exists()
    finally:
        run(capsys, "server", "stop", "--data-dir", str(data_dir))


def test_bad_server_flags_are_usage_errors(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    code, _, err = run(
        capsys, "server", "start", "--data-dir", str(data_dir), "--rate-limit", "create=fast"
    )
    assert code == 1
    assert "invalid rate limits" in err
    code, _, err = run(
        capsys, "server", "start", "--data-dir", str(data_dir), "--faults", "error=2"
    )
    assert code == 1
    assert "invalid faults" in err
    assert not (data_dir / "server.json").exists()


def test_data_dir_that_sandboxes_cannot_reach_is_refused_clearly(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    code, _, err = run(
        capsys, "server", "start", "--port", "0", "--data-dir", str(private / "data")
    )
    assert code == 1
    assert "exited at start" in err
    log = (private / "data" / "server.log").read_text()
    assert "which sandbox users cannot enter" in log


def test_doctor_reports_isolation_features(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "doctor")
    assert code == 0
    assert "bwrap:" in out
    assert "cgroups: v" in out
    assert "ok: this host can run sandboxes" in out
    assert os.geteuid() == 0 or "problem:" in out


def test_a_killed_server_leaks_nothing_after_the_next_start(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    assert run(capsys, "server", "start", "--port", "0", "--data-dir", str(data_dir))[0] == 0
    info = json.loads((data_dir / "server.json").read_text())
    headers = {"Authorization": f"Bearer {(data_dir / 'token').read_text().strip()}"}
    with httpx.Client(base_url=f"{info['url']}/api/v1", headers=headers) as api:
        sandbox_id = api.post(
            "/sandbox", json={"name": "orphan", "docker_image": "x", "memory_gb": 0.5}
        ).json()["id"]
        deadline = time.monotonic() + 30
        while api.get(f"/sandbox/{sandbox_id}").json()["status"] != "RUNNING":
            assert time.monotonic() < deadline
        runtime = sqlite_runtime(data_dir, sandbox_id)
    os.kill(info["pid"], signal.SIGKILL)
    wait_gone(info["pid"])
    assert process_alive(runtime["init_pid"]), "the sandbox should outlive a killed server"
    assert run(capsys, "server", "start", "--port", "0", "--data-dir", str(data_dir))[0] == 0
    try:
        info = json.loads((data_dir / "server.json").read_text())
        with httpx.Client(base_url=f"{info['url']}/api/v1", headers=headers) as api:
            record = api.get(f"/sandbox/{sandbox_id}").json()
        assert record["status"] == "TERMINATED"
        assert "restarted" in record["terminationReason"]
        assert not process_alive(runtime["init_pid"])
        assert not (data_dir / "sandboxes" / sandbox_id).exists()
        assert not any(Path(p).exists() for p in runtime["cgroup_paths"])
    finally:
        run(capsys, "server", "stop", "--data-dir", str(data_dir))


def sqlite_runtime(data_dir: Path, sandbox_id: str) -> dict[str, Any]:
    with sqlite3.connect(data_dir / "state.db") as db:
        row = db.execute("SELECT runtime FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    return dict(json.loads(row[0]))


def process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (this container's init may not reap)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line[stat_line.rindex(")") + 2] not in "ZX"


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not process_alive(pid):
            return
        assert time.monotonic() < deadline, f"process {pid} did not exit"
