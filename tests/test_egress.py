"""The egress allow/deny entry contract (fleetctl.egress), entry by entry: the table in
tests/sandboxes/prime-0.5.1.json, which tests/official/ checks against today's official
client, decided here by fleetctl's own check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.egress import MAX_ENTRIES, EgressError, check_entry, check_lists

TABLE: dict[str, str | None] = json.loads(
    (Path(__file__).parent / "sandboxes" / "prime-0.5.1.json").read_text()
)["egress_entries"]


@pytest.mark.parametrize(("entry", "expected"), TABLE.items())
def test_each_entry_is_decided_as_todays_api_decides_it(entry: str, expected: str | None) -> None:
    if expected is None:
        check_entry(entry)
    else:
        with pytest.raises(EgressError) as caught:
            check_entry(entry)
        assert str(caught.value) == expected


def test_lists_are_exclusive_bounded_and_name_themselves() -> None:
    check_lists([], None)  # an empty allowlist allows nothing: valid
    with pytest.raises(EgressError, match="mutually exclusive"):
        check_lists([], [])
    with pytest.raises(EgressError, match=f"at most {MAX_ENTRIES} entries"):
        check_lists(["example.com"] * (MAX_ENTRIES + 1), None)
    with pytest.raises(EgressError) as caught:
        check_lists(None, ["ok.com", "a..com"])
    assert str(caught.value) == "network_denylist: 'a..com' contains an empty label"
