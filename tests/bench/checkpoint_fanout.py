"""Benchmark: a fleet started from a checkpoint vs the same fleet set up one by one.

    python tests/bench/checkpoint_fanout.py [--n 300] [--size-mb 200]

Starts a server in a temporary data dir; the same setup (writing `size-mb` files of
1 MiB of random bytes into /usr/local/lib/deps, as an install would: nothing in it
compressible or shared) reaches n sandboxes two ways, one after the other:

    checkpoint  one sandbox is created and set up, checkpointed (`checkpoint`, then
                `wait_for_checkpoint`), then n sandboxes are created from the
                checkpoint (`CreateSandboxRequest(checkpoint_id=…)`), waited for, and
                each checks with one exec that the setup's last file is there
    bare        n sandboxes are created from the image, waited for, and each runs the
                setup with one exec

Creates and execs are gathered (`AsyncSandboxClient`, no rate limit). Each arm's wall
time runs from its first request to its last sandbox done; the checkpoint arm's includes
its one setup and the checkpoint. Every sandbox and the checkpoint are deleted between
and after the arms, outside the timing. The bare arm writes n times size-mb MiB to disk: the
script refuses to start when the data dir's filesystem has less than that plus 5 GiB
free. Prints figures and, last, one line:

    checkpoint_s=… bare_s=… prepare_s=… ratio=… n=… size_mb=…

    checkpoint_s  the checkpoint arm, its one setup and checkpoint (prepare_s) included
    bare_s        the bare arm
    ratio         checkpoint_s / bare_s (target: well below 1)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable

import httpx

from fleetctl.sandboxes import AsyncAPIClient, AsyncSandboxClient, CreateSandboxRequest
from tests.conftest import start_server, stop_server

IMAGE = "python:3.11-slim"
SPARE_BYTES = 5 << 30
EXEC_TIMEOUT_S = 900
DELETE_TIMEOUT_S = 1800


def setup_command(size_mb: int) -> str:
    return (
        f"mkdir -p /usr/local/lib/deps && i=0 && while [ $i -lt {size_mb} ]; do "
        "head -c 1048576 /dev/urandom > /usr/local/lib/deps/f$i || exit 1; i=$((i+1)); done"
    )


def check_command(size_mb: int) -> str:
    return f"test -s /usr/local/lib/deps/f{size_mb - 1}"


async def fleet(
    client: AsyncSandboxClient,
    label: str,
    n: int,
    request: Callable[[int], CreateSandboxRequest],
    command: str,
) -> None:
    """Create n sandboxes, wait for them, run `command` in each; SystemExit on a failure."""
    created = await asyncio.gather(*(client.create(request(i)) for i in range(n)))
    ids = [sandbox.id for sandbox in created]
    for start in range(0, n, 100):  # bulk waits take up to 100 ids a call
        await client.bulk_wait_for_creation(ids[start : start + 100], max_attempts=600)
    results = await asyncio.gather(
        *(client.execute_command(i, command, timeout=EXEC_TIMEOUT_S) for i in ids)
    )
    failed = [(i, r) for i, r in zip(ids, results, strict=True) if r.exit_code != 0]
    if failed:
        sandbox_id, result = failed[0]
        raise SystemExit(
            f"[{label}] {len(failed)} of {n} sandboxes failed `{command[:60]}…`; the first, "
            f"{sandbox_id}, exited {result.exit_code}: {result.stderr[:300]}"
        )


async def timed(work: Awaitable[None]) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


async def run(url: str, token: str, n: int, size_mb: int) -> tuple[float, float, float]:
    """Wall times of the checkpoint arm, its preparation, and the bare arm."""
    client = AsyncSandboxClient(AsyncAPIClient(api_key=token, base_url=url))
    checkpoint_id = ""

    def bare(label: str) -> Callable[[int], CreateSandboxRequest]:
        return lambda i: CreateSandboxRequest(
            name=f"{label}-{i}", docker_image=IMAGE, memory_gb=0.5, labels=[label]
        )

    def restored(i: int) -> CreateSandboxRequest:
        return CreateSandboxRequest(
            name=f"restored-{i}", checkpoint_id=checkpoint_id, memory_gb=0.5,
            labels=["restored"],
        )  # fmt: skip

    async def prepare() -> None:
        nonlocal checkpoint_id
        await fleet(client, "source", 1, bare("source"), setup_command(size_mb))
        (source,) = (await client.list(labels=["source"])).sandboxes
        pending = await client.checkpoint(source.id)
        checkpoint_id = (await client.wait_for_checkpoint(pending.id, 600)).id

    try:
        started = time.perf_counter()
        prepare_s = await timed(prepare())
        await fleet(client, "restored", n, restored, check_command(size_mb))
        checkpoint_s = time.perf_counter() - started
        for label in ("source", "restored"):
            await client.bulk_delete(labels=[label])
        bare_s = await timed(fleet(client, "bare", n, bare("bare"), setup_command(size_mb)))
    finally:
        await client.aclose()
        # Deleting n sandboxes of size-mb each takes longer than the SDK's control timeout.
        async with httpx.AsyncClient(
            base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"},
            timeout=DELETE_TIMEOUT_S,
        ) as api:  # fmt: skip
            for label in ("source", "restored", "bare"):
                await api.request("DELETE", "/sandbox", json={"labels": [label]})
            if checkpoint_id:
                await api.delete(f"/sandbox/checkpoints/{checkpoint_id}")
    return checkpoint_s, prepare_s, bare_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="sandboxes per arm (default 300)")
    parser.add_argument("--size-mb", type=int, default=200, help="MiB the setup writes")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fleetctl-ckpt-", dir="/tmp"))
    base.chmod(0o711)
    needed = args.n * args.size_mb << 20
    free = shutil.disk_usage(base).free
    if free < needed + SPARE_BYTES:
        base.rmdir()
        raise SystemExit(
            f"the bare arm writes {needed / 2**30:.1f} GiB under {base.parent}, which has "
            f"{free / 2**30:.1f} GiB free (5 GiB kept spare): lower --n or --size-mb"
        )
    info, process = start_server(base / "data")
    try:
        checkpoint_s, prepare_s, bare_s = asyncio.run(
            run(info.url, info.token, args.n, args.size_mb)
        )
    finally:
        stop_server(process)
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{args.n} sandboxes with {args.size_mb} MiB of setup each: from a checkpoint "
        f"{checkpoint_s:.1f} s (of which one setup and its checkpoint {prepare_s:.1f} s), "
        f"bare and set up each {bare_s:.1f} s"
    )
    print(
        f"checkpoint_s={checkpoint_s:.1f} bare_s={bare_s:.1f} prepare_s={prepare_s:.1f} "
        f"ratio={checkpoint_s / bare_s:.2f} n={args.n} size_mb={args.size_mb}"
    )


if __name__ == "__main__":
    main()
