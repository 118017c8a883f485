"""Exposed ports: a host listener whose every connection is forwarded into a sandbox.

How a connection reaches the inside is the runtime's business (`Runtime.connect`);
the forwarder only listens and pumps bytes both ways.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import anyio
from anyio.abc import SocketStream, TaskStatus


class Forwarder:
    """Forwards every connection on a host port through `connect` (blocking, run on a
    worker thread; OSError when nothing listens inside)."""

    def __init__(
        self, connect: Callable[[], socket.socket], host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.connect = connect
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
                raw = await anyio.to_thread.run_sync(self.connect)
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
