"""A channel stream that carries a TCP connection, seen by host code as a plain socket.

The egress proxy and the preview gateway speak HTTP, TLS and SOCKS with asyncio's streams
(and h11, ssl); they should not know about frames. `socket_for(stream)` gives one end of a
socketpair and moves bytes between the other end and the stream: OUT frames into the
socket, socket bytes out as IN frames (with the channel's flow control both ways), EOF as
a half-close either way. It ends when both directions are done or either side goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from torpor.agent import protocol as P
from torpor.channel import ChannelClosed, Stream

READ_SIZE = P.CHUNK


async def socket_for(stream: Stream, on_bytes=None) -> socket.socket:
    """The host end of a tunnel: use it with `asyncio.open_connection(sock=...)`.
    `on_bytes(n)` is called as bytes move either way (activity)."""
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    task = asyncio.create_task(_carry(stream, ours, on_bytes))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return theirs


_TASKS: set[asyncio.Task] = set()  # keep the carriers referenced while they run


async def _carry(stream: Stream, sock: socket.socket, on_bytes) -> None:
    loop = asyncio.get_running_loop()

    async def to_socket() -> None:
        # OUT frames are granted credit only as they are written: a slow reader on the
        # host side slows the program in the sandbox, nothing piles up here
        async for ev in stream:
            if ev.kind == "stdout" or ev.kind == "stderr":
                await loop.sock_sendall(sock, ev.data)
                if on_bytes:
                    on_bytes(len(ev.data))
            elif ev.kind == "eof":
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def from_socket() -> None:
        while True:
            data = await loop.sock_recv(sock, READ_SIZE)
            if not data:
                await stream.send_eof()
                return
            await stream.send(data)
            if on_bytes:
                on_bytes(len(data))

    down = asyncio.create_task(to_socket())
    up = asyncio.create_task(from_socket())
    try:
        # both directions end normally, or the first failure (channel gone, socket reset)
        # ends both
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in (down, up):
            if not t.done():
                t.cancel()
        for t in (down, up):
            with contextlib.suppress(asyncio.CancelledError, OSError, ChannelClosed,
                                     ConnectionError):
                await t
        # stop the sandbox's side too: a stream still open after we are gone is a leak
        stream.abandon()
        sock.close()
