"""Network namespaces from the host: connecting into a sandbox's (exposures), making them
ahead of the sandboxes that take them (spares), and naming them.

`setns(CLONE_NEWNET)` applies to the calling thread only, and a socket keeps
the namespace it was made in; so each connection is made on a worker thread
that enters the sandbox's netns, connects, and goes back. A server bound to
127.0.0.1 inside a sandbox with network off is reachable this way.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 2
CONNECT_TIMEOUT_S = 5.0
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int) -> None:
    """setns(2) (os.setns arrives only in Python 3.12)."""
    if _libc.setns(fd, nstype) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def connect_in_netns(netns_pid: int, port: int) -> socket.socket:
    """Connect to 127.0.0.1:`port` inside the network namespace of `netns_pid` (blocking)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY)
    try:
        setns(target, CLONE_NEWNET)
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
        finally:
            setns(own, CLONE_NEWNET)  # the worker thread goes back to the pool clean
    finally:
        os.close(own)
        os.close(target)


def made_netns(inside: Callable[[], object]) -> int:
    """A new network namespace, held by the descriptor returned (no name: it goes when the
    descriptor is closed, or with this process). `inside` runs in it first, on this thread
    (with what it forks), which then goes back to its own. Never on the main thread: its
    namespace stands for the host's (`ip ... netns PID`)."""
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError("a namespace is made on a worker thread")
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"unshare: {os.strerror(errno)}")
        try:
            made = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                inside()
            except BaseException:
                os.close(made)
                raise
        finally:
            setns(own, CLONE_NEWNET)
    finally:
        os.close(own)
    return made


def name_netns(fd: int, path: Path) -> None:
    """Name the namespace `fd` holds at `path` (in /run/netns: what `ip netns` lists), as
    `ip netns attach` does: a bind mount that keeps it after `fd` is closed."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o444))
    if _libc.mount(f"/proc/self/fd/{fd}".encode(), str(path).encode(), None, MS_BIND, None) != 0:
        errno = ctypes.get_errno()
        path.unlink(missing_ok=True)
        raise OSError(errno, f"cannot name a network namespace {path}: {os.strerror(errno)}")


def unname_netns(path: Path) -> None:
    """Remove a namespace's name, as `ip netns delete` does (the kernel removes the
    namespace, and its links, once nothing is in it); nothing when it has none."""
    _libc.umount2(str(path).encode(), MNT_DETACH)
    path.unlink(missing_ok=True)


class Spare(NamedTuple):
    """A namespace made ahead: its slot (host link, addresses, route in place) and the
    descriptor that holds it."""

    slot: int
    fd: int


class Spares:
    """Namespaces made ahead (by `make`, given a preferred slot), so that a sandbox's start
    only names one and gives it rules; made from the first take on (a server that starts
    no networked sandbox makes none). They have no name: the kernel removes them, with
    their links, when the server exits however it exits, so a crash leaves nothing."""

    def __init__(self, make: Callable[[int], Spare], keep: int) -> None:
        self._make, self._keep = make, keep
        self._ready: deque[Spare] = deque()
        self._lock = threading.Lock()
        self._filling = self._closed = False
        self._filler = futures.ThreadPoolExecutor(1, thread_name_prefix="netns-spares")
        self._seq = itertools.count(os.getpid())

    def take(self, seq: int) -> Spare:
        """A spare, or one made now (on this worker thread) when none is ready."""
        with self._lock:
            spare = self._ready.popleft() if self._ready else None
        self._fill_soon()
        return spare or self._make(seq)

    def close(self) -> None:
        """Drop the spares (and stop making them)."""
        with self._lock:
            self._closed = True
        self._filler.shutdown(wait=True, cancel_futures=True)
        while self._ready:
            os.close(self._ready.popleft().fd)

    def _fill_soon(self) -> None:
        with self._lock:
            if self._filling or self._closed:
                return
            self._filling = True
        self._filler.submit(self._fill)

    def _fill(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self._keep:
                        return
                try:
                    spare = self._make(next(self._seq))
                except (OSError, RuntimeError):  # the next start makes its own, and says why
                    return
                with self._lock:
                    self._ready.append(spare)
        finally:
            with self._lock:
                self._filling = False
