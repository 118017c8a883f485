"""Repeated apply/destroy of one fleet under injected faults and throttling stays exact.

Every round must converge (one RUNNING sandbox per key, a clean plan) and its destroy
must leave nothing: no sandbox listed, and no sandbox dir, cgroup or process on the host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import needs_sandboxes
from tests.reliability.conftest import Scale
from tests.reliability.scenarios import soak

pytestmark = [pytest.mark.reliability, needs_sandboxes]


def test_soak_under_faults_converges_every_round_without_duplicates_or_leaks(
    scale: Scale, tmp_path: Path
) -> None:
    """With 10% 5xx and 5% resets on the control plane and creates limited to 20/s, each
    round's apply makes exactly the replicas and its destroy leaves the host clean."""
    tally = soak(scale.rounds, scale.sandboxes, tmp_path)
    assert tally.problems == []
    assert (tally.duplicates, tally.leaked) == (0, 0)
    assert tally.converged_rounds == tally.rounds == scale.rounds
    assert tally.faults_injected > 0, "no fault struck: the soak tested nothing extra"
