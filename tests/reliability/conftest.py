"""The size of the reliability scenarios: short by default (CI), long with
`pytest --reliability-long` (the option lives in tests/conftest.py, so that a bare
`pytest` knows it) or FLEETCTL_RELIABILITY_LONG=1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest


@dataclass(frozen=True, slots=True)
class Scale:
    """How hard the scenarios push: soak `rounds`, and `sandboxes` per fleet."""

    rounds: int
    sandboxes: int
    seed: int = 7


SHORT = Scale(rounds=2, sandboxes=12)
LONG = Scale(rounds=10, sandboxes=100)


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> Scale:
    long = request.config.getoption("--reliability-long", default=False)
    return LONG if long or os.environ.get("FLEETCTL_RELIABILITY_LONG") == "1" else SHORT
