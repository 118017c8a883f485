"""`prepare:`, `from_checkpoint:` and `idle_timeout_minutes:` end to end: a group's setup
runs once and its sandboxes start from the checkpoint, later applies reuse it, a changed
setup makes a new one and the old one goes, a failed setup creates nothing."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetctl.cli import main
from tests.conftest import Connect, Create, Server, needs_sandboxes, wait_for

pytestmark = needs_sandboxes
SETUP = "mkdir -p /usr/local/share/t && echo {marker} > /usr/local/share/t/ready"


def write(path: Path, *, replicas: int = 2, marker: str = "one", fail: bool = False) -> None:
    command = SETUP.format(marker=marker) + ("; exit 3" if fail else "")
    path.write_text(textwrap.dedent(f"""\
        apiVersion: fleetctl/v1
        kind: Fleet
        name: t-setup
        defaults: {{image: python:3.11-slim, memory_gb: 0.25}}
        sandboxes:
          - name: worker
            replicas: {replicas}
            idle_timeout_minutes: 30
            prepare: {{command: "{command}", timeout_minutes: 5}}
        """))  # fmt: skip


@pytest.fixture
def spec(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FLEETCTL_API_URL", server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "fleet.yaml"
    write(path)
    yield path
    main(["destroy", str(path), "--yes"])


def apply(capsys: pytest.CaptureFixture[str], spec: Path) -> tuple[int, list[dict[str, Any]]]:
    code = main(["apply", str(spec), "--yes", "-o", "json"])
    out, _ = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()]


def kinds(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def files(api: httpx.Client, gateway: Connect) -> dict[str, str]:
    """Each live sandbox of the fleet: what its setup left, read from inside it."""
    found = api.get("/sandbox", params={"labels": "fleetctl.fleet=t-setup",
                                        "is_active": "true"}).json()["sandboxes"]  # fmt: skip
    return {
        sandbox["name"]: gateway(sandbox["id"])
        .exec("cat /usr/local/share/t/ready")
        .json()["stdout"]
        .strip()
        for sandbox in found
    }


def test_a_setup_runs_once_is_reused_and_replaced_when_it_changes(
    spec: Path, capsys: pytest.CaptureFixture[str], api: httpx.Client, gateway: Connect
) -> None:
    code, events = apply(capsys, spec)
    assert code == 0, events
    assert len(kinds(events, "preparing")) == 1
    (prepared,) = kinds(events, "prepared")
    first = prepared["checkpoint"]
    assert prepared["reused"] is False
    assert files(api, gateway) == {"t-setup-worker-0": "one", "t-setup-worker-1": "one"}
    live = api.get("/sandbox", params={"labels": "fleetctl.fleet=t-setup"}).json()["sandboxes"]
    assert {s["idleTimeoutMinutes"] for s in live} == {30}
    assert all(f"fleetctl.checkpoint={first}" in s["labels"] for s in live)
    assert api.get(f"/sandbox/checkpoints/{first}").json()["state"] == "DURABLE"

    code, events = apply(capsys, spec)  # nothing to do: no setup either
    assert (code, kinds(events, "preparing"), kinds(events, "prepared")) == (0, [], [])
    write(spec, replicas=3)
    code, events = apply(capsys, spec)
    assert (code, kinds(events, "preparing")) == (0, [])
    assert [(e["checkpoint"], e["reused"]) for e in kinds(events, "prepared")] == [(first, True)]
    assert files(api, gateway)["t-setup-worker-2"] == "one"

    write(spec, replicas=3, marker="two")
    code, events = apply(capsys, spec)
    assert code == 0, events
    assert len(kinds(events, "preparing")) == 1
    assert set(files(api, gateway).values()) == {"two"}
    assert [e["key"] for e in kinds(events, "released")] == [first]
    assert api.get(f"/sandbox/checkpoints/{first}").status_code == 404


def test_a_failed_setup_creates_none_of_its_group_and_says_why(
    spec: Path, capsys: pytest.CaptureFixture[str], api: httpx.Client
) -> None:
    write(spec, fail=True)
    code, events = apply(capsys, spec)
    assert code != 0
    failed = kinds(events, "failed")
    assert sorted(e["key"] for e in failed) == ["worker-0", "worker-1"]
    assert all("prepare of group worker exited with code 3" in e["error"] for e in failed)
    assert kinds(events, "created") == []
    left = api.get("/sandbox", params={"labels": "fleetctl.fleet=t-setup", "is_active": "true"})
    assert left.json()["total"] == 0
    setups = api.get("/sandbox", params={"is_active": "true", "per_page": 500}).json()
    assert not [s for s in setups["sandboxes"] if s["name"] == "t-setup-worker-prepare"]


def test_a_group_starts_from_a_checkpoint_another_sandbox_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: Server, api: httpx.Client,
    sandboxes: Create, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("FLEETCTL_API_URL", server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    source = sandboxes(name="golden")
    wait_for(api, source["id"], "RUNNING")
    assert main(["exec", source["id"], "--", "sh", "-c", "echo gold > /workspace/g"]) == 0
    assert main(["checkpoint", source["id"]]) == 0
    checkpoint = capsys.readouterr().out.strip().splitlines()[-1]
    path = tmp_path / "restored.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: fleetctl/v1
        kind: Fleet
        name: t-restored
        defaults: {{image: python:3.11-slim, memory_gb: 0.25}}
        sandboxes:
          - {{name: copy, replicas: 2, from_checkpoint: {checkpoint}}}
        """))  # fmt: skip
    try:
        assert main(["apply", str(path), "--yes"]) == 0
        capsys.readouterr()
        live = api.get("/sandbox", params={"labels": "fleetctl.fleet=t-restored"}).json()
        assert {s["checkpointId"] for s in live["sandboxes"]} == {checkpoint}
        for sandbox in live["sandboxes"]:
            assert main(["exec", sandbox["id"], "--", "cat", "/workspace/g"]) == 0
        assert capsys.readouterr().out == "gold\ngold\n"
    finally:
        main(["destroy", str(path), "--yes"])
