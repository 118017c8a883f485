"""Exposed ports: a host listener that connects inside a sandbox's network namespace.

`setns(CLONE_NEWNET)` applies to the calling thread only, and a socket keeps
the namespace it was made in; so each upstream socket is created on a worker
thread that enters the sandbox's netns, connects, and returns. A server bound
to 127.0.0.1 inside a sandbox with network off is reachable this way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket

import anyio
from anyio.abc import SocketStream, TaskStatus

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


class Forwarder:
    """Forwards every connection on a host port to a port inside one sandbox."""

    def __init__(
        self, netns_pid: int, port: int, host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.netns_pid = netns_pid
        self.port = port
        self.host = host
        self.listen_port = listen_port

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen (on `listen_port`, or an ephemeral one: reported through task_status)
        until cancelled."""
        listener = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self.listen_port
        )
        async with listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(port)
            await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            try:
                raw = await anyio.to_thread.run_sync(connect_in_netns, self.netns_pid, self.port)
            except OSError:
                return  # nothing listens inside (yet): the client sees the connection close
            raw.setblocking(False)
            upstream = await SocketStream.from_socket(raw)
            async with upstream, anyio.create_task_group() as group:
                group.start_soon(_pump, client, upstream)
                group.start_soon(_pump, upstream, client)


async def _pump(source: SocketStream, sink: SocketStream) -> None:
    with contextlib.suppress(
        anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError
    ):
        async for chunk in source:
            await sink.send(chunk)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await sink.send_eof()
