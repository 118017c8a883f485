"""Live processes (`open_process`, `attach_process`), sync and async, against real sandboxes.

A process runs on in its sandbox whatever happens to the stream that reads it: a stream
dropped by the network re-attaches (the server's fault injection cuts it), another
client attaches by the session uuid, and the process's end always arrives.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest

from fleetctl.sandboxes import APIError, ConnectFailure, SandboxNotRunningError
from tests.conftest import Server, acontrol
from tests.sandboxes.support import Connect, Flavor, New, Process, Sdk, Tap, started

pytestmark = pytest.mark.anyio
#: Live processes need the command session (the last test: without it, a clear error).
DIALECTS = ("connect",)


async def read_until(chunks: AsyncIterator[bytes], needle: bytes) -> bytes:
    """Output read until it holds `needle` (the stream must not end before)."""
    seen = b""
    async for chunk in chunks:
        seen += chunk
        if needle in seen:
            return seen
    raise AssertionError(f"the stream ended before {needle!r}; it said {seen!r}")


async def everything(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_stdin_reaches_the_process_and_closing_it_ends_its_input(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    process = await sdk.open_process(sandbox.id, "cat; echo done >&2")
    assert process.pid > 0
    assert process.returncode is None
    await process.write_stdin(b"one\n")
    await process.write_stdin(b"two\n")
    await process.close_stdin()
    assert await everything(process.stdout) == b"one\ntwo\n"
    assert await everything(process.stderr) == b"done\n"
    assert await process.wait() == 0
    assert process.returncode == 0


async def test_output_streams_as_it_comes_with_env_and_working_dir(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new(environment_vars={"BASE": "b"}))
    process = await sdk.open_process(
        sandbox.id, 'echo "ready $BASE $EXTRA $(pwd)"; read x; echo "got $x" >&2; exit 3',
        working_dir="/tmp", env={"EXTRA": "e"},
    )  # fmt: skip
    assert await read_until(process.stdout, b"\n") == b"ready b e /tmp\n"
    assert process.returncode is None, "the first line came before the process ended"
    await process.write_stdin(b"x\n")
    assert await read_until(process.stderr, b"\n") == b"got x\n"
    assert await process.wait() == 3


async def test_large_output_arrives_whole_in_many_chunks(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    process = await sdk.open_process(sandbox.id, "head -c 3000000 /dev/zero | tr '\\0' x")
    chunks = [chunk async for chunk in process.stdout]
    assert (len(b"".join(chunks)), set(b"".join(chunks))) == (3_000_000, {ord("x")})
    assert len(chunks) > 1
    assert await process.wait() == 0


async def test_terminate_and_kill_end_the_process_by_signal(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    polite = await sdk.open_process(sandbox.id, "exec sleep 300")
    await polite.terminate()
    assert await polite.wait() == 128 + 15
    stubborn = await sdk.open_process(sandbox.id, "trap '' TERM; echo armed; exec sleep 300")
    await read_until(stubborn.stdout, b"armed")
    await stubborn.kill()
    assert await stubborn.wait() == 128 + 9
    await stubborn.terminate()  # nothing to signal any more: not an error


async def test_a_second_client_attaches_by_session_uuid_and_sees_new_output_and_the_end(
    connect: Connect, flavor: Flavor, new: New, sdk: Sdk
) -> None:
    sandbox = await started(sdk, new())
    process = await sdk.open_process(sandbox.id, "read x; echo first $x; read y; echo second $y")
    other = await connect(flavor).attach_process(sandbox.id, process.session_uuid)
    assert other.pid == process.pid
    await process.write_stdin(b"1\n")
    assert await read_until(process.stdout, b"\n") == b"first 1\n"
    assert await read_until(other.stdout, b"\n") == b"first 1\n"
    await other.write_stdin(b"2\n")  # either handle drives the same process
    assert await everything(process.stdout) == b"second 2\n"
    assert (await process.wait(), await other.wait()) == (0, 0)
    late = await sdk.attach_process(sandbox.id, process.session_uuid)  # ended, still known
    assert (await late.wait(), await everything(late.stdout)) == (0, b"")


async def test_a_dropped_stream_reattaches_and_the_end_still_arrives(
    connect: Connect, flavor: Flavor, new: New, target: Server
) -> None:
    tap = Tap()
    sdk = connect(flavor, target, transport=tap)
    sandbox = await started(sdk, new())
    process = await sdk.open_process(sandbox.id, "echo ready; read x; echo got $x; exit 4")
    assert await read_until(process.stdout, b"ready\n") == b"ready\n"
    cut = await acontrol(target, "POST", "/_fleetctl/faults/cut-streams",
                         json={"sandbox_id": sandbox.id})  # fmt: skip
    assert cut.json() == {"cut": 1}
    await process.write_stdin(b"x\n")
    assert await read_until(process.stdout, b"got x\n") == b"got x\n"
    assert await process.wait() == 4
    assert (tap.count("/Start"), tap.count("/Connect")) == (1, 1)


async def test_attaching_to_an_unknown_session_is_an_api_error(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    with pytest.raises(ConnectFailure) as caught:
        await sdk.attach_process(sandbox.id, str(uuid.uuid4()))
    assert caught.value.code == "not_found"


async def test_writing_to_an_ended_process_is_a_broken_pipe(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    process = await sdk.open_process(sandbox.id, "exit 0")
    assert await process.wait() == 0
    with pytest.raises(BrokenPipeError):
        await process.write_stdin(b"late\n")


async def test_a_sandbox_deleted_mid_stream_ends_the_process_as_not_running(
    sdk: Sdk, new: New, target: Server
) -> None:
    sandbox = await started(sdk, new())
    process = await sdk.open_process(sandbox.id, "echo up; exec sleep 300")
    await read_until(process.stdout, b"up")
    await acontrol(target, "DELETE", f"/sandbox/{sandbox.id}")
    with pytest.raises(SandboxNotRunningError) as caught:
        await process.wait()
    assert caught.value.status == "TERMINATED"


async def test_closing_a_process_stops_it(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    process: Process = await sdk.open_process(sandbox.id, "exec sleep 300")
    pid = process.pid
    await process.aclose()
    assert process.returncode == 128 + 15
    alive = await sdk.execute_command(sandbox.id, f"kill -0 {pid}")
    assert alive.exit_code != 0, "the process outlived its closing"


@pytest.mark.parametrize("dialect", ["rest"])
async def test_live_processes_need_the_command_session(sdk: Sdk, new: New) -> None:
    sandbox = await started(sdk, new())
    with pytest.raises(APIError, match="offers no live processes"):
        await sdk.open_process(sandbox.id, "cat")


async def test_reads_cancelled_midway_leave_the_process_readable(
    connect: Connect, new: New
) -> None:
    """Each cancelled read drops the stream it was reading; more of them than the
    re-attach budget still lose neither the process nor its output."""
    sdk = connect("async")
    sandbox = await started(sdk, new())
    process = await sdk.open_process(sandbox.id, "read x; echo got $x")
    for _ in range(7):
        with anyio.move_on_after(0.2):
            async for chunk in process.stdout:
                raise AssertionError(f"output before any input: {chunk!r}")
    await process.write_stdin(b"1\n")
    assert await everything(process.stdout) == b"got 1\n"
    assert await process.wait() == 0
