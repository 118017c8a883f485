"""The warm exec path (runtime/bwrap/warm.py): commands forked by a helper that joined
the sandbox once. It must run them exactly as the cold path did, and a helper that dies
or floods may cost only its own sandbox's command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from fleetctl.server.runtime.bwrap import helper
from fleetctl.server.runtime.bwrap.warm import KEEP_CAPS
from tests.conftest import Connect, Create, Gateway, Running, Server, wait_for

#: The bounding set of a container's root (Docker's default capabilities).
CONTAINER_BOUNDING = "00000000a80425fb"


def helpers(server: Server) -> dict[str, int]:
    """The server's exec helpers: the mount namespace each joined, and its pid."""
    listed = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    found = {}
    for pid in map(int, listed):
        try:
            if helper.__file__.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found[os.readlink(f"/proc/{pid}/ns/mnt")] = pid
        except OSError:
            continue  # it ended meanwhile
    return found


def helper_of(server: Server, gw: Gateway) -> int:
    """The pid of the helper that runs the sandbox's commands, once they go through it
    (the first goes down the cold path while the helper starts). A command it starts
    leads a session of its own inside; the cold path's belongs to nsenter's, outside."""
    deadline = time.monotonic() + 30
    while True:
        said = gw.exec("echo $$ $(cut -d' ' -f6 /proc/self/stat) $(readlink /proc/self/ns/mnt)")
        shell, session, mnt = said.json()["stdout"].split()
        if shell == session and mnt in helpers(server):
            return helpers(server)[mnt]
        assert time.monotonic() < deadline, f"no warm command: {said.json()}"
        time.sleep(0.02)


def status_of(gw: Gateway, user: str | None = None) -> dict[str, str]:
    fields = {"user": user} if user else {}
    shown = gw.exec("grep -E '^(Cap|NoNewPrivs|Uid|Gid|Groups)' /proc/self/status", **fields)
    return dict(line.split(":\t", 1) for line in shown.json()["stdout"].splitlines())


def test_commands_run_warm_with_the_cold_path_s_ids_limits_and_capabilities(
    server: Server, running: Running
) -> None:
    _, gw = running()
    first = helper_of(server, gw)
    root = status_of(gw)
    assert root["CapBnd"] == root["CapEff"] == CONTAINER_BOUNDING
    assert (root["CapInh"], root["CapAmb"], root["NoNewPrivs"]) == ("0" * 16, "0" * 16, "1")
    assert root["Uid"].split() == ["0"] * 4
    nobody = status_of(gw, "nobody")
    assert nobody["Uid"].split() == ["65534"] * 4
    assert nobody["CapEff"] == nobody["CapPrm"] == "0" * 16
    cgroup = gw.exec("cat /proc/self/cgroup").json()["stdout"]
    assert cgroup.splitlines()[-1].endswith(":/")  # its sandbox's own cgroup
    assert helper_of(server, gw) == first  # one helper serves every command
    assert str(first) not in gw.exec("ls /proc").json()["stdout"].split()


def test_a_killed_helper_fails_its_running_command_clearly_and_is_replaced(
    server: Server, running: Running
) -> None:
    _, gw = running()
    _, neighbour = running()
    victim = helper_of(server, gw)
    helper_of(server, neighbour)
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(gw.exec("sleep 60", timeout=120)))
    waiting.start()
    deadline = time.monotonic() + 30
    while "sleep 60" not in gw.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").json()["stdout"]:
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    waiting.join(timeout=30)
    assert answers[0].status_code == 500
    assert "exec helper ended before the command" in answers[0].json()["detail"]
    left = gw.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").json()["stdout"]
    assert "sleep 60" not in left  # killed with its helper's loss
    assert helper_of(server, gw) != victim
    assert neighbour.exec("echo fine").json()["stdout"] == "fine\n"


def test_output_past_16_mib_is_cut_and_said_while_neighbours_run(
    running: Running,
) -> None:
    _, gw = running(memory_gb=1)
    _, neighbour = running()
    flood: list[dict[str, object]] = []
    thread = threading.Thread(
        target=lambda: flood.append(gw.exec("yes | head -c 40000000; echo done >&2").json())
    )
    thread.start()
    assert neighbour.exec("echo fine").json()["stdout"] == "fine\n"
    thread.join(timeout=120)
    body = flood[0]
    assert len(str(body["stdout"])) == 16 * 1024 * 1024
    assert (body["stdout_truncated"], body["stderr_truncated"]) == (True, False)
    assert body["stderr"] == "done\n"


def test_a_thousand_concurrent_execs_over_fifty_sandboxes_leave_nothing(
    server: Server, api: httpx.Client, sandboxes: Create, gateway: Connect
) -> None:
    fds_before = len(os.listdir(f"/proc/{server.pid}/fd"))
    ids = [sandboxes(name=f"warm{i}", memory_gb=0.25)["id"] for i in range(50)]
    tokens = {}
    for sandbox_id in ids:
        wait_for(api, sandbox_id, "RUNNING")
        helper_of(server, gateway(sandbox_id))  # every command below goes warm
        auth = api.post(f"/sandbox/{sandbox_id}/auth").json()
        url = f"{auth['gateway_url']}/{auth['user_ns']}/{auth['job_id']}/exec"
        tokens[sandbox_id] = (url, auth["token"])

    async def run_all() -> list[tuple[str, int, str]]:
        limits = httpx.Limits(max_connections=1000)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def one(index: int) -> tuple[str, int, str]:
                url, token = tokens[ids[index % 50]]
                sent = {"command": f"echo {index}"}
                got = await client.post(
                    url, json=sent, headers={"Authorization": f"Bearer {token}"}
                )
                return got.json()["stdout"], index, got.text

            return await asyncio.gather(*(one(i) for i in range(1000)))

    for stdout, index, text in asyncio.run(run_all()):
        assert stdout == f"{index}\n", text
    assert len(helpers(server)) >= 50
    api.request("DELETE", "/sandbox", json={"sandbox_ids": ids})
    deadline = time.monotonic() + 30
    while helpers(server) or len(os.listdir(f"/proc/{server.pid}/fd")) > fds_before:
        assert time.monotonic() < deadline, (helpers(server), os.listdir(f"/proc/{server.pid}/fd"))
        time.sleep(0.05)


def test_a_helper_with_nothing_to_do_goes_and_one_with_a_command_stays(
    server: Server, running: Running
) -> None:
    """The helper itself, run as the server runs it but with a short idle period."""
    record, _ = running()
    with sqlite3.connect(server.data_dir / "state.db") as db:
        row = db.execute("SELECT runtime FROM sandboxes WHERE id = ?", (record["id"],))
        init_pid = json.loads(row.fetchone()[0])["init_pid"]
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [sys.executable, "-I", "-S", helper.__file__, str(theirs.fileno()), str(init_pid),
            KEEP_CAPS, "0.5"]  # fmt: skip
    process = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        assert mine.recv(4096) == b"ready"
        out_r, out_w = os.pipe()
        asked, answer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = ["sh", "-c", "sleep 1; echo slept"]
        request = helper.encode(0, 0, [], argv, {"PATH": "/usr/bin:/bin"})
        devnull = os.open(os.devnull, os.O_RDONLY)
        fds = [devnull, out_w, out_w, answer.fileno()]
        socket.send_fds(mine, [request], fds)
        for fd in (devnull, out_w):
            os.close(fd)
        answer.close()
        assert asked.recv(4096).startswith(b"pid ")
        assert asked.recv(4096) == b"code 0"  # it outlived its idle period
        assert os.read(out_r, 100) == b"slept\n"
        asked.close()
        os.close(out_r)
        process.wait(timeout=10)  # then went, with nothing more to do
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        mine.close()


def test_a_warm_command_past_its_timeout_is_killed_with_its_group_by_the_helper(
    server: Server, running: Running
) -> None:
    _, gw = running()
    helper_of(server, gw)
    response = gw.exec("sleep 300 & sleep 300; echo never", timeout=1)
    assert response.status_code == 408
    deadline = time.monotonic() + 10
    while "sleep 300" in gw.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").json()["stdout"]:
        assert time.monotonic() < deadline, "the command's group outlived its timeout"
        time.sleep(0.02)
