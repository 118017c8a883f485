"""Recording the HTTP requests a benchmark sends, on the wire (a helper of the bench scripts).

`recording(sent)` patches `httpx.AsyncHTTPTransport.handle_async_request` (which both
SDKs' REST calls use underneath) for the duration of a ``with`` block rather than passing
a transport, which would change the clients' connection limits. Each request is appended
to `sent` as ``(method, path, outcome)``: the answer's status code, or ``transport
<Exception>`` when sending raised `httpx.TransportError`. The records are plain strings,
so a benchmark running an SDK in another interpreter can send them back as JSON.

`tally(sent, classify)` counts them, each request put in a class by
``classify(method, path)``:

    requests                 every request sent
    <class>                  requests of that class
    429, <class>_429         answers 429 (Too Many Requests), all and per class
    5xx                      answers 500 and above
    transport_errors         requests that raised `httpx.TransportError`
    transport <class> <Exc>  those, per class and exception type

`wire_counter(counter, classify)` is the two together: it records a block and adds the
tally to `counter` when the block ends. This module imports nothing of fleetctl.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import httpx

Sent = tuple[str, str, str]
Classify = Callable[[str, str], str]
TRANSPORT = "transport "


@contextlib.contextmanager
def recording(sent: list[Sent]) -> Iterator[None]:
    """Append every request sent through httpx's async transport to `sent`."""
    original = httpx.AsyncHTTPTransport.handle_async_request

    async def recorded(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        try:
            response = await original(self, request)
        except httpx.TransportError as exc:
            sent.append((method, path, f"{TRANSPORT}{type(exc).__name__}"))
            raise
        sent.append((method, path, str(response.status_code)))
        return response

    setattr(httpx.AsyncHTTPTransport, "handle_async_request", recorded)  # noqa: B010
    try:
        yield
    finally:
        setattr(httpx.AsyncHTTPTransport, "handle_async_request", original)  # noqa: B010


def tally(sent: Iterable[Sent], classify: Classify) -> Counter[str]:
    """Count recorded requests by class and outcome (the keys are in the module's doc)."""
    counter: Counter[str] = Counter()
    for method, path, outcome in sent:
        what = classify(method, path)
        counter["requests"] += 1
        counter[what] += 1
        if outcome.startswith(TRANSPORT):
            counter["transport_errors"] += 1
            counter[f"transport {what} {outcome.removeprefix(TRANSPORT)}"] += 1
        elif outcome == "429":
            counter["429"] += 1
            counter[f"{what}_429"] += 1
        elif int(outcome) >= 500:
            counter["5xx"] += 1
    return counter


@contextlib.contextmanager
def wire_counter(counter: Counter[str], classify: Classify) -> Iterator[None]:
    """Count every request sent in the block in `counter`, by class."""
    sent: list[Sent] = []
    try:
        with recording(sent):
            yield
    finally:
        counter.update(tally(sent, classify))
