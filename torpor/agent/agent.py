"""The in-sandbox agent: the first process of every sandbox.

Stdlib only. It runs from a read-only bundle the host mounts at /.torpor (the host's
interpreter started through the host's dynamic loader), so it works in any template and
sandboxed code cannot change it. It speaks the frames of `protocol.py` on its stdin and
stdout, which are the container's stdio: they survive checkpoint and restore.

It runs as root inside the sandbox (gVisor's root, not the host's) and starts user commands
as `user` unless asked otherwise.

Start-up time is part of every sandbox's creation, and inside gVisor on the ptrace platform
each page fault is expensive: the agent imports only small modules (its own event loop,
`miniloop`, instead of asyncio; the C half of json instead of json). Keep it that way:
anything heavy must be imported lazily, where it is needed.
"""

from __future__ import annotations

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fsops
import miniloop
import netops
import protocol as P
import signames
from procs import ProcessTable

OpError = P.OpError
CancelledError = miniloop.CancelledError

# Bytes waiting for the host pipe past which writers wait, and below which they go on.
OUT_HIGH = 4 * P.CHUNK
OUT_LOW = 2 * P.CHUNK


class Output:
    """The agent's end of the channel towards the host (its stdout, non-blocking).

    Frames queue here and leave once per loop iteration, just before the loop blocks: the
    frames one wakeup produces (a MSG, a chunk of output, a CLOSE) cost one write() syscall.
    """

    def __init__(self, loop: miniloop.Loop, fd: int):
        self.loop = loop
        self.fd = fd
        self.buf = bytearray()
        self.drained = miniloop.Event()
        self.drained.set()
        self._watching = False  # waiting for the pipe to take more
        loop.add_idle_hook(self.flush)

    def write(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > OUT_HIGH:
            self.drained.clear()

    def flush(self) -> None:
        if not self.buf:
            return
        try:
            n = os.write(self.fd, self.buf)
        except BlockingIOError:
            n = 0
        except OSError:
            # the host end is gone (EPIPE): nobody will read these frames. The agent lives
            # on: a restore hands it a new pipe on the same descriptor.
            n = len(self.buf)
        if n:
            del self.buf[:n]
        if self.buf and not self._watching:
            self.loop.add_writer(self.fd, self.flush)
            self._watching = True
        elif not self.buf and self._watching:
            self.loop.remove_writer(self.fd)
            self._watching = False
        if len(self.buf) <= OUT_LOW:
            self.drained.set()

    def rearm(self) -> None:
        """Register again with the loop (see `serve`), and try to write at once."""
        if self._watching:
            self.loop.remove_writer(self.fd)
            self._watching = False
        self.flush()


class Stream:
    """One stream of the channel, as the agent sees it."""

    def __init__(self, agent: Agent, sid: int):
        self.agent = agent
        self.sid = sid
        self.send_window = P.WINDOW
        self._window_event = miniloop.Event()
        self.inbox = miniloop.Queue()  # IN payloads, None at EOF
        self.closed = False
        self.task: miniloop.Task | None = None
        self._reply: miniloop.Future | None = None  # a stream the agent opened, waiting

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
        self.agent.streams.pop(self.sid, None)
        self._window_event.set()
        self.inbox.put_nowait(None)
        if self.task and not self.task.done():
            self.task.cancel()

    async def reply(self) -> dict:
        """For a stream the agent opened: wait for the host's CLOSE and return its body."""
        self._reply = self.agent.loop.create_future()
        return await self._reply

    def on_close(self, payload: bytes) -> None:
        if self._reply is not None and not self._reply.done():
            self.closed = True
            try:
                self._reply.set_result(P.loads(payload) if payload else {})
            except ValueError:
                self._reply.set_result({})
        else:
            self.abort()

    async def read_in(self):
        """Yield IN payloads until EOF, granting credit as they are consumed."""
        while True:
            data = await self.inbox.get()
            if data is None:
                return
            yield data
            await self.agent.write(P.credit_frame(self.sid, len(data)))


class Agent:
    def __init__(self, loop: miniloop.Loop, out_fd: int) -> None:
        self.loop = loop
        self.streams: dict[int, Stream] = {}
        self.procs = ProcessTable(self)
        self.base_env: dict[str, str] = {}
        self.env_file_error: str | None = None  # why envfile.ENV_FILE is stale
        self.out = Output(loop, out_fd)
        self.egress = netops.Egress(self)
        self._next_sid = 2  # streams the agent opens have even ids

    def open_stream(self, request: dict) -> Stream:
        """Open a stream towards the host (egress, DNS); the OPEN frame leaves at once."""
        sid = self._next_sid
        self._next_sid = sid + 2 if sid < 0xFFFFFFF0 else 2
        st = Stream(self, sid)
        self.streams[sid] = st
        self.out.write(P.jframe(P.OPEN, sid, request))
        return st

    async def write(self, data: bytes) -> None:
        self.out.write(data)
        if not self.out.drained.is_set():
            await self.out.drained.wait()

    # --- input --------------------------------------------------------------------------
    def on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == P.OPEN:
            st = Stream(self, sid)
            self.streams[sid] = st
            # run the operation up to its first wait right now: most answer without waiting
            st.task = self.loop.create_task(self.run_op(st, payload), eager=True)
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
            # the host abandons the stream (client went away): stop following, keep processes;
            # or answers a stream the agent opened
            st = self.streams.pop(sid, None)
            if st:
                st.on_close(payload)
        elif kind == P.RESET:
            for st in list(self.streams.values()):
                st.abort()
            self.streams.clear()
        elif kind == P.PING:
            self.out.write(P.frame(P.PONG, sid, payload))

    async def run_op(self, st: Stream, payload: bytes) -> None:
        try:
            req = P.loads(payload)
            op = req.pop("op")
            handler = HANDLERS.get(op)
            if handler is None:
                raise OpError("unknown_op", f"unknown operation {op!r}")
            result = await handler(self, st, **req)
            await st.close(result)
        except CancelledError:
            st.closed = True
            self.streams.pop(st.sid, None)
        except OpError as e:
            await st.close(error=e.to_wire())
        except (TypeError, ValueError) as e:
            # a request whose values the OS refuses (a NUL byte in a name, text that is not
            # UTF-8): the caller's mistake, told as such, never an internal error
            await st.close(error={"code": "bad_request", "message": str(e)})
        except OSError as e:
            code = errno.errorcode.get(e.errno or 0, "EIO")
            await st.close(error={"code": "os_error", "errno": code, "message": str(e)})
        except Exception as e:  # noqa: BLE001 - the agent must survive any single operation
            await st.close(error={"code": "internal", "message": f"{type(e).__name__}: {e}"})


# --- operations ---------------------------------------------------------------------------
async def op_ping(agent: Agent, st: Stream, **_):
    return {"pid": os.getpid()}


async def op_configure(agent: Agent, st: Stream, env: dict | None = None):
    if env is not None:
        agent.base_env = {str(k): str(v) for k, v in env.items()}
        import envfile  # for processes that predate it (a boot snapshot's): envfile.py
        agent.env_file_error = envfile.write(agent.base_env)
    agent.procs.check_compat()
    out = {"env": agent.base_env, "egress_errors": agent.egress.errors}
    if agent.env_file_error is not None:
        out["env_file_error"] = agent.env_file_error
    return out


async def op_exec(agent: Agent, st: Stream, argv, env=None, cwd=None, user="user",
                  stdin=False, timeout=None, background=False, tag=None, follow=True):
    proc = agent.procs.start(argv, env or {}, cwd, user, stdin, timeout, tag)
    if background:
        return proc.info()
    await st.msg({"event": "start", "pid": proc.pid})
    if stdin:
        agent.loop.create_task(proc.feed_stdin(st))
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


async def op_pids_kill(agent: Agent, st: Stream, **_):
    return agent.procs.kill_runaway()


# file systems whose files live in the sentry's memory: checkpointed with it
_MEMORY_FS = {"tmpfs", "devpts", "proc", "sysfs", "mqueue", "devtmpfs"}


def _inet_inodes() -> set[str]:
    """Inodes of the sandbox's TCP and UDP sockets (netstack's, loopback included)."""
    out = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{name}") as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if len(parts) > 9:
                        out.add(parts[9])
        except OSError:
            pass
    return out


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


async def op_hibernate_check(agent: Agent, st: Stream, **_):
    """What would make a checkpoint fail here, killing the sandbox on this runsc:
    - a file on a host-backed file system deleted while a process holds it open;
    - a TCP or UDP socket a process waits on with epoll (node, asyncio, nginx...): netstack
      refuses to save an endpoint that still has waiters, and the save panics. (The agent
      itself waits with poll(2), whose waiters exist only during the call.)"""
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                mounts.append((parts[1], parts[2]))
    mounts.sort(key=lambda m: len(m[0]), reverse=True)

    def fstype(path: str) -> str:
        for mnt, kind in mounts:
            if path == mnt or path.startswith(mnt.rstrip("/") + "/"):
                return kind
        return "?"

    inet = _inet_inodes()
    me = str(os.getpid())
    problems = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        has_epoll = False
        sockets = []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target == "anon_inode:[eventpoll]":
                has_epoll = True
            elif target.startswith("socket:[") and target[8:-1] in inet:
                sockets.append(int(fd))
            if not target.endswith(" (deleted)") or not target.startswith("/"):
                continue
            path = target[: -len(" (deleted)")]
            if fstype(path) in _MEMORY_FS:
                continue
            problems.append({"kind": "deleted_file", "pid": int(pid), "fd": int(fd),
                             "path": path, "cmdline": _cmdline(pid)})
        if has_epoll and sockets and pid != me:
            problems.append({"kind": "epoll_socket", "pid": int(pid), "fds": sockets,
                             "cmdline": _cmdline(pid)})
    return {"problems": problems}


async def op_watch(agent: Agent, st: Stream, **args):
    import watch  # on first use: ctypes is not for the agent's start

    return await watch.op_watch(agent, st, **args)


async def op_resumed(agent: Agent, st: Stream, warm_up: bool = False, **_):
    """After a restore: look at the compat helpers anew (a restore may bring another runsc,
    or another agent bundle). With warm_up, run `true` once this answer has left, as at a
    start: a restored sandbox's first process otherwise takes ~20 ms more than the next
    (gVisor opens the files it runs from anew), and the host is busy with its own side of
    the create meanwhile. The agent is busy while it spawns, so the host asks for it last."""
    agent.procs.check_compat()
    if warm_up:
        def warm() -> None:
            agent.out.flush()  # the answer first: the host waits for it, not the warm-up
            agent.procs.warm_up()
        agent.loop.call_later(0, warm)
    return {}


def _lazy(module: str, op: str):
    """A handler that imports its module on the first call (not at the agent's start)."""
    async def handler(agent: Agent, st: Stream, **args):
        return await __import__(module).HANDLERS[op](agent, st, **args)
    return handler


HANDLERS = {
    P.Op.PING: op_ping,
    P.Op.CONFIGURE: op_configure,
    P.Op.EXEC: op_exec,
    P.Op.PROC_LIST: op_proc_list,
    P.Op.PROC_INFO: op_proc_info,
    P.Op.PROC_FOLLOW: op_proc_follow,
    P.Op.PROC_STDIN: op_proc_stdin,
    P.Op.PROC_SIGNAL: op_proc_signal,
    P.Op.PROC_WAIT: op_proc_wait,
    P.Op.OOM_KILL: op_oom_kill,
    P.Op.PIDS_KILL: op_pids_kill,
    P.Op.HIBERNATE_CHECK: op_hibernate_check,
    P.Op.RESUMED: op_resumed,
    P.Op.WATCH: op_watch,
    **fsops.HANDLERS,
    **netops.HANDLERS,
    P.Op.PTY_CREATE: _lazy("ptys", P.Op.PTY_CREATE),
    P.Op.PTY_ATTACH: _lazy("ptys", P.Op.PTY_ATTACH),
    P.Op.PTY_RESIZE: _lazy("ptys", P.Op.PTY_RESIZE),
}


# --- main loop ----------------------------------------------------------------------------
async def serve(loop: miniloop.Loop) -> None:
    out_fd = os.dup(1)
    in_fd = os.dup(0)
    # keep 0/1 away from children and stray writes: /dev/null, read-only as a child's stdin
    # (children inherit fd 0 as it is), write-only as stdout
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY)):
        null = os.open("/dev/null", flags)
        os.dup2(null, fd)
        os.close(null)
    os.set_blocking(out_fd, False)
    os.set_blocking(in_fd, False)
    agent = Agent(loop, out_fd)
    done = loop.create_future()
    reader = P.FrameReader()
    # one buffer for every read of the channel: os.read(fd, 256 KiB) would have malloc map
    # and unmap 256 KiB per request (mmap + mremap + munmap, ~0.4 ms of system calls and
    # page faults per command under ptrace, seen with runsc --strace)
    inbuf = bytearray(P.CHUNK + P.HEADER_SIZE)
    inview = memoryview(inbuf)

    def on_input() -> None:
        try:
            n = os.readv(in_fd, [inbuf])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        try:
            if n:
                reader.feed(inview[:n])  # copies
                for kind, sid, payload in reader.frames():
                    agent.on_frame(kind, sid, payload)
                return
        except P.ProtocolError:
            pass  # the host end is broken beyond repair: as if it had closed
        loop.remove_reader(in_fd)
        if not done.done():
            done.set_result(None)

    loop.add_reader(in_fd, on_input)
    loop.add_signal_handler(signames.SIGCHLD, agent.procs.reap)

    def rearm() -> None:
        # After `runsc restore` (runsc 20221219 at least), the container's stdio are new
        # host pipes, which an epoll set never reports again. The loop polls with poll(2)
        # now, which sees them; SIGHUP (`runsc kill ID HUP`) still makes the agent register
        # its fds anew, the host's fallback when a restored agent does not answer.
        # Harmless at any other time.
        loop.remove_reader(in_fd)
        loop.add_reader(in_fd, on_input)
        agent.out.rearm()
        agent.egress.rearm()
        agent.procs.check_compat()  # perhaps another runsc, or another agent bundle
        on_input()

    loop.add_signal_handler(signames.SIGHUP, rearm)
    if os.environ.get("TORPOR_EGRESS") == "1":  # set in sandboxes, not where tests run it
        agent.egress.start()
    agent.out.write(P.jframe(P.HELLO, 0, {"version": P.VERSION, "pid": os.getpid()}))
    # after the HELLO has left (idle hooks run first): the host's side of the start and
    # the agent's warm-up overlap
    loop.call_later(0, agent.procs.warm_up)
    await done
    # stdin closed: the host side is gone for good (a restore hands us new pipes instead)


def main() -> None:
    loop = miniloop.Loop()
    loop.run(serve(loop))


if __name__ == "__main__":
    main()
