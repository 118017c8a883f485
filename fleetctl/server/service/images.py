"""Which root filesystem a sandbox gets for its image, by the server's image policy.

    pull-or-host  pull the image (a stored one serves when no registry answers); when no
                  registry can be reached and none is stored, the host's root
                  filesystem, said loudly (imageSource, the sandbox log)
    pull          the same, but such an image fails the sandbox IMAGE_PULL_FAILED
    host          never pull: the host's root filesystem

A registry that answers and refuses (not found, unauthorized, a bad digest, a hostile
layer) fails the sandbox IMAGE_PULL_FAILED with the registry's reason, under any policy
that pulls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from fleetctl.contract import ErrorType
from fleetctl.server.images.flatten import flatten
from fleetctl.server.images.importer import import_archive
from fleetctl.server.images.pull import Image, Puller, PullInProgress
from fleetctl.server.images.reference import BadReference, parse
from fleetctl.server.images.registry import PullError, Unreachable
from fleetctl.server.runtime.base import ImageLayers
from fleetctl.server.service.state import Busy, NotFound, Refused, Shared, Unsupported
from fleetctl.server.service.users import UnknownUser, image_user

HOST_SOURCE = "host root filesystem (read-only lower layer)"
#: What an image's Env may set (a registry's config is not trusted to name more).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ImageFailed(Exception):
    """The image cannot run; the message is the reason the sandbox records."""

    error_type = ErrorType.IMAGE_PULL_FAILED


class ImageUserUnknown(ImageFailed):
    """The image names a user its own passwd or group file does not have."""

    error_type = ErrorType.START_FAILED


@dataclass(frozen=True)
class RootFs:
    """What a sandbox runs on: an image's layers (None: the host's), and what to say."""

    layers: ImageLayers | None
    source: str
    env: dict[str, str] = field(default_factory=dict)
    image: dict[str, str] = field(default_factory=dict)  # ref, digest, workdir, user (recorded)
    warning: str | None = None


async def root_for(puller: Puller | None, policy: str, name: str, max_layers: int) -> RootFs:
    """The root filesystem for image `name` (its bottom layers merged past `max_layers`);
    ImageFailed when it cannot run."""
    if policy == "host":
        return RootFs(None, f"{HOST_SOURCE}: the server does not pull images (--image-policy "
                            f"host); image {name!r} not used")  # fmt: skip
    if puller is None:
        raise ImageFailed(f"cannot pull {name}: this server has no image store")
    try:
        image = await anyio.to_thread.run_sync(puller.image, name, abandon_on_cancel=True)
    except BadReference as exc:
        raise ImageFailed(str(exc)) from None
    except Unreachable as exc:
        if policy == "pull":
            raise ImageFailed(f"cannot pull {name}: {exc}") from None
        warning = (f"WARNING: image {name!r} was not pulled (no registry could be reached: "
                   f"{exc}); running on the host's root filesystem instead "
                   "(--image-policy pull-or-host)")  # fmt: skip
        return RootFs(None, f"{HOST_SOURCE}: FALLBACK, image {name!r} not pulled: {exc}",
                      warning=warning)  # fmt: skip
    except PullError as exc:
        raise ImageFailed(f"cannot pull {name}: {exc}") from None
    layers = [p.name for p in image.layers]
    if len(layers) > max_layers:
        cut = len(layers) - max_layers + 1
        merged = await anyio.to_thread.run_sync(flatten, puller.store, list(image.layers[:cut]))
        layers = [merged, *layers[cut:]]
    return await anyio.to_thread.run_sync(_from_image, puller, image, layers)  # reads files


def _from_image(puller: Puller, image: Image, layers: list[str]) -> RootFs:
    config = image.config.get("config") or {}
    env = {}
    for item in config.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep and _ENV_NAME.fullmatch(key) and "\0" not in value:
            env[key] = value
    workdir = str(config.get("WorkingDir") or "") or None
    try:
        user = image_user(str(config.get("User") or ""), [puller.store.layers / k for k in layers])
    except UnknownUser as exc:
        raise ImageUserUnknown(f"image {image.ref}: {exc}") from None
    stack = ImageLayers(puller.store.layers, tuple(layers), workdir, user)
    recorded = {"ref": image.ref, "digest": image.digest, "workdir": workdir or "",
                "user": user.encode()}  # fmt: skip
    return RootFs(stack, f"image {image.ref} ({image.digest})", env, recorded)


class Images:
    """The image store as the API shows it: list, pull, remove, prune, import."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    @property
    def puller(self) -> Puller:
        if self.shared.images is None:
            raise Unsupported("this server has no image store")
        return self.shared.images

    def in_use(self) -> dict[str, int]:
        """Image digest → sandboxes not yet ended that run it."""
        counts: dict[str, int] = {}
        for record in self.shared.store.query(active_only=True)[0]:
            digest = (record.request.get("image") or {}).get("digest")
            if digest:
                counts[digest] = counts.get(digest, 0) + 1
        return counts

    def listing(self) -> list[dict[str, object]]:
        store, using = self.puller.store, self.in_use()
        records = store.images()
        users: dict[str, int] = {}
        for record in records:
            for diff_id in record.layers:
                users[diff_id] = users.get(diff_id, 0) + 1
        return [
            {"refs": r.refs, "digest": r.digest, "pulled_at": r.pulled_at,
             "size": sum(store.layer_size(d) for d in r.layers),
             "shared_size": sum(store.layer_size(d) for d in r.layers if users[d] > 1),
             "layers": len(r.layers), "sandboxes": using.get(r.digest, 0)}
            for r in sorted(records, key=lambda r: r.refs[:1] or [r.digest])
        ]  # fmt: skip

    async def pull(self, name: str) -> dict[str, object]:
        try:
            image = await anyio.to_thread.run_sync(self.puller.pull, name)
        except (BadReference, PullError) as exc:
            raise Refused(f"cannot pull {name}: {exc}") from None
        return {"refs": [image.ref], "digest": image.digest, "layers": len(image.layers)}

    async def resolve(self, name: str) -> dict[str, str]:
        try:
            digest = await anyio.to_thread.run_sync(self.puller.resolve, name)
        except (BadReference, PullError) as exc:
            raise Refused(f"cannot resolve {name}: {exc}") from None
        return {"name": name, "digest": digest}

    def remove(self, name: str) -> dict[str, object]:
        store = self.puller.store
        try:
            found = store.find(name) or store.find(str(parse(name)))
        except BadReference as exc:
            raise Refused(str(exc)) from None
        if found is None:
            raise NotFound(f"no image {name} in the store")
        if self.in_use().get(found.digest):
            raise Busy(f"image {name} is used by running sandboxes: delete them first")
        store.remove(found.digest)
        return {"removed": found.refs or [found.digest], "digest": found.digest}

    def prune(self) -> dict[str, int]:
        keep = set()
        for record in self.shared.store.query(active_only=True)[0]:
            digest = (record.request.get("image") or {}).get("digest")
            stored = self.puller.store.find(digest) if digest else None
            keep |= set(stored.layers if stored else ())
        try:
            layers, freed = self.puller.prune(keep)
        except PullInProgress as exc:
            raise Busy(str(exc)) from None
        return {"layers_removed": layers, "bytes_freed": freed}

    async def import_archive(self, archive: Path) -> list[dict[str, object]]:
        try:
            records = await anyio.to_thread.run_sync(
                import_archive, archive, self.puller.store, self.puller.max_unpacked
            )
        except PullError as exc:
            raise Refused(f"cannot import the archive: {exc}") from None
        return [{"refs": r.refs, "digest": r.digest, "layers": len(r.layers)} for r in records]
