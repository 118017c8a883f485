"""Refresh: reading live state before planning (terraform's refresh, then plan).

A fleet's sandboxes are found by fleetctl's own labels; for those the spec could
change in place, what is inside them is read too (exposures, uploaded files, jobs
started). `make_plan` is refresh followed by the pure planner.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import replace

import anyio

from fleetctl.contract import SandboxStatus, job_files
from fleetctl.plan.identity import FILES_MARKER, JOB_PREFIX, fleet_label, parse
from fleetctl.plan.model import LiveSandbox, Plan
from fleetctl.plan.planner import Limits, plan
from fleetctl.plan.prepare import Prepared
from fleetctl.sandboxes import APIError, AsyncSandboxClient, Sandbox, SandboxNotRunningError
from fleetctl.spec import DesiredSandbox

PAGE = 100
_DIGEST = re.compile(r"\((sha256:[0-9a-f]{64})\)")
FACTS_PARALLELISM = 32


def _facts_script() -> str:
    """One exec per sandbox: the uploaded files' digests, then the spec jobs started."""
    logs = job_files(JOB_PREFIX + "*").stdout  # e.g. /tmp/job_fleetctl-*.stdout.log
    head, _, tail = logs.partition("*")
    return (
        f"sed 's/^/file /' {FILES_MARKER} 2>/dev/null; "
        f'for f in {logs}; do [ -e "$f" ] || continue; '
        f'f=${{f#{head}}}; echo "job ${{f%{tail}}}"; done; true'
    )


FACTS_SCRIPT = _facts_script()


async def make_plan(
    client: AsyncSandboxClient, prepared: Prepared, limits: Limits, *, refresh_images: bool = False
) -> Plan:
    """Refresh the fleets' live state, then plan against it; with `refresh_images`, ask
    the server what each image tag names now, and replace sandboxes whose tag moved."""
    inside = {(s.fleet, s.key) for s in prepared.desired if s.files or s.jobs}
    live = await owned(client, prepared.fleets, facts=True, look_inside=inside)
    moves = await image_moves(client, prepared.desired, live) if refresh_images else None
    return plan(prepared.desired, prepared.digests, live, prepared.fleets, limits,
                prepared.file_digests, moves)  # fmt: skip


async def image_moves(
    client: AsyncSandboxClient, desired: Sequence[DesiredSandbox], live: Sequence[LiveSandbox]
) -> dict[tuple[str, str], tuple[str, str]]:
    """(fleet, key) → (digest it runs, digest its image tag names now), for the sandboxes
    whose tag moved; each image is resolved once. Pinned images (@sha256:) never move."""
    running = {(s.fleet, s.key): s.image_digest for s in live if s.image_digest}
    names = {d.image for d in desired if d.image and "@" not in d.image
             and (d.fleet, d.key) in running}  # fmt: skip
    now = {name: await client.resolve_image(name) for name in sorted(names)}
    moves = {}
    for sandbox in desired:
        ran = running.get((sandbox.fleet, sandbox.key))
        tagged = now.get(sandbox.image or "")
        if ran and tagged and ran != tagged:
            moves[(sandbox.fleet, sandbox.key)] = (ran, tagged)
    return moves


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
                    labels=tuple(sandbox.labels), image_digest=_image_digest(sandbox),
                ))  # fmt: skip
    if not facts:
        return found
    limiter = anyio.CapacityLimiter(FACTS_PARALLELISM)
    async with anyio.create_task_group() as group:
        for index, known in enumerate(found):
            if known.status == SandboxStatus.RUNNING:
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
            kept = await client.started_background_jobs(sandbox.id) if inside else None
        except (APIError, SandboxNotRunningError):
            return  # facts stay unknown: the planner then compares nothing in place
    exposures = {(e.port, e.protocol or "HTTP"): e.exposure_id for e in ports.exposures}
    files: dict[str, str] = {}
    # the server's record of the jobs it started, which a job cannot wipe (where it
    # keeps jobs), and the logs of jobs started through exec
    jobs = {i.removeprefix(JOB_PREFIX) for i in kept or () if i.startswith(JOB_PREFIX)}
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
        batch = await client.list(labels=list(labels), page=page, per_page=PAGE)
        found += batch.sandboxes
        if not batch.has_next:
            return found
        page += 1


def _image_digest(sandbox: Sandbox) -> str | None:
    """The image digest in the local server's `imageSource` ("image NAME (sha256:…)")."""
    found = _DIGEST.search(sandbox.image_source or "")
    return found.group(1) if found else None
