"""The server's URL planes, and small helpers its ASGI middlewares share.

    control plane   /api/v1/...                       (API key)
    data plane      /gw/{user_ns}/{job_id}/...        (per-sandbox gateway token)

/api/v1/health and paths outside both planes (docs, OpenAPI) belong to neither:
middlewares leave them alone, so probes and docs keep working.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Literal

from starlette.types import Scope

Plane = Literal["control", "data"]
CONTROL_PREFIX = "/api/v1"
DATA_PREFIX = "/gw"
HEALTH_PATH = f"{CONTROL_PREFIX}/health"
SANDBOX_PATH = f"{CONTROL_PREFIX}/sandbox"


def plane(path: str) -> Plane | None:
    """Which API plane `path` belongs to; None for health and non-API paths."""
    if path.rstrip("/") == HEALTH_PATH:
        return None
    if under(path, CONTROL_PREFIX):
        return "control"
    if under(path, DATA_PREFIX):
        return "data"
    return None


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def bearer(scope: Scope) -> str:
    """The bearer token of the request, or "" for requests without one."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def key_id(key: str) -> str:
    """A name for an API key that can be shown (in fault counts) without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else "anonymous"


def pairs(text: str, problems: list[str]) -> Iterator[tuple[str, str]]:
    """Yield the pairs in a flag value ``'k=v,k=v'``, noting malformed and repeated items in
    `problems`. Lazy, so the caller's problems and these stay in the order written."""
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not (sep and key):
            problems.append(f"{item!r} is not KEY=VALUE")
        elif key in seen:
            problems.append(f"{key!r} is given more than once")
        else:
            seen.add(key)
            yield key, value
