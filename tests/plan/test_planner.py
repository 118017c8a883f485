"""The planner: table tests of each action and the prune guard, and Hypothesis laws."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetctl.plan.model import Action, LiveSandbox
from fleetctl.plan.planner import Limits, plan
from fleetctl.spec.expand import DesiredSandbox
from fleetctl.spec.models import Exposure, FileSpec, Job

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def desired(key: str, fleet: str = "f") -> DesiredSandbox:
    return DesiredSandbox(
        fleet=fleet, key=key, group=key, replica=0, image="i", from_checkpoint=None,
        prepare=None, start_command=None, cpu_cores=1, memory_gb=1, disk_size_gb=1,
        timeout_minutes=60, idle_timeout_minutes=None, network_access=True,
        env={}, secrets={}, labels=(), files=(), expose=(), jobs=(),
    )  # fmt: skip


def live(key: str, digest: str = "d", status: str = "RUNNING", fleet: str = "f",
         sandbox_id: str | None = None, age: int = 0) -> LiveSandbox:  # fmt: skip
    return LiveSandbox(sandbox_id or f"id-{fleet}-{key}-{status}-{age}", fleet, key, digest,
                       status, T0 - timedelta(seconds=age))  # fmt: skip


def actions(changes: object) -> list[tuple[str, str]]:
    return [(c.action.value, c.key) for c in changes]  # type: ignore[attr-defined]


def test_each_action_with_its_reason() -> None:
    want = [desired(k) for k in ("new", "same", "changed", "dead")]
    digests = {("f", "new"): "d", ("f", "same"): "d", ("f", "changed"): "d2", ("f", "dead"): "d"}
    found = [live("same"), live("changed"), live("dead", status="ERROR"), live("gone")]
    result = plan(want, digests, found, ["f"], Limits(max_delete=1.0))
    assert actions(result.changes) == [
        ("replace", "changed"), ("recreate", "dead"), ("delete", "gone"), ("create", "new"),
        ("noop", "same"),
    ]  # fmt: skip
    reasons = {c.key: c.reason for c in result.changes}
    assert reasons["changed"] == "settings changed (digest d → d2)"
    assert reasons["dead"] == "sandbox is ERROR"
    assert reasons["gone"] == "no longer in the spec"
    assert result.summary() == "Plan: 1 to create, 1 to replace, 1 to recreate, 1 to delete."


def test_duplicates_of_a_key_keep_the_oldest_running_one() -> None:
    found = [live("a", sandbox_id="young", age=1), live("a", sandbox_id="old", age=100),
             live("a", sandbox_id="dead", status="TERMINATED", age=500)]  # fmt: skip
    result = plan([desired("a")], {("f", "a"): "d"}, found, ["f"], Limits(max_delete=1.0))
    kept = [c for c in result.changes if c.action is Action.noop]
    assert [c.before.id for c in kept if c.before] == ["old"]
    assert sorted(c.before.id for c in result.changes if c.action is Action.delete
                  and c.before) == ["dead", "young"]  # fmt: skip


def test_prune_guard_refuses_deleting_everything_or_past_max_delete() -> None:
    found = [live(k) for k in "abcd"]
    everything = plan([], {}, found, ["f"])
    assert everything.refused == ("the plan deletes all 4 running sandboxes of the fleet",)
    three = plan([desired("a")], {("f", "a"): "d"}, found, ["f"])
    assert three.refused == (
        "the plan deletes 3 of 4 running sandboxes, more than --max-delete 50%",
    )
    assert plan([desired("a"), desired("b")], {("f", "a"): "d", ("f", "b"): "d"}, found,
                ["f"]).refused == ()  # fmt: skip
    assert plan([], {}, found, ["f"], Limits(allow_mass_delete=True)).refused == ()


def test_dead_sandboxes_leaving_the_spec_do_not_trip_the_guard() -> None:
    found = [live("a"), live("old", status="TIMEOUT")]
    assert plan([desired("a")], {("f", "a"): "d"}, found, ["f"]).refused == ()


keys = st.text(alphabet="abc", min_size=1, max_size=2)
statuses = st.sampled_from(["RUNNING", "PENDING", "TERMINATED", "ERROR", "TIMEOUT"])
lives = st.lists(
    st.builds(live, keys, st.sampled_from(["d", "x"]), statuses,
              st.sampled_from(["f", "other"]), st.none(), st.integers(0, 9)),
    max_size=12, unique_by=lambda s: s.id,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.sets(keys, max_size=5), lives)
def test_plan_never_touches_a_sandbox_the_fleet_does_not_own(
    wanted: set[str], found: list[LiveSandbox]
) -> None:
    want = [desired(k) for k in sorted(wanted)]
    result = plan(want, {("f", k): "d" for k in wanted}, found, ["f"], Limits(max_delete=1.0))
    touched = {c.before.id for c in result.changes if c.before}
    assert all(s.fleet == "f" for s in found if s.id in touched)


@settings(max_examples=300, deadline=None)
@given(st.sets(keys, max_size=5), lives)
def test_applying_a_plan_then_planning_again_changes_nothing(
    wanted: set[str], found: list[LiveSandbox]
) -> None:
    want = [desired(k) for k in sorted(wanted)]
    digests = {("f", k): "d" for k in wanted}
    first = plan(want, digests, found, ["f"], Limits(max_delete=1.0))
    # a fake API that records the plan's effect: deleted sandboxes go, created appear RUNNING
    after = [s for s in found if s.id not in {c.before.id for c in first.changes if c.before
                                              and c.action is not Action.noop}]  # fmt: skip
    after += [live(c.key, digests[("f", c.key)], sandbox_id=f"new-{c.key}")
              for c in first.changes if c.action in (Action.create, Action.replace,
                                                     Action.recreate)]  # fmt: skip
    second = plan(want, digests, after, ["f"], Limits(max_delete=1.0))
    assert not second.has_changes, second.changes


def test_in_place_update_from_facts_read_inside_the_sandbox() -> None:
    want = replace(
        desired("a"),
        expose=(Exposure(port=8000), Exposure(port=9000, protocol="TCP")),
        files=(FileSpec(source="/src/a", target="/workspace/a"),
               FileSpec(source="/src/b", target="/workspace/b")),
        jobs=(Job(name="done", command="x"), Job(name="new", command="y")),
    )  # fmt: skip
    current = replace(
        live("a"),
        exposures={(8000, "HTTP"): "e1", (7000, "HTTP"): "e2"},
        files={"/workspace/a": "old", "/workspace/b": "same"},
        jobs_started=frozenset({"done"}),
    )
    result = plan([want], {("f", "a"): "d"}, [current], ["f"],
                  file_digests={"/src/a": "new", "/src/b": "same"})  # fmt: skip
    (change,) = result.changes
    assert change.action is Action.update
    assert (
        change.reason == "expose 9000/TCP; unexpose 1 port(s); upload /workspace/a; start job new"
    )
    assert change.in_place.unexpose == ("e2",)
    unknown = plan([want], {("f", "a"): "d"}, [live("a")], ["f"])  # facts not read: no guess
    assert [c.action for c in unknown.changes] == [Action.noop]
