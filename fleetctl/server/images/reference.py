"""Image references as users write them, made whole.

    parse("python:3.11-slim")          → docker.io/library/python:3.11-slim
    parse("ghcr.io/org/tool@sha256:…") → that registry, repository and digest
    parse("127.0.0.1:5055/evals/base") → a registry with a port, tag latest

The first path component names a registry when it has a dot or a colon or is
`localhost` (Docker's rule); otherwise the image is on Docker Hub, and a one-part name
is under `library/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
#: Where Docker Hub's registry API answers (the name users write is docker.io).
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


class BadReference(ValueError):
    """An image name that is not a valid reference; the message says why."""


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # as written (docker.io for Docker Hub), host[:port]
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def version(self) -> str:
        """What to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}"
        if self.tag:
            name += f":{self.tag}"
        return f"{name}@{self.digest}" if self.digest else name

    def pinned(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)


def parse(name: str) -> Reference:
    """The full reference of `name`; BadReference when it cannot be one."""
    rest, digest = name, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise BadReference(f"image {name!r}: the digest must be sha256: and 64 hex digits")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not _HOST.match(registry):
            raise BadReference(f"image {name!r}: {registry!r} is not a registry host[:port]")
    else:
        registry, path = DOCKER_HUB, rest
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.match(tag):
            raise BadReference(f"image {name!r}: {tag!r} is not a valid tag")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _REPOSITORY.match(path):
        raise BadReference(
            f"image {name!r}: {path!r} is not a repository name (lower case letters, digits "
            "and separators . _ - between path components)"
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)
