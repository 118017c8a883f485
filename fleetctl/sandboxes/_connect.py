"""Connect RPC framing, as the SDK speaks it to a gateway's command session over httpx.

A streaming call's body is a sequence of envelopes: one flag byte, a 4-byte big-endian
length, the message. The last envelope of a response has flag 0x02 and a JSON payload:
`{}`, or `{"error": {"code": ..., "message": ...}}`. A server without the command
session answers a plain HTTP 404, which reads as `unimplemented`.

Everything read from the server is untrusted: envelopes are bounded, and a response
that breaks the framing is an error, never a hang or a crash.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from fleetctl.proto import command_session_pb2 as pb
from fleetctl.sandboxes.errors import ConnectFailure

SERVICE = "command_session.CommandSession"
STREAM_CONTENT_TYPE = "application/connect+proto"
UNARY_CONTENT_TYPE = "application/proto"
END_STREAM = 0x02
#: The largest envelope accepted from a server.
MAX_ENVELOPE = 64 * 1024 * 1024


def envelope(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


def headers(timeout_s: float, *, stream: bool) -> dict[str, str]:
    content = STREAM_CONTENT_TYPE if stream else UNARY_CONTENT_TYPE
    return {"content-type": content, "connect-protocol-version": "1",
            "connect-timeout-ms": str(max(1, int(timeout_s * 1000)))}  # fmt: skip


def path(method: str) -> str:
    return f"{SERVICE}/{method}"


@dataclass(slots=True)
class Decoder:
    """Splits a streamed response into events; `ended` is set once the stream ended."""

    buffer: bytearray = field(default_factory=bytearray)
    ended: bool = False

    def feed(self, data: bytes) -> tuple[list[pb.CommandSessionEvent], ConnectFailure | None]:
        """The events `data` completes, and the failure that ended the stream there (an error
        end, or framing that breaks), if one did: events before a failure are kept."""
        self.buffer += data
        events: list[pb.CommandSessionEvent] = []
        view, at = memoryview(self.buffer), 0
        try:
            while len(view) - at >= 5 and not self.ended:
                flags, size = struct.unpack_from(">BI", view, at)
                if size > MAX_ENVELOPE:
                    raise ConnectFailure("resource_exhausted", f"an envelope of {size} bytes")
                if len(view) - at < 5 + size:
                    break
                payload = bytes(view[at + 5 : at + 5 + size])
                at += 5 + size
                if flags & END_STREAM:
                    self.ended = True
                    _raise_if_error(payload)
                    break
                response = pb.StartResponse()
                try:
                    response.ParseFromString(payload)
                except Exception as exc:  # protobuf's DecodeError, from an untrusted peer
                    raise ConnectFailure(
                        "internal", f"a message that does not parse: {exc}"
                    ) from None
                if response.HasField("event"):
                    events.append(response.event)
        except ConnectFailure as failure:
            return events, failure
        finally:
            view.release()
            del self.buffer[:at]
        return events, None

    def finish(self) -> None:
        """The response ended: a message cut short is an error."""
        if self.buffer and not self.ended:
            raise ConnectFailure("internal", "the stream ended in the middle of a message")


def check_stream(status: int, content_type: str, body: bytes) -> None:
    """Raise the ConnectFailure of a streaming call's answer that is not a stream."""
    if status != 200:
        raise unary_error(status, body)
    if not content_type.startswith("application/connect+"):
        raise ConnectFailure("unknown", f"not a Connect stream (content-type {content_type!r})")


def _raise_if_error(payload: bytes) -> None:
    try:
        end = json.loads(payload or b"{}")
    except ValueError:
        raise ConnectFailure("internal", "an end of stream that is not JSON") from None
    error = end.get("error") if isinstance(end, dict) else None
    if isinstance(error, dict):
        raise ConnectFailure(str(error.get("code", "unknown")), str(error.get("message", "")))


def unary_error(status: int, body: bytes) -> ConnectFailure:
    """The error of a non-200 answer: its JSON `code` if it has one, else by status."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "code" in data:
        return ConnectFailure(str(data["code"]), str(data.get("message", "")))
    by_status = {400: "internal", 401: "unauthenticated", 403: "permission_denied",
                 404: "unimplemented", 408: "deadline_exceeded", 429: "unavailable",
                 502: "unavailable", 503: "unavailable", 504: "unavailable"}  # fmt: skip
    return ConnectFailure(by_status.get(status, "unknown"), body[:200].decode("utf-8", "replace"))
