"""The engine's terminals: programs on a pseudo-terminal inside a sandbox (an interactive
shell by default), for every front door.

A terminal is one of the sandbox's processes (it shows in `processes.list`, its info has
`pty: {cols, rows}`), whose output the agent keeps with byte offsets in the bounded log
every process has. It runs whether or not a client is attached: `attach` gives its output
from an offset (or its recent screen, the last `replay` bytes) and on, live, and takes
keystrokes; a client that goes away just stops reading, and the next `attach` goes on.
An attached terminal is an open stream, so its sandbox stays out of standby meanwhile.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from torpor.agent import protocol as P
from torpor.channel import AgentError, ChannelClosed, Stream
from torpor.engine.processes import Processes
from torpor.engine.types import agent_errors
from torpor.errors import Invalid, NotFound, Timeout, Unavailable, from_agent

MAX_SIZE = 4096  # columns or rows (the agent's bound too)
REPLAY = 64 * 1024  # bytes of recent output an attach without an offset replays


def check_size(cols: object, rows: object) -> tuple[int, int]:
    """Invalid (field=cols|rows) unless both are whole numbers in 1..MAX_SIZE."""
    for name, v in (("cols", cols), ("rows", rows)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE:
            raise Invalid(f"a terminal's {name} must be a whole number from 1 to {MAX_SIZE} "
                          f"(got {v!r}): a {cols}x{rows} terminal cannot show anything",
                          field=name)
    return cols, rows  # type: ignore[return-value]


class Attached:
    """One client's view of a terminal: `output()` yields its bytes from `offset` on,
    `send` types, `close` detaches (the terminal runs on). Once the terminal has exited and
    its output is all out, `output()` ends and `info` holds its exit code."""

    def __init__(self, sid: str, pid: int, stream: Stream, first: dict):
        self.sid = sid
        self.pid = pid
        self.offset: int = first["offset"]  # where the output handed out starts
        self.size: dict = first.get("pty") or {}  # {cols, rows} when attached
        self.info: dict | None = None
        self._stream = stream

    async def output(self) -> AsyncIterator[bytes]:
        async for ev in self._stream:
            if ev.kind != "msg" and ev.data:
                yield ev.data
        try:
            self.info = await self._stream.finish()
        except AgentError as e:
            if e.code != "abandoned":
                raise from_agent(self.sid, e) from None

    async def send(self, data: bytes) -> None:
        """Keystrokes (any bytes: 0x03 is Ctrl-C). Conflict once the terminal is gone."""
        try:
            await self._stream.send(data)
        except ChannelClosed:
            raise from_agent(self.sid, AgentError(
                "stdin_closed", f"terminal {self.pid} is closed", {})) from None

    def close(self) -> None:
        self._stream.abandon()


class Terminals:
    """Over the sandbox's processes (a terminal is one): their way to the agent, the
    template's user and cwd for a terminal that names none, their signals."""

    def __init__(self, processes: Processes):
        self.processes = processes
        self.client_of = processes.client_of

    async def create(self, sid: str, cols: int = 80, rows: int = 24,
                     cmd: list[str] | None = None, env: dict | None = None,
                     cwd: str | None = None, user: str | int | None = None,
                     tag: str | None = None) -> dict:
        """Start `cmd` (None: the user's login shell) on a new cols x rows terminal; its
        process info (pid, pty {cols, rows}, ...). No user: the template's, in its working
        directory."""
        check_size(cols, rows)
        if cmd is not None and (not isinstance(cmd, list) or not cmd):
            raise Invalid("cmd must be a non-empty list of strings (None: a login shell)",
                          field="cmd")
        user, cwd = self.processes.who(sid, user, cwd)
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PTY_CREATE):
            return await client.pty_create(cols, rows, cmd=cmd, env=env, cwd=cwd, user=user,
                                           tag=tag)

    async def info(self, sid: str, pid: int) -> dict:
        """NotFound unless `pid` is a terminal of the sandbox (running or recently exited)."""
        info = await self.processes.info(sid, pid)
        if "pty" not in info:
            raise NotFound(f"sandbox {sid}: process {pid} is not a terminal",
                           sandbox_id=sid, pid=pid)
        return info

    async def attach(self, sid: str, pid: int, offset: int | None = None,
                     replay: int = REPLAY) -> Attached:
        """Follow the terminal from output byte `offset` (None: its last `replay` bytes).
        NotFound (no such terminal) and Invalid (an offset no longer kept: the error's
        `available` says which are) raise here, before any output."""
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)
                                   or offset < 0):
            raise Invalid("offset must be a byte offset, 0 or more", field="offset")
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PTY_ATTACH):
            stream = client.pty_attach(pid, offset=offset, replay=replay)
            try:
                # the agent's first word: MSG attached, or the CLOSE of a refusal
                async for ev in stream:
                    if ev.kind == "msg" and ev.msg.get("event") == "attached":
                        return Attached(sid, pid, stream, ev.msg)
                    break
                await stream.finish()
            except BaseException:
                stream.abandon()
                raise
        raise Unavailable(f"sandbox {sid}: terminal {pid} did not attach", sandbox_id=sid)

    async def list(self, sid: str) -> list[dict]:
        """The sandbox's terminals (running, and those that exited recently)."""
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PROC_LIST):
            return [p for p in await client.proc_list() if "pty" in p]

    async def resize(self, sid: str, pid: int, cols: int, rows: int) -> dict:
        """{pid, cols, rows}; the program gets SIGWINCH."""
        check_size(cols, rows)
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PTY_RESIZE):
            return await client.pty_resize(pid, cols, rows)

    async def kill(self, sid: str, pid: int, signal: str = "SIGKILL") -> dict:
        """Signal the terminal's session (its shell and what runs in it)."""
        await self.info(sid, pid)
        return await self.processes.signal(sid, pid, signal)

    async def wait(self, sid: str, pid: int, timeout: float) -> dict:
        """Its info once it has exited; Timeout if it still runs after `timeout` s."""
        try:
            return await self.processes.wait(sid, pid, timeout)
        except Timeout:
            await self.info(sid, pid)  # NotFound if it is not a terminal
            raise Timeout(f"sandbox {sid}: terminal {pid} still running after {timeout}s; "
                          "wait again, or kill it", sandbox_id=sid, pid=pid) from None
