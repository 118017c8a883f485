"""Reading live state: the fleet's sandboxes, found by fleetctl's own labels."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

import anyio

from fleetctl.apply.executor import FILES_MARKER
from fleetctl.plan.identity import fleet_label, parse
from fleetctl.plan.model import LiveSandbox
from fleetctl.sandboxes import APIError, AsyncSandboxClient, Sandbox, SandboxNotRunningError

#: One exec per sandbox: the uploaded files' digests, then the spec jobs started.
FACTS_SCRIPT = (
    f"sed 's/^/file /' {FILES_MARKER} 2>/dev/null; "
    'for f in /tmp/job_fleetctl-*.stdout.log; do [ -e "$f" ] || continue; '
    'f=${f#/tmp/job_fleetctl-}; echo "job ${f%.stdout.log}"; done; true'
)


async def owned(
    client: AsyncSandboxClient,
    fleets: Sequence[str],
    *,
    facts: bool = False,
    look_inside: Collection[tuple[str, str]] = (),
) -> list[LiveSandbox]:
    """Every sandbox labelled for one of `fleets` (all pages); with `facts`, also each
    RUNNING one's exposures, and, for the (fleet, key)s in `look_inside` (those whose
    spec has files or jobs), the files uploaded and jobs started inside it. The others
    cannot need an upload or a job, so the exec into them is skipped."""
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
    if not facts:
        return found
    limiter = anyio.CapacityLimiter(32)
    async with anyio.create_task_group() as group:
        for index, known in enumerate(found):
            if known.status == "RUNNING":
                inside = (known.fleet, known.key) in look_inside
                group.start_soon(_read_facts, client, found, index, limiter, inside)
    return found


async def _read_facts(
    client: AsyncSandboxClient,
    found: list[LiveSandbox],
    index: int,
    limiter: anyio.CapacityLimiter,
    inside: bool,
) -> None:
    sandbox = found[index]
    async with limiter:
        try:
            ports = await client.list_exposed_ports(sandbox.id)
            listing = (
                (await client.execute_command(sandbox.id, FACTS_SCRIPT, timeout=30)).stdout
                if inside else ""
            )  # fmt: skip
        except (APIError, SandboxNotRunningError):
            return  # facts stay unknown: the planner then compares nothing in place
    exposures = {(e.port, e.protocol or "HTTP"): e.exposure_id for e in ports.exposures}
    files: dict[str, str] = {}
    jobs: set[str] = set()
    for line in listing.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "job":
            jobs.add(rest)
        elif kind == "file":
            digest, _, target = rest.partition(" ")
            files[target] = digest
    found[index] = replace(sandbox, exposures=exposures, files=files,
                           jobs_started=frozenset(jobs))  # fmt: skip


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
