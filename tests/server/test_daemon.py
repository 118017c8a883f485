"""`fleetctl server start|stop|status`, the API token, rate limits and doctor, end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetctl.proto import command_session_pb2 as pb
from fleetctl.sandboxes import APIClient, SandboxClient
from tests.conftest import needs_sandboxes, traversable_dir
from tests.conftest import run_cli as run

pytestmark = needs_sandboxes


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with traversable_dir() as base:
        yield base / "data"


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


def test_extra_api_keys_are_accepted_and_rate_limited_apart(
    capsys: pytest.CaptureFixture[str],
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEETCTL_SERVER_TOKEN", "main-key-123")
    second = tmp_path / "second.key"
    second.write_text("second-key-456\n")
    code, _, err = run(capsys, "server", "start", "--port", "0", "--data-dir", str(data_dir),
                       "--api-key-file", str(tmp_path / "missing.key"))  # fmt: skip
    assert code == 1
    assert "cannot read the API key file" in (data_dir / "server.log").read_text(), err
    argv = ["server", "start", "--port", "0", "--data-dir", str(data_dir),
            "--api-key-file", str(second), "--rate-limit", "list=1/s"]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    try:
        url = json.loads((data_dir / "server.json").read_text())["url"]
        with httpx.Client(base_url=f"{url}/api/v1") as api:

            def listed(key: str) -> int:
                return api.get("/sandbox", headers={"Authorization": f"Bearer {key}"}).status_code

            assert [listed("main-key-123"), listed("main-key-123")] == [200, 429]
            assert listed("second-key-456") == 200  # a bucket of its own
            assert listed("third-key-789") == 401
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


def start(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> tuple[dict[str, Any], httpx.Client]:
    assert run(capsys, "server", "start", "--port", "0", "--data-dir", str(data_dir))[0] == 0
    info = json.loads((data_dir / "server.json").read_text())
    headers = {"Authorization": f"Bearer {(data_dir / 'token').read_text().strip()}"}
    return info, httpx.Client(base_url=f"{info['url']}/api/v1", headers=headers)


def exec_in(api: httpx.Client, sandbox_id: str, command: str) -> httpx.Response:
    auth = api.post(f"/sandbox/{sandbox_id}/auth").json()
    with httpx.Client(headers={"Authorization": f"Bearer {auth['token']}"}) as gw:
        url = f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/exec"
        return gw.post(url, json={"command": command})


def running_sandbox(api: httpx.Client, **fields: Any) -> str:
    body = {"name": "adopt", "docker_image": "x", "memory_gb": 0.5, **fields}
    sandbox_id = str(api.post("/sandbox", json=body).json()["id"])
    deadline = time.monotonic() + 30
    while api.get(f"/sandbox/{sandbox_id}").json()["status"] != "RUNNING":
        assert time.monotonic() < deadline
    return sandbox_id


@pytest.mark.parametrize("how", ["SIGKILL", "restart"])
def test_sandboxes_jobs_and_exposures_survive_a_server_restart(
    capsys: pytest.CaptureFixture[str], data_dir: Path, how: str
) -> None:
    info, api = start(capsys, data_dir)
    try:
        sandbox_id = running_sandbox(
            api, secrets={"TOKEN": "sk-adopt"},
            start_command="python3 -m http.server 8000 --bind 127.0.0.1",
        )  # fmt: skip
        exposure = api.post(f"/sandbox/{sandbox_id}/expose", json={"port": 8000}).json()
        job = ("nohup sh -c 'while [ ! -e /tmp/go ]; do sleep 0.05; done; echo done > /tmp/out' "
               "</dev/null >/dev/null 2>&1 &")  # fmt: skip
        assert exec_in(api, sandbox_id, job).status_code == 200
        if how == "SIGKILL":
            os.kill(info["pid"], signal.SIGKILL)
            wait_gone(info["pid"])
            api.close()
            info, api = start(capsys, data_dir)
        else:
            assert run(capsys, "server", "restart", "--port", "0", "--data-dir",
                       str(data_dir))[0] == 0  # fmt: skip
            api.close()
            info = json.loads((data_dir / "server.json").read_text())
            api = httpx.Client(base_url=f"{info['url']}/api/v1", headers=dict(api.headers))
        assert api.get(f"/sandbox/{sandbox_id}").json()["status"] == "RUNNING"
        assert exec_in(api, sandbox_id, "echo $TOKEN").json()["stdout"] == "sk-adopt\n"
        exec_in(api, sandbox_id, "touch /tmp/go")
        deadline = time.monotonic() + 20
        while exec_in(api, sandbox_id, "cat /tmp/out").json()["stdout"] != "done\n":
            assert time.monotonic() < deadline, "the job did not survive the restart"
        with httpx.Client(timeout=5) as web:
            assert web.get(exposure["url"]).status_code == 200  # same URL as before
    finally:
        api.close()
        run(capsys, "server", "stop", "--data-dir", str(data_dir))
    assert not (data_dir / "sandboxes" / sandbox_id).exists()


def test_sandboxes_that_died_while_the_server_was_down_are_terminated_with_a_reason(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    info, api = start(capsys, data_dir)
    try:
        sandbox_id = running_sandbox(api)
        runtime = sqlite_runtime(data_dir, sandbox_id)
        os.kill(info["pid"], signal.SIGKILL)
        wait_gone(info["pid"])
        os.kill(runtime["init_pid"], signal.SIGKILL)  # its pid 1: the whole sandbox dies
        wait_gone(runtime["init_pid"])
        api.close()
        info, api = start(capsys, data_dir)
        record = api.get(f"/sandbox/{sandbox_id}").json()
        assert record["status"] == "TERMINATED"
        assert record["terminationReason"] == "its processes ended while the server was down"
        assert not (data_dir / "sandboxes" / sandbox_id).exists()
        assert not any(Path(p).exists() for p in runtime["cgroup_paths"])
    finally:
        api.close()
        run(capsys, "server", "stop", "--data-dir", str(data_dir))


def sqlite_runtime(data_dir: Path, sandbox_id: str) -> dict[str, Any]:
    with sqlite3.connect(data_dir / "state.db") as db:
        row = db.execute("SELECT runtime FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    return dict(json.loads(row[0]))


def process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (this container's init may not reap)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, possibly between open and read
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


def test_gateway_tokens_from_before_a_restart_are_refused_and_the_sdk_asks_again(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    """A restarted server (same port) has forgotten the tokens it gave: a stale one is
    `unauthenticated` before any message, and the SDK, holding one, gets a new one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    assert run(capsys, "server", "start", "--port", port, "--data-dir", str(data_dir))[0] == 0
    info = json.loads((data_dir / "server.json").read_text())
    key = (data_dir / "token").read_text().strip()
    api = httpx.Client(base_url=f"{info['url']}/api/v1", headers={"Authorization": f"Bearer {key}"})
    sdk = SandboxClient(APIClient(key, info["url"]))
    try:
        sandbox_id = running_sandbox(api)
        assert sdk.execute_command(sandbox_id, "echo before").stdout == "before\n"
        stale = api.post(f"/sandbox/{sandbox_id}/auth").json()
        assert run(capsys, "server", "restart", "--port", port, "--data-dir", str(data_dir))[0] == 0
        start = pb.StartRequest(command=pb.CommandSpec(cmd="/bin/sh", args=["-c", "echo x"]))
        body = start.SerializeToString()
        answer = httpx.post(
            f"{stale['gateway_url']}/{stale['user_ns']}/{stale['job_id']}/"
            "command_session.CommandSession/Start",
            content=struct.pack(">BI", 0, len(body)) + body,
            headers={"Authorization": f"Bearer {stale['token']}",
                     "content-type": "application/connect+proto"},
        )  # fmt: skip
        flags, size = struct.unpack(">BI", answer.content[:5])
        assert flags == 2, "a message came before the refusal"
        assert json.loads(answer.content[5 : 5 + size])["error"]["code"] == "unauthenticated"
        assert sdk.execute_command(sandbox_id, "echo after").stdout == "after\n"
    finally:
        sdk.close()
        api.close()
        run(capsys, "server", "stop", "--data-dir", str(data_dir))
