"""What a sandbox cannot reach: other sandboxes, the server, the host kernel's settings.

Every attack runs inside a real sandbox on the session server. Where the probe
could pass vacuously, a control shows it would have worked had isolation been
missing (the secret really is at the path tried, the listener really accepts,
the leftovers scan really finds a live sandbox), so each test can fail. A bug
not fixed yet is pinned as a strict xfail whose reason says what is wrong.
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import shlex
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import WHOLE, Create, Gateway, Running, Server, wait_for

SHADOW = Path("/etc/shadow")


def run(gw: Gateway, command: str, **fields: Any) -> dict[str, Any]:
    """Exec `command` in the sandbox; the data plane itself must answer 200."""
    response = gw.exec(command, **fields)
    assert response.status_code == 200, response.text
    return dict(response.json())


def cat_each(gw: Gateway, paths: list[str]) -> tuple[str, dict[str, int]]:
    """`cat` every path inside the sandbox; returns all output and each path's exit code."""
    quoted = " ".join(shlex.quote(path) for path in paths)
    result = run(gw, f'for p in {quoted}; do cat -- "$p"; echo "== $? $p"; done')
    codes: dict[str, int] = {}
    for line in result["stdout"].splitlines():
        if line.startswith("== "):
            code, _, path = line[3:].partition(" ")
            codes[path] = int(code)
    assert set(codes) == set(paths), result
    return result["stdout"] + result["stderr"], codes


def host_pids(needle: str, *, exact: bool = False) -> list[int]:
    """Host processes whose command line (arguments joined by spaces) mentions `needle`,
    or is exactly `needle`; the test's own command line never does."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ")
            except OSError:
                continue  # exited while we looked
            if command == needle.encode() or (not exact and needle.encode() in command):
                found.append(int(entry.name))
    return found


def start_time(pid: int) -> int | None:
    """Clock ticks since boot at which `pid` started; None once it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def cgroup_dirs(sandbox_id: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/**/fleetctl/{sandbox_id}", recursive=True)


def sandbox_processes(sandbox_id: str) -> dict[int, int | None]:
    """Every process in the sandbox's cgroups (host pids), with its start time."""
    pids: set[int] = set()
    for directory in cgroup_dirs(sandbox_id):
        procs = Path(directory) / "cgroup.procs"
        pids.update(int(pid) for pid in procs.read_text().split())
    return {pid: start_time(pid) for pid in pids}


def file_state(path: Path) -> tuple[str, int]:
    """Content hash and mtime of a host file, to show it was not written."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def unreadable(path: str) -> bool:
    """A path the sandbox's root may not read (owned by host root, no read for others)."""
    return path in (str(SHADOW), "/workspace/shadow") or path.endswith("etc/shadow")


# --- other sandboxes' files ------------------------------------------------------------


def test_sandbox_cannot_read_another_sandboxs_workspace_or_tmp(
    server: Server, running: Running
) -> None:
    """A secret in sandbox A's /workspace and /tmp is unreachable from B by any host path:
    A's data dir, /proc/<A's host pid>/root, bwrap's old root, or B's data plane."""
    (a, gw_a), (_, gw_b) = running(), running()
    secret = f"sk-CANARY-{secrets.token_hex(8)}"
    run(gw_a, f"echo {secret} > /workspace/secret.txt && echo {secret} > /tmp/secret.txt")

    # Controls: the secret is where B will look, seen from A and from the host.
    inside_a, _ = cat_each(gw_a, ["/workspace/secret.txt", "/tmp/secret.txt"])
    assert inside_a.count(secret) == 2
    a_home = server.data_dir / "sandboxes" / a["id"]
    assert secret in (a_home / "workspace" / "secret.txt").read_text()
    a_pids = sorted({*host_pids(a["id"]), *sandbox_processes(a["id"])})
    via_proc = [Path(f"/proc/{pid}/root/tmp/secret.txt") for pid in a_pids]
    assert any(path.exists() and secret in path.read_text() for path in via_proc), a_pids

    paths = [
        "/workspace/secret.txt",
        "/tmp/secret.txt",
        f"{a_home}/workspace/secret.txt",
        f"/workspace/../../{a_home}/workspace/secret.txt",
        f"/oldroot{a_home}/workspace/secret.txt",
        "/newroot/workspace/secret.txt",
        "/newroot/tmp/secret.txt",
    ]
    for pid in [1, 2, *a_pids]:
        paths += [
            f"/proc/{pid}/root/workspace/secret.txt",
            f"/proc/{pid}/root/tmp/secret.txt",
            f"/proc/{pid}/cwd/secret.txt",
        ]
    output, codes = cat_each(gw_b, paths)
    assert secret not in output
    assert [path for path, code in codes.items() if code == 0] == []
    for path in paths:
        response = gw_b.client.get("download", params={"path": path})
        assert response.status_code == 404, (path, response.status_code)
        assert secret not in response.text


# --- the server and the host -----------------------------------------------------------


def test_sandbox_cannot_see_the_server_token_database_or_host_secrets(
    server: Server, running: Running
) -> None:
    """The API key file, state.db and the data dir listing are absent inside; /root is
    an empty tmpfs although the host's is not; /etc/shadow is permission denied; no
    process environment inside carries the API key."""
    _, gw = running()
    # Controls: all of these exist on the host and hold what we look for.
    assert (server.data_dir / "token").read_text().strip() == server.token
    assert (server.data_dir / "state.db").is_file()
    assert os.listdir("/root")
    assert SHADOW.stat().st_size > 0

    data_dir = str(server.data_dir)
    output, codes = cat_each(
        gw, [f"{data_dir}/token", f"{data_dir}/state.db", f"{data_dir}/server.json"]
    )
    assert server.token not in output
    assert set(codes.values()) == {1}
    listing = run(gw, f"ls -A {shlex.quote(data_dir)}")
    assert listing["exit_code"] != 0
    assert "state.db" not in listing["stdout"]
    assert run(gw, "ls -A /root") == {"stdout": "", "stderr": "", "exit_code": 0, **WHOLE}
    shadow = run(gw, "cat /etc/shadow")
    assert shadow["exit_code"] == 1
    assert "Permission denied" in shadow["stderr"]
    assert shadow["stdout"] == ""
    environments = run(gw, "cat /proc/[0-9]*/environ; env")
    assert environments["stdout"]
    assert server.token not in environments["stdout"]


# --- network ---------------------------------------------------------------------------

CONNECT = """
import socket, sys
target = sys.argv[1]
family = socket.AF_UNIX if target.startswith("@") else socket.AF_INET
address = "\\0" + target[1:] if target.startswith("@") else ("127.0.0.1", int(target))
try:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(address)
except OSError as exc:
    print(type(exc).__name__)
else:
    print("connected")
"""


def connect_from(gw: Gateway, target: str) -> str:
    """Try to connect from inside to 127.0.0.1:<port>, or to @<abstract unix socket>."""
    result = run(gw, f"python3 -c {shlex.quote(CONNECT)} {shlex.quote(target)}")
    assert result["exit_code"] == 0, result
    return str(result["stdout"]).strip()


def test_no_sandbox_reaches_host_loopback_with_network_or_without(
    server: Server, running: Running
) -> None:
    """A host TCP listener on 127.0.0.1, the server's own port and a host abstract unix
    socket are unreachable from a sandbox without network (only `lo`) and from one with
    network (its own namespace: `lo` and `eth0`; tests/network/ checks the rest)."""
    (_, offline), (_, online) = running(network_access=False), running(network_access=True)
    abstract = f"fleetctl-isolation-{secrets.token_hex(6)}"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)  # the kernel completes handshakes into the backlog; no accept needed
        unix.bind("\0" + abstract)
        unix.listen(8)
        port = str(tcp.getsockname()[1])
        server_port = str(httpx.URL(server.url).port)
        for sandbox in (offline, online):
            assert connect_from(sandbox, port) == "ConnectionRefusedError"
            assert connect_from(sandbox, server_port) == "ConnectionRefusedError"
            assert connect_from(sandbox, f"@{abstract}") == "ConnectionRefusedError"

    interfaces = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    assert run(offline, f'python3 -c "{interfaces}"')["stdout"] == "['lo']\n"
    assert run(online, f'python3 -c "{interfaces}"')["stdout"] == "['eth0', 'lo']\n"


# --- privileged operations -------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "mount -o remount,rw /",
        "mount -o remount,rw /usr",
        "mount -o remount,ro /workspace",
        "mkdir -p /tmp/mnt && mount -t tmpfs probe /tmp/mnt",
        "mkdir -p /tmp/mnt && mount --bind /workspace /tmp/mnt",
        "mkdir -p /tmp/mnt && mount -t proc proc /tmp/mnt",
        "echo pwned > /proc/sys/kernel/hostname",
        "hostname pwned",
        "sysctl -w kernel.hostname=pwned",
        # Same values as now, so harmless to the host even if isolation failed; the
        # sandbox shares the host's network namespace (network_access defaults to true).
        f"sysctl -w vm.swappiness={Path('/proc/sys/vm/swappiness').read_text().strip()}",
        "sysctl -w net.ipv4.ip_forward="
        + Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        f"ip link set lo mtu {Path('/sys/class/net/lo/mtu').read_text().strip()}",
        "python3 -c 'import time; r = time.CLOCK_REALTIME; "
        "time.clock_settime(r, time.clock_gettime(r))'",
    ],
)
def test_sandbox_cannot_mount_remount_or_change_kernel_settings(
    running: Running, command: str
) -> None:
    """Each privileged operation fails, and afterwards the sandbox's mounts, hostname and
    the host's hostname and pid_max are what they were."""
    record, gw = running()
    before = run(gw, "cat /proc/self/mountinfo; hostname; cat /proc/sys/kernel/pid_max")
    host = (socket.gethostname(), Path("/proc/sys/kernel/pid_max").read_text())
    attempt = run(gw, command)
    assert attempt["exit_code"] != 0, attempt
    after = run(gw, "cat /proc/self/mountinfo; hostname; cat /proc/sys/kernel/pid_max")
    assert after["stdout"] == before["stdout"]
    assert f"\n{record['id']}\n" in after["stdout"]
    assert (socket.gethostname(), Path("/proc/sys/kernel/pid_max").read_text()) == host


def test_pid_max_a_sandbox_may_set_is_its_own_pid_namespaces(running: Running) -> None:
    """kernel.pid_max is per pid namespace (Linux >= 6.14): root inside may lower its own,
    which takes effect inside, while the host's value stays what it was."""
    _, gw = running()
    host = Path("/proc/sys/kernel/pid_max").read_text()
    wanted = "4099" if host.strip() != "4099" else "4100"
    result = run(gw, f"sysctl -w kernel.pid_max={wanted} && cat /proc/sys/kernel/pid_max")
    if result["exit_code"] == 0:  # a kernel where pid_max is namespaced
        assert result["stdout"].endswith(f"\n{wanted}\n"), result
    assert Path("/proc/sys/kernel/pid_max").read_text() == host


NESTED_MOUNT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
    print("unshare refused", os.strerror(ctypes.get_errno()))
else:
    caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")]
    print("unshare ok", caps[0].split()[1])
    os.makedirs("/tmp/nested", exist_ok=True)
    if libc.mount(b"probe", b"/tmp/nested", b"tmpfs", 0, None) == 0:
        print("mounted")
    else:
        print("mount refused", os.strerror(ctypes.get_errno()))
"""


def test_sandbox_cannot_regain_capabilities_in_a_nested_user_namespace(
    running: Running,
) -> None:
    """`--cap-drop ALL` must stay dropped: creating a user namespace inside the sandbox
    (and with it a full capability set, then a mount) is refused."""
    _, gw = running()
    result = run(gw, f"python3 -c {shlex.quote(NESTED_MOUNT)}")
    assert result["exit_code"] == 0, result
    assert result["stdout"].startswith("unshare refused"), result["stdout"]
    assert "mounted" not in result["stdout"]


# --- file transfer paths ---------------------------------------------------------------


def plant_symlinks(gw: Gateway, data_dir: Path) -> None:
    """Symlinks inside /workspace to host files (absolute and relative)."""
    links = {
        "token": f"{data_dir}/token",
        "db": f"{data_dir}/state.db",
        "shadow": str(SHADOW),
        "relative": f"../../../../../../..{data_dir}/token",
        "datadir": str(data_dir),
    }
    script = "; ".join(f"ln -s {shlex.quote(t)} /workspace/{n}" for n, t in links.items())
    assert run(gw, script)["exit_code"] == 0


def escape_paths(server: Server) -> list[str]:
    data_dir = server.data_dir
    return [
        "/workspace/../../etc/shadow",
        "../../../../etc/shadow",
        str(SHADOW),
        f"{data_dir}/token",
        f"/workspace/../../../{data_dir}/token",
        f"{data_dir}/state.db",
        "/var/lib/fleetctl/token",
        "/workspace/token",
        "/workspace/db",
        "/workspace/shadow",
        "/workspace/relative",
        "/workspace/datadir/token",
        "/proc/1/root/etc/shadow",
        f"/proc/{server.pid}/root{data_dir}/token",
        f"/proc/{server.pid}/cwd/{data_dir}/token",
    ]


def host_secrets(server: Server) -> list[str]:
    """Strings that must never come back: the API key and /etc/shadow's hashes."""
    hashes = [line.split(":")[1] for line in SHADOW.read_text().splitlines() if ":" in line]
    return [server.token, *(h for h in hashes if len(h) > 2)]


def test_download_never_returns_host_files(server: Server, running: Running) -> None:
    """`..` segments, absolute host paths and symlinks planted in /workspace pointing at
    the token, state.db, /etc/shadow or the data dir all answer 404, with no content."""
    _, gw = running()
    plant_symlinks(gw, server.data_dir)
    # Control: the download route does return files (and follows the sandbox's own links).
    run(gw, "echo mine > /workspace/own.txt && ln -s /workspace/own.txt /workspace/own-link")
    assert gw.client.get("download", params={"path": "/workspace/own-link"}).text == "mine\n"
    forbidden = host_secrets(server)
    for path in escape_paths(server):
        response = gw.client.get("download", params={"path": path})
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert not any(secret in response.text for secret in forbidden), path


def test_read_file_never_returns_host_file_contents(server: Server, running: Running) -> None:
    """The same escapes through read-file never answer 200 nor carry host content."""
    _, gw = running()
    plant_symlinks(gw, server.data_dir)
    run(gw, "echo mine > /workspace/own.txt")
    own = gw.client.get("read-file", params={"path": "/workspace/own.txt"})
    assert own.json()["content"] == "mine\n"
    forbidden = host_secrets(server)
    for path in escape_paths(server):
        # A fresh connection each: the server drops the connection after its 500s (see
        # the xfail below), and a reused one would then reset the next request.
        response = gw.client.get(
            "read-file", params={"path": path}, headers={"Connection": "close"}
        )
        assert response.status_code != 200, (path, response.text)
        assert not any(secret in response.text for secret in forbidden), path
        if not unreadable(path):
            assert response.status_code == 404, (path, response.status_code)


def test_read_file_of_a_file_the_sandbox_cannot_read_is_a_clean_4xx(
    server: Server, running: Running
) -> None:
    """Like download, read-file answers a 4xx (not a 500) for an unreadable file."""
    _, gw = running()
    plant_symlinks(gw, server.data_dir)
    for path in ("/etc/shadow", "/workspace/../../etc/shadow", "/workspace/shadow"):
        response = gw.client.get("read-file", params={"path": path})
        assert response.status_code in (400, 403, 404), (path, response.status_code)


def test_upload_through_traversal_or_symlinks_never_writes_host_files(
    server: Server, running: Running
) -> None:
    """Uploads to host paths, through `..`, through symlinks to the token, /etc/shadow or
    the data dir either fail or land in the sandbox's own view; the host files stay the
    same and no new host file appears."""
    _, gw = running()
    data_dir = server.data_dir
    plant_symlinks(gw, data_dir)
    probe = f"fleetctl-isolation-{secrets.token_hex(6)}"
    run(gw, f"ln -s /etc/{probe}-link /workspace/new-link")
    watched = [data_dir / "token", SHADOW, Path("/etc/passwd")]  # state.db changes by itself
    before = {path: file_state(path) for path in watched}
    new_host_files = [
        Path(f"/etc/{probe}"),
        Path(f"/etc/{probe}-link"),
        Path(f"/usr/local/bin/{probe}"),
        data_dir / probe,
        data_dir / "sandboxes" / probe,
    ]
    payload = b"PWNED-" + probe.encode() + b"\n"
    targets = {
        "/workspace/token": (400,),
        "/workspace/relative": (400,),
        "/workspace/shadow": (400,),
        "/etc/shadow": (400,),
        "/etc/passwd": (400,),
        f"{data_dir}/token": (200,),
        f"/workspace/datadir/{probe}": (200,),  # {data_dir} exists inside by now
        f"/workspace/../../etc/{probe}": (400,),  # /etc is read-only inside
        f"/usr/local/bin/{probe}": (200,),
        f"/workspace/../../{data_dir}/sandboxes/{probe}": (200,),
        "/workspace/new-link": (400,),  # points into /etc, read-only inside
        f"/proc/{server.pid}/root{data_dir}/{probe}": (400,),
    }
    try:
        landed: list[str] = []
        for path, expected in targets.items():
            response = gw.client.post(
                "upload", params={"path": path}, files={"file": ("x", payload)}
            )
            assert response.status_code in expected, (path, response.status_code, response.text)
            if response.status_code == 200:
                landed.append(path)
        # Control: what was accepted really was written, in the sandbox's own view.
        inside, codes = cat_each(gw, landed)
        assert inside.count(payload.decode()) == len(landed), inside
        assert set(codes.values()) == {0}
        assert {path: file_state(path) for path in watched} == before
        assert [path for path in new_host_files if path.exists()] == []
        assert run(gw, "cat /etc/shadow")["exit_code"] == 1
    finally:
        for leaked in new_host_files:  # only if the test failed: undo what leaked out
            if leaked.is_file() and leaked.read_bytes() == payload:
                leaked.unlink()


# --- the environment a caller gives ----------------------------------------------------


def plant_host_tools(gw: Gateway, marker: Path) -> str:
    """Put fake `nsenter` and `setpriv` in the sandbox's /workspace/hijack; run on the host,
    each records its uid in `<marker>-<name>` and then execs the real tool. Returns the
    directory's host path, read from inside (any code in the sandbox can see it)."""
    for name in ("nsenter", "setpriv"):
        real = shutil.which(name)
        assert real is not None
        fake = f'#!/bin/sh\nid -u > {marker}-{name}\nexec {real} "$@"\n'
        response = gw.client.post(
            "upload", params={"path": f"/workspace/hijack/{name}"}, files={"file": fake.encode()}
        )
        assert response.status_code == 200, response.text
    mounts = run(gw, "chmod -R 755 /workspace/hijack && cat /proc/self/mountinfo")["stdout"]
    workspace = next(line.split()[3] for line in mounts.splitlines() if " /workspace " in line)
    return f"{workspace}/hijack"


def test_exec_env_never_reaches_the_host_side_of_the_exec(server: Server, running: Running) -> None:
    """An exec's `env` (here PATH naming the sandbox's own /workspace on the host) applies
    inside the sandbox only: no file of the sandbox ever runs on the host."""
    _, gw = running()
    marker = server.data_dir.parent / f"host-ran-{secrets.token_hex(6)}"
    hijack = plant_host_tools(gw, marker)
    try:
        result = run(gw, "echo inside", env={"PATH": f"{hijack}:/usr/bin:/bin"})
        assert result["stdout"] == "inside\n"
        assert not Path(f"{marker}-nsenter").exists(), "the sandbox's nsenter ran on the host"
    finally:
        Path(f"{marker}-nsenter").unlink(missing_ok=True)


def test_environment_vars_never_reach_the_host_side_of_the_start(
    server: Server, api: httpx.Client, sandboxes: Create, running: Running
) -> None:
    """A sandbox created with environment_vars PATH naming another sandbox's /workspace
    starts without running that sandbox's files on the host."""
    _, gw = running()
    marker = server.data_dir.parent / f"host-ran-{secrets.token_hex(6)}"
    hijack = plant_host_tools(gw, marker)
    try:
        second = sandboxes(environment_vars={"PATH": f"{hijack}:/usr/bin:/bin"})
        wait_for(api, second["id"], "RUNNING")
        assert not Path(f"{marker}-setpriv").exists(), "a sandbox's setpriv ran on the host"
    finally:
        Path(f"{marker}-setpriv").unlink(missing_ok=True)


# --- processes ------------------------------------------------------------------------

FORK_BOMB = """
import errno, os, signal
count, failure = 0, "none"
try:
    while count < 5000:
        if os.fork() == 0:
            os.closerange(0, 1024)  # hold none of the exec's pipes, so the exec can return
            signal.pause()
            os._exit(0)
        count += 1
except OSError as exc:
    failure = errno.errorcode.get(exc.errno, str(exc.errno))
print(count, failure)
"""


def test_fork_bomb_stops_at_the_pids_limit_and_spares_the_server_and_other_sandboxes(
    server: Server, api: httpx.Client, running: Running
) -> None:
    """A bomb that forks until failure gets EAGAIN short of 1024 processes (the pids
    limit), leaves the sandbox saturated, and the server, another sandbox and the
    saturated sandbox itself still serve execs; delete then removes it all."""
    (bomber, gw_bomber), (_, gw_other) = running(memory_gb=1), running()
    limits = [Path(d) / "pids.max" for d in cgroup_dirs(bomber["id"])]
    assert [p.read_text().strip() for p in limits if p.exists()] == ["1024"]

    started = time.monotonic()
    result = run(gw_bomber, f"python3 -c {shlex.quote(FORK_BOMB)}", timeout=20)
    count, failure = result["stdout"].split()
    assert failure == "EAGAIN", result
    assert 900 < int(count) < 1024
    assert time.monotonic() - started < 20
    assert len(sandbox_processes(bomber["id"])) > 900  # the bomb's children still hold pids

    assert httpx.get(f"{server.url}/api/v1/health", timeout=10).status_code == 200
    assert run(gw_other, "echo fine") == {"stdout": "fine\n", "stderr": "", "exit_code": 0, **WHOLE}
    assert run(gw_bomber, "echo still")["stdout"] == "still\n"
    assert api.get(f"/sandbox/{bomber['id']}").json()["status"] == "RUNNING"

    assert api.delete(f"/sandbox/{bomber['id']}").status_code == 200
    assert cgroup_dirs(bomber["id"]) == []


def test_writing_past_disk_size_gb_stops_the_sandbox_with_a_clear_error(
    api: httpx.Client, running: Running
) -> None:
    """disk_size_gb is enforced by measurement: a sandbox of 0.01 GB that writes 64 MiB
    (a small, safe overrun) is stopped as ERROR / DISK_LIMIT_EXCEEDED, its files removed."""
    record, gw = running(disk_size_gb=0.01)
    assert record["diskSizeGB"] == 0.01
    run(gw, "head -c 64M /dev/urandom > /workspace/fill")
    final = wait_for(api, record["id"], "ERROR")
    assert final["errorType"] == "DISK_LIMIT_EXCEEDED"
    assert "past its disk_size_gb of 0.01" in final["errorMessage"]


def test_sandbox_sees_only_its_own_processes(running: Running) -> None:
    """/proc inside B lists only B's few pids: not A's main process (which the host
    sees), not the server, not the host's; A's host pid does not exist for B."""
    (a, _), (_, gw_b) = running(start_command="exec sleep 31337"), running()
    a_pids = host_pids(a["id"]) + host_pids("sleep 31337")
    assert a_pids  # control: the host sees A's processes

    pids = run(gw_b, "ls /proc | grep -E '^[0-9]+$'")["stdout"].split()
    assert 2 <= len(pids) <= 8, pids
    commands = run(gw_b, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")["stdout"]
    for foreign in (a["id"], "31337", "fleetctl server", "pytest"):
        assert foreign not in commands
    for pid in a_pids:
        probe = run(gw_b, f"kill -0 {pid} || echo gone")
        assert probe["stdout"] == "gone\n", (pid, probe)


def test_kill_everything_inside_a_sandbox_spares_other_sandboxes(
    api: httpx.Client, running: Running
) -> None:
    """`kill -9 -1` in B ends B's own processes (B terminates) but no one else's."""
    (a, gw_a), (b, gw_b) = running(start_command="exec sleep 31338"), running()
    a_main = host_pids("sleep 31338", exact=True)
    assert len(a_main) == 1
    started = start_time(a_main[0])

    run(gw_b, "kill -9 -1")
    wait_for(api, b["id"], "TERMINATED")  # control: the kill did bite, inside B
    assert start_time(a_main[0]) == started
    assert api.get(f"/sandbox/{a['id']}").json()["status"] == "RUNNING"
    assert run(gw_a, "echo alive")["stdout"] == "alive\n"


# --- cleanup --------------------------------------------------------------------------


def leftovers(data_dir: Path, sandbox_id: str, processes: dict[int, int | None]) -> list[str]:
    """Everything of the sandbox still on the host: dirs, cgroups, mounts, processes."""
    found = [
        str(path)
        for path in (data_dir / "sandboxes" / sandbox_id, data_dir / "run" / sandbox_id)
        if path.exists()
    ]
    found += cgroup_dirs(sandbox_id)
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [f"mount {line}" for line in mounts if sandbox_id in line]
    found += [f"process {pid} names the sandbox" for pid in host_pids(sandbox_id)]
    found += [
        f"process {pid} of the sandbox"
        for pid, started in processes.items()
        if started is not None and start_time(pid) == started
    ]
    return found


def test_delete_leaves_nothing_on_the_host(
    server: Server, api: httpx.Client, running: Running
) -> None:
    """After DELETE of 3 sandboxes (each with files and a daemonized process) no sandbox
    or run dir, cgroup, mount, or process of theirs remains; cleanup is synchronous."""
    ids: list[str] = []
    processes: dict[str, dict[int, int | None]] = {}
    for _ in range(3):
        record, gw = running()
        run(
            gw,
            "echo x > /workspace/f && echo y > /tmp/f && "
            "setsid sleep 4243 </dev/null >/dev/null 2>&1 &",
        )
        ids.append(record["id"])
    for sandbox_id in ids:
        processes[sandbox_id] = sandbox_processes(sandbox_id)
        # Control: the scan finds a live sandbox (dirs, cgroups, its processes).
        found = leftovers(server.data_dir, sandbox_id, processes[sandbox_id])
        assert len(found) >= 5, found
        assert any("of the sandbox" in item for item in found)

    for sandbox_id in ids:
        assert api.delete(f"/sandbox/{sandbox_id}").status_code == 200
    left = {i: leftovers(server.data_dir, i, processes[i]) for i in ids}
    first_look = {i: items for i, items in left.items() if items}
    deadline = time.monotonic() + 10
    while any(left.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {i: leftovers(server.data_dir, i, processes[i]) for i in ids}
    assert not any(left.values()), left
    assert first_look == {}, f"cleanup finished only after DELETE returned: {first_look}"
