"""The planner: desired sandboxes vs live ones → a Plan. Pure: no I/O, no clock.

Per key: absent → create; live but TERMINATED, ERROR or TIMEOUT → recreate;
digest changed → replace; otherwise noop. Live keys the spec no longer has,
and duplicates of a key, → delete. A plan that would delete every owned
sandbox, or more than `max_delete` of them, is refused unless allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleetctl.contract import FINAL_STATUSES as FINAL
from fleetctl.contract import SandboxStatus
from fleetctl.plan.model import Action, Change, InPlace, LiveSandbox, Plan
from fleetctl.spec.expand import DesiredSandbox
from fleetctl.spec.models import Exposure, FileSpec, Job

#: Which of several live sandboxes of one key to keep, most preferred first.
ACTIVE_ORDER: dict[str, int] = {
    SandboxStatus.RUNNING: 0,
    SandboxStatus.PROVISIONING: 1,
    SandboxStatus.PENDING: 2,
}


@dataclass(frozen=True, slots=True)
class Limits:
    """The prune guard: at most `max_delete` (a fraction) of owned sandboxes, never all."""

    max_delete: float = 0.5
    allow_mass_delete: bool = False


def plan(
    desired: Sequence[DesiredSandbox],
    digests: Mapping[tuple[str, str], str],
    live: Iterable[LiveSandbox],
    fleets: Sequence[str],
    limits: Limits = Limits(),
    file_digests: Mapping[str, str] | None = None,
    image_moves: Mapping[tuple[str, str], tuple[str, str]] | None = None,
) -> Plan:
    """Compare `desired` (with their `digests` by (fleet, key)) to the `live` sandboxes
    of `fleets`; only sandboxes labelled for one of `fleets` are ever touched.

    `file_digests` (local source → content digest) lets a sandbox that stays get
    changed files uploaded again; without it, files are compared by presence.
    `image_moves` ((fleet, key) → (digest run, digest the tag names now)) replaces the
    sandboxes whose image tag moved (`make_plan(refresh_images=True)`).
    """
    owned = [s for s in live if s.fleet in fleets]
    by_key: dict[tuple[str, str], list[LiveSandbox]] = {}
    for found in owned:
        by_key.setdefault((found.fleet, found.key), []).append(found)
    changes: list[Change] = []
    wanted = {(d.fleet, d.key) for d in desired}
    for sandbox in desired:
        ident = (sandbox.fleet, sandbox.key)
        candidates = sorted(by_key.get(ident, []), key=_preference)
        current = candidates[0] if candidates else None
        moved = (image_moves or {}).get(ident)
        changes.append(_change(sandbox, digests[ident], current, file_digests or {}, moved))
        changes += [
            Change(Action.delete, sandbox.key, extra, None, "duplicate of this key")
            for extra in candidates[1:]
        ]
    for ident, sandboxes in by_key.items():
        if ident not in wanted:
            changes += [
                Change(Action.delete, s.key, s, None, "no longer in the spec") for s in sandboxes
            ]
    changes.sort(key=lambda c: (c.after.fleet if c.after else c.before.fleet if c.before else "",
                                c.key, c.action.value))  # fmt: skip
    refused = _guard(changes, owned, limits)
    return Plan(tuple(changes), tuple(fleets), fingerprint(owned), refused=refused)


def _preference(sandbox: LiveSandbox) -> tuple[int, str, str]:
    """Which of several live sandboxes with one key to keep: active first, then oldest."""
    return ACTIVE_ORDER.get(sandbox.status, 9), sandbox.created_at.isoformat(), sandbox.id


def _change(
    sandbox: DesiredSandbox,
    digest: str,
    current: LiveSandbox | None,
    file_digests: Mapping[str, str],
    moved: tuple[str, str] | None = None,
) -> Change:
    if current is None:
        return Change(Action.create, sandbox.key, None, sandbox, "not running yet")
    if current.status in FINAL:
        return Change(
            Action.recreate, sandbox.key, current, sandbox, f"sandbox is {current.status}"
        )
    if current.digest != digest:
        return Change(
            Action.replace,
            sandbox.key,
            current,
            sandbox,
            f"settings changed (digest {current.digest} → {digest})",
        )
    if moved is not None:  # the new sandbox pins what the tag names now
        before, after = (d.removeprefix("sha256:")[:12] for d in moved)
        pinned = dataclasses.replace(sandbox, image=f"{sandbox.image}@{moved[1]}")
        return Change(Action.replace, sandbox.key, current, pinned,
                      f"image tag moved: sha256:{before}… → sha256:{after}…")  # fmt: skip
    updates = in_place(sandbox, current, file_digests)
    if updates:
        return Change(Action.update, sandbox.key, current, sandbox, updates.describe(), updates)
    return Change(Action.noop, sandbox.key, current, sandbox, "up to date")


def in_place(
    sandbox: DesiredSandbox, current: LiveSandbox, file_digests: Mapping[str, str]
) -> InPlace:
    """What a sandbox that stays needs: only facts that were read are compared."""
    expose: tuple[Exposure, ...] = ()
    unexpose: tuple[str, ...] = ()
    if current.exposures is not None:
        wanted = {(e.port, e.protocol) for e in sandbox.expose}
        expose = tuple(e for e in sandbox.expose if (e.port, e.protocol) not in current.exposures)
        unexpose = tuple(i for k, i in sorted(current.exposures.items()) if k not in wanted)
    upload: tuple[FileSpec, ...] = ()
    if current.files is not None:
        known = current.files
        upload = tuple(
            f for f in sandbox.files if known.get(f.target) != file_digests.get(f.source, "present")
        )
    jobs: tuple[Job, ...] = ()
    if current.jobs_started is not None:
        jobs = tuple(j for j in sandbox.jobs if j.name not in current.jobs_started)
    return InPlace(expose, unexpose, upload, jobs)


def _guard(
    changes: Sequence[Change], owned: Sequence[LiveSandbox], limits: Limits
) -> tuple[str, ...]:
    if limits.allow_mass_delete:
        return ()
    active = [s for s in owned if s.status not in FINAL]
    pruned = [c for c in changes if c.action is Action.delete and c.before is not None
              and c.before.status not in FINAL and c.reason == "no longer in the spec"]  # fmt: skip
    if not pruned:
        return ()
    if len(pruned) == len(active):
        return (f"the plan deletes all {len(active)} running sandboxes of the fleet",)
    if len(pruned) > limits.max_delete * len(active):
        return (f"the plan deletes {len(pruned)} of {len(active)} running sandboxes, more "
                f"than --max-delete {limits.max_delete:.0%}",)  # fmt: skip
    return ()


def fingerprint(live: Iterable[LiveSandbox]) -> str:
    """A digest of the live state a plan was made from; a saved plan whose live state
    changed since is refused."""
    items = sorted(f"{s.id}:{s.status}:{s.digest}" for s in live)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
