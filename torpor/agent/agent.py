"""The in-sandbox agent: the first process of every sandbox.

Stdlib only. It runs from a read-only bundle the host mounts at /.torpor (the host's
interpreter started through the host's dynamic loader), so it works in any template and
sandboxed code cannot change it. It speaks the frames of `protocol.py` on its stdin and
stdout, which are the container's stdio: they survive checkpoint and restore.

It runs as root inside the sandbox (gVisor's root, not the host's) and starts user commands
as `user` unless asked otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fsops  # noqa: E402
import protocol as P  # noqa: E402
from procs import ProcessTable  # noqa: E402

OpError = P.OpError


class Stream:
    """One stream of the channel, as the agent sees it."""

    def __init__(self, agent: "Agent", sid: int):
        self.agent = agent
        self.sid = sid
        self.send_window = P.WINDOW
        self._window_event = asyncio.Event()
        self.inbox: asyncio.Queue = asyncio.Queue()  # IN payloads, None at EOF
        self.closed = False
        self.task: asyncio.Task | None = None

    async def send(self, kind: int, data: bytes) -> None:
        """Send OUT/ERR bytes, waiting for credit and for the host pipe to drain."""
        view = memoryview(data)
        while view and not self.closed:
            while self.send_window <= 0 and not self.closed:
                self._window_event.clear()
                await self._window_event.wait()
            if self.closed:
                return
            n = min(len(view), self.send_window, P.CHUNK)
            self.send_window -= n
            await self.agent.write(P.frame(kind, self.sid, bytes(view[:n])))
            view = view[n:]

    def grant(self, n: int) -> None:
        self.send_window += n
        self._window_event.set()

    async def msg(self, obj: dict) -> None:
        if not self.closed:
            await self.agent.write(P.jframe(P.MSG, self.sid, obj))

    async def close(self, result=None, error: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self._window_event.set()
        body = {"error": error} if error is not None else {"result": result}
        self.agent.streams.pop(self.sid, None)
        await self.agent.write(P.jframe(P.CLOSE, self.sid, body))

    def abort(self) -> None:
        """The host side is gone: stop without a CLOSE frame."""
        self.closed = True
        self._window_event.set()
        self.inbox.put_nowait(None)
        if self.task and not self.task.done():
            self.task.cancel()

    async def read_in(self):
        """Yield IN payloads until EOF, granting credit as they are consumed."""
        while True:
            data = await self.inbox.get()
            if data is None:
                return
            yield data
            await self.agent.write(P.credit_frame(self.sid, len(data)))


class Agent:
    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self.procs = ProcessTable(self)
        self.base_env: dict[str, str] = {}
        self._writer: asyncio.WriteTransport | None = None
        self._drained = asyncio.Event()
        self._drained.set()

    # --- output -------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        if self._writer.get_write_buffer_size() > 4 * P.CHUNK:
            self._drained.clear()
            await self._drained.wait()

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    # --- input --------------------------------------------------------------------------
    def on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == P.OPEN:
            st = Stream(self, sid)
            self.streams[sid] = st
            st.task = asyncio.ensure_future(self.run_op(st, payload))
        elif kind == P.IN:
            st = self.streams.get(sid)
            if st:
                st.inbox.put_nowait(payload)
        elif kind == P.EOF:
            st = self.streams.get(sid)
            if st:
                st.inbox.put_nowait(None)
        elif kind == P.CREDIT:
            st = self.streams.get(sid)
            if st:
                st.grant(P.parse_credit(payload))
        elif kind == P.CLOSE:
            # the host abandons the stream (client went away): stop following, keep processes
            st = self.streams.pop(sid, None)
            if st:
                st.abort()
        elif kind == P.RESET:
            for st in list(self.streams.values()):
                st.abort()
            self.streams.clear()
        elif kind == P.PING:
            self._writer.write(P.frame(P.PONG, sid, payload))

    async def run_op(self, st: Stream, payload: bytes) -> None:
        try:
            req = json.loads(payload)
            op = req.pop("op")
            handler = HANDLERS.get(op)
            if handler is None:
                raise OpError("unknown_op", f"unknown operation {op!r}")
            result = await handler(self, st, **req)
            await st.close(result)
        except asyncio.CancelledError:
            st.closed = True
            self.streams.pop(st.sid, None)
        except OpError as e:
            await st.close(error=e.to_wire())
        except TypeError as e:
            await st.close(error={"code": "bad_request", "message": str(e)})
        except OSError as e:
            code = errno.errorcode.get(e.errno or 0, "EIO")
            await st.close(error={"code": "os_error", "errno": code, "message": str(e)})
        except Exception as e:  # the agent must survive any single operation
            await st.close(error={"code": "internal", "message": f"{type(e).__name__}: {e}"})


# --- operations ---------------------------------------------------------------------------
async def op_ping(agent: Agent, st: Stream, **_):
    return {"pid": os.getpid()}


async def op_configure(agent: Agent, st: Stream, env: dict | None = None):
    if env is not None:
        agent.base_env = {str(k): str(v) for k, v in env.items()}
    return {"env": agent.base_env}


async def op_exec(agent: Agent, st: Stream, argv, env=None, cwd=None, user="user",
                  stdin=False, timeout=None, background=False, tag=None, follow=True):
    proc = agent.procs.start(argv, env or {}, cwd, user, stdin, timeout, tag)
    if background:
        return proc.info()
    await st.msg({"event": "start", "pid": proc.pid})
    if stdin:
        asyncio.ensure_future(proc.feed_stdin(st))
    await proc.follow(st, offset=0, blocking=True)
    return proc.info()


async def op_proc_list(agent: Agent, st: Stream, **_):
    return [p.info() for p in agent.procs.all()]


async def op_proc_info(agent: Agent, st: Stream, pid: int):
    return agent.procs.get(pid).info()


async def op_proc_follow(agent: Agent, st: Stream, pid: int, offset: int | None = None,
                         follow: bool = True):
    proc = agent.procs.get(pid)
    await proc.follow(st, offset=offset, blocking=False, live=follow)
    return proc.info()


async def op_proc_stdin(agent: Agent, st: Stream, pid: int, data: str | None = None,
                        eof: bool = False):
    proc = agent.procs.get(pid)
    if data is not None:
        await proc.write_stdin(data.encode())
    else:
        async for chunk in st.read_in():
            await proc.write_stdin(chunk)
    if eof:
        proc.close_stdin()
    return {"pid": pid}


async def op_proc_signal(agent: Agent, st: Stream, pid: int, signal: str = "SIGTERM"):
    agent.procs.get(pid).send_signal(signal)
    return {"pid": pid}


async def op_proc_wait(agent: Agent, st: Stream, pid: int):
    proc = agent.procs.get(pid)
    await proc.exited.wait()
    return proc.info()


async def op_oom_kill(agent: Agent, st: Stream, **_):
    return agent.procs.kill_largest()


HANDLERS = {
    "ping": op_ping,
    "configure": op_configure,
    "exec": op_exec,
    "proc_list": op_proc_list,
    "proc_info": op_proc_info,
    "proc_follow": op_proc_follow,
    "proc_stdin": op_proc_stdin,
    "proc_signal": op_proc_signal,
    "proc_wait": op_proc_wait,
    "oom_kill": op_oom_kill,
    **fsops.HANDLERS,
}


# --- main loop ----------------------------------------------------------------------------
class _InProto(asyncio.Protocol):
    def __init__(self, agent: Agent, done: asyncio.Future):
        self.agent = agent
        self.reader = P.FrameReader()
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        for kind, sid, payload in self.reader.frames():
            self.agent.on_frame(kind, sid, payload)

    def eof_received(self):
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _OutProto(asyncio.BaseProtocol):
    def __init__(self, agent: Agent):
        self.agent = agent

    def pause_writing(self) -> None:
        self.agent.pause_writing()

    def resume_writing(self) -> None:
        self.agent.resume_writing()


async def main() -> None:
    loop = asyncio.get_running_loop()
    agent = Agent()
    done = loop.create_future()
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    # keep 0/1/2 away from children and stray writes: point them at /dev/null
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    transport, _ = await loop.connect_write_pipe(lambda: _OutProto(agent), out)
    transport.set_write_buffer_limits(high=8 * P.CHUNK, low=2 * P.CHUNK)
    agent._writer = transport
    await loop.connect_read_pipe(lambda: _InProto(agent, done), inp)
    loop.add_signal_handler(signal.SIGCHLD, agent.procs.reap)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    transport.write(P.jframe(P.HELLO, 0, {"version": P.VERSION, "pid": os.getpid()}))
    await done
    # stdin closed: the host side is gone for good (a restore hands us new pipes instead)


if __name__ == "__main__":
    asyncio.run(main())
