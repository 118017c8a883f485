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

from dataclasses import dataclass, field

import anyio

from fleetctl.server.images.pull import Image, Puller
from fleetctl.server.images.reference import BadReference
from fleetctl.server.images.registry import PullError, Unreachable
from fleetctl.server.runtime.base import ImageLayers

HOST_SOURCE = "host root filesystem (read-only lower layer)"


class ImageFailed(Exception):
    """The image cannot run; the message is the reason the sandbox records."""


@dataclass(frozen=True)
class RootFs:
    """What a sandbox runs on: an image's layers (None: the host's), and what to say."""

    layers: ImageLayers | None
    source: str
    env: dict[str, str] = field(default_factory=dict)
    image: dict[str, str] = field(default_factory=dict)  # ref, digest, workdir (recorded)
    warning: str | None = None


async def root_for(puller: Puller | None, policy: str, name: str) -> RootFs:
    """The root filesystem for image `name`; ImageFailed when it cannot run."""
    if policy == "host":
        return RootFs(None, f"{HOST_SOURCE}: the server does not pull images (--image-policy "
                            f"host); image {name!r} not used")  # fmt: skip
    if puller is None:
        raise ImageFailed(f"cannot pull {name}: this server has no image store")
    try:
        image = await anyio.to_thread.run_sync(puller.pull, name, abandon_on_cancel=True)
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
    return _from_image(puller, image)


def _from_image(puller: Puller, image: Image) -> RootFs:
    config = image.config.get("config") or {}
    env = {}
    for item in config.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep and key:
            env[key] = value
    workdir = str(config.get("WorkingDir") or "") or None
    layers = ImageLayers(puller.store.layers, tuple(p.name for p in image.layers), workdir)
    recorded = {"ref": image.ref, "digest": image.digest, "workdir": workdir or ""}
    user = str(config.get("User") or "")
    warning = None
    if user and user not in ("root", "0", "root:root", "0:0"):
        warning = (
            f"WARNING: image user {user!r} is not supported yet: commands run as the sandbox's root"
        )
    return RootFs(layers, f"image {image.ref} ({image.digest})", env, recorded, warning)
