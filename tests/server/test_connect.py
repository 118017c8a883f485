"""The gateway's Connect command session on the wire, read with nothing but httpx and
`struct`: events and errors as today's SDK reads them, live processes (input, signals,
re-attach, list), and hostile callers (huge or cut frames, unknown methods, a thousand
streams at once) that get clear errors while the server keeps serving."""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
from google.protobuf.message import Message

from fleetctl.proto import command_session_pb2 as pb
from fleetctl.server.service.processes import MAX_PER_SANDBOX
from tests.conftest import Gateway, Running, Server, needs_sandboxes
from tests.server.test_warm_exec import helper_of

pytestmark = needs_sandboxes
SERVICE = "command_session.CommandSession"
STREAM = {"content-type": "application/connect+proto", "connect-protocol-version": "1"}
UNARY = {"content-type": "application/proto", "connect-protocol-version": "1"}


def frame(message: Message | bytes, flags: int = 0) -> bytes:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    return struct.pack(">BI", flags, len(data)) + data


def parse(body: bytes) -> tuple[list[pb.CommandSessionEvent], dict[str, Any] | None]:
    """A stream's events, and its end-of-stream JSON (None if it had none)."""
    events, end = [], None
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        payload, body = body[5 : 5 + size], body[5 + size :]
        if flags & 0x02:
            end = json.loads(payload)
        else:
            events.append(pb.StartResponse.FromString(payload).event)
    return events, end


def kinds(events: list[pb.CommandSessionEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events if e.WhichOneof("event") != "keepalive"]


def start_request(command: str, **fields: Any) -> pb.StartRequest:
    return pb.StartRequest(command=pb.CommandSpec(cmd="/bin/sh", args=["-c", command]), **fields)


def call(gw: Gateway, method: str, message: Message | bytes, *, timeout_ms: int = 30_000,
         stream: bool = True) -> httpx.Response:  # fmt: skip
    headers = {**(STREAM if stream else UNARY), "connect-timeout-ms": str(timeout_ms)}
    body = frame(message) if stream else (message if isinstance(message, bytes)
                                          else message.SerializeToString())  # fmt: skip
    return gw.client.post(f"{SERVICE}/{method}", content=body, headers=headers)


def output(events: list[pb.CommandSessionEvent], kind: str = "stdout") -> bytes:
    return b"".join(getattr(e.data, kind) for e in events if e.WhichOneof("event") == "data")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- Start ---------------------------------------------------------------------------


def test_start_streams_the_pid_the_output_and_the_exit_code_then_ends_the_stream(
    running: Running,
) -> None:
    _, gw = running()
    response = call(gw, "Start", start_request("echo out; echo err >&2; exit 3",
                                               stdin=False))  # fmt: skip
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/connect+proto"
    events, end = parse(response.content)
    assert (kinds(events)[0], kinds(events)[-1], end) == ("start", "end", {})
    assert events[0].start.pid > 0
    assert (output(events), output(events, "stderr")) == (b"out\n", b"err\n")
    finished = events[-1].end
    assert (finished.exit_code, finished.exited, finished.status) == (3, True, "exit")


def test_commands_that_ended_do_not_count_against_the_live_process_limit(
    running: Running,
) -> None:
    """Ended processes are kept a while for re-attach; more of them than a sandbox may run
    at once must not make the next command `resource_exhausted`."""
    _, gw = running()
    for index in range(MAX_PER_SANDBOX + 20):
        events, end = parse(call(gw, "Start", start_request("true", stdin=False)).content)
        assert end == {}, (index, end)
        assert kinds(events)[-1] == "end"


def test_a_bad_token_is_unauthenticated_before_any_message(running: Running) -> None:
    _, gw = running()
    gw.client.headers["Authorization"] = "Bearer not-a-token"
    response = call(gw, "Start", start_request("echo never"))
    events, end = parse(response.content) if response.status_code == 200 else ([], response.json())
    assert events == []
    assert end is not None
    assert end.get("code", end.get("error", {}).get("code")) == "unauthenticated"


def test_a_sandbox_deleted_mid_stream_ends_the_stream_with_not_found(
    running: Running, api: httpx.Client
) -> None:
    record, gw = running()
    headers = {**STREAM, "connect-timeout-ms": "60000"}
    request = frame(start_request("echo up; exec sleep 300"))
    with gw.client.stream("POST", f"{SERVICE}/Start", headers=headers, content=request) as stream:
        body = b""
        chunks = stream.iter_raw()
        while b"up\n" not in output(parse_prefix(body)):
            body += next(chunks)
        api.delete(f"/sandbox/{record['id']}")
        body += b"".join(chunks)
    events, end = parse(body)
    assert "end" not in kinds(events)
    assert end is not None
    assert end["error"]["code"] == "not_found"


def parse_prefix(body: bytes) -> list[pb.CommandSessionEvent]:
    """The whole events at the start of a stream still arriving."""
    events = []
    while len(body) >= 5:
        flags, size = struct.unpack(">BI", body[:5])
        if len(body) < 5 + size or flags & 0x02:
            break
        events.append(pb.StartResponse.FromString(body[5 : 5 + size]).event)
        body = body[5 + size :]
    return events


def test_the_deadline_ends_the_stream_and_kills_the_command(running: Running) -> None:
    _, gw = running()
    started = time.monotonic()
    response = call(gw, "Start", start_request("echo begun; exec sleep 30"), timeout_ms=500)
    events, end = parse(response.content)
    assert time.monotonic() - started < 10
    assert end is not None
    assert end["error"]["code"] == "deadline_exceeded"
    assert output(events) == b"begun\n"
    count = "grep -l '[s]leep.30' /proc/[0-9]*/cmdline 2>/dev/null | wc -l"
    deadline = time.monotonic() + 10
    while gw.exec(count).json()["stdout"].strip() != "0":
        assert time.monotonic() < deadline, "the command outlived its deadline"
        time.sleep(0.05)


# -- live processes ------------------------------------------------------------------


def test_inputs_and_signals_are_done_once_per_id_and_any_selector_finds_the_process(
    running: Running,
) -> None:
    _, gw = running()
    session = str(uuid.uuid4())
    opened: dict[str, httpx.Response] = {}
    reader = threading.Thread(target=lambda: opened.update(first=call(gw, "Start", start_request(
        "cat; echo eof", stdin=True, session_uuid=session))))  # fmt: skip
    reader.start()
    listed = poll_sessions(gw, session)
    by_uuid = pb.CommandSessionSelector(session_uuid=session)
    by_pid = pb.CommandSessionSelector(pid=listed.pid)
    assert (listed.command.cmd, dict(listed.command.envs)) == ("/bin/sh", {})
    once = pb.SendInputRequest(session=by_uuid, input=pb.CommandInput(stdin=b"a\n"),
                               input_uuid="in-1")  # fmt: skip
    for _ in range(2):  # a retried input is written once
        assert call(gw, "SendInput", once, stream=False).status_code == 200
    pid_input = pb.SendInputRequest(session=by_pid, input=pb.CommandInput(stdin=b"b\n"))
    assert call(gw, "SendInput", pid_input, stream=False).status_code == 200
    resize = call(gw, "Update", pb.UpdateRequest(session=by_pid), stream=False)
    assert (resize.status_code, resize.json()["code"]) == (400, "failed_precondition")
    close = pb.SendInputRequest(session=by_uuid, input=pb.CommandInput(stdin=b""))
    assert call(gw, "SendInput", close, stream=False).status_code == 200
    reader.join(timeout=30)
    events, end = parse(opened["first"].content)
    assert (output(events), events[-1].end.exit_code, end) == (b"a\nb\neof\n", 0, {})
    late = call(gw, "SendInput", once, stream=False)
    assert late.status_code == 200, "a repeated id of an ended process is still done once"
    again = call(gw, "Connect", pb.ConnectRequest(session=by_uuid))
    assert kinds(parse(again.content)[0]) == ["start", "end"], "the retained end re-attaches"


def poll_sessions(gw: Gateway, session_uuid: str) -> pb.CommandSessionInfo:
    deadline = time.monotonic() + 30
    while True:
        listed = call(gw, "List", pb.ListRequest(), stream=False)
        assert listed.status_code == 200, listed.text
        for info in pb.ListResponse.FromString(listed.content).sessions:
            if info.session_uuid == session_uuid and info.pid:
                return info
        assert time.monotonic() < deadline, "the session never showed in List"
        time.sleep(0.02)


def test_a_session_uuid_names_one_command_and_unknown_ones_are_not_found(
    running: Running,
) -> None:
    _, gw = running()
    session = str(uuid.uuid4())
    first = call(gw, "Start", start_request("echo once", session_uuid=session, stdin=False))
    assert output(parse(first.content)[0]) == b"once\n"
    replay = call(gw, "Start", start_request("echo once", session_uuid=session, stdin=False))
    events, _ = parse(replay.content)
    assert (kinds(events), events[-1].end.exit_code) == (["start", "end"], 0), "ran twice"
    other = call(gw, "Start", start_request("echo other", session_uuid=session))
    refused = {"code": "failed_precondition", "message": f"session {session} runs another command"}
    assert parse(other.content)[1] == {"error": refused}
    unknown = pb.ConnectRequest(session=pb.CommandSessionSelector(session_uuid=str(uuid.uuid4())))
    end = parse(call(gw, "Connect", unknown).content)[1]
    assert end is not None
    assert end["error"]["code"] == "not_found"
    signal = pb.SendSignalRequest(session=pb.CommandSessionSelector(pid=999_999),
                                  signal=pb.SIGNAL_SIGTERM)  # fmt: skip
    assert call(gw, "SendSignal", signal, stream=False).json()["code"] == "not_found"


# -- hostile callers -------------------------------------------------------------------


def test_hostile_frames_and_methods_get_clear_errors_and_the_server_keeps_serving(
    running: Running, server: Server
) -> None:
    _, gw = running()
    before = rss_kb(server.pid)
    headers = {**STREAM, "connect-timeout-ms": "10000"}
    huge = gw.client.post(f"{SERVICE}/Start", headers=headers,
                          content=struct.pack(">BI", 0, 2**31) + b"x" * 1024)  # fmt: skip
    cut = gw.client.post(f"{SERVICE}/Start", headers=headers,
                         content=frame(start_request("echo hi"))[:-3])  # fmt: skip
    garbage = gw.client.post(f"{SERVICE}/Start", headers=headers, content=frame(b"\xff" * 40))
    unknown = gw.client.post(f"{SERVICE}/Explode", headers=headers, content=frame(b""))
    for response, code, says in (
        (huge, "resource_exhausted", "a message of 2147483648 bytes"),
        (cut, "invalid_argument", "ended in the middle of its message"),
        (garbage, "invalid_argument", "does not parse"),
    ):
        events, end = parse(response.content)
        assert (response.status_code, events) == (200, [])
        assert end is not None
        assert end["error"]["code"] == code
        assert says in end["error"]["message"]
    assert unknown.status_code == 404
    assert rss_kb(server.pid) - before < 64 * 1024, "a 2 GB frame length was allocated"
    assert gw.exec("echo still").json()["stdout"] == "still\n"


def test_a_thousand_streams_at_once_all_end_and_memory_stays_bounded(
    running: Running, server: Server
) -> None:
    """A thousand clients attach to one process at once; it writes a line and ends:
    every stream gets the line and the end, and the server's memory stays bounded."""
    _, gw = running()
    session = str(uuid.uuid4())
    go = "/tmp/go"
    command = f"while [ ! -e {go} ]; do sleep 0.05; done; echo released"
    runner = threading.Thread(target=lambda: call(gw, "Start", start_request(
        command, session_uuid=session, stdin=False), timeout_ms=120_000))  # fmt: skip
    runner.start()
    poll_sessions(gw, session)
    before = rss_kb(server.pid)
    results = anyio.run(attach_many, gw, session, 1000, go)
    assert results.count((b"released\n", 0)) == 1000, set(results)
    runner.join(timeout=30)
    assert rss_kb(server.pid) - before < 256 * 1024
    assert gw.exec("echo still").json()["stdout"] == "still\n"


async def attach_many(gw: Gateway, session: str, count: int, go: str) -> list[tuple[bytes, int]]:
    headers = {**STREAM, "connect-timeout-ms": "120000",
               "Authorization": gw.client.headers["Authorization"]}  # fmt: skip
    request = frame(pb.ConnectRequest(session=pb.CommandSessionSelector(session_uuid=session)))
    results: list[tuple[bytes, int]] = []
    attached = anyio.Event()
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(base_url=str(gw.client.base_url), timeout=120,
                                 limits=limits) as client:  # fmt: skip

        async def one() -> None:
            async with client.stream("POST", f"{SERVICE}/Connect", headers=headers,
                                     content=request) as response:  # fmt: skip
                body, counted = b"", False
                async for chunk in response.aiter_raw():
                    body += chunk
                    if not counted and parse_prefix(body):  # its start: it is attached
                        counted = True
                        started.append(1)
                        if len(started) == count:
                            attached.set()
            events, _ = parse(body)
            results.append((output(events), events[-1].end.exit_code if events else -1))

        started: list[int] = []
        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(one)
            with anyio.fail_after(60):
                await attached.wait()
            await anyio.to_thread.run_sync(lambda: gw.exec(f"touch {go}"))
    return results


def test_live_processes_run_warm_once_the_helper_runs_and_as_they_ran_cold(
    server: Server, running: Running
) -> None:
    """A sandbox's first command goes down the cold path; once its exec helper runs, a
    Start is one message to it. Input, signals, pid and the end are the same either way;
    only a warm command leads a session of its own inside."""
    script = ('echo $$ $(cut -d" " -f6 /proc/self/stat); read line; echo "got $line"; '
              "touch /tmp/read; exec sleep 300")  # fmt: skip
    _, cold_gw = running()
    _, warm_gw = running()
    helper_of(server, warm_gw)
    seen = [signalled(gw, script) for gw in (cold_gw, warm_gw)]
    for (pid, _), listed_pid, said, end in seen:
        assert (pid, said) == (listed_pid, "got x")
        assert (end.exit_code, end.exited, end.status) == (143, True, "exit")  # 128 + SIGTERM
    assert [pid == session for (pid, session), *_ in seen] == [False, True]


def signalled(
    gw: Gateway, script: str
) -> tuple[tuple[int, int], int, str, pb.CommandSessionEvent.EndEvent]:
    """Start `script` with stdin, write it a line, SIGTERM it: (its pid and session as it
    said, its pid in List, what it said then, its end)."""
    session = str(uuid.uuid4())
    opened: dict[str, httpx.Response] = {}
    reader = threading.Thread(target=lambda: opened.update(first=call(gw, "Start", start_request(
        script, stdin=True, session_uuid=session))))  # fmt: skip
    reader.start()
    listed = poll_sessions(gw, session)
    by_uuid = pb.CommandSessionSelector(session_uuid=session)
    line = pb.SendInputRequest(session=by_uuid, input=pb.CommandInput(stdin=b"x\n"))
    assert call(gw, "SendInput", line, stream=False).status_code == 200
    deadline = time.monotonic() + 30
    while gw.exec("ls /tmp").json()["stdout"] != "read\n":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    term = pb.SendSignalRequest(session=by_uuid, signal=pb.SIGNAL_SIGTERM)
    assert call(gw, "SendSignal", term, stream=False).status_code == 200
    reader.join(timeout=30)
    events, _ = parse(opened["first"].content)
    said = output(events).decode().splitlines()
    pid, session_id = map(int, said[0].split())
    return (pid, session_id), listed.pid, said[1], events[-1].end
