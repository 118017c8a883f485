"""The `fleetctl` command line.

    app.py       the root command and its global options
    fleet.py     validate, render, schema, plan, apply, destroy, status, wait
    sandbox.py   get, logs, exec
    server.py    server [start|stop|status|restart], doctor (the server loads only when run)
    options.py   arguments and options several commands share; loading specs
    output.py    everything shown: text, tables, events, summaries, logs; all redacted
    exits.py     exit codes, decided in one place

Commands parse flags, call into the package and hand what to show to `output`;
`main` turns whatever they raise into a message and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from fleetctl.cli import fleet, image, output, sandbox, server  # noqa: F401 - they register their commands
from fleetctl.cli.app import app
from fleetctl.cli.exits import Outcome, exit_code

__all__ = ["app", "entry", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code: errors become a message, never a traceback."""
    try:
        result = app(
            args=list(argv) if argv is not None else None,
            prog_name="fleetctl",
            standalone_mode=False,
        )
    except (typer.Abort, KeyboardInterrupt) as exc:
        output.echo("Aborted.", err=True)
        return exit_code(exc)
    except Outcome as exc:
        if str(exc):
            output.echo(str(exc), err=True)
        return exit_code(exc)
    except typer.TyperException as exc:  # click's usage errors show themselves
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            output.echo(f"Error: {exc}", err=True)
        return exit_code(exc)
    except Exception as exc:
        code = exit_code(exc)  # re-raises what has no code: a bug, shown as one
        output.echo(f"Error: {exc}", err=True)
        return code
    return result if isinstance(result, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
