"""The CLI given arbitrary flags and values: an exit code and a message, never a traceback.

Commands that never reach a server are fuzzed on their own; those that do are fuzzed
against a real server of the test's own (so a fuzzed `destroy -l ... --yes` can only
touch what the fuzzing made), with a real fleet spec and a real sandbox among the words.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetctl.cli import main
from tests.conftest import Server, control, own_server

pytestmark = pytest.mark.reliability


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])  # fmt: skip


# Commands that never reach a server.
OFFLINE = ["validate", "render", "schema", "--version", "--help", "nosuch", ""]
WORDS = ["specs/", "specs/eval.yaml", "/nonexistent", "-", "--", "-o", "json", "yaml", "xml",
         "--var", "shards=3", "shards", "=", "x=[1]", "--var-file", "--bogus", "-h", "-v",
         "--log-format", "json", "\x00", "é", "{{", "--output"]  # fmt: skip


@fuzz(200)
@given(
    command=st.sampled_from(OFFLINE),
    words=st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=6),
)
def test_any_arguments_give_an_exit_code_not_a_traceback(
    command: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([command, *words] if command else words)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (command, words, err)
    assert "Traceback" not in out + err


ONLINE = ["get", "logs", "exec", "status", "wait", "plan", "apply", "destroy"]
#: Placeholders replaced per run: the fleet spec, a live sandbox's id.
SPEC, SANDBOX = "<spec>", "<sandbox>"
ONLINE_WORDS = [SPEC, SANDBOX, "nosuch-sandbox", "-l", "fuzz", "--label", "-o", "json", "yaml",
                "table", "text", "--timeout", "0", "1", "-1", "0.5", "x", "--for", "jobs", "ready",
                "--dry-run", "--yes", "--", "true", "false", "sh", "-c", "exit 7", "--var",
                "n=2", "n=0", "--max-delete", "0", "2", "--allow-mass-delete",
                "--detailed-exitcode", "--parallelism", "--out", "/nonexistent/dir/plan.json",
                "--wait-jobs"]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[Server]:
    with own_server() as (info, _):
        yield info


@pytest.fixture
def fleet(fuzz_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A one-sandbox fleet spec (a replica count of `n`) and the id of a running sandbox."""
    monkeypatch.setenv("FLEETCTL_API_URL", fuzz_server.url)
    monkeypatch.setenv("FLEETCTL_API_KEY", fuzz_server.token)
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "fleet.yaml"
    spec.write_text(textwrap.dedent("""\
        apiVersion: fleetctl/v1
        kind: Fleet
        name: fuzz
        labels: [fuzz]
        vars: {n: 1}
        defaults: {image: python:3.11-slim, memory_gb: 0.25, network_access: false}
        sandboxes:
          - {name: worker, replicas: "{{ n }}"}
        """))  # fmt: skip
    body = {"name": "fuzz-target", "docker_image": "python:3.11-slim", "memory_gb": 0.25,
            "labels": ["fuzz-target"]}  # fmt: skip
    made = control(fuzz_server, "POST", "/sandbox", json=body)
    assert made.is_success, made.text
    return spec, made.json()["id"]


@fuzz(40)
@given(
    command=st.sampled_from(ONLINE),
    words=st.lists(st.sampled_from(ONLINE_WORDS) | st.text(max_size=6), max_size=7),
)
def test_commands_that_reach_a_server_give_an_exit_code_not_a_traceback(
    fleet: tuple[Path, str], command: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, sandbox = fleet
    argv = [command, *(str(spec) if w == SPEC else sandbox if w == SANDBOX else w for w in words)]
    if command == "wait" and "--timeout" not in argv:
        argv += ["--timeout", "0"]  # a fleet never applied would be waited for, for 10 minutes
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, argv
    assert isinstance(code, int), argv
    if command != "exec":  # exec passes its command's exit code through
        assert code in (0, 1, 2, 3), (argv, out, err)
