"""Saved plans (`plan --out FILE`, `apply FILE`): GitOps reviews a plan, then applies it.

A saved plan holds the desired sandboxes (secrets as references, never values),
the planned (action, key) pairs and a fingerprint of the live state it was made
from. Applying it re-plans from the saved desired state and refuses when the
live state, or the plan itself, came out differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleetctl.errors import UsageError
from fleetctl.plan.model import PLAN_VERSION, Action, Plan
from fleetctl.spec.expand import DesiredSandbox, Fleet

KIND = "fleetctl-plan"


def to_json(plan: Plan, fleets: list[Fleet]) -> dict[str, Any]:
    """The plan as `plan -o json` prints it and `--out` saves it."""
    return {
        "kind": KIND,
        "version": plan.version,
        "fleets": list(plan.fleets),
        "sources": {f.name: f.source for f in fleets},
        "live_fingerprint": plan.live_fingerprint,
        "refused": list(plan.refused),
        "summary": plan.summary(),
        "changes": [c.to_dict() for c in plan.changes],
        "desired": [s.to_record() for f in fleets for s in f.sandboxes],
    }


def is_plan_file(path: Path) -> bool:
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("kind") == KIND)
    except (OSError, ValueError, AttributeError):
        return False


def load(path: Path) -> tuple[dict[str, Any], list[Fleet]]:
    """A saved plan and the fleets it was made for; UsageError if unreadable."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != PLAN_VERSION:
            raise UsageError(f"{path}: plan version {data.get('version')} is not "
                             f"{PLAN_VERSION}; make the plan again with this fleetctl")  # fmt: skip
        desired = [DesiredSandbox.from_record(d) for d in data["desired"]]
        fleets = [
            Fleet(name, str(data["sources"][name]), (),
                  tuple(d for d in desired if d.fleet == name))
            for name in data["fleets"]
        ]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise UsageError(f"{path}: not a readable fleetctl plan ({exc})") from None
    return data, fleets


def check_unchanged(saved: dict[str, Any], fresh: Plan) -> None:
    """Refuse to apply a saved plan whose world moved on since it was made."""
    if saved["live_fingerprint"] != fresh.live_fingerprint:
        raise UsageError("live state changed since the plan was made; run `fleetctl plan` again")
    planned = [(c["action"], c["key"]) for c in saved["changes"] if c["action"] != "noop"]
    now = [(c.action.value, c.key) for c in fresh.changes if c.action is not Action.noop]
    if planned != now:
        raise UsageError("the plan would come out differently now (did a secret change?); "
                         "run `fleetctl plan` again")  # fmt: skip
