"""The CLI in-process: exit codes, output formats, redaction and help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fleetctl import __version__
from fleetctl.docgen import ROOT, SCHEMA_FILE
from tests.conftest import run_cli as run

SPECS = ROOT / "specs"


def test_validate_example_specs_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", str(SPECS))
    assert (code, err) == (0, "")
    assert "fleet 'eval' is valid (4 sandboxes)" in out


def test_render_json_lists_exact_shards_with_secrets_redacted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_CANARY_never_printed")
    code, out, _ = run(
        capsys, "render", str(SPECS / "eval.yaml"), "--var", "shards=3", "-o", "json"
    )
    assert code == 0
    sandboxes = json.loads(out)
    assert [s["key"] for s in sandboxes] == ["shard-0", "shard-1", "shard-2"]
    assert {s["secrets"]["HF_TOKEN"] for s in sandboxes} == {"<secret:from_env:HF_TOKEN>"}
    assert "hf_CANARY_never_printed" not in out
    assert [s["env"]["FLEETCTL_REPLICA"] for s in sandboxes] == ["0", "1", "2"]


def test_render_yaml_default_with_var_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    var_file = tmp_path / "vars.yaml"
    var_file.write_text("shards: 2\nmodel: big\n")
    code, out, _ = run(
        capsys,
        "render",
        str(SPECS / "eval.yaml"),
        "--var-file",
        str(var_file),
        "--var",
        "model=huge",
    )
    assert code == 0
    sandboxes = yaml.safe_load(out)
    assert [(s["key"], s["env"]["MODEL"]) for s in sandboxes] == [
        ("shard-0", "huge"),
        ("shard-1", "huge"),
    ]


def test_schema_command_equals_checked_in_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema")
    assert code == 0
    assert out == SCHEMA_FILE.read_text(encoding="utf-8")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"fleetctl {__version__}\n", "")


def test_invalid_spec_exits_one_with_position_and_no_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "apiVersion: fleetctl/v1\nkind: Fleet\nname: x\nsandboxes:\n  - name: a\n"
        "    image: i\n    expose: [{port: 2222}]\n"
    )
    code, out, err = run(capsys, "validate", str(spec))
    assert code == 1
    assert out == ""
    assert f"{spec}:7:21: sandboxes[0].expose[0].port: port 2222 is reserved" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["validate"], "Missing argument"),
        (["validate", "--bogus"], "No such option: --bogus"),
        (["render", "specs", "-o", "xml"], "Invalid value"),
        (["render", str(SPECS), "--var", "novalue"], "--var expects NAME=VALUE"),
        (["render", str(SPECS), "--var", "nope=1"], "variable 'nope' is not used"),
        (["render", str(SPECS), "--var-file", "/nonexistent/v.yaml"], "cannot read it"),
        (["validate", "/nonexistent/spec.yaml"], "no such spec file or directory"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_usage_errors_exit_one(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [
        "validate",
        "render",
        "schema",
        "apply",
        "doctor",
        "server",
        "server start",
        "server stop",
        "server status",
    ],
)
def test_every_command_help_has_an_example(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, _ = run(capsys, *command.split(), "--help")
    assert code == 0
    assert f"Example: fleetctl {command}" in " ".join(out.split())
