"""Counting the HTTP requests a benchmark sends, on the wire (a helper of the bench scripts).

`wire_counter(counter, classify)` patches `httpx.AsyncHTTPTransport.handle_async_request`
(which both SDKs use underneath) for the duration of a ``with`` block rather than passing
a transport, which would change the clients' connection limits. Each request is put in a
class by `classify(request)`; the counter gets, per block:

    requests                 every request sent
    <class>                  requests of that class
    429, <class>_429         answers 429 (Too Many Requests), all and per class
    5xx                      answers 500 and above
    transport_errors         requests that raised `httpx.TransportError`
    transport <class> <Exc>  those, per class and exception type
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import httpx

Classify = Callable[[httpx.Request], str]


@contextlib.contextmanager
def wire_counter(counter: Counter[str], classify: Classify) -> Iterator[None]:
    """Count every request sent through httpx's async transport in `counter`, by class."""
    original = httpx.AsyncHTTPTransport.handle_async_request

    async def counted(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        what = classify(request)
        counter["requests"] += 1
        counter[what] += 1
        try:
            response = await original(self, request)
        except httpx.TransportError as exc:
            counter["transport_errors"] += 1
            counter[f"transport {what} {type(exc).__name__}"] += 1
            raise
        if response.status_code == 429:
            counter["429"] += 1
            counter[f"{what}_429"] += 1
        elif response.status_code >= 500:
            counter["5xx"] += 1
        return response

    setattr(httpx.AsyncHTTPTransport, "handle_async_request", counted)  # noqa: B010
    try:
        yield
    finally:
        setattr(httpx.AsyncHTTPTransport, "handle_async_request", original)  # noqa: B010
