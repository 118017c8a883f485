"""What endpoints depend on: the service of the app, and authentication for each plane.

`create_app` keeps the service and the accepted API keys in `app.state`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from fleetctl.server.service import SandboxService


class Unauthorized(Exception):
    """A missing, wrong or expired key or token."""


async def _service(request: Request) -> SandboxService:
    service: SandboxService = request.app.state.service
    return service


Service = Annotated[SandboxService, Depends(_service)]


async def api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """The control plane takes any of the server's API keys as a bearer token."""
    scheme, _, key = (authorization or "").partition(" ")
    keys: tuple[str, ...] = request.app.state.api_keys
    matches = [hmac.compare_digest(key.encode(), k.encode()) for k in keys]  # all compared
    if scheme.lower() != "bearer" or not any(matches):
        raise Unauthorized("invalid or missing API key")


async def gateway_token(
    service: Service,
    user_ns: str,
    job_id: str,
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """The data plane takes the sandbox's own gateway token; the sandbox id it names."""
    del user_ns  # one namespace here; declared so the OpenAPI document names it
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not service.data.token_valid(job_id, token):
        raise Unauthorized("invalid or expired gateway token for this sandbox")
    return job_id


SandboxId = Annotated[str, Depends(gateway_token)]
