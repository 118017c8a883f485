"""plan / apply / destroy end to end against the real server, through the CLI."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetctl.cli import main
from tests.conftest import Server, needs_sandboxes, wait_for

pytestmark = needs_sandboxes
CANARY = "sk-CANARY-apply-7f3e9d"


@pytest.fixture
def spec(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FLEETCTL_API_URL", server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    monkeypatch.setenv("APPLY_TEST_TOKEN", CANARY)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text("hello\n")
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: fleetctl/v1
        kind: Fleet
        name: t-apply
        labels: [t-apply-fleet]
        vars: {workers: 2}
        defaults: {image: python:3.11-slim, memory_gb: 0.25, network_access: false}
        sandboxes:
          - name: worker
            replicas: "{{ workers }}"
            secrets: {TOKEN: {from_env: APPLY_TEST_TOKEN}}
            files: [{source: ./data, target: /workspace/data}]
            jobs:
              - name: count
                command: >-
                  cat /workspace/data/input.txt > /workspace/out.txt;
                  echo "$TOKEN" | wc -c >> /workspace/out.txt
                artifacts: [/workspace/out.txt]
          - name: web
            start_command: python3 -m http.server 8000 --bind 127.0.0.1
            expose: [{port: 8000}]
        """))  # fmt: skip
    yield path
    main(["destroy", str(path), "--yes"])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert CANARY not in out + err, "a secret value was printed"
    return code, out, err


def test_apply_converges_then_plans_nothing_then_changes_exactly_what_changed(
    spec: Path, capsys: pytest.CaptureFixture[str], api: httpx.Client
) -> None:
    code, out, _ = run(capsys, "apply", str(spec), "--yes", "--wait-jobs", "-o", "json")
    assert code == 0, out
    events = [json.loads(line) for line in out.splitlines()]
    assert sorted(e["key"] for e in events if e["event"] == "created") == [
        "web", "worker-0", "worker-1"]  # fmt: skip
    assert sum(e["event"] == "job-finished" and e["exit_code"] == 0 for e in events) == 2
    artifact = Path("artifacts/t-apply/worker-1/workspace/out.txt").read_text()
    assert artifact == f"hello\n{len(CANARY) + 1}\n"  # the secret reached the job, not a file here
    assert events[-1]["event"] == "summary"
    assert events[-1]["failed"] == 0
    ended = sorted((e["key"], e["action"]) for e in events if e["event"] in ("done", "failed"))
    assert ended == [("web", "create"), ("worker-0", "create"), ("worker-1", "create")]

    assert run(capsys, "plan", str(spec), "--detailed-exitcode")[:2] == (0, "Plan: no changes.\n")
    code, out, _ = run(
        capsys, "plan", str(spec), "--var", "workers=3", "-o", "json", "--detailed-exitcode"
    )
    assert code == 2
    planned = json.loads(out)
    assert planned["version"] == 1
    assert [(c["action"], c["key"]) for c in planned["changes"] if c["action"] != "noop"] == [
        ("create", "worker-2")]  # fmt: skip
    assert planned["changes"][0]["after"]["secrets"] == {} or all(
        v.startswith("<secret:")
        for c in planned["changes"]
        if c["after"]
        for v in c["after"]["secrets"].values()
    )
    assert run(capsys, "apply", str(spec), "--var", "workers=3", "--yes")[0] == 0

    listed = api.get("/sandbox", params={"labels": ["t-apply-fleet"]}).text
    assert CANARY not in listed
    # run() asserts the canary is in no output: get, status, and verbose JSON logs
    assert run(capsys, "get", "-l", "t-apply-fleet", "-o", "json")[0] == 0
    assert run(capsys, "status", str(spec), "-o", "yaml")[0] == 0
    assert run(capsys, "-vv", "plan", str(spec), "-o", "json", "--var", "workers=2")[0] == 0
    code, _, logs = run(capsys, "-vv", "--log-format", "json", "apply", str(spec), "--yes",
                        "--var", "workers=2")  # fmt: skip
    assert code == 0
    assert '"event": "deleted"' in logs  # the structured logs were really written
    code, out, _ = run(capsys, "destroy", "-l", "t-apply-fleet", "--yes")
    assert code == 0
    assert "Destroyed 3" in out
    assert api.get("/sandbox", params={"labels": ["t-apply-fleet"]}).json()["total"] == 0


def test_wait_with_timeout_zero_checks_once_and_names_what_is_not_ready(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "wait", str(spec), "--timeout", "0")
    assert code == 1
    assert "timed out after 0s waiting for ready" in err
    assert "t-apply/web MISSING" in err
    assert "Traceback" not in out + err
    assert run(capsys, "apply", str(spec), "--yes")[0] == 0
    code, out, err = run(capsys, "wait", str(spec), "--timeout", "0")
    assert (code, out) == (0, "ready: 3 sandbox(es)\n"), err


def test_drift_is_repaired_and_jobs_run_once_per_sandbox_lifetime(
    spec: Path, capsys: pytest.CaptureFixture[str], api: httpx.Client
) -> None:
    assert run(capsys, "apply", str(spec), "--yes")[0] == 0
    sandboxes = api.get("/sandbox", params={"labels": ["t-apply-fleet"]}).json()["sandboxes"]
    by_name = {s["name"]: s["id"] for s in sandboxes}
    api.delete(f"/sandbox/{by_name['t-apply-worker-0']}")  # out of band
    auth = api.post(f"/sandbox/{by_name['t-apply-web']}/auth").json()
    with httpx.Client(headers={"Authorization": f"Bearer {auth['token']}"}) as gw:
        killed = gw.post(
            f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/exec",
            json={"command": "kill 2"},  # pid 2: the start command's shell; it dies
        )
        assert killed.status_code == 200, killed.text
    wait_for(api, by_name["t-apply-web"], "TERMINATED")
    code, out, _ = run(capsys, "plan", str(spec))
    assert "+ t-apply/worker-0" in out
    assert "↻ t-apply/web" in out
    assert "Plan: 1 to create, 1 to recreate." in out
    for _ in range(2):  # applying twice more starts no job in the sandboxes that kept running
        code, out, _ = run(capsys, "apply", str(spec), "--yes", "-o", "json")
        assert code == 0
    job_starts = [json.loads(line) for line in out.splitlines()]
    assert [e for e in job_starts if e["event"] == "job-started"] == []


def test_prune_guard_refuses_until_allowed(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "apply", str(spec), "--yes")[0] == 0
    code, _, err = run(capsys, "apply", str(spec), "--var", "workers=0", "--yes")
    assert code == 1
    assert "refusing to apply: the plan deletes 2 of 3 running sandboxes" in err
    code, out, _ = run(
        capsys, "apply", str(spec), "--var", "workers=0", "--yes", "--allow-mass-delete"
    )
    assert code == 0
    assert "- t-apply/worker-0" in out


def test_status_and_wait_report_sandboxes_exposures_and_jobs(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", str(spec), "-o", "json")
    assert code == 0
    assert {(s["key"], s["status"]) for s in json.loads(out)} == {
        ("web", "MISSING"), ("worker-0", "MISSING"), ("worker-1", "MISSING")}  # fmt: skip
    assert run(capsys, "apply", str(spec), "--yes")[0] == 0
    assert run(capsys, "wait", str(spec), "--for", "jobs", "--timeout", "60")[0] == 0
    code, out, _ = run(capsys, "status", str(spec), "-o", "json")
    states = {s["key"]: s for s in json.loads(out)}
    assert states["worker-0"]["status"] == "RUNNING"
    assert states["worker-0"]["jobs"] == [{"name": "count", "state": "succeeded", "exit_code": 0}]
    assert states["web"]["exposures"][0].startswith("8000/HTTP→http://127.0.0.1:")
    code, out, _ = run(capsys, "status", str(spec))
    assert "count:succeeded" in out


def test_changed_files_ports_and_jobs_are_applied_in_place(
    spec: Path, capsys: pytest.CaptureFixture[str], api: httpx.Client
) -> None:
    assert run(capsys, "apply", str(spec), "--yes", "--wait-jobs")[0] == 0
    before = ids_by_name(api)
    (spec.parent / "data" / "input.txt").write_text("changed\n")
    text = spec.read_text().replace(
        "expose: [{port: 8000}]", "expose: [{port: 8000}, {port: 9000, protocol: TCP}]"
    )
    spec.write_text(text)
    code, out, _ = run(capsys, "plan", str(spec))
    assert "~ t-apply/web" in out
    assert "expose 9000/TCP" in out
    assert "~ t-apply/worker-0" in out
    assert "upload /workspace/data" in out
    assert "Plan: 3 to update." in out
    code, out, _ = run(capsys, "apply", str(spec), "--yes", "-o", "json")
    assert code == 0
    after = ids_by_name(api)
    assert after == before  # updated in place: no sandbox was replaced
    auth = api.post(f"/sandbox/{after['t-apply-worker-0']}/auth").json()
    base = f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}"
    with httpx.Client(headers={"Authorization": f"Bearer {auth['token']}"}) as gw:
        read = gw.get(f"{base}/read-file", params={"path": "/workspace/data/input.txt"})
        content = read.json()["content"]
    assert content == "changed\n"
    assert run(capsys, "plan", str(spec), "--detailed-exitcode")[0] == 0


def ids_by_name(api: httpx.Client) -> dict[str, str]:
    listed = api.get("/sandbox", params={"labels": ["t-apply-fleet"]}).json()["sandboxes"]
    return {s["name"]: s["id"] for s in listed}
