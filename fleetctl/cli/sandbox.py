"""Commands on single sandboxes, by id: get, logs, exec, checkpoint."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import anyio
import typer

from fleetctl.cli import output
from fleetctl.cli.app import app
from fleetctl.cli.exits import CommandExited
from fleetctl.cli.options import TableFormat, label_option
from fleetctl.contract import DEFAULT_EXEC_TIMEOUT_S, MAX_EXEC_TIMEOUT_S
from fleetctl.plan.refresh import list_all
from fleetctl.sandboxes import AsyncSandboxClient, Sandbox, SandboxClient

SandboxArg = Annotated[str, typer.Argument(help="Sandbox id.")]


@app.command(epilog="Example: fleetctl get -l team-research -o json")
def get(
    label: Annotated[list[str] | None, label_option("Only sandboxes with this label")] = None,
    fmt: Annotated[
        TableFormat, typer.Option("--output", "-o", help="Output format.")
    ] = TableFormat.table,
) -> None:
    """List sandboxes, newest first (starts the local server on first use)."""

    async def run() -> list[Sandbox]:
        async with AsyncSandboxClient() as client:
            return await list_all(client, label or [])

    found = anyio.run(run)
    if fmt is TableFormat.table:
        output.sandboxes(found)
    else:
        output.dump([s.model_dump(mode="json", by_alias=False) for s in found], fmt.value)


@app.command(epilog="Example: fleetctl logs 3f9c2a1b8e7d6c5b4a39")
def logs(sandbox: SandboxArg) -> None:
    """Print the output of a sandbox's start command."""
    with SandboxClient() as client:
        output.echo(client.get_logs(sandbox), nl=False)


@app.command("exec", epilog="Example: fleetctl exec 3f9c2a1b8e7d6c5b4a39 -- python3 -c 'print(42)'")
def exec_command(
    sandbox: SandboxArg,
    command: Annotated[list[str], typer.Argument(help="Command and its arguments, after --.")],
    timeout: Annotated[
        int, typer.Option("--timeout", min=1, max=MAX_EXEC_TIMEOUT_S, help="Seconds.")
    ] = DEFAULT_EXEC_TIMEOUT_S,
) -> None:
    """Run a command in a sandbox; its output is printed and its exit code is fleetctl's."""
    with SandboxClient() as client:
        result = client.execute_command(sandbox, shlex.join(command), timeout=timeout)
    # the command's own bytes, unredacted: they are what it printed, not what fleetctl says
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    raise CommandExited(result.exit_code)


@app.command(epilog="Example: fleetctl checkpoint 3f9c2a1b8e7d6c5b4a39")
def checkpoint(
    sandbox: SandboxArg,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until it can be restored (DURABLE).")
    ] = True,
) -> None:
    """Checkpoint a sandbox's files (its writable layer and workspace) and print the
    checkpoint's id, for `from_checkpoint:` in a spec or `checkpoint_id` in the SDK."""
    with SandboxClient() as client:
        made = client.checkpoint(sandbox)
        if wait:
            made = client.wait_for_checkpoint(made.id)
    output.echo(made.id)
