"""Idmapped mounts made side by side: each call's helper child holds only its own pipes.

A sandbox started from a checkpoint gets an idmapped mount of each stacked layer, and
creates run concurrently (one worker thread each). A helper child that inherited the
pipe ends of a concurrent call kept that call's child from seeing EOF, and the two
children waited on each other for ever, with every later create stuck behind them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from fleetctl.server.runtime.bwrap import idmap
from tests.conftest import needs_sandboxes

OWNER = 1_999_000
CALLS = 48
DEADLINE_S = 20


@needs_sandboxes
def test_concurrent_idmapped_mounts_all_finish(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "file").write_text("x")
    os.chown(layer / "file", OWNER, OWNER)
    targets = [tmp_path / f"t{i}" for i in range(CALLS)]
    failures: list[BaseException] = []
    start = threading.Barrier(CALLS)

    def mount(i: int) -> None:
        targets[i].mkdir()
        start.wait()
        try:
            idmap.mount_idmapped(layer, targets[i], owner=OWNER, as_uid=OWNER + 1 + i)
        except BaseException as exc:  # reported below, by the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=mount, args=(i,), daemon=True) for i in range(CALLS)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + DEADLINE_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in threads)
        assert stuck == 0, f"{stuck} of {CALLS} idmapped mounts still waiting after {DEADLINE_S}s"
        assert failures == []
        owners = [(target / "file").stat().st_uid for target in targets]
        assert owners == [OWNER + 1 + i for i in range(CALLS)]
    finally:
        if any(thread.is_alive() for thread in threads):
            kill_children()  # the stuck helpers, else they outlive the run holding its stdout
        for target in targets:
            idmap.unmount(target)


def kill_children() -> None:
    """SIGKILL every child process of this one (only the stuck helpers, on failure)."""
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
