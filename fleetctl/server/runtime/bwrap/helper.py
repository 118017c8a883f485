"""The warm exec helper: a process that joined one sandbox once and starts its commands.

Run by the server as `python -I -S helper.py SOCKET INIT_PID KEEP_CAPS IDLE_S CGROUP_PROCS...`
(standard library only, and few modules of it: it runs beside no site-packages, and
after it joins the sandbox's mount namespace no host file is visible to import). It
writes itself into the sandbox's cgroups, joins every namespace of the sandbox's init
process (the user namespace last, as nsenter does: root outside can enter the others
first), becomes the sandbox's root with only KEEP_CAPS in its bounding set and
no_new_privs (what every command it starts inherits), says `ready` on its socket, and
serves requests until the server closes it, or until it has had nothing to do for
IDLE_S seconds.

A request is one SOCK_SEQPACKET message, `UID GID GROUPS ARGC\\n` then the arguments
and the environment (`NAME=value`), each ended by a NUL, with four descriptors: the
command's stdin, stdout and stderr, and a reply socket. The command starts in a session
of its own (in the sandbox's pid namespace) as the given ids: a root command by
posix_spawn (vfork), another user's by a fork that switches ids, a millisecond more.
The reply socket gets `pid N` (the command's host pid) and later `code C` (its exit
code, -signal when killed), or `error WHY`; the server closing it kills the command
(see `serve`). Output never passes through here: the server reads the command's pipes
itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import sys

#: How long a helper with nothing to do stays (what the server passes).
IDLE_S = 30.0
#: A request's size limit (the server sends larger ones down its cold path).
MAX_REQUEST = 256 * 1024
NAMESPACES = ("ipc", "uts", "net", "pid", "cgroup", "mnt", "user")
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
#: What Python ignores and a command must not inherit ignored.
DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
LIBC = ctypes.CDLL(None, use_errno=True)


class Request:
    """A parsed request: ids, argv and environment of the command to start, and whether
    it is left running when the server hangs up (`detached`: a job)."""

    def __init__(self, data: bytes) -> None:
        header, _, rest = data.partition(b"\n")
        uid, gid, groups, argc, detached = header.split(b" ")
        self.uid, self.gid, count = int(uid), int(gid), int(argc)
        self.detached = detached == b"1"
        self.groups = [int(g) for g in groups.split(b",") if g]
        items = rest.split(b"\0")[:-1]
        self.argv = items[:count]
        self.env = dict(item.split(b"=", 1) for item in items[count:])
        if not self.argv:
            raise ValueError("no command")


def encode(
    uid: int,
    gid: int,
    groups: list[int],
    argv: list[str],
    env: dict[str, str],
    *,
    detached: bool = False,
) -> bytes:
    """A request, as the server sends it (ValueError when a string holds a NUL)."""
    items = [*argv, *(f"{k}={v}" for k, v in env.items())]
    if any("\0" in item for item in items):
        raise ValueError("a NUL in the command or its environment")
    header = f"{uid} {gid} {','.join(map(str, groups))} {len(argv)} {int(detached)}\n"
    return (header + "".join(f"{item}\0" for item in items)).encode()


def check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def join(init_pid: int, procs_files: list[str], keep: set[int]) -> None:
    """Enter the sandbox's cgroups and namespaces (never to be left again) as its root."""
    for procs in procs_files:
        with open(procs, "w") as joined:
            joined.write(str(os.getpid()))
    with open("/proc/sys/kernel/cap_last_cap") as last:
        drop = [cap for cap in range(int(last.read()) + 1) if cap not in keep]
    fds = [os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY) for name in NAMESPACES]
    for name, fd in zip(NAMESPACES, fds, strict=True):
        check(LIBC.setns(fd, 0), f"setns {name}")
        os.close(fd)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    for cap in drop:
        check(LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop a capability")
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir("/")


def start(request: Request, fds: list[int]) -> int:
    """Start the command with `fds` as its stdin, stdout and stderr: its pid."""
    if request.uid == request.gid == 0 and not request.groups:
        moves = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds[:3])]
        return os.posix_spawn(b"/bin/sh", request.argv, request.env, file_actions=moves,
                              setsid=True, setsigdef=DEFAULT_SIGNALS)  # fmt: skip
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return
        try:
            os.setsid()
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
            for number in DEFAULT_SIGNALS:
                signal.signal(number, signal.SIG_DFL)
            os.setgroups(request.groups)
            os.setresgid(request.gid, request.gid, request.gid)
            os.setresuid(request.uid, request.uid, request.uid)
            os.execve(b"/bin/sh", request.argv, request.env)
        except BaseException as exc:
            os.write(2, f"fleetctl: cannot run the command: {exc}\n".encode())
        os._exit(127)
    return pid


def reply(sock: socket.socket, message: str) -> None:
    with contextlib.suppress(OSError):  # the server gave up on it (a cancelled request)
        sock.send(message.encode())


def serve(control: socket.socket, idle_s: float) -> None:
    """Every descriptor here is close-on-exec: a command gets only its own three. The
    server hanging up a command's reply socket (a timeout, a cancelled request) kills
    the command's process group here, before it is reaped (so never a reused pid's),
    unless the request was `detached` (a job left running whatever the server does)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    running: dict[int, socket.socket] = {}
    watched: dict[int, int] = {}  # reply socket fd -> pid of its command
    while True:
        listen = [control.fileno(), wake_r, *watched]
        readable, _, _ = select.select(listen, [], [], idle_s)
        if not readable and not running:
            return
        for fd in [f for f in readable if f in watched]:  # hung up
            with contextlib.suppress(OSError):
                os.killpg(watched.pop(fd), signal.SIGKILL)
        if wake_r in readable:
            os.read(wake_r, 4096)
            while running:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                if pid in running:
                    answer = running.pop(pid)
                    watched.pop(answer.fileno(), None)
                    reply(answer, f"code {os.waitstatus_to_exitcode(status)}")
                    answer.close()
        if control.fileno() in readable and not handle(control, running, watched):
            return  # the server is gone; commands still running keep running


def handle(
    control: socket.socket, running: dict[int, socket.socket], watched: dict[int, int]
) -> bool:
    """Start the request waiting on `control`; False when the server closed it."""
    data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 4)
    if not data:
        return False
    for fd in fds:
        os.set_inheritable(fd, False)
    if len(fds) == 4:
        answer = socket.socket(fileno=fds[3])
        answer.setblocking(False)
        try:
            request = Request(data)
            pid = start(request, fds)
        except (ValueError, OSError) as exc:
            reply(answer, f"error {exc}")
            answer.close()
        else:
            running[pid] = answer
            if not request.detached:
                watched[answer.fileno()] = pid
            reply(answer, f"pid {pid}")
    for fd in fds[:3] if len(fds) == 4 else fds:
        os.close(fd)
    return True


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    control.set_inheritable(False)
    try:
        join(int(sys.argv[2]), sys.argv[5:], {int(c) for c in sys.argv[3].split(",") if c})
    except OSError as exc:
        control.send(f"error {exc}".encode())
        return
    control.send(b"ready")
    serve(control, float(sys.argv[4]))


if __name__ == "__main__":
    main()
