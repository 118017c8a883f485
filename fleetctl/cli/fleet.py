"""Commands on fleets, from spec files: validate, render, schema, plan, apply, destroy,
status, wait."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import anyio
import typer

from fleetctl.apply.executor import Options, Result, execute
from fleetctl.apply.setup import release
from fleetctl.cli import output
from fleetctl.cli.app import app
from fleetctl.cli.exits import ChangesPresent, Interrupted, PartialFailure
from fleetctl.cli.options import (
    DataFormat,
    MassDeleteOpt,
    MaxDeleteOpt,
    RefreshImagesOpt,
    SpecsArg,
    TableFormat,
    TextOrJson,
    VarFileOpt,
    VarOpt,
    YesOpt,
    label_option,
    load_fleets,
)
from fleetctl.errors import FleetError, UsageError
from fleetctl.plan import saved
from fleetctl.plan.identity import fleet_label
from fleetctl.plan.model import Action, Plan
from fleetctl.plan.planner import Limits
from fleetctl.plan.prepare import Prepared, prepare
from fleetctl.plan.refresh import list_all, make_plan, owned
from fleetctl.plan.status import JobPhase, SandboxState, fleet_status
from fleetctl.sandboxes import AsyncSandboxClient
from fleetctl.spec import Fleet
from fleetctl.spec.schema import schema_text


@app.command(epilog="Example: fleetctl validate specs/ --var shards=8")
def validate(specs: SpecsArg, var: VarOpt = None, var_file: VarFileOpt = None) -> None:
    """Check spec files and report every problem with file:line:col and field path."""
    for fleet in load_fleets(specs, var, var_file):
        count = len(fleet.sandboxes)
        noun = "sandbox" if count == 1 else "sandboxes"
        output.echo(f"{fleet.source}: fleet '{fleet.name}' is valid ({count} {noun})")


@app.command(epilog="Example: fleetctl render specs/eval.yaml --var shards=3 -o json")
def render(
    specs: SpecsArg,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    fmt: Annotated[
        DataFormat, typer.Option("--output", "-o", help="Output format.")
    ] = DataFormat.yaml,
) -> None:
    """Print the desired sandboxes after templating and replica expansion.

    Secrets are shown by source (<secret:from_env:NAME>), never by value.
    """
    fleets = load_fleets(specs, var, var_file)
    output.dump([s.to_dict() for fleet in fleets for s in fleet.sandboxes], fmt.value)


@app.command(epilog="Example: fleetctl schema > schemas/fleet.schema.json")
def schema() -> None:
    """Print the JSON Schema of fleet specs (for editors and CI)."""
    output.echo(schema_text(), nl=False)


Planned = tuple[Prepared, Plan]


async def _plan(
    client: AsyncSandboxClient, fleets: list[Fleet], limits: Limits, refresh_images: bool
) -> Planned:
    """Refresh and plan: the desired side, and the plan against live state."""
    prepared = prepare(fleets, client.api.endpoint.api_key)
    return prepared, await make_plan(client, prepared, limits, refresh_images=refresh_images)


@app.command(epilog="Example: fleetctl plan specs/eval.yaml --var shards=8 --detailed-exitcode")
def plan(
    specs: SpecsArg,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    fmt: Annotated[
        TextOrJson, typer.Option("--output", "-o", help="Output format.")
    ] = TextOrJson.text,
    detailed_exitcode: Annotated[
        bool,
        typer.Option("--detailed-exitcode", help="Exit 2 when there are changes, 0 when none."),
    ] = False,
    max_delete: MaxDeleteOpt = 0.5,
    allow_mass_delete: MassDeleteOpt = False,
    refresh_images: RefreshImagesOpt = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Save the plan (JSON) for `fleetctl apply FILE` to apply."),
    ] = None,
) -> None:
    """Show what apply would change: + create, ± replace, ↻ recreate, - delete, ~ update.

    Exit codes: 0 success (with --detailed-exitcode: no changes), 1 error,
    2 changes present (with --detailed-exitcode).
    """
    fleets = load_fleets(specs, var, var_file)

    async def run() -> Plan:
        async with AsyncSandboxClient() as client:
            limits = Limits(max_delete, allow_mass_delete)
            return (await _plan(client, fleets, limits, refresh_images))[1]

    the_plan = anyio.run(run)
    output.plan(the_plan, fleets, as_json=fmt is TextOrJson.json)
    if out is not None:
        output.write_json(out, saved.to_json(the_plan, fleets))
    if detailed_exitcode and the_plan.has_changes:
        raise ChangesPresent


@app.command(epilog="Example: fleetctl apply specs/eval.yaml --yes --wait-jobs")
def apply(
    specs: SpecsArg,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    yes: YesOpt = False,
    parallelism: Annotated[
        int, typer.Option("--parallelism", min=1, max=1024, help="Concurrent API calls.")
    ] = Options().parallelism,
    wait_jobs: Annotated[
        bool,
        typer.Option(
            "--wait-jobs",
            help="Wait for jobs, then download their artifacts to ./artifacts/<fleet>/<sandbox>/.",
        ),
    ] = False,
    fmt: Annotated[
        TextOrJson, typer.Option("--output", "-o", help="text, or json: one NDJSON event a line.")
    ] = TextOrJson.text,
    max_delete: MaxDeleteOpt = 0.5,
    allow_mass_delete: MassDeleteOpt = False,
    refresh_images: RefreshImagesOpt = False,
) -> None:
    """Converge live sandboxes to the spec: create, replace and prune until live == spec.

    SPEC may also be a plan saved by `plan --out`: it is applied only if live
    state is still what it was planned against. Exit codes: 0 converged, 1 error,
    3 partial failure (some sandboxes failed, the rest converged).
    """
    plan_file = specs[0] if len(specs) == 1 and saved.is_plan_file(specs[0]) else None
    if plan_file is not None and (var or var_file):
        raise UsageError("a saved plan was made with its variables; --var does not apply to it")
    saved_plan, fleets = (
        saved.load(plan_file) if plan_file else (None, load_fleets(specs, var, var_file))
    )
    as_json = fmt is TextOrJson.json
    result = Result()
    stats: dict[str, int] = {}

    async def run() -> None:
        async with AsyncSandboxClient() as client:
            limits = Limits(max_delete, allow_mass_delete)
            prepared, the_plan = await _plan(client, fleets, limits, refresh_images)
            if saved_plan is not None:
                saved.check_unchanged(saved_plan, the_plan)
            if not as_json:
                output.plan(the_plan, fleets, as_json=False)
            if the_plan.refused:
                refused = "; ".join(the_plan.refused)
                raise UsageError(f"refusing to apply: {refused} (pass --allow-mass-delete if "
                                 "that is what you want)")  # fmt: skip
            if not the_plan.has_changes:
                return
            _confirm(yes, "apply these changes?")
            total = sum(c.action is not Action.noop for c in the_plan.changes)
            options = Options(parallelism=parallelism, wait_jobs=wait_jobs)
            try:
                with output.apply_events(total, as_json=as_json) as emit:
                    await execute(the_plan, client, prepared, options, emit, result)
            finally:
                stats.update(client.api.stats)
            await _warn_fallbacks(client, [fleet.name for fleet in fleets])

    try:
        anyio.run(run)
    except KeyboardInterrupt:
        output.summary(result, stats, as_json=as_json)
        raise Interrupted(
            "Interrupted: work in flight was cancelled; run apply again to converge."
        ) from None
    if result.done or result.failed:
        output.summary(result, stats, as_json=as_json)
    if not result.ok:
        raise PartialFailure


@app.command(epilog="Example: fleetctl destroy -l team-research --yes")
def destroy(
    specs: Annotated[
        list[Path] | None, typer.Argument(help="Spec files: destroy their fleets.", metavar="SPEC")
    ] = None,
    label: Annotated[list[str] | None, label_option("Destroy sandboxes with this label")] = None,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    yes: YesOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
) -> None:
    """Delete a fleet's sandboxes (by spec), or every sandbox with all the given labels."""
    if not specs and not label:
        raise UsageError("destroy needs SPEC files or at least one -l LABEL")
    fleets = load_fleets(specs or [], var, var_file) if specs else []
    wanted = list(label or [])

    async def targets(client: AsyncSandboxClient) -> list[tuple[str, str, Sequence[str]]]:
        if fleets:
            found = await owned(client, [f.name for f in fleets])
            return [(s.id, f"{s.fleet}/{s.key}", s.labels) for s in found
                    if all(x in s.labels for x in wanted)]  # fmt: skip
        return [(s.id, s.name, s.labels) for s in await list_all(client, wanted)]

    async def run() -> None:
        async with AsyncSandboxClient() as client:
            doomed = await targets(client)
            for sandbox_id, name, _ in doomed:
                output.echo(f"  - {name} ({sandbox_id})")
            output.echo(f"Destroy: {len(doomed)} sandbox(es).")
            if dry_run or not doomed:
                return
            _confirm(yes, "destroy these sandboxes?")
            result = await client.bulk_delete(sandbox_ids=[i for i, _, _ in doomed])
            output.echo(f"Destroyed {len(result.succeeded)}; {len(result.failed)} failed.")
            # the checkpoints of their `prepare:` steps, unless something still uses them
            said = output.echo
            await release(client, [labels for _, _, labels in doomed], set(),
                          lambda done: said(f"Deleted checkpoint {done['key']}."))  # fmt: skip
            if result.failed:
                raise PartialFailure

    anyio.run(run)


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("no terminal to confirm on: pass --yes to proceed")
    if not typer.confirm(question):
        raise typer.Abort


@app.command(epilog="Example: fleetctl status specs/eval.yaml -o json")
def status(
    specs: SpecsArg,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    fmt: Annotated[
        TableFormat, typer.Option("--output", "-o", help="Output format.")
    ] = TableFormat.table,
) -> None:
    """Per sandbox of the fleets: status, age, exposures with URLs, each job's state."""
    fleets = load_fleets(specs, var, var_file)

    async def run() -> list[SandboxState]:
        async with AsyncSandboxClient() as client:
            await _warn_fallbacks(client, [fleet.name for fleet in fleets])
            return await fleet_status(client, fleets)

    states = anyio.run(run)
    if fmt is TableFormat.table:
        output.fleet_states(states)
    else:
        output.dump([state.to_dict() for state in states], fmt.value)


async def _warn_fallbacks(client: AsyncSandboxClient, fleets: list[str]) -> None:
    """One warning line (stderr) per image whose sandboxes run on the host's root
    filesystem because no registry could be reached (the server's pull-or-host policy)."""
    fallen: dict[str, int] = {}
    for fleet in fleets:
        for sandbox in await list_all(client, [fleet_label(fleet)]):
            if "FALLBACK" in (sandbox.image_source or "") and sandbox.status == "RUNNING":
                fallen[sandbox.docker_image] = fallen.get(sandbox.docker_image, 0) + 1
    for image, count in sorted(fallen.items()):
        output.echo(f"warning: image {image!r} could not be pulled (no registry reachable): "
                    f"{count} sandbox{'es' if count > 1 else ''} run on the host's root "
                    "filesystem instead (fleetctl server --image-policy pull-or-host)",
                    err=True)  # fmt: skip


class WaitFor(StrEnum):
    ready = "ready"
    jobs = "jobs"


@app.command(epilog="Example: fleetctl wait specs/eval.yaml --for jobs --timeout 600")
def wait(
    specs: SpecsArg,
    for_: Annotated[
        WaitFor,
        typer.Option("--for", help="ready: every sandbox RUNNING; jobs: every job finished."),
    ] = WaitFor.ready,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Seconds; 0 checks once.")
    ] = 600,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
) -> None:
    """Wait until the fleets are ready, or their jobs are done.

    Exit codes: 0 done, 1 timed out or a sandbox failed, 3 a job failed.
    """
    fleets = load_fleets(specs, var, var_file)
    jobs = for_ is WaitFor.jobs

    async def run() -> list[SandboxState]:
        deadline = time.monotonic() + timeout
        async with AsyncSandboxClient() as client:
            while True:
                states = await fleet_status(client, fleets)
                for state in states:
                    if state.final:
                        raise FleetError(f"{state.fleet}/{state.key} is {state.status}")
                waiting = [s for s in states if not s.done(jobs)]
                if not waiting:
                    return states
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(
                        f"timed out after {timeout:g}s waiting for {for_.value}: "
                        + ", ".join(f"{s.fleet}/{s.key} {s.status}" for s in waiting)
                    )
                await anyio.sleep(min(1.0, left))

    states = anyio.run(run)
    failed = [f"{s.fleet}/{s.key}:{j.name}" for s in states for j in s.jobs
              if j.state is JobPhase.FAILED]  # fmt: skip
    if failed:
        raise PartialFailure(f"jobs failed: {', '.join(failed)}")
    output.echo(f"{for_.value}: {len(states)} sandbox(es)")
