"""The local server's image store, /api/v1/_fleetctl/images (what `fleetctl image` uses):
list, pull, remove, prune, and import an archive streamed in the request body."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from fleetctl.server.asgi import CONTROL_PREFIX
from fleetctl.server.routes.deps import Service, api_key
from fleetctl.server.service import Refused

router = APIRouter(prefix=f"{CONTROL_PREFIX}/_fleetctl/images", dependencies=[Depends(api_key)])


class PullImage(BaseModel):
    name: str


@router.get("")
def list_images(service: Service) -> dict[str, Any]:
    return {"images": service.images.listing()}


@router.post("/pull")
async def pull_image(service: Service, body: PullImage) -> dict[str, Any]:
    return await service.images.pull(body.name)


@router.post("/resolve")
async def resolve_image(service: Service, body: PullImage) -> dict[str, str]:
    """The digest the image's tag names now (asks the registry; pulls nothing)."""
    return await service.images.resolve(body.name)


@router.post("/prune")
def prune_images(service: Service) -> dict[str, int]:
    return service.images.prune()


@router.post("/import")
async def import_images(service: Service, request: Request) -> dict[str, Any]:
    """The request body is one tar: an OCI image layout or a `docker save` archive."""
    puller = service.images.puller
    received = 0
    with tempfile.NamedTemporaryFile(dir=puller.store.layers, prefix="tmp-upload-") as spool:
        async for chunk in request.stream():
            received += len(chunk)
            if received > puller.max_unpacked:
                raise Refused(f"the archive is larger than the {puller.max_unpacked} bytes "
                              "an image may take (--image-max-gb)")  # fmt: skip
            spool.write(chunk)
        spool.flush()
        return {"images": await service.images.import_archive(Path(spool.name))}


@router.delete("/{name:path}")
def remove_image(service: Service, name: str) -> dict[str, Any]:
    return service.images.remove(name)
