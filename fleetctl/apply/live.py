"""Reading live state: the fleet's sandboxes, found by fleetctl's own labels."""

from __future__ import annotations

from collections.abc import Sequence

from fleetctl.plan.identity import fleet_label, parse
from fleetctl.plan.model import LiveSandbox
from fleetctl.sandboxes import AsyncSandboxClient, Sandbox


async def owned(client: AsyncSandboxClient, fleets: Sequence[str]) -> list[LiveSandbox]:
    """Every sandbox labelled for one of `fleets` (all pages)."""
    found: list[LiveSandbox] = []
    for fleet in fleets:
        for sandbox in await list_all(client, [fleet_label(fleet)]):
            identity = parse(sandbox.labels)
            if identity is not None and identity[0] == fleet:
                found.append(LiveSandbox(
                    id=sandbox.id, fleet=identity[0], key=identity[1], digest=identity[2],
                    status=sandbox.status, created_at=sandbox.created_at,
                    labels=tuple(sandbox.labels),
                ))  # fmt: skip
    return found


async def list_all(client: AsyncSandboxClient, labels: Sequence[str]) -> list[Sandbox]:
    """Every sandbox having all `labels`, following pagination."""
    found: list[Sandbox] = []
    page = 1
    while True:
        batch = await client.list(labels=list(labels), page=page, per_page=100)
        found += batch.sandboxes
        if not batch.has_next:
            return found
        page += 1
