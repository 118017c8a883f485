"""A crash of the client or of the server at a seeded point never duplicates or loses.

The kill point (after k `created` events) is drawn from `random.Random(seed)`, so a
failure replays with the same seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import needs_sandboxes
from tests.reliability.conftest import Scale
from tests.reliability.scenarios import crash_apply, crash_server

pytestmark = [pytest.mark.reliability, needs_sandboxes]


def test_apply_killed_at_a_seeded_point_then_rerun_converges_without_duplicates(
    scale: Scale, tmp_path: Path
) -> None:
    """The re-run creates only the missing keys and keeps what the killed run made."""
    tally = crash_apply(scale.sandboxes, scale.seed, tmp_path)
    assert tally.problems == []
    assert (tally.duplicates, tally.lost, tally.leaked) == (0, 0, 0)
    assert tally.converged_rounds == 1


def test_server_killed_midapply_restarted_on_its_data_dir_loses_and_duplicates_nothing(
    scale: Scale, tmp_path: Path
) -> None:
    """The restarted server adopts the sandboxes still running; the re-run apply keeps
    each of them (same id, RUNNING) and creates only what is missing."""
    tally = crash_server(scale.sandboxes, scale.seed, tmp_path)
    assert tally.problems == []
    assert (tally.duplicates, tally.lost, tally.leaked) == (0, 0, 0)
    assert tally.converged_rounds == 1
