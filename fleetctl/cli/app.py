"""The root command: its help, global options (--version, --log-format, -v) and the exit
codes it documents. Command modules register their commands on `app`."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from fleetctl import __version__
from fleetctl.cli import output
from fleetctl.cli.exits import MEANINGS

app = typer.Typer(
    name="fleetctl",
    help="Declarative orchestrator for fleets of sandboxes: describe a fleet in YAML, "
    "keep it in git, and converge the live world to it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: " + "; ".join(MEANINGS) + ".",
)


class LogFormat(StrEnum):
    console = "console"
    json = "json"


def _version(value: bool) -> None:
    if value:
        output.echo(f"fleetctl {__version__}")
        raise typer.Exit


@app.callback()
def root(
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
    output.configure_logging(log_format.value, verbose)
