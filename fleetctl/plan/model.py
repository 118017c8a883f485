"""Plan data: what `plan` computes and `apply` carries out (the engine is in planner.py).

    Action     create (+), replace (±), recreate (↻), delete (-), update (~), noop
    Change     (action, key, before, after, reason): one sandbox's change
    InPlace    what an update does to a sandbox that stays (expose, upload, start job)
    Plan       the changes of one run, versioned for `plan -o json` and `--out`

`reason` explains a change to people; it never decides anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from fleetctl.spec.expand import DesiredSandbox
from fleetctl.spec.models import Exposure, FileSpec, Job

PLAN_VERSION = 1


class Action(Enum):
    create = "create"
    replace = "replace"
    recreate = "recreate"
    delete = "delete"
    update = "update"
    noop = "noop"

    @property
    def symbol(self) -> str:
        return {"create": "+", "replace": "±", "recreate": "↻", "delete": "-",
                "update": "~", "noop": " "}[self.value]  # fmt: skip


@dataclass(frozen=True, slots=True)
class LiveSandbox:
    """A sandbox fleetctl owns, as read from the API (its labels are the state)."""

    id: str
    fleet: str
    key: str
    digest: str
    status: str
    created_at: datetime
    labels: tuple[str, ...] = ()
    #: What was read from inside a running sandbox (None: not read, e.g. not running):
    #: exposures as (port, protocol) → exposure id, uploaded files as target → content
    #: digest, and the spec jobs started in this sandbox's lifetime.
    exposures: Mapping[tuple[int, str], str] | None = None
    files: Mapping[str, str] | None = None
    jobs_started: frozenset[str] | None = None
    #: The manifest digest of the image it runs, when the server says (None: unknown).
    image_digest: str | None = None


@dataclass(frozen=True, slots=True)
class InPlace:
    """Changes made to a sandbox that stays: none of them needs a new sandbox."""

    expose: tuple[Exposure, ...] = ()
    unexpose: tuple[str, ...] = ()  # exposure ids
    upload: tuple[FileSpec, ...] = ()
    start_jobs: tuple[Job, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.expose or self.unexpose or self.upload or self.start_jobs)

    def describe(self) -> str:
        parts = [f"expose {e.port}/{e.protocol}" for e in self.expose]
        parts += [f"unexpose {len(self.unexpose)} port(s)"] if self.unexpose else []
        parts += [f"upload {f.target}" for f in self.upload]
        parts += [f"start job {j.name}" for j in self.start_jobs]
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    key: str
    before: LiveSandbox | None
    after: DesiredSandbox | None
    reason: str
    in_place: InPlace = field(default_factory=InPlace)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "key": self.key,
            "before": None if self.before is None else {
                "id": self.before.id, "status": self.before.status, "digest": self.before.digest,
            },
            "after": None if self.after is None else self.after.to_dict(),
            "reason": self.reason,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """Every change for the fleets planned, in key order; noops included."""

    changes: tuple[Change, ...]
    fleets: tuple[str, ...]
    live_fingerprint: str = ""
    version: int = PLAN_VERSION
    refused: tuple[str, ...] = field(default=())

    @property
    def has_changes(self) -> bool:
        return any(c.action is not Action.noop for c in self.changes)

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action is action)

    def summary(self) -> str:
        parts = [f"{self.count(a)} to {a.value}" for a in Action if a is not Action.noop
                 and self.count(a)]  # fmt: skip
        return "Plan: " + (", ".join(parts) if parts else "no changes") + "."
