"""The README's GitOps pipeline, run exactly as written, and a stale saved plan refused."""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.cli import main
from fleetctl.docgen import README_FILE, ROOT
from tests.conftest import Server, needs_sandboxes

pytestmark = needs_sandboxes


def readme_pipeline() -> list[list[str]]:
    text = README_FILE.read_text()
    block = re.search(r"<!-- gitops: .*? -->\n```sh\n(.*?)```", text, re.DOTALL)
    assert block, "README lost its GitOps block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("fleetctl ")]


@pytest.fixture
def repo(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FLEETCTL_API_URL", server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", server.token)
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert main(["destroy", "specs/", "--yes"]) == 0


def test_readme_gitops_commands_in_order(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan_on_pr, apply_on_merge = readme_pipeline()
    assert plan_on_pr[:2] == ["plan", "specs/"]
    assert main(plan_on_pr) == 2  # changes: the fleets do not run yet
    assert (repo / "plan.json").exists()
    assert main(apply_on_merge) == 0
    capsys.readouterr()
    assert main(plan_on_pr) == 0  # live now matches git
    assert "Plan: no changes." in capsys.readouterr().out


def test_a_saved_plan_is_refused_once_live_state_changed(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_on_pr, apply_on_merge = readme_pipeline()
    assert main(plan_on_pr) == 2
    assert main(["apply", "specs/web.yaml", "--yes"]) == 0  # someone applied meanwhile
    capsys.readouterr()
    assert main(apply_on_merge) == 1
    assert "live state changed since the plan was made" in capsys.readouterr().err
