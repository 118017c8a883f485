"""One canary secret, followed through every surface: it must appear nowhere but inside
the sandbox that holds it (where its own commands and jobs see it)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetctl.cli import main
from tests.conftest import Server, needs_sandboxes, own_server

pytestmark = [pytest.mark.reliability, needs_sandboxes]
CANARY = "sk-CANARY-5e1f0c9b7a"


@pytest.fixture
def canary_server() -> Iterator[Server]:
    with own_server() as (info, _):
        yield info


def test_the_canary_is_nowhere_but_inside_its_sandbox(
    canary_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("FLEETCTL_API_URL", canary_server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", canary_server.token)
    monkeypatch.setenv("CANARY_SOURCE", CANARY)
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "fleet.yaml"
    spec.write_text(textwrap.dedent("""\
        apiVersion: fleetctl/v1
        kind: Fleet
        name: canary
        defaults: {image: python:3.11-slim, memory_gb: 0.25}
        sandboxes:
          - name: holder
            secrets: {TOKEN: {from_env: CANARY_SOURCE}}
            jobs: [{name: use, command: 'test -n "$TOKEN"'}]  # fails without the secret
          - name: neighbour
        """))  # fmt: skip
    seen: list[str] = []
    for argv in (["validate", str(spec)], ["render", str(spec), "-o", "json"],
                 ["plan", str(spec), "-o", "json"], ["plan", str(spec)],
                 ["-vv", "--log-format", "json", "apply", str(spec), "--yes", "-o", "json",
                  "--wait-jobs"],
                 ["status", str(spec), "-o", "json"], ["get", "-o", "yaml"],
                 ["plan", str(spec), "--out", str(tmp_path / "plan.json")]):  # fmt: skip
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        seen.append(out + err)
    seen.append((tmp_path / "plan.json").read_text())
    assert not [text for text in seen if CANARY in text], "the CLI printed or saved the secret"

    headers = {"Authorization": f"Bearer {canary_server.token}"}
    with httpx.Client(base_url=f"{canary_server.url}/api/v1", headers=headers) as api:
        sandboxes = api.get("/sandbox").json()["sandboxes"]
        ids = {s["name"]: s["id"] for s in sandboxes}
        reads = [api.get("/sandbox").text]
        for sandbox_id in ids.values():
            reads += [api.get(f"/sandbox/{sandbox_id}").text,
                      api.get(f"/sandbox/{sandbox_id}/logs").text,
                      api.get(f"/sandbox/{sandbox_id}/error-context").text,
                      api.get(f"/sandbox/{sandbox_id}/expose").text]  # fmt: skip
        reads.append(api.post("/sandbox/status:batchGet",
                              json={"sandbox_ids": list(ids.values())}).text)  # fmt: skip
        assert not [r for r in reads if CANARY in r], "an API read returned the secret"

        def run_in(name: str, command: str) -> str:
            auth = api.post(f"/sandbox/{ids[name]}/auth").json()
            base = f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}"
            with httpx.Client(headers={"Authorization": f"Bearer {auth['token']}"}) as gw:
                return str(gw.post(f"{base}/exec", json={"command": command}).json()["stdout"])

        assert run_in("canary-holder", "echo $TOKEN") == f"{CANARY}\n"  # control: it is there
        neighbour_view = run_in("canary-neighbour",
                                "cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'; "
                                "env; ls -R /tmp /workspace 2>/dev/null")  # fmt: skip
        assert CANARY not in neighbour_view, "another sandbox saw the secret"

    host_processes = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            host_processes.append(cmdline.read_bytes().decode(errors="replace"))
        except OSError:
            continue
    assert not [c for c in host_processes if CANARY in c], "a host process's argv holds it"
    holder_dirs = {canary_server.data_dir / "sandboxes" / ids["canary-holder"]}
    leaked = [
        str(path) for path in canary_server.data_dir.rglob("*")
        if path.is_file() and not any(d in path.parents for d in holder_dirs)
        and CANARY.encode() in path.read_bytes()
    ]  # fmt: skip
    assert leaked == [], "a file outside the holder sandbox holds the secret"
    assert main(["destroy", str(spec), "--yes"]) == 0
