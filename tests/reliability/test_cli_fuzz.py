"""The CLI given arbitrary flags and values: an exit code and a message, never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetctl.cli import main

pytestmark = pytest.mark.reliability

# Commands that never reach a server (those that do are covered against real servers).
COMMANDS = ["validate", "render", "schema", "--version", "--help", "nosuch", ""]
WORDS = ["specs/", "specs/eval.yaml", "/nonexistent", "-", "--", "-o", "json", "yaml", "xml",
         "--var", "shards=3", "shards", "=", "x=[1]", "--var-file", "--bogus", "-h", "-v",
         "--log-format", "json", "\x00", "é", "{{", "--output"]  # fmt: skip


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    command=st.sampled_from(COMMANDS),
    words=st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=6),
)
def test_any_arguments_give_an_exit_code_not_a_traceback(
    command: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([command, *words] if command else words)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (command, words, err)
    assert "Traceback" not in out + err
