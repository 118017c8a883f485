"""The `fleetctl` command line.

Every command is a thin shell over the package: it parses flags, calls into
`fleetctl.spec` (and later the planner and executor), and prints. Errors are
mapped to exit codes in exactly one place, `EXIT_CODES`, used by `main`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
import yaml
from rich.console import Console
from rich.table import Table

from fleetctl import __version__
from fleetctl.apply import events, live
from fleetctl.apply.executor import Options, Result
from fleetctl.apply.run import Prepared, apply_plan, make_plan, prepare
from fleetctl.apply.status import SandboxState, fleet_status
from fleetctl.errors import FleetError, UsageError
from fleetctl.plan import saved
from fleetctl.plan.model import Action, Plan
from fleetctl.plan.planner import Limits
from fleetctl.sandboxes import (
    APIError,
    AsyncSandboxClient,
    CommandTimeoutError,
    Sandbox,
    SandboxClient,
    SandboxNotRunningError,
)
from fleetctl.server.daemon import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServerOptions,
    default_data_dir,
    restart,
    running,
    serve,
    start_background,
    stop,
)
from fleetctl.server.limits import parse_faults, parse_rate_limits
from fleetctl.server.runtime.host import probe
from fleetctl.spec import Fleet, load, load_var_file, parse_var
from fleetctl.spec.diagnostics import SpecError
from fleetctl.spec.schema import schema_text

#: Exit codes by error class, most specific first. The only place they are decided.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (SpecError, 1),
    (UsageError, 1),
    (FleetError, 1),
    (APIError, 1),
    (SandboxNotRunningError, 1),
    (CommandTimeoutError, 1),
    (typer.TyperException, 1),  # click's usage errors (typer vendors click)
)

app = typer.Typer(
    name="fleetctl",
    help="Declarative orchestrator for fleets of sandboxes: describe a fleet in YAML, "
    "keep it in git, and converge the live world to it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 success (plan --detailed-exitcode: no changes), 1 error (invalid "
    "spec, usage, API), 2 changes present (plan --detailed-exitcode), 3 partial failure "
    "(apply: some sandboxes failed, the rest converged).",
)


class GetFormat(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


class RenderFormat(StrEnum):
    yaml = "yaml"
    json = "json"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fleetctl {__version__}")
        raise typer.Exit


class LogFormat(StrEnum):
    console = "console"
    json = "json"


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="Structured logs on stderr: console or json.")
    ] = LogFormat.console,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logs (-v info, -vv debug).")
    ] = 0,
) -> None:
    """Declarative orchestrator for fleets of sandboxes."""
    events.configure_logging(log_format.value, verbose)


SpecsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Spec files, or directories whose *.yaml files are all loaded.",
        metavar="SPEC",
        show_default=False,
    ),
]
VarOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--var",
        help="Set a template variable, NAME=VALUE (typed as YAML: 3 is a number). Repeatable; "
        "wins over --var-file and the spec's vars:.",
        metavar="NAME=VALUE",
        show_default=False,
    ),
]
VarFileOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--var-file",
        help="A YAML file of template variables. Repeatable; later files win.",
        metavar="FILE",
        show_default=False,
    ),
]


def load_fleets(
    specs: Sequence[Path], var: Sequence[str] | None, var_file: Sequence[str] | None
) -> list[Fleet]:
    """Load specs with --var-file values, then --var values, layered over the spec's vars:."""
    variables: dict[str, Any] = {}
    for path in var_file or ():
        variables.update(load_var_file(path))
    variables.update(parse_var(item) for item in var or ())
    return load([str(s) for s in specs], variables)


@app.command(
    epilog="Example: fleetctl validate specs/ --var shards=8",
)
def validate(specs: SpecsArg, var: VarOpt = None, var_file: VarFileOpt = None) -> None:
    """Check spec files and report every problem with file:line:col and field path."""
    for fleet in load_fleets(specs, var, var_file):
        count = len(fleet.sandboxes)
        noun = "sandbox" if count == 1 else "sandboxes"
        typer.echo(f"{fleet.source}: fleet '{fleet.name}' is valid ({count} {noun})")


@app.command(
    epilog="Example: fleetctl render specs/eval.yaml --var shards=3 -o json",
)
def render(
    specs: SpecsArg,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    output: Annotated[
        RenderFormat, typer.Option("--output", "-o", help="Output format.")
    ] = RenderFormat.yaml,
) -> None:
    """Print the desired sandboxes after templating and replica expansion.

    Secrets are shown by source (<secret:from_env:NAME>), never by value.
    """
    sandboxes = [
        s.to_dict() for fleet in load_fleets(specs, var, var_file) for s in fleet.sandboxes
    ]
    if output is RenderFormat.json:
        typer.echo(json.dumps(sandboxes, indent=2))
    else:
        typer.echo(yaml.safe_dump(sandboxes, sort_keys=False, allow_unicode=True), nl=False)


class PlanFormat(StrEnum):
    text = "text"
    json = "json"


MaxDeleteOpt = Annotated[
    float,
    typer.Option("--max-delete", min=0.0, max=1.0,
                 help="Refuse a plan that prunes more than this fraction of running sandboxes."),
]  # fmt: skip
MassDeleteOpt = Annotated[
    bool,
    typer.Option("--allow-mass-delete", help="Allow a plan that prunes past --max-delete, or all."),
]


async def _plan(
    client: AsyncSandboxClient, fleets: list[Fleet], limits: Limits
) -> tuple[Prepared, Plan]:
    prepared = prepare(fleets, client.api.endpoint.api_key)
    return prepared, await make_plan(client, prepared, limits)


def _show_plan(the_plan: Plan, fleets: list[Fleet], output: PlanFormat) -> None:
    if output is PlanFormat.json:
        typer.echo(json.dumps(saved.to_json(the_plan, fleets), indent=2))
        return
    for change in the_plan.changes:
        if change.action is not Action.noop:
            fleet = (
                change.after.fleet if change.after else change.before.fleet if change.before else ""
            )
            typer.echo(f"  {change.action.symbol} {fleet}/{change.key:<24} {change.reason}")
    typer.echo(the_plan.summary())


@app.command(epilog="Example: fleetctl plan specs/eval.yaml --var shards=8 --detailed-exitcode")
def plan(
    specs: SpecsArg,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    output: Annotated[PlanFormat, typer.Option("--output", "-o", help="Output format.")] = (
        PlanFormat.text
    ),
    detailed_exitcode: Annotated[
        bool,
        typer.Option("--detailed-exitcode", help="Exit 2 when there are changes, 0 when none."),
    ] = False,
    max_delete: MaxDeleteOpt = 0.5,
    allow_mass_delete: MassDeleteOpt = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Save the plan (JSON) for `fleetctl apply FILE` to apply."),
    ] = None,
) -> None:
    """Show what apply would change: + create, ± replace, ↻ recreate, - delete.

    Exit codes: 0 success (with --detailed-exitcode: no changes), 1 error,
    2 changes present (with --detailed-exitcode).
    """
    fleets = load_fleets(specs, var, var_file)

    async def run() -> Plan:
        async with AsyncSandboxClient() as client:
            return (await _plan(client, fleets, Limits(max_delete, allow_mass_delete)))[1]

    the_plan = anyio.run(run)
    _show_plan(the_plan, fleets, output)
    if out is not None:
        out.write_text(json.dumps(saved.to_json(the_plan, fleets), indent=2) + "\n")
    if detailed_exitcode and the_plan.has_changes:
        raise typer.Exit(2)


@app.command(epilog="Example: fleetctl apply specs/eval.yaml --yes --wait-jobs")
def apply(
    specs: SpecsArg,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    parallelism: Annotated[
        int, typer.Option("--parallelism", min=1, max=1024, help="Concurrent API calls.")
    ] = 32,
    wait_jobs: Annotated[
        bool,
        typer.Option(
            "--wait-jobs",
            help="Wait for jobs, then download their artifacts to ./artifacts/<fleet>/<sandbox>/.",
        ),
    ] = False,
    output: Annotated[
        PlanFormat, typer.Option("--output", "-o", help="text, or json: one NDJSON event a line.")
    ] = PlanFormat.text,
    max_delete: MaxDeleteOpt = 0.5,
    allow_mass_delete: MassDeleteOpt = False,
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

    result = Result()
    stats: dict[str, int] = {}

    async def run() -> bool:
        async with AsyncSandboxClient() as client:
            limits = Limits(max_delete, allow_mass_delete)
            prepared, the_plan = await _plan(client, fleets, limits)
            if saved_plan is not None:
                saved.check_unchanged(saved_plan, the_plan)
            if output is PlanFormat.text:
                _show_plan(the_plan, fleets, output)
            if the_plan.refused:
                raise UsageError(
                    "refusing to apply: "
                    + "; ".join(the_plan.refused)
                    + " (pass --allow-mass-delete if that is what you want)"
                )
            if not the_plan.has_changes:
                return True
            _confirm(yes, "apply these changes?")
            options = Options(parallelism=parallelism, wait_jobs=wait_jobs)
            stats.update(client.api.stats)
            total = sum(c.action is not Action.noop for c in the_plan.changes)
            with _printer(output, total) as show:
                await apply_plan(client, prepared, the_plan, options,
                                 events.fan_out(show, events.log_event), result)  # fmt: skip
            stats.update(client.api.stats)
            return result.ok

    try:
        converged = anyio.run(run)
    except KeyboardInterrupt:
        _summarise(result, stats, output)
        typer.echo("Interrupted: work in flight was cancelled; run apply again to converge.",
                   err=True)  # fmt: skip
        raise typer.Exit(130) from None
    if result.done or result.failed:
        _summarise(result, stats, output)
    if not converged:
        raise typer.Exit(3)


@contextlib.contextmanager
def _printer(output: PlanFormat, total: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    if output is PlanFormat.json:
        yield events.ndjson
    else:
        with events.text_output(total) as show:
            yield show


def _summarise(result: Result, stats: dict[str, int], output: PlanFormat) -> None:
    if output is PlanFormat.json:
        typer.echo(json.dumps({
            "event": "summary", "changed": len(result.done), "failed": len(result.failed),
            "seconds": round(result.elapsed, 2), **stats,
        }))  # fmt: skip
        return
    table = Table("ACTION", "DONE", box=None, header_style="bold", title="Applied")
    for action in Action:
        count = sum(1 for a in result.done.values() if a == action.value)
        if count:
            table.add_row(f"{action.symbol} {action.value}", str(count))
    table.add_row("failed", str(len(result.failed)))
    Console().print(table)
    counts = {name: stats.get(name, 0) for name in ("requests", "retries", "throttled")}
    typer.echo(f"in {result.elapsed:.1f}s: {counts['requests']} requests, "
               f"{counts['retries']} retries, {counts['throttled']} throttled (429)")  # fmt: skip
    for key, error in result.failed.items():
        typer.echo(f"failed: {key}: {error}", err=True)


@app.command(epilog="Example: fleetctl destroy -l team-research --yes")
def destroy(
    specs: Annotated[
        list[Path] | None, typer.Argument(help="Spec files: destroy their fleets.", metavar="SPEC")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", "-l", help="Destroy sandboxes with this label (repeatable: all must match)."
        ),
    ] = None,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Destroy without asking.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
) -> None:
    """Delete a fleet's sandboxes (by spec), or every sandbox with all the given labels."""
    if not specs and not label:
        raise UsageError("destroy needs SPEC files or at least one -l LABEL")
    fleets = load_fleets(specs or [], var, var_file) if specs else []
    labels_wanted = list(label or [])

    async def targets(client: AsyncSandboxClient) -> list[tuple[str, str]]:
        if fleets:
            found = await live.owned(client, [f.name for f in fleets])
            return [(s.id, f"{s.fleet}/{s.key}") for s in found
                    if all(x in s.labels for x in labels_wanted)]  # fmt: skip
        return [(s.id, s.name) for s in await live.list_all(client, labels_wanted)]

    async def run() -> None:
        async with AsyncSandboxClient() as client:
            doomed = await targets(client)
            for sandbox_id, name in doomed:
                typer.echo(f"  - {name} ({sandbox_id})")
            typer.echo(f"Destroy: {len(doomed)} sandbox(es).")
            if dry_run or not doomed:
                return
            _confirm(yes, "destroy these sandboxes?")
            result = await client.bulk_delete(sandbox_ids=[i for i, _ in doomed])
            typer.echo(f"Destroyed {len(result.succeeded)}; {len(result.failed)} failed.")
            if result.failed:
                raise typer.Exit(3)

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
    output: Annotated[GetFormat, typer.Option("--output", "-o", help="Output format.")] = (
        GetFormat.table
    ),
) -> None:
    """Per sandbox of the fleets: status, age, exposures with URLs, each job's state."""
    fleets = load_fleets(specs, var, var_file)

    async def run() -> list[SandboxState]:
        async with AsyncSandboxClient() as client:
            return await fleet_status(client, fleets)

    states = anyio.run(run)
    if output is not GetFormat.table:
        rows = [dataclasses.asdict(s) for s in states]
        text = (
            json.dumps(rows, indent=2) + "\n" if output is GetFormat.json else yaml.safe_dump(rows)
        )
        typer.echo(text, nl=False)
        return
    table = Table("SANDBOX", "ID", "STATUS", "AGE", "EXPOSED", "JOBS", box=None,
                  header_style="bold")  # fmt: skip
    for state in states:
        age = "" if state.age_seconds is None else _age(timedelta(seconds=state.age_seconds))
        jobs = " ".join(f"{j.name}:{j.state}" + (f"({j.exit_code})" if j.exit_code else "")
                        for j in state.jobs)  # fmt: skip
        table.add_row(f"{state.fleet}/{state.key}", state.id or "-", state.status, age,
                      " ".join(state.exposures), jobs)  # fmt: skip
    Console(width=200).print(table)


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
    timeout: Annotated[float, typer.Option("--timeout", min=0, help="Seconds.")] = 600,
    var: VarOpt = None,
    var_file: VarFileOpt = None,
) -> None:
    """Wait until the fleets are ready, or their jobs are done.

    Exit codes: 0 done, 1 timed out or a sandbox failed, 3 a job failed.
    """
    fleets = load_fleets(specs, var, var_file)

    async def run() -> list[SandboxState]:
        async with AsyncSandboxClient() as client:
            with anyio.move_on_after(timeout):
                while True:
                    states = await fleet_status(client, fleets)
                    if _done(states, for_):
                        return states
                    await anyio.sleep(1.0)
        raise FleetError(f"timed out after {timeout:g}s waiting for {for_.value}: "
                         + ", ".join(f"{s.fleet}/{s.key} {s.status}" for s in states
                                     if not _done([s], for_)))  # fmt: skip

    states = anyio.run(run)
    failed = [f"{s.fleet}/{s.key}:{j.name}" for s in states for j in s.jobs if j.state == "failed"]
    if failed:
        typer.echo(f"jobs failed: {', '.join(failed)}", err=True)
        raise typer.Exit(3)
    typer.echo(f"{for_.value}: {len(states)} sandbox(es)")


def _done(states: list[SandboxState], for_: WaitFor) -> bool:
    for state in states:
        if state.status in ("TERMINATED", "ERROR", "TIMEOUT"):
            raise FleetError(f"{state.fleet}/{state.key} is {state.status}")
        if state.status != "RUNNING":
            return False
        if for_ is WaitFor.jobs and any(j.state in ("running", "not started", "unknown")
                                        for j in state.jobs):  # fmt: skip
            return False
    return True


@app.command(epilog="Example: fleetctl schema > schemas/fleet.schema.json")
def schema() -> None:
    """Print the JSON Schema of fleet specs (for editors and CI)."""
    typer.echo(schema_text(), nl=False)


server_app = typer.Typer(
    help="Run the local sandbox server: real isolated sandboxes on this machine behind the "
    "sandbox REST API. Without a subcommand it runs in the foreground (Ctrl-C stops it and "
    "its sandboxes).",
    no_args_is_help=False,
    epilog="Example: fleetctl server --port 7431 --rate-limit create=10/s",
)
app.add_typer(server_app, name="server")

HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")]
PortOpt = Annotated[int, typer.Option("--port", help="Port to listen on (0 picks a free one).")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where state, token, logs and sandboxes live "
        "[default: $FLEETCTL_DATA_DIR, /var/lib/fleetctl for root, else ~/.local/share/fleetctl]",
        show_default=False,
    ),
]


class ImagePolicyChoice(StrEnum):
    host = "host"
    strict = "strict"


ImagePolicyOpt = Annotated[
    ImagePolicyChoice,
    typer.Option(
        "--image-policy",
        help="host: an image with no local rootfs runs on the host's root filesystem (said in "
        "its record and logs); strict: such an image fails with IMAGE_PULL_FAILED.",
    ),
]
RateLimitOpt = Annotated[
    str,
    typer.Option(
        "--rate-limit",
        help="Token buckets per endpoint class and API key, answering 429 with Retry-After, "
        "e.g. create=10/s,default=200/s. None by default.",
    ),
]
FaultsOpt = Annotated[
    str,
    typer.Option(
        "--faults",
        help="Seeded fault injection for tests, e.g. "
        "error=0.1,reset=0.05,latency=50ms..2s,kill_sandbox=0.01,seed=7. Off by default.",
    ),
]


TimeoutScaleOpt = Annotated[
    float,
    typer.Option(
        "--timeout-scale",
        min=0.0001,
        help="Multiply every sandbox lifetime (timeout_minutes) by this; for tests, e.g. "
        "0.01 makes a 1-minute timeout last 0.6 s.",
    ),
]


def _server_options(
    host: str,
    port: int,
    data_dir: Path | None,
    image_policy: ImagePolicyChoice,
    rate_limit: str,
    faults: str,
    timeout_scale: float = 1.0,
) -> ServerOptions:
    for parse, text in ((parse_rate_limits, rate_limit), (parse_faults, faults)):
        try:
            parse(text)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return ServerOptions(
        host, port, data_dir, image_policy.value, rate_limit, faults, timeout_scale
    )


@server_app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    data_dir: DataDirOpt = None,
    image_policy: ImagePolicyOpt = ImagePolicyChoice.host,
    rate_limit: RateLimitOpt = "",
    faults: FaultsOpt = "",
    timeout_scale: TimeoutScaleOpt = 1.0,
) -> None:
    """Run the local sandbox server in the foreground."""
    if ctx.invoked_subcommand is None:
        serve(
            _server_options(host, port, data_dir, image_policy, rate_limit, faults, timeout_scale)
        )


@server_app.command("start", epilog="Example: fleetctl server start --port 7431")
def server_start(
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    data_dir: DataDirOpt = None,
    image_policy: ImagePolicyOpt = ImagePolicyChoice.host,
    rate_limit: RateLimitOpt = "",
    faults: FaultsOpt = "",
    timeout_scale: TimeoutScaleOpt = 1.0,
) -> None:
    """Start the server in the background (pid and log file in the data dir)."""
    options = _server_options(host, port, data_dir, image_policy, rate_limit, faults, timeout_scale)
    info = start_background(options)
    typer.echo(
        f"fleetctl server running on {info.url} (pid {info.pid}, data dir {options.directory})"
    )


@server_app.command("restart", epilog="Example: fleetctl server restart")
def server_restart(
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    data_dir: DataDirOpt = None,
    image_policy: ImagePolicyOpt = ImagePolicyChoice.host,
    rate_limit: RateLimitOpt = "",
    faults: FaultsOpt = "",
    timeout_scale: TimeoutScaleOpt = 1.0,
) -> None:
    """Restart the background server; running sandboxes, jobs and exposures survive."""
    options = _server_options(host, port, data_dir, image_policy, rate_limit, faults, timeout_scale)
    info = restart(options)
    typer.echo(f"fleetctl server running on {info.url} (pid {info.pid}); sandboxes kept")


@server_app.command("stop", epilog="Example: fleetctl server stop")
def server_stop(data_dir: DataDirOpt = None) -> None:
    """Stop the background server; it stops and removes all of its sandboxes first."""
    directory = data_dir or default_data_dir()
    info = stop(directory)
    typer.echo(f"stopped the server (pid {info.pid})" if info else "no server is running")


@server_app.command("status", epilog="Example: fleetctl server status")
def server_status(data_dir: DataDirOpt = None) -> None:
    """Say whether the background server runs, where, and with which data dir."""
    directory = data_dir or default_data_dir()
    info = running(directory)
    if info is None:
        typer.echo(f"no server is running for {directory}")
        raise typer.Exit(1)
    typer.echo(f"running on {info.url} (pid {info.pid}, data dir {directory})")


@app.command(epilog="Example: fleetctl get -l team-research -o json")
def get(
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", "-l", help="Only sandboxes with this label (repeatable: all must match)."
        ),
    ] = None,
    output: Annotated[GetFormat, typer.Option("--output", "-o", help="Output format.")] = (
        GetFormat.table
    ),
) -> None:
    """List sandboxes, newest first (starts the local server on first use)."""

    async def run() -> list[Sandbox]:
        async with AsyncSandboxClient() as client:
            return await live.list_all(client, label or [])

    sandboxes = anyio.run(run)
    rows = [s.model_dump(mode="json", by_alias=False) for s in sandboxes]
    if output is GetFormat.json:
        typer.echo(json.dumps(rows, indent=2))
    elif output is GetFormat.yaml:
        typer.echo(yaml.safe_dump(rows, sort_keys=False), nl=False)
    else:
        table = Table("ID", "NAME", "STATUS", "AGE", "LABELS", box=None, header_style="bold")
        now = datetime.now(UTC)
        for sandbox in sandboxes:
            table.add_row(
                sandbox.id,
                sandbox.name,
                sandbox.status,
                _age(now - sandbox.created_at),
                ",".join(sandbox.labels),
            )
        Console().print(table)


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


@app.command(epilog="Example: fleetctl logs 3f9c2a1b8e7d6c5b4a39")
def logs(sandbox: Annotated[str, typer.Argument(help="Sandbox id.")]) -> None:
    """Print the output of a sandbox's start command."""
    with SandboxClient() as client:
        typer.echo(client.get_logs(sandbox), nl=False)


@app.command(
    "exec",
    epilog="Example: fleetctl exec 3f9c2a1b8e7d6c5b4a39 -- python3 -c 'print(42)'",
)
def exec_command(
    sandbox: Annotated[str, typer.Argument(help="Sandbox id.")],
    command: Annotated[list[str], typer.Argument(help="Command and its arguments, after --.")],
    timeout: Annotated[int, typer.Option("--timeout", min=1, max=900, help="Seconds.")] = 300,
) -> None:
    """Run a command in a sandbox; its output is printed and its exit code is fleetctl's."""
    with SandboxClient() as client:
        result = client.execute_command(sandbox, shlex.join(command), timeout=timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    raise typer.Exit(result.exit_code)


@app.command(epilog="Example: fleetctl doctor")
def doctor() -> None:
    """Report which isolation features this host offers and what the server refuses without them."""
    report = probe()
    for line in report.lines():
        typer.echo(line)
    for problem in report.problems:
        typer.echo(f"problem: {problem}")
    if not report.can_run:
        raise typer.Exit(1)
    typer.echo("ok: this host can run sandboxes")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code: errors become a message, never a traceback."""
    try:
        result = app(
            args=list(argv) if argv is not None else None,
            prog_name="fleetctl",
            standalone_mode=False,
        )
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        return 130
    except typer.TyperException as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"Error: {exc}", err=True)
        return _exit_code(exc)
    except (FleetError, APIError, SandboxNotRunningError, CommandTimeoutError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        return _exit_code(exc)
    return result if isinstance(result, int) else 0


def _exit_code(exc: BaseException) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
