"""The steps an SDK operation yields, and how it reads the answers.

Each operation is a generator: it yields the I/O it needs (a `Call`, a `Sleep`, or
`Open`/`Read`/`Close` of a streamed response) and receives the result, so the sync and
async clients differ only in the small driver that performs those steps (`transport`).
Retries and backoff live in the drivers; the operations decide meaning: which status
maps to which error, gateway tokens, polling, transports.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from fleetctl.sandboxes import errors

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request. `path` is under /api/v1 unless `token` (a gateway call, full URL).

    `content` is a raw body (a Connect message) sent with `headers`; `json` a JSON one."""

    method: str
    path: str
    json: Any = None
    params: Any = None
    token: str | None = field(default=None, repr=False)
    retryable: bool = True
    timeout: float | None = None
    upload_from: str | None = None
    download_to: str | None = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Stream:
    """An open streaming response: `response` (its body already read unless 200) and
    the driver's iterator of its raw chunks."""

    response: httpx.Response
    chunks: Any


@dataclass(frozen=True, slots=True)
class Open:
    """Send `call` and answer with a `Stream`, its body unread (never retried)."""

    call: Call


@dataclass(frozen=True, slots=True)
class Read:
    """The stream's next chunk; b"" at its end."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class Close:
    stream: Stream


Step = Call | Sleep | Open | Read | Close
Op = Generator[Step, Any, T]


def sandbox_path(sandbox_id: str, *rest: str) -> str:
    """/sandbox/{id}/..., each part quoted: an id can never name another endpoint."""
    return "/".join(["/sandbox", *(quote(part, safe="") for part in (sandbox_id, *rest))])


def ok(response: httpx.Response) -> httpx.Response:
    """The response if 2xx; else the API error its status maps to."""
    if response.is_success:
        return response
    detail = _detail(response)
    code = response.status_code
    if code == 401:
        raise errors.UnauthorizedError(f"HTTP 401: unauthorized ({detail})", status_code=401)
    if code == 402:
        raise errors.PaymentRequiredError(f"HTTP 402: payment required ({detail})", status_code=402)
    raise errors.APIError(f"HTTP {code}: {detail}", status_code=code)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    if isinstance(body, dict) and "message" in body:  # {code, message}, as a 501 says it
        return str(body["message"])
    return str(body)[:500]


def json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise errors.APIError("malformed response from the API: expected a JSON object",
                              status_code=response.status_code)  # fmt: skip
    return body


def model(kind: type[M], response: httpx.Response) -> M:
    try:
        return kind.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise errors.APIError(
            f"malformed {kind.__name__} from the API: {str(exc).splitlines()[0]}",
            status_code=response.status_code,
        ) from None


def unsupported(response: httpx.Response) -> bool:
    """A server without this endpoint (an older API release): read item by item instead."""
    return response.status_code in (404, 405)
