"""The request of a server-streaming Connect call (Start, Connect), read and checked before
the Connect app sees it: exactly one envelope, whole, of at most `limit` bytes.

connectrpc reads a cut envelope, or one that declares more bytes than ever arrive, as
"zero messages" (`unimplemented`), and would buffer whatever length a frame declares.
Here a declared length past the limit is refused from its 5-byte header, and a cut
or extra envelope is `invalid_argument`, each with a message that says so.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from starlette.types import Message, Receive, Scope, Send

HEADER = 5


class Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def read_single(receive: Receive, limit: int) -> bytes:
    """The whole request body, one envelope; raises Refusal."""
    body = bytearray()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refusal("canceled", "the client went away")
        body += message.get("body", b"")
        if len(body) >= HEADER:
            size = int.from_bytes(body[1:HEADER], "big")
            if size > limit:
                raise Refusal("resource_exhausted", f"a message of {size} bytes (at most {limit})")
            if len(body) > HEADER + size:
                raise Refusal("invalid_argument", "more than one message for a single-message call")
        if not message.get("more_body"):
            break
    if len(body) < HEADER + size or not body:
        raise Refusal("invalid_argument", f"the request ended in the middle of its message "
                      f"({max(len(body) - HEADER, 0)} of {size} bytes)")  # fmt: skip
    return bytes(body)


def replaying(body: bytes, receive: Receive, on_disconnect: Callable[[], object]) -> Receive:
    """`receive` that first hands out `body` (already read), then the connection's events,
    calling `on_disconnect` when the client goes away."""
    pending = [body]

    async def replay() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
        return message

    return replay


async def refuse(scope: Scope, send: Send, refusal: Refusal) -> None:
    """Answer as a Connect stream that ends at once with the refusal's error."""
    content_type = dict(scope.get("headers", [])).get(b"content-type", b"application/connect+proto")
    payload = json.dumps({"error": {"code": refusal.code, "message": str(refusal)}}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type)]})  # fmt: skip
    await send(
        {"type": "http.response.body", "body": struct.pack(">BI", 2, len(payload)) + payload}
    )
