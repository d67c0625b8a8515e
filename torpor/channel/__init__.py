"""The host end of a sandbox's agent channel (asyncio), reached through the holder's socket.

`call()` runs one request/response operation; `open()` gives a `Stream` for operations
that move bytes (command output, file contents, stdin). Raw bytes are flow-controlled in
both directions: a reader that stops reading stops the sender, so a flood never piles up
in the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from torpor.agent import protocol as P


class ChannelClosed(Exception):
    """The channel to the sandbox's agent is gone (sandbox stopped, or holder died)."""


class AgentError(Exception):
    """The agent refused or failed an operation; `code` is the agent's stable error word."""

    def __init__(self, code: str, message: str, detail: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}


@dataclass
class Event:
    kind: str  # "stdout" | "stderr" | "msg" | "eof"
    data: bytes = b""
    msg: dict | None = None


def describe(op: Any, args: dict) -> str:
    """A stream in a few words, for messages that name what is open: `exec sleep 60`,
    `connect port 8001`, `fs_read /tmp/x`, `egress`."""
    words = [str(op)]
    if isinstance(args.get("argv"), list):
        words.append(" ".join(map(str, args["argv"]))[:60])
    for key in ("pid", "port", "path"):
        if key in args:
            words.append(f"{key} {args[key]}" if key != "path" else str(args[key])[:60])
    return " ".join(words)


class Stream:
    def __init__(self, chan: Channel, sid: int, what: str = ""):
        self.chan = chan
        self.sid = sid
        self.what = what  # what the stream carries, in a few words (`describe`)
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.result: Any = None
        self.error: dict | None = None
        self.done = asyncio.Event()
        self.send_window = P.WINDOW
        self._window = asyncio.Event()
        self._window.set()

    # --- from the agent ---------------------------------------------------------------
    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind == P.OUT:
            self.events.put_nowait(("stdout", payload))
        elif kind == P.EOF:  # a tunnel's half-close: the socket in the sandbox sent EOF
            self.events.put_nowait(("eof", None))
        elif kind == P.ERR:
            self.events.put_nowait(("stderr", payload))
        elif kind == P.MSG:
            self.events.put_nowait(("msg", json.loads(payload)))
        elif kind == P.CREDIT:
            self.send_window += P.parse_credit(payload)
            self._window.set()
        elif kind == P.CLOSE:
            body = json.loads(payload) if payload else {}
            self.result = body.get("result")
            self.error = body.get("error")
            self._finish()

    def _finish(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self._window.set()
            self.events.put_nowait(("close", None))

    def _lost(self) -> None:
        if not self.done.is_set():
            self.error = {"code": "channel_closed", "message": "the sandbox's channel closed"}
            self._finish()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            kind, payload = await self.events.get()
            if kind == "close":
                return
            if kind == "msg":
                yield Event("msg", msg=payload)
                continue
            if kind == "eof":
                yield Event("eof")
                continue
            # grant credit only as output is taken: a slow consumer slows the process
            self.chan._send(P.credit_frame(self.sid, len(payload)))
            yield Event(kind, data=payload)

    async def finish(self) -> Any:
        """Wait for the CLOSE frame; return the result or raise the agent's error."""
        await self.done.wait()
        if self.error is not None:
            raise AgentError(self.error.get("code", "error"), self.error.get("message", ""),
                             self.error)
        return self.result

    # --- towards the agent ------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.done.is_set():
                raise ChannelClosed("the stream closed while sending")
            if self.send_window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            n = min(len(view), self.send_window, P.CHUNK)
            self.send_window -= n
            self.chan._send(P.frame(P.IN, self.sid, bytes(view[:n])))
            view = view[n:]
            await self.chan.drain()

    async def send_eof(self) -> None:
        if not self.done.is_set():
            self.chan._send(P.frame(P.EOF, self.sid))
            await self.chan.drain()

    def reply(self, result: Any = None, error: dict | None = None) -> None:
        """Answer a stream the agent opened (DNS) with its CLOSE."""
        if not self.done.is_set():
            body = {"error": error} if error is not None else {"result": result}
            if not self.chan.closed.is_set():
                self.chan._send(P.jframe(P.CLOSE, self.sid, body))
            self.chan.streams.pop(self.sid, None)
            self.result, self.error = result, error
            self._finish()

    def abandon(self) -> None:
        """Stop caring about the stream: the agent stops following, processes keep running."""
        if not self.done.is_set():
            if not self.chan.closed.is_set():
                self.chan._send(P.frame(P.CLOSE, self.sid))
            self.chan.streams.pop(self.sid, None)
            self.error = {"code": "abandoned", "message": "stream abandoned"}
            self._finish()


class Channel:
    """`on_open(stream, request)`, when set, takes the streams the agent opens (egress,
    DNS); without it they are refused."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, Stream] = {}
        self._next = 1
        self.hello: dict | None = None
        self._hello = asyncio.Event()
        self.closed = asyncio.Event()
        self.last_frame_at = time.monotonic()
        self._task = asyncio.create_task(self._read_loop())
        self._pings: dict[bytes, asyncio.Future] = {}
        self.on_open: Callable[[Stream, dict], None] | None = None

    @classmethod
    async def connect(cls, socket_path: str) -> Channel:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=4 << 20)
        return cls(reader, writer)

    async def wait_ready(self, timeout: float) -> dict:
        """Wait for the agent's HELLO; it arrives once after start (buffered by the holder
        if nobody was connected). An adopted sandbox's agent is checked with a ping instead."""
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(self._hello.wait()), asyncio.ensure_future(self.closed.wait())],
            timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        if self.hello is None:
            if self.closed.is_set():
                raise ChannelClosed("the sandbox stopped before its agent was ready")
            raise TimeoutError(f"the agent did not start within {timeout:.0f}s")
        return self.hello

    async def ping(self, timeout: float = 5.0) -> float:
        token = str(time.monotonic_ns()).encode()
        fut = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        t0 = time.perf_counter()
        self._send(P.frame(P.PING, 0, token))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(token, None)
        return time.perf_counter() - t0

    async def _read_loop(self) -> None:
        fr = P.FrameReader()
        try:
            while True:
                data = await self.reader.read(P.CHUNK + P.HEADER_SIZE)
                if not data:
                    break
                fr.feed(data)
                self.last_frame_at = time.monotonic()
                for kind, sid, payload in fr.frames():
                    if sid == 0:
                        self._on_control(kind, payload)
                        continue
                    if kind == P.OPEN and sid % 2 == 0:
                        self._agent_open(sid, payload)
                        continue
                    st = self.streams.get(sid)
                    if st is None:
                        continue
                    st._on_frame(kind, payload)
                    if kind == P.CLOSE:
                        self.streams.pop(sid, None)
        except (OSError, P.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            for st in list(self.streams.values()):
                st._lost()
            self.streams.clear()
            for fut in self._pings.values():
                if not fut.done():
                    fut.set_exception(ChannelClosed("channel closed"))
            self.writer.close()

    def _agent_open(self, sid: int, payload: bytes) -> None:
        try:
            request = json.loads(payload)
        except ValueError:
            request = None
        st = Stream(self, sid, describe(request.get("op"), {})
                    if isinstance(request, dict) else "")
        self.streams[sid] = st
        if self.on_open is None or not isinstance(request, dict):
            st.reply(error={"code": "refused", "message": "the host takes no such stream"})
            return
        self.on_open(st, request)

    def _on_control(self, kind: int, payload: bytes) -> None:
        if kind == P.HELLO:
            self.hello = json.loads(payload)
            self._hello.set()
        elif kind == P.PONG:
            fut = self._pings.get(payload)
            if fut and not fut.done():
                fut.set_result(None)
        elif kind == P.PING:
            self._send(P.frame(P.PONG, 0, payload))

    def _send(self, data: bytes) -> None:
        if self.closed.is_set():
            raise ChannelClosed("the sandbox's channel is closed")
        self.writer.write(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise ChannelClosed(str(e)) from e

    def open(self, op: str, **args: Any) -> Stream:
        sid = self._next
        self._next += 2
        st = Stream(self, sid, describe(op, args))
        self.streams[sid] = st
        self._send(P.jframe(P.OPEN, sid, {"op": op, **args}))
        return st

    async def call(self, op: str, timeout: float | None = 60.0, **args: Any) -> Any:
        st = self.open(op, **args)
        try:
            return await asyncio.wait_for(st.finish(), timeout)
        except TimeoutError:
            st.abandon()
            raise

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
        self._task.cancel()
