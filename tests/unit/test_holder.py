"""The holder's relay towards the server, on real sockets: frames that meet a full socket
wait for it to drain, and then leave, without another event having to come by.

(Before, a send that met a full socket returned without watching it for writing: a file
download stalled at random, about once in 100-200 reads of 3 MiB under load, until the
next request to that sandbox woke the relay.)"""

from __future__ import annotations

import os
import selectors
import socket

from torpor.agent import protocol as P
from torpor.runtime.holder import Holder


def fill(sock: socket.socket) -> int:
    """Write into sock until it takes no more; returns how much it took."""
    n, junk = 0, b"\0" * 65536
    while True:
        try:
            n += sock.send(junk)
        except BlockingIOError:
            return n


def test_frames_meeting_a_full_socket_leave_once_it_drains():
    server_end, holder_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    h = Holder({})
    try:
        holder_end.setblocking(False)
        h.conn = holder_end
        h.sel.register(holder_end, selectors.EVENT_READ, "conn")  # as accept() leaves it
        stuffed = fill(holder_end)
        frame = P.frame(P.OUT, 7, b"the last bytes of a download")
        h.to_server += frame
        h.flush_server()  # the socket is full: nothing leaves yet
        assert bytes(h.to_server) == frame
        key = h.sel.get_key(holder_end)
        assert key.events & selectors.EVENT_WRITE, "the full socket must be watched for writing"

        # the server reads what was stuffed; the holder's loop, as in Holder.run, does the rest
        server_end.settimeout(5)
        got = b""
        while len(got) < stuffed:
            got += server_end.recv(1 << 20)
        for _ in range(10):
            for key, events in h.sel.select(timeout=1):
                if key.data == "conn" and events & selectors.EVENT_WRITE:
                    h.flush_server()
            if not h.to_server:
                break
        assert not h.to_server
        assert server_end.recv(1 << 20) == frame
        assert not h.sel.get_key(holder_end).events & selectors.EVENT_WRITE  # nothing left
    finally:
        h.sel.close()
        server_end.close()
        holder_end.close()


def test_events_of_a_connection_dropped_in_the_same_batch_are_ignored():
    """A server SIGKILLed while output streams: relaying the agent's output meets the dead
    socket and drops it; the same select() batch still holds that socket's own event. The
    holder must skip it, not die (the sandbox dies with it)."""
    server_end, holder_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    to_agent_r, to_agent_w = os.pipe()
    h = Holder({})
    try:
        h.in_w = to_agent_w
        holder_end.setblocking(False)
        h.conn = holder_end
        h.sel.register(holder_end, selectors.EVENT_READ, "conn")
        server_end.close()  # the server died
        h.to_server += P.frame(P.OUT, 7, b"output on its way")
        h.flush_server()  # the send fails: the connection is dropped
        assert h.conn is None
        h.on_conn(holder_end, selectors.EVENT_READ | selectors.EVENT_WRITE)  # stale event
        assert h.conn is None
        assert os.read(to_agent_r, 100) == P.frame(P.RESET, 0)  # the agent was told
    finally:
        h.sel.close()
        holder_end.close()
        os.close(to_agent_r)
        os.close(to_agent_w)
