"""`plan --refresh-images`: a tag that moved on the registry replaces the sandboxes that
run the old image; a pinned digest, or no flag, changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.cli import main
from tests.conftest import Server
from tests.images.registry import Layer, Registry, busybox_layer


def planned(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, object]]:
    assert main(["plan", *argv, "-o", "json"]) == 0
    changes: list[dict[str, object]] = json.loads(capsys.readouterr().out)["changes"]
    return changes


def test_a_moved_tag_replaces_its_sandboxes_only_when_asked(
    puller: Server, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("FLEETCTL_API_URL", puller.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", puller.token)
    first = registry.push("tests/moving", "v1", [busybox_layer(), Layer().file("v", b"1")])
    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        "apiVersion: fleetctl/v1\nkind: Fleet\nname: t-refresh\n"
        f"defaults: {{image: '{registry.host}/tests/moving:v1', memory_gb: 0.25}}\n"
        "sandboxes:\n  - name: w\n"
        f"  - name: pinned\n    image: '{registry.host}/tests/moving@{first}'\n"
    )
    assert main(["apply", str(spec), "--yes"]) == 0
    capsys.readouterr()
    second = registry.push("tests/moving", "v1", [busybox_layer(), Layer().file("v", b"2")])
    assert {c["action"] for c in planned(capsys, str(spec))} == {"noop"}
    changes = {
        str(c["key"]).split("-")[0]: c for c in planned(capsys, str(spec), "--refresh-images")
    }
    assert changes["pinned"]["action"] == "noop"
    assert changes["w"]["action"] == "replace"
    reason = str(changes["w"]["reason"])
    assert reason.startswith("image tag moved: sha256:")
    assert first.removeprefix("sha256:")[:12] in reason
    assert second.removeprefix("sha256:")[:12] in reason
    assert main(["apply", str(spec), "--yes", "--refresh-images"]) == 0
    capsys.readouterr()
    assert {c["action"] for c in planned(capsys, str(spec), "--refresh-images")} == {"noop"}
    assert main(["destroy", str(spec), "--yes"]) == 0
