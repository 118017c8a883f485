"""The sandbox service: the server's behaviour, free of HTTP, in pieces with one job each.

    lifecycle.py   create, provision, find, delete; `finish` ends a sandbox whoever asks
    monitor.py     timeouts, OOM, exits and disk, checked every pass
    dataplane.py   gateway tokens, exec, files, exposures
    processes.py   live processes: streamed output, stdin, signals, re-attach
    checkpoints.py frozen writable layers to start new sandboxes from
    adoption.py    taking over from the previous server; leaving to the next one
    state.py       what they share: settings, store, runtime, in-memory environments

The pieces reach sandboxes only through the runtime protocol
(`fleetctl.server.runtime.base.Runtime`), so another runtime needs no change here.
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskGroup

from fleetctl.server import api
from fleetctl.server.images.pull import Puller
from fleetctl.server.runtime.base import Runtime
from fleetctl.server.service.adoption import Adoption
from fleetctl.server.service.checkpoints import Checkpoints
from fleetctl.server.service.dataplane import DataPlane
from fleetctl.server.service.images import Images
from fleetctl.server.service.jobs import Jobs
from fleetctl.server.service.lifecycle import Lifecycle
from fleetctl.server.service.monitor import Monitor
from fleetctl.server.service.processes import Processes
from fleetctl.server.service.state import (
    Busy,
    Failed,
    NotFound,
    NotRunning,
    Refused,
    Settings,
    Shared,
    Unsupported,
)
from fleetctl.server.store import SandboxRecord, Store

__all__ = [
    "Busy", "Failed", "NotFound", "NotRunning", "Refused", "SandboxService", "Settings",
    "Unsupported",
]  # fmt: skip


class SandboxService:
    """The pieces, wired together; routes call them through `sandboxes`, `monitor`,
    `data`, `processes` and `adoption`."""

    def __init__(
        self, store: Store, runtime: Runtime, settings: Settings, images: Puller | None = None
    ) -> None:
        self.shared = Shared(store, runtime, settings, images)
        self.sandboxes = Lifecycle(self.shared)
        self.monitor = Monitor(self.shared, self.sandboxes)
        self.data = DataPlane(self.shared, self.sandboxes, self.monitor)
        self.processes = Processes(self.shared, self.sandboxes, self.data)
        self.jobs = Jobs(self.shared, self.data)
        self.checkpoints = Checkpoints(self.shared, self.sandboxes)
        self.adoption = Adoption(self.shared, self.sandboxes)
        self.images = Images(self.shared)

    @property
    def store(self) -> Store:
        return self.shared.store

    @property
    def runtime(self) -> Runtime:
        return self.shared.runtime

    async def run(self, group: TaskGroup, *, monitor_interval: float = 0.2) -> None:
        """Start background work in `group`: adoption of leftovers, exposures, the monitor."""
        await anyio.to_thread.run_sync(self.adoption.reclaim)
        self.sandboxes.run(group)
        self.processes.run(group)
        self.jobs.run(group)
        self.checkpoints.run(group)
        await self.data.run(group)
        group.start_soon(self.monitor.run, monitor_interval)

    async def create(self, request: api.CreateSandbox) -> SandboxRecord:
        """A new sandbox, from the checkpoint the request names if it names one."""
        restore = self.checkpoints.restore(request.checkpoint_id) if request.checkpoint_id else None
        return await self.sandboxes.create(request, restore)

    async def shutdown(self) -> None:
        await self.adoption.shutdown()
