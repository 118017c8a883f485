"""The monitor: ends sandboxes that exited, ran out of memory, time (lifetime or idle) or
disk, and forgets deleted ones after a while. The data plane runs the same `check` before
and after it uses a sandbox, so a sandbox that just ended is never served."""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta

import anyio

from fleetctl.contract import ErrorType, SandboxStatus
from fleetctl.server.runtime.base import Handle
from fleetctl.server.service.lifecycle import Lifecycle
from fleetctl.server.service.state import Shared, handle_of
from fleetctl.server.store import SandboxRecord

log = logging.getLogger("fleetctl.server")
DISK_CHECK_SECONDS = 2.0
DELETED_RETENTION = timedelta(hours=1)


class Monitor:
    """One pass (`tick`) every `interval` seconds while the server runs."""

    def __init__(self, shared: Shared, lifecycle: Lifecycle) -> None:
        self.shared = shared
        self.lifecycle = lifecycle
        self._next_disk_check = 0.0

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a monitor that dies would silently freeze every status
                log.exception("monitor pass failed; retrying")
            await anyio.sleep(interval)

    async def tick(self) -> None:
        """One pass: end sandboxes that exited, ran out of memory, time or disk."""
        store, runtime = self.shared.store, self.shared.runtime
        records, _ = store.query(status=SandboxStatus.RUNNING)
        if time.monotonic() >= self._next_disk_check:
            self._next_disk_check = time.monotonic() + DISK_CHECK_SECONDS
            for record in records:
                await self._check_disk(record)
            records, _ = store.query(status=SandboxStatus.RUNNING)
        for record in records:
            handle = handle_of(record)
            if handle is not None:
                await self.check(record, handle)
        retention = self.shared.clock() - DELETED_RETENTION
        for record in store.query(include_deleted=True, status=SandboxStatus.TERMINATED)[0]:
            if record.deleted_at is not None and record.deleted_at < retention:
                store.purge(record.id)
                runtime.forget(record.id)

    async def check(self, record: SandboxRecord, handle: Handle, *, oom_only: bool = False) -> bool:
        """End a RUNNING sandbox that ran out of memory (ERROR/OOM_KILLED, as the cloud's
        container does: an OOM kill anywhere in it), past its lifetime or idle timeout
        (TIMEOUT), or whose main process exited (TERMINATED); True if it ended. With
        `oom_only` (after an exec, whose result an OOM kill spoils), only the first."""
        usage = self.shared.runtime.usage(handle)
        if usage.oom_kills:
            await self.lifecycle.finish(record.id, SandboxStatus.ERROR,
                                        error_type=ErrorType.OOM_KILLED,
                                        message="the sandbox ran out of memory")  # fmt: skip
            return True
        if oom_only:
            return False
        timed_out = self._timed_out(record)
        if timed_out:
            await self.lifecycle.finish(record.id, SandboxStatus.TIMEOUT,
                                        error_type=ErrorType.TIMEOUT,
                                        message=timed_out)  # fmt: skip
            return True
        if not usage.alive:
            self.shared.store.update(record.id, exit_code=usage.exit_code)
            reason = f"the main process exited with code {usage.exit_code}"
            await self.lifecycle.finish(record.id, SandboxStatus.TERMINATED, reason=reason)
            return True
        return False

    def _timed_out(self, record: SandboxRecord) -> str | None:
        """Why the sandbox is out of time (its lifetime, or its idle timeout), or None."""
        now, scale = self.shared.clock(), self.shared.settings.timeout_scale
        started = record.started_at or record.created_at
        minutes = int(record.request["timeout_minutes"])
        if now >= started + timedelta(minutes=minutes * scale):
            return f"the sandbox exceeded its timeout of {minutes} minutes"
        idle = record.request.get("idle_timeout_minutes")
        last_used = max(started, self.shared.used.get(record.id, started))
        busy = record.id in self.shared.busy
        if idle and not busy and now >= last_used + timedelta(minutes=int(idle) * scale):
            return f"the sandbox was idle for {idle} minutes (its idle_timeout_minutes)"
        return None

    async def _check_disk(self, record: SandboxRecord) -> None:
        """disk_size_gb is enforced by measurement: a sandbox past it is stopped with a
        clear error (no per-sandbox filesystem quota is available on every host)."""
        size = record.request["disk_size_gb"]
        used = await anyio.to_thread.run_sync(self.shared.runtime.disk_usage, record.id)
        if used > float(size) * 1024**3:
            message = f"the sandbox wrote {used / 1024**3:.2f} GB, past its disk_size_gb of {size}"
            await self.lifecycle.finish(
                record.id,
                SandboxStatus.ERROR,
                error_type=ErrorType.DISK_LIMIT_EXCEEDED,
                message=message,
            )

    async def kill_random_sandbox(self, rng: random.Random) -> None:
        """Fault injection: kill one running sandbox's processes out of band, as a
        crashed node would; the next pass then reports it TERMINATED."""
        records, _ = self.shared.store.query(status=SandboxStatus.RUNNING)
        handles = [h for h in map(handle_of, records) if h is not None]
        if handles:
            self.shared.runtime.kill(rng.choice(handles))
