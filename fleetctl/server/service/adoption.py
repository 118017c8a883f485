"""Adoption: what a server does with the sandboxes of the server before it, and leaves to
the server after it.

Sandboxes outlive their server. At start, those still running are adopted (their
environment read back through the runtime), those that died meanwhile become
TERMINATED with the reason, a create that was cut short is cleaned up, and
whatever the runtime holds without a live record is removed. At stop, sandboxes
are stopped, unless the server is restarting (`restart_marker` exists).
"""

from __future__ import annotations

from fleetctl.contract import FINAL_STATUSES, SandboxStatus
from fleetctl.server.options import restart_marker
from fleetctl.server.service.lifecycle import Lifecycle
from fleetctl.server.service.state import Shared, handle_of


class Adoption:
    def __init__(self, shared: Shared, lifecycle: Lifecycle) -> None:
        self.shared = shared
        self.lifecycle = lifecycle

    def reclaim(self) -> None:
        """Take over what a previous server left (it was killed, or restarted); blocking."""
        store, runtime = self.shared.store, self.shared.runtime
        live, _ = store.query(active_only=True, include_deleted=True)
        for record in live:
            handle = handle_of(record)
            if record.status == SandboxStatus.RUNNING and handle is not None:
                env = runtime.adopt(handle)
                if env is not None:
                    self.shared.env[record.id] = env
                    continue
            reason = (
                "its processes ended while the server was down"
                if record.status == SandboxStatus.RUNNING
                else "the server stopped while it was being created"
            )
            runtime.stop(record.id, handle)
            store.update(
                record.id,
                status=SandboxStatus.TERMINATED,
                terminated_at=self.shared.clock(),
                termination_reason=reason,
            )
            for exposure in store.exposures(record.id):
                store.remove_exposure(exposure.id)
        for sandbox_id in runtime.leftovers():
            found = store.get(sandbox_id)
            if found is None or found.status in FINAL_STATUSES:
                runtime.stop(sandbox_id, handle_of(found))

    async def shutdown(self) -> None:
        """Stop every live sandbox (the server is going away), unless it is restarting:
        then they keep running and the next server adopts them."""
        marker = restart_marker(self.shared.settings.data_dir)
        if marker.exists():
            marker.unlink()
            return
        records, _ = self.shared.store.query(active_only=True)
        for record in records:
            await self.lifecycle.finish(
                record.id, SandboxStatus.TERMINATED, reason="the server stopped"
            )
