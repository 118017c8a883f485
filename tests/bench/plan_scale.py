"""Benchmark: the planner on 10,000 desired and 10,000 live sandboxes (not run by the suite).

    python tests/bench/plan_scale.py [--n 10000] [--repeat 3] [--profile]

Loads a generated spec (one group, ``replicas: n``) with `fleetctl.spec.load_text`,
digests it with `fleetctl.plan.prepare.prepare` (the path `apply` takes), and builds n
`LiveSandbox` records as `live.owned` would return them (the three fleetctl labels
each): most up to date, some with a changed digest, some dead, some duplicates of a
key and some keys the spec no longer has. Then times `plan(...)` in memory `--repeat`
times and checks the plan's counts. No server, no I/O in the timed part.

Peak RSS is the process's `ru_maxrss` (imports, spec, digests, live records and plans
included). With `--profile` a cProfile run of one `plan(...)` follows (top functions by
cumulative and own time), outside the figures. Prints figures and, last, one line:

    plan_s=… peak_rss_mb=…

with plan_s the median of the runs, not the best (the best and every run are printed
above it). Targets on a 2-core machine: plan_s ≤ 1 and peak_rss_mb ≤ 300.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fleetctl.plan.identity import DIGEST_LABEL, KEY_LABEL, fleet_label
from fleetctl.plan.model import Action, LiveSandbox, Plan
from fleetctl.plan.planner import Limits, plan
from fleetctl.plan.prepare import Prepared, prepare
from fleetctl.spec import load_text

FLEET = "scale"
#: Shares of the desired keys, by what the live side holds for them.
CHANGED_EVERY = 25  # every 25th key: live with another digest → replace (4 %)
DEAD_EVERY = 33  # every 33rd key (not already changed): TERMINATED/ERROR → recreate (~3 %)
ABSENT_EVERY = 40  # every 40th key (not already above): nothing live → create (~2 %)
DUPLICATE_EVERY = 100  # every 100th up-to-date key gets a second, younger sandbox → delete
EXTRA_SHARE = 0.02  # of n: live keys the spec no longer has → delete (prune, under the guard)


def spec_text(n: int) -> str:
    return (
        "apiVersion: fleetctl/v1\n"
        "kind: Fleet\n"
        f"name: {FLEET}\n"
        "sandboxes:\n"
        "  - name: worker\n"
        f"    replicas: {n}\n"
        "    image: python:3.11-slim\n"
        "    memory_gb: 0.25\n"
    )


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_record(index: int, key: str, digest: str, status: str, age_s: int) -> LiveSandbox:
    sandbox_id = f"sbx-{index:08x}"
    own = (fleet_label(FLEET), KEY_LABEL + key, DIGEST_LABEL + digest)
    created = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=age_s)
    return LiveSandbox(sandbox_id, FLEET, key, digest, status, created, own)


def build_live(prepared: Prepared, n: int) -> tuple[list[LiveSandbox], Counter[Action]]:
    """n live records and the plan's expected counts per action."""
    live: list[LiveSandbox] = []
    expected: Counter[Action] = Counter()
    extras = round(n * EXTRA_SHARE)
    up_to_date = 0
    for index, sandbox in enumerate(prepared.desired):
        if len(live) >= n - extras:
            expected[Action.create] += 1  # the live side ran out: the rest are new
            continue
        digest = prepared.digests[(sandbox.fleet, sandbox.key)]
        if index % CHANGED_EVERY == 0:
            live.append(live_record(len(live), sandbox.key, "0" * 16, "RUNNING", index))
            expected[Action.replace] += 1
        elif index % DEAD_EVERY == 0:
            status = "TERMINATED" if index % 2 else "ERROR"
            live.append(live_record(len(live), sandbox.key, digest, status, index))
            expected[Action.recreate] += 1
        elif index % ABSENT_EVERY == 0:
            expected[Action.create] += 1
        else:
            live.append(live_record(len(live), sandbox.key, digest, "RUNNING", index))
            expected[Action.noop] += 1
            up_to_date += 1
            if up_to_date % DUPLICATE_EVERY == 0 and len(live) < n - extras:
                live.append(live_record(len(live), sandbox.key, digest, "RUNNING", n + index))
                expected[Action.delete] += 1
    for extra in range(n - len(live)):
        live.append(live_record(len(live), f"gone-{extra}", "f" * 16, "RUNNING", extra))
        expected[Action.delete] += 1
    return live, expected


def timed_plans(
    prepared: Prepared, live: Sequence[LiveSandbox], repeat: int
) -> tuple[list[float], Plan]:
    times: list[float] = []
    result: Plan | None = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = plan(prepared.desired, prepared.digests, live, prepared.fleets, Limits())
        times.append(time.perf_counter() - started)
    assert result is not None
    return times, result


def profile(prepared: Prepared, live: Sequence[LiveSandbox]) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    plan(prepared.desired, prepared.digests, live, prepared.fleets, Limits())
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(15)
    stats.sort_stats("tottime").print_stats(10)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="desired and live sandboxes")
    parser.add_argument("--repeat", type=int, default=3, help="timed plan() runs")
    parser.add_argument("--profile", action="store_true", help="cProfile one plan() after")
    args = parser.parse_args()
    rss_imports = rss_mb()

    with tempfile.TemporaryDirectory(dir="/tmp") as spec_dir:
        spec_file = Path(spec_dir) / "scale.yaml"
        started = time.perf_counter()
        fleets = load_text(spec_text(args.n), file=str(spec_file))
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        prepared = prepare(fleets, api_key="bench-plan-scale")
        prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    live, expected = build_live(prepared, args.n)
    build_s = time.perf_counter() - started
    rss_inputs = rss_mb()

    gc.collect()
    times, result = timed_plans(prepared, live, args.repeat)
    rss_peak = rss_mb()
    got = Counter(change.action for change in result.changes)
    if got != expected or result.refused:
        sys.exit(f"unexpected plan: {dict(got)} != {dict(expected)}; refused {result.refused}")

    tracemalloc.start()
    plan(prepared.desired, prepared.digests, live, prepared.fleets, Limits())
    _, plan_alloc = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    best, median = min(times), statistics.median(times)
    counts = ", ".join(f"{a.value} {got[a]}" for a in Action if got[a])
    print(f"desired={len(prepared.desired)} live={len(live)} changes={len(result.changes)}")
    print(f"plan: {counts}; {result.summary()}")
    print(
        f"inputs: load_text {load_s:.3f} s, prepare (digests) {prepare_s:.3f} s, "
        f"live records {build_s:.3f} s"
    )
    print(
        f"plan() s over {len(times)} runs: best {best:.3f}, median {median:.3f}, "
        f"all {' '.join(f'{t:.3f}' for t in times)}"
    )
    print(
        f"peak RSS MB: after imports {rss_imports:.1f}, with inputs {rss_inputs:.1f}, "
        f"after plans {rss_peak:.1f}; one plan() allocates at most "
        f"{plan_alloc / 2**20:.1f} MB (tracemalloc)"
    )
    if args.profile:
        print(profile(prepared, live))
    print(f"plan_s={median:.3f} peak_rss_mb={rss_peak:.1f}")


if __name__ == "__main__":
    main()
