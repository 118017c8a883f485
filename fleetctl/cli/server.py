"""`fleetctl server` and `fleetctl doctor`: the local sandbox server.

The server's own modules (FastAPI, uvicorn, the runtime) are imported inside the
commands, so no other command loads them. Every option is declared once, in
`_command`, for the foreground server and for `start` and `restart`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fleetctl.cli import output
from fleetctl.cli.app import app
from fleetctl.cli.exits import NotFound
from fleetctl.errors import UsageError
from fleetctl.server.options import (
    DEFAULT_HOST,
    DEFAULT_IMAGE_MAX_GB,
    DEFAULT_PORT,
    ServerOptions,
    default_data_dir,
)

server_app = typer.Typer(
    help="Run the local sandbox server: real isolated sandboxes on this machine behind the "
    "sandbox REST API. Without a subcommand it runs in the foreground (Ctrl-C stops it and "
    "its sandboxes).",
    no_args_is_help=False,
    epilog="Example: fleetctl server --port 7431 --rate-limit create=10/s",
)
app.add_typer(server_app, name="server")


class ImagePolicyChoice(StrEnum):
    pull_or_host = "pull-or-host"
    pull = "pull"
    host = "host"


DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where state, token, logs and sandboxes live "
        "[default: $FLEETCTL_DATA_DIR, /var/lib/fleetctl for root, else ~/.local/share/fleetctl]",
        show_default=False,
    ),
]


def _command(run: Callable[[ServerOptions], None]) -> Callable[..., None]:
    """A command taking every server option, then calling `run` with them (unless a
    subcommand of the group runs instead)."""

    def command(
        ctx: typer.Context,
        host: Annotated[
            str, typer.Option("--host", help="Address to listen on (loopback by default).")
        ] = DEFAULT_HOST,
        port: Annotated[
            int, typer.Option("--port", help="Port to listen on (0 picks a free one).")
        ] = DEFAULT_PORT,
        data_dir: DataDirOpt = None,
        image_policy: Annotated[
            ImagePolicyChoice,
            typer.Option(
                "--image-policy",
                envvar="FLEETCTL_IMAGE_POLICY",
                help="pull-or-host: pull images from their registry, and run an image no "
                "registry could be reached for on the host's root filesystem (said in its "
                "imageSource and logs); pull: such an image fails with IMAGE_PULL_FAILED; "
                "host: never pull, every sandbox runs on the host's root filesystem.",
            ),
        ] = ImagePolicyChoice.pull_or_host,
        rate_limit: Annotated[
            str,
            typer.Option(
                "--rate-limit",
                help="Token buckets per endpoint class and API key, answering 429 with "
                "Retry-After, e.g. create=10/s,default=200/s. None by default.",
            ),
        ] = "",
        faults: Annotated[
            str,
            typer.Option(
                "--faults",
                help="Seeded fault injection for tests, e.g. error=0.1,reset=0.05,after=0.05,"
                "latency=50ms..2s,kill_sandbox=0.01,seed=7,scope=control. Off by default.",
            ),
        ] = "",
        timeout_scale: Annotated[
            float,
            typer.Option(
                "--timeout-scale",
                min=0.0001,
                help="Multiply every sandbox lifetime (timeout_minutes) by this; for tests, "
                "e.g. 0.01 makes a 1-minute timeout last 0.6 s.",
            ),
        ] = 1.0,
        api_key_file: Annotated[
            list[Path] | None,
            typer.Option(
                "--api-key-file",
                help="Also accept the API key in this file (repeatable), e.g. for a second "
                "client whose requests are rate-limited and fault-counted apart.",
                show_default=False,
            ),
        ] = None,
        command_session: Annotated[
            bool,
            typer.Option(
                "--command-session/--no-command-session",
                help="Offer the gateway's Connect command session (today's exec and live "
                "processes). Off, exec is REST only, as on a 0.2 API: for testing clients.",
            ),
        ] = True,
        insecure_registry: Annotated[
            list[str] | None,
            typer.Option(
                "--insecure-registry",
                metavar="HOST:PORT",
                help="Speak plain HTTP to this registry (repeatable), e.g. 127.0.0.1:5000.",
                show_default=False,
            ),
        ] = None,
        registry_mirror: Annotated[
            list[str] | None,
            typer.Option(
                "--registry-mirror",
                metavar="URL",
                help="Pull Docker Hub images through this mirror first (repeatable).",
                show_default=False,
            ),
        ] = None,
        image_max_gb: Annotated[
            float,
            typer.Option(
                "--image-max-gb",
                min=0.001,
                help="Most one image may unpack to; a pull past it fails (decompression bombs).",
            ),
        ] = DEFAULT_IMAGE_MAX_GB,
        insecure_host_network: Annotated[
            bool,
            typer.Option(
                "--insecure-host-network",
                help="Let sandboxes with network access share this machine's network: they "
                "reach its loopback services, the API and the LAN. Only where the server "
                "cannot give each its own (not root, no nftables).",
            ),
        ] = False,
        sandbox_dns: Annotated[
            list[str] | None,
            typer.Option(
                "--sandbox-dns",
                metavar="IP",
                help="A resolver (IPv4) sandboxes use, the only one they reach on port 53 "
                "(repeatable). Default: this machine's, but for loopback ones.",
                show_default=False,
            ),
        ] = None,
    ) -> None:
        if ctx.invoked_subcommand is not None:
            return
        from fleetctl.server.faults import parse_faults  # noqa: PLC0415 - only when run
        from fleetctl.server.ratelimit import parse_rate_limits  # noqa: PLC0415

        for resolver in sandbox_dns or ():
            if not _ipv4(resolver):
                raise UsageError(f"--sandbox-dns {resolver!r}: not an IPv4 address")
        for parse, text in ((parse_rate_limits, rate_limit), (parse_faults, faults)):
            try:
                parse(text)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        run(ServerOptions(host, port, data_dir, image_policy.value, rate_limit, faults,
                          timeout_scale, tuple(api_key_file or ()), command_session,
                          tuple(insecure_registry or ()), tuple(registry_mirror or ()),
                          image_max_gb, insecure_host_network,
                          tuple(sandbox_dns or ())))  # fmt: skip

    command.__doc__ = run.__doc__  # the help text (not update_wrapper: its __wrapped__
    return command  # would make typer read `run`'s signature instead)


def _foreground(options: ServerOptions) -> None:
    """Run the local sandbox server in the foreground."""
    from fleetctl.server.serve import serve  # noqa: PLC0415 - FastAPI and uvicorn load here

    serve(options)


def _start(options: ServerOptions) -> None:
    """Start the server in the background (pid and log file in the data dir)."""
    from fleetctl.server.daemon import start_background  # noqa: PLC0415

    info = start_background(options)
    output.echo(
        f"fleetctl server running on {info.url} (pid {info.pid}, data dir {options.directory})"
    )


def _restart(options: ServerOptions) -> None:
    """Restart the background server; running sandboxes, jobs and exposures survive."""
    from fleetctl.server.daemon import restart  # noqa: PLC0415

    info = restart(options)
    output.echo(f"fleetctl server running on {info.url} (pid {info.pid}); sandboxes kept")


server_app.callback(invoke_without_command=True)(_command(_foreground))
server_app.command("start", epilog="Example: fleetctl server start --port 7431")(_command(_start))
server_app.command("restart", epilog="Example: fleetctl server restart")(_command(_restart))


@server_app.command("stop", epilog="Example: fleetctl server stop")
def server_stop(data_dir: DataDirOpt = None) -> None:
    """Stop the background server; it stops and removes all of its sandboxes first."""
    from fleetctl.server.daemon import stop  # noqa: PLC0415

    info = stop(data_dir or default_data_dir())
    output.echo(f"stopped the server (pid {info.pid})" if info else "no server is running")


@server_app.command("status", epilog="Example: fleetctl server status")
def server_status(data_dir: DataDirOpt = None) -> None:
    """Say whether the background server runs, where, and with which data dir."""
    from fleetctl.server.daemon import running  # noqa: PLC0415

    directory = data_dir or default_data_dir()
    info = running(directory)
    if info is None:
        output.echo(f"no server is running for {directory}")
        raise NotFound
    output.echo(f"running on {info.url} (pid {info.pid}, data dir {directory})")


@app.command(epilog="Example: fleetctl doctor")
def doctor() -> None:
    """Report which isolation features this host offers and what the server refuses without them."""
    from fleetctl.server.runtime.bwrap.host import probe  # noqa: PLC0415

    report = probe()
    for line in report.lines():
        output.echo(line)
    for problem in report.problems:
        output.echo(f"problem: {problem}")
    if not report.can_run:
        raise NotFound  # the problems above say why
    output.echo("ok: this host can run sandboxes")


def _ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False
