"""Connecting into a sandbox's network namespace from the host (exposures).

`setns(CLONE_NEWNET)` applies to the calling thread only, and a socket keeps
the namespace it was made in; so each connection is made on a worker thread
that enters the sandbox's netns, connects, and goes back. A server bound to
127.0.0.1 inside a sandbox with network off is reachable this way.
"""

from __future__ import annotations

import ctypes
import os
import socket

CLONE_NEWNET = 0x40000000
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
