"""The official SDK's half of `sdk_fanout.py`, run in the official release's own venv.

    PRIME_API_BASE_URL=… PRIME_API_KEY=… HOME=… \
        .venvs/prime-sandboxes-0.5.1/bin/python tests/bench/fanout_official.py --n N --rate R

`sdk_fanout.py` starts it; it is not meant to be run by hand. It runs the fan-out of
`tests/bench/fanout.py` with `prime_sandboxes.AsyncSandboxClient`, unmodified, and prints
its `Result` as one JSON line, last. The official client raises on a throttled create
(0.2.x on the first 429; 0.5.1 after its own waits of 10 s and 30 s), so each create is
WRAPPED in a retry on 429 (and on nothing else): it sleeps 1/rate s
(±50 % jitter) and sends the create again with the same idempotency key, until a
deadline of 30 s + 3·n/rate from the start of the run. The token comes from the
environment, never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx
import prime_sandboxes

from tests.bench.fanout import IMAGE, Result, fan_out
from tests.bench.wire import recording

#: The wrapper's deadline for one create: this + 3 n / rate s from the run's start.
RETRY_BASE_S = 30.0
LABEL = "bench-official"


def is_429(exc: BaseException) -> bool:
    """Whether the official client raised for an HTTP 429 answer (and for nothing else).

    Its `APIError` keeps the `httpx.HTTPStatusError` as cause or context; the message
    ("HTTP 429: …") is the fallback.
    """
    if not isinstance(exc, prime_sandboxes.APIError):
        return False
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short; bounded against a cycle
        if seen is None:
            break
        if isinstance(seen, httpx.HTTPStatusError):
            return seen.response.status_code == 429
        seen = seen.__cause__ or seen.__context__
    return str(exc).startswith("HTTP 429")


async def run(n: int, rate: float) -> Result:
    result = Result(f"official {prime_sandboxes.__version__}", n, retried_429=0)
    jitter = random.Random(n)
    deadline = time.monotonic() + RETRY_BASE_S + 3 * n / rate
    client = prime_sandboxes.AsyncSandboxClient()

    async def create(i: int) -> str:
        request = prime_sandboxes.CreateSandboxRequest(
            name=f"official-{i}",
            docker_image=IMAGE,
            memory_gb=0.25,
            labels=[LABEL],
            idempotency_key=os.urandom(16).hex(),  # the same for each retry of this create
        )
        while True:
            try:
                return str((await client.create(request)).id)
            except prime_sandboxes.APIError as exc:
                if not is_429(exc) or time.monotonic() >= deadline:
                    raise
            result.retried_429 = (result.retried_429 or 0) + 1
            await asyncio.sleep(jitter.uniform(0.5, 1.5) / rate)

    async def execute(sandbox_id: str) -> str:
        return str((await client.execute_command(sandbox_id, "echo ok")).stdout)

    async def bulk_delete() -> list[str]:
        response = await client.bulk_delete(labels=[LABEL])
        return [str(item.get("sandbox_id", "")) for item in response.failed]

    try:
        with recording(result.sent):
            await fan_out(result, create, client.bulk_wait_for_creation, execute, bulk_delete)
    finally:
        await client.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args.n, args.rate))
    print(json.dumps(result.to_json()))


if __name__ == "__main__":
    main()
