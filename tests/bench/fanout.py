"""The fan-out both SDKs run in `sdk_fanout.py`: its steps, its result, its report.

Imports nothing of fleetctl and no SDK: `sdk_fanout.py` runs our SDK through it in its
own interpreter, and `fanout_official.py` runs the official one through it in the
official release's venv, which sends its `Result` back as JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.bench.wire import Classify, Sent, tally

IMAGE = "python:3.11-slim"
STEPS = ("create", "wait", "exec", "delete")


@dataclass
class Result:
    """What one SDK's fan-out did: timings, per-sandbox failures, requests on the wire."""

    name: str
    n: int
    wall_s: float = 0.0
    step_s: dict[str, float] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # sandbox index → first failed step
    errors: dict[str, str] = field(default_factory=dict)  # step → first error seen
    sent: list[Sent] = field(default_factory=list)  # REST requests, as `wire.recording` saw
    sdk_stats: dict[str, int] | None = None
    retried_429: int | None = None  # creates the bench's wrapper sent again (official only)

    def fail(self, index: int, step: str, error: object) -> None:
        self.failed.setdefault(index, step)
        self.errors.setdefault(step, f"{type(error).__name__}: {error}"[:200])

    def live(self, ids: dict[int, str]) -> dict[int, str]:
        return {i: sandbox_id for i, sandbox_id in ids.items() if i not in self.failed}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        data = dict(data)
        data["failed"] = {int(i): step for i, step in data["failed"].items()}
        data["sent"] = [(m, p, o) for m, p, o in data["sent"]]
        return cls(**data)


async def timed(result: Result, step: str, work: Awaitable[None]) -> None:
    started = time.perf_counter()
    await work
    result.step_s[step] = time.perf_counter() - started


async def fan_out(
    result: Result,
    create: Callable[[int], Awaitable[str]],
    bulk_wait: Callable[[list[str]], Awaitable[object]],
    execute: Callable[[str], Awaitable[str]],
    bulk_delete: Callable[[], Awaitable[list[str]]],
) -> None:
    """The four steps, the same for both SDKs; each callable wraps one SDK method."""
    ids: dict[int, str] = {}

    async def creates() -> None:
        outcomes = await asyncio.gather(
            *(create(i) for i in range(result.n)), return_exceptions=True
        )
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                result.fail(i, "create", outcome)
            else:
                ids[i] = outcome

    async def wait() -> None:
        live = result.live(ids)
        if not live:
            return
        try:
            await bulk_wait(list(live.values()))
        except Exception as exc:  # one call for all: it tells no sandbox apart
            for i in live:
                result.fail(i, "wait", exc)

    async def commands() -> None:
        live = result.live(ids)
        outputs = await asyncio.gather(
            *(execute(sandbox_id) for sandbox_id in live.values()), return_exceptions=True
        )
        for i, output in zip(live, outputs, strict=True):
            if isinstance(output, BaseException):
                result.fail(i, "exec", output)
            elif output.strip() != "ok":
                result.fail(i, "exec", f"unexpected output {output!r}")

    async def delete() -> None:
        try:
            not_deleted = set(await bulk_delete())
        except Exception as exc:
            not_deleted = set(ids.values())
            result.errors.setdefault("delete", f"{type(exc).__name__}: {exc}"[:200])
        for i, sandbox_id in ids.items():
            if sandbox_id in not_deleted:
                result.fail(i, "delete", f"{sandbox_id} not deleted")

    started = time.perf_counter()
    for step, work in zip(STEPS, (creates, wait, commands, delete), strict=True):
        await timed(result, step, work())
    result.wall_s = time.perf_counter() - started


def report(result: Result, classify: Classify) -> None:
    """Print one SDK's figures: timings, failures, requests on the wire by class."""
    per_step = Counter(result.failed.values())
    steps = " ".join(f"{s} {result.step_s.get(s, 0.0):.2f}" for s in STEPS)
    print(f"[{result.name}] wall {result.wall_s:.2f} s ({steps})")
    print(
        f"[{result.name}] failures {len(result.failed)}/{result.n}"
        + (f" ({', '.join(f'{s}: {c}' for s, c in per_step.items())})" if per_step else "")
    )
    for step, error in result.errors.items():
        print(f"[{result.name}]   first {step} error: {error}")
    wire = tally(result.sent, classify)
    classes = ", ".join(
        f"{cls} {wire[cls]}" + (f" ({wire[f'{cls}_429']} × 429)" if wire[f"{cls}_429"] else "")
        for cls in ("create", "list", "exec", "delete", "default")
        if wire[cls]
    )
    print(
        f"[{result.name}] HTTP requests {wire['requests']} ({classes}); 429s {wire['429']}, "
        f"5xx {wire['5xx']}, transport errors {wire['transport_errors']}"
    )
    if result.retried_429 is not None:
        print(
            f"[{result.name}] creates WRAPPED by this bench in a retry on a 429 the SDK "
            f"raised: {result.retried_429} sent again"
        )
    done = result.n - len(result.failed)
    if done:
        each_ms = result.wall_s / done * 1000
        print(f"[{result.name}] {done} sandboxes through all steps: {each_ms:.0f} ms each")
    if result.sdk_stats is not None:
        stats = result.sdk_stats
        print(
            f"[{result.name}] client.api.stats: requests {stats['requests']}, "
            f"retries {stats['retries']}, throttled {stats['throttled']}"
        )
