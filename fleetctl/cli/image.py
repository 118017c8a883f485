"""`fleetctl image`: the local server's image store (pull, ls, rm, prune, import)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from fleetctl.cli import output
from fleetctl.cli.app import app
from fleetctl.cli.options import TableFormat
from fleetctl.errors import UsageError
from fleetctl.sandboxes import SandboxClient
from fleetctl.sandboxes._calls import Call, Op, ok

image_app = typer.Typer(
    help="The local server's images: pull, list, remove, prune, import (air-gapped hosts).",
    no_args_is_help=True,
)
app.add_typer(image_app, name="image")
PREFIX = "/_fleetctl/images"
SOURCE_HELP = "An OCI image layout directory, or a tar of one, or a `docker save` tarball."
#: Pulls and imports of large images take a while.
SLOW_S = 3600.0


def _request(method: str, path: str, **fields: Any) -> Any:
    def call() -> Op[Any]:
        response = yield Call(method, f"{PREFIX}{path}", retryable=False, timeout=SLOW_S,
                              **fields)  # fmt: skip
        return ok(response).json()

    with SandboxClient() as client:
        return client.api.run(call())


def _size(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    scaled, unit = float(count), "B"
    for unit in ("KB", "MB", "GB"):  # noqa: B007 - the last one is the unit
        scaled /= 1000
        if scaled < 1000:
            break
    return f"{scaled:.1f} {unit}"


@image_app.command("pull", epilog="Example: fleetctl image pull python:3.11-slim")
def pull(name: Annotated[str, typer.Argument(help="Image reference.")]) -> None:
    """Pull an image into the local server's store (a tag is resolved again)."""
    pulled = _request("POST", "/pull", json={"name": name})
    output.echo(f"{pulled['refs'][0]}: {pulled['digest']} ({pulled['layers']} layers)")


@image_app.command("ls", epilog="Example: fleetctl image ls -o json")
def ls(
    fmt: Annotated[
        TableFormat, typer.Option("--output", "-o", help="Output format.")
    ] = TableFormat.table,
) -> None:
    """List stored images: names, digest, size on disk, and the part shared with others."""
    images = _request("GET", "")["images"]
    if fmt is not TableFormat.table:
        output.dump(images, fmt.value)
        return
    rows = [(", ".join(i["refs"]) or "<none>", i["digest"][:19], _size(i["size"]),
             _size(i["shared_size"]), str(i["layers"]), str(i["sandboxes"]))
            for i in images]  # fmt: skip
    output.table(("IMAGE", "DIGEST", "SIZE", "SHARED", "LAYERS", "SANDBOXES"), rows)


@image_app.command("rm", epilog="Example: fleetctl image rm python:3.11-slim")
def rm(name: Annotated[str, typer.Argument(help="Image reference or digest.")]) -> None:
    """Remove an image from the store (refused while sandboxes run it).

    Its layers go with the next `prune`."""
    removed = _request("DELETE", f"/{quote(name, safe=':@/')}")
    output.echo(f"removed {', '.join(removed['removed'])}")


@image_app.command("prune", epilog="Example: fleetctl image prune")
def prune() -> None:
    """Remove layers no stored image and no sandbox uses."""
    done = _request("POST", "/prune")
    output.echo(f"removed {done['layers_removed']} layers, {_size(done['bytes_freed'])}")


@image_app.command("import", epilog="Example: fleetctl image import ./eval-image.tar")
def import_(
    source: Annotated[Path, typer.Argument(help=SOURCE_HELP)],
) -> None:
    """Load images from an archive instead of a registry (air-gapped hosts)."""
    if source.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(source.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
        data = buffer.getvalue()
    elif source.is_file():
        data = source.read_bytes()
    else:
        raise UsageError(f"{source} is neither a directory nor a file")
    loaded = _request("POST", "/import", content=data,
                      headers={"Content-Type": "application/x-tar"})["images"]  # fmt: skip
    for image in loaded:
        output.echo(f"{', '.join(image['refs']) or '<no name>'}: {image['digest']}")
