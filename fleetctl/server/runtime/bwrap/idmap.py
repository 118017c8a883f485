"""A sandbox's own host ids, and idmapped mounts: a directory shown with its files' owners
changed, without touching them.

Each sandbox's user namespace maps its ids 0..ID_RANGE-1 to a host range of its own,
written by the server (root) while bwrap waits (`map_sandbox_ids`), as a container
runtime does with subordinate ids.

A checkpoint's files belong to the host range of the sandbox it was taken from. Another
sandbox's user namespace maps only its own range, so to it they would belong to nobody:
unwritable, and overlayfs could not copy them up. An idmapped mount of the layer, made
for each sandbox that stacks it, shows the owner range's files as the sandbox's own,
while the layer on disk stays shared and untouched (mount_setattr(2) with
MOUNT_ATTR_IDMAP, Linux 5.12+; overlayfs takes idmapped lower layers since 5.19).

    mount_idmapped(source, target, owner=S, as_uid=T)   # files of S+n appear as T+n's
    unmount(target)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen
from typing import Any

from fleetctl.server.runtime.base import ID_RANGE
from fleetctl.server.runtime.bwrap.handle import kill_pid

# syscall numbers (x86_64 and aarch64 share these, from the generic table)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
MNT_DETACH = 2
#: util-linux's unshare and the shell it runs (host tools, absolute paths).
UNSHARE = shutil.which("unshare", path="/usr/bin:/bin") or "/usr/bin/unshare"
SH = "/bin/sh"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = (("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64))  # fmt: skip


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def map_sandbox_ids(pid: int, base: int, nsenter: str) -> None:
    """Map the ids of the new user namespace of `pid` (bwrap's sandbox, waiting on its
    --userns-block-fd) to the host range from `base`, and let nothing in it make another
    user namespace: its user.max_user_namespaces is set to 0 from inside (what bwrap's
    --disable-userns does, which cannot be combined with ids mapped from outside)."""
    for kind in ("uid_map", "gid_map"):
        Path(f"/proc/{pid}/{kind}").write_text(f"0 {base} {ID_RANGE}\n")
    subprocess.run(
        [nsenter, f"--user=/proc/{pid}/ns/user", SH, "-c",
         "echo 0 > /proc/sys/user/max_user_namespaces"],
        env={"PATH": "/usr/bin:/bin"}, check=True, capture_output=True,
    )  # fmt: skip


def _userns(owner: int, as_uid: int) -> int:
    """An fd of a new user namespace mapping the ids from `owner` (inside) to those from
    `as_uid` (outside). `unshare --user` makes it and waits (on its stdin) until the maps are
    written and the fd is open: spawned, not forked, so its cost does not grow with the
    server's memory, and it inherits no descriptor of a concurrent call."""
    helper = subprocess.Popen(
        [UNSHARE, "--user", "--", SH, "-c", "echo R; read _"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert helper.stdin is not None
    assert helper.stdout is not None
    try:
        if helper.stdout.read(2) != b"R\n":
            raise OSError("could not make a user namespace for an idmapped mount")
        for kind in ("uid_map", "gid_map"):
            Path(f"/proc/{helper.pid}/{kind}").write_text(f"{owner} {as_uid} {ID_RANGE}\n")
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.stdin.close()
        helper.stdout.close()
        helper.wait()


def mount_idmapped(source: Path, target: Path, *, owner: int, as_uid: int) -> None:
    """Mount `source` at `target` (an existing empty directory) so that files of uid and
    gid `owner` + n appear as `as_uid` + n's (n below ID_RANGE). Root only."""
    userns = _userns(owner, as_uid)
    try:
        tree = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, str(source).encode(),
                                    OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
                      "open_tree")  # fmt: skip
        try:
            attr = MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns)
            flags = AT_EMPTY_PATH | AT_RECURSIVE
            size = ctypes.sizeof(attr)
            _check(_libc.syscall(SYS_MOUNT_SETATTR, tree, b"", flags, ctypes.byref(attr), size),
                   "mount_setattr")  # fmt: skip
            _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, str(target).encode(),
                                 MOVE_MOUNT_F_EMPTY_PATH), "move_mount")  # fmt: skip
        finally:
            os.close(tree)
    finally:
        os.close(userns)


def unmount(target: Path) -> None:
    """Detach the mount at `target` (nothing mounted there is fine)."""
    with contextlib.suppress(OSError):
        _check(_libc.umount2(str(target).encode(), MNT_DETACH), "umount2")


def mounts_under(top: Path) -> list[Path]:
    """Mount points at or below `top` in this mount namespace, deepest first."""
    prefix = str(top.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # octal escapes, e.g. \\040
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unblock(
    info: dict[str, Any],
    uid: int,
    child: Popen[bytes],
    block_w: int,
    nsenter: str,
    log: Callable[[str], None],
) -> None:
    """Map the ids of the sandbox bwrap made (`info`: empty when bwrap ended), then let
    it go on (it waits on the other end of `block_w`); on failure, kill it first."""
    try:
        if info:
            map_sandbox_ids(int(info["child-pid"]), uid, nsenter)
            os.write(block_w, b"1")
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        log(f"[fleetctl] cannot map the sandbox's ids: {exc}\n")
        kill_pid(int(info["child-pid"]))  # before it is unblocked, unmapped
        child.kill()
    finally:
        os.close(block_w)
