"""The engine's processes: commands run and followed, background processes, their stdin,
signals and waits, for every front door.

Each call reaches the sandbox through `client_of(sid)`, the engine's way to the agent
(it resumes a parked sandbox and counts the call as activity), once per agent operation
as the REST door did. Answers are the agent's process info dicts (`pid`, `argv`, `tag`,
`started_at`, `running`, `exit_code`, `signal`, `timed_out`, `output_bytes`) and the
events of `torpor/engine/types.py`; failures are engine errors (`torpor/errors.py`).
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Awaitable, Callable

from torpor.agent import protocol as P
from torpor.channel import AgentError, ChannelClosed, Stream
from torpor.channel.client import AgentClient
from torpor.engine.types import (
    Chunk,
    Event,
    Exited,
    Failed,
    Output,
    Started,
    Truncated,
    agent_errors,
)
from torpor.errors import Conflict, Timeout, Unavailable, from_agent

ClientOf = Callable[[str], Awaitable[AgentClient]]
# (sid) -> the user and working directory of the template the sandbox started from
DefaultsOf = Callable[[str], tuple[str, str | None]]
START_WAIT = 60.0  # seconds a background process may take to start


class Processes:
    """`hold_process(sid, pid)`, when given, keeps a sandbox out of standby while that
    background process runs (`keep_alive`). `defaults_of(sid)`, when given, is what a
    command given no user runs as, and where: the template's user and working directory
    (a command given a user and no cwd starts in that user's home)."""

    def __init__(self, client_of: ClientOf,
                 hold_process: Callable[[str, int], None] | None = None,
                 defaults_of: DefaultsOf | None = None):
        self.client_of = client_of
        self.hold_process = hold_process
        self.defaults_of = defaults_of

    def who(self, sid: str, user: str | int | None,
            cwd: str | None) -> tuple[str | int, str | None]:
        """The user a command runs as, and its cwd: as given, else the template's."""
        if user is not None:
            return user, cwd
        if self.defaults_of is None:
            return "user", cwd
        t_user, t_cwd = self.defaults_of(sid)
        return t_user, cwd if cwd is not None else t_cwd

    async def run(self, sid: str, argv: list[str], env: dict | None = None,
                  cwd: str | None = None, user: str | int | None = None,
                  tag: str | None = None, stdin: str | None = None,
                  timeout: float | None = None) -> AsyncIterator[Event]:
        """Start a command and follow it: Started, Output and Truncated events, then
        Exited or Failed. `stdin` is sent whole (then EOF) before this returns; `timeout`
        kills the command after that many seconds. Errors before the command starts
        (no such sandbox, not running) raise here; once started, a failure is a Failed
        event. Leaving the iteration early (or closing it) lets the command run on."""
        client = await self.client_of(sid)
        user, cwd = self.who(sid, user, cwd)
        with agent_errors(sid, None):
            stream = client.exec(argv, env=env, cwd=cwd, user=user, stdin=stdin is not None,
                                 timeout=timeout, tag=tag)
        if stdin is not None:
            try:
                await stream.send(stdin.encode())
                await stream.send_eof()
            except ChannelClosed:
                pass  # the command ended first (it could not start?): its events say why
        return _events(sid, stream)

    async def start(self, sid: str, argv: list[str], env: dict | None = None,
                    cwd: str | None = None, user: str | int | None = None,
                    tag: str | None = None, stdin: str | None = None,
                    keep_alive: bool = False) -> dict:
        """Start a background process; its info. It keeps a stdin pipe (`stdin` is written
        to it and closed at once, if given; "" starts it with no stdin, reading it gives
        end of file) and runs until it exits or is signalled."""
        client = await self.client_of(sid)
        user, cwd = self.who(sid, user, cwd)
        with agent_errors(sid, P.Op.EXEC):
            try:
                info = await client.exec_background(argv, env=env, cwd=cwd, user=user,
                                                    stdin=stdin != "", tag=tag,
                                                    wait=START_WAIT)
            except TimeoutError:
                raise Unavailable(f"sandbox {sid}: the background command did not start "
                                  f"within {START_WAIT:.0f} s; list the processes to see "
                                  "whether it runs", sandbox_id=sid) from None
        if keep_alive and self.hold_process is not None:
            self.hold_process(sid, info["pid"])
        if stdin:
            await self.stdin(sid, info["pid"], stdin, eof=True)
        return info

    async def list(self, sid: str) -> list[dict]:
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PROC_LIST):
            return await client.proc_list()

    async def info(self, sid: str, pid: int) -> dict:
        """NotFound if the sandbox has no such process (any more)."""
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PROC_INFO):
            return await client.proc_info(pid)

    async def follow(self, sid: str, pid: int, offset: int | None = None,
                     follow: bool = True) -> AsyncIterator[Event]:
        """A process's events as `run` gives them, from output byte `offset` (None: what
        the agent still keeps); with `follow`, until it exits, else up to now. NotFound
        raises here, before any event."""
        await self.info(sid, pid)
        client = await self.client_of(sid)
        with agent_errors(sid, None):
            stream = client.proc_follow(pid, offset=offset, follow=follow)
        return _events(sid, stream)

    async def attach(self, sid: str, pid: int, offset: int | None = None,
                     follow: bool = True,
                     started: dict | None = None) -> AsyncIterator[Chunk | Exited | Failed]:
        """A process's output as bytes with their offsets (Chunk), from byte `offset`
        (None: the oldest byte still kept), then Exited (with `follow`, once it exited;
        without, only if it has). Reading again from the offset after the last Chunk's
        bytes gives every byte once, in order, whatever happened in between (the client
        went away, the sandbox was parked, the server restarted): the agent keeps the
        output, on the sandbox's disk past its in-memory log, up to its bound. An offset
        no longer kept (or not reached yet) is a Conflict naming the range that is; output
        dropped while this reader lagged ends the iteration with a Failed saying so.
        `started`: the info `start` just gave for this process, whose output is then known
        to be kept from byte 0 (one agent round trip fewer)."""
        info = started if started is not None and started.get("pid") == pid else (
            await self.info(sid, pid))
        start, end = info.get("output_start", 0), info["output_bytes"]
        if offset is None:
            offset = start
        if not start <= offset <= end:
            raise Conflict(f"sandbox {sid}: process {pid}: output offset {offset} is not kept; "
                           f"bytes {start}..{end} are (older output was dropped past the "
                           "sandbox's output bound)" if offset < start else
                           f"sandbox {sid}: process {pid}: output offset {offset} is past the "
                           f"end of its output ({end} bytes so far; kept from {start})",
                           sandbox_id=sid, pid=pid, field="offset", output_start=start,
                           output_end=end)
        client = await self.client_of(sid)
        with agent_errors(sid, None):
            stream = client.proc_follow(pid, offset=offset, follow=follow)
        return _chunks(sid, pid, stream, offset, follow)

    async def stdin(self, sid: str, pid: int, data: str, eof: bool = False) -> dict:
        """Write text to a background process's stdin; `eof` closes it after."""
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PROC_STDIN):
            return await client.proc_stdin(pid, data, eof=eof)

    async def signal(self, sid: str, pid: int, sig: str = "SIGTERM") -> dict:
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PROC_SIGNAL):
            return await client.proc_signal(pid, sig)

    async def wait(self, sid: str, pid: int, timeout: float) -> dict:
        """The process's info once it has exited; Timeout if it still runs after
        `timeout` seconds (0: look now)."""
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.PROC_WAIT):
            try:
                return await client.proc_wait(pid, timeout)
            except TimeoutError:
                pass
        # the wait ran out, maybe before the agent answered at all (timeout=0): ask again,
        # so an unknown pid is a NotFound and a process that has just exited is its info
        info = await self.info(sid, pid)
        if not info.get("running"):
            return info
        raise Timeout(f"sandbox {sid}: process {pid} still running after {timeout}s; wait "
                      "again, or signal it", sandbox_id=sid, pid=pid)


async def _chunks(sid: str, pid: int, stream: Stream, pos: int,
                  follow: bool) -> AsyncIterator[Chunk | Exited | Failed]:
    try:
        async for ev in stream:
            if ev.kind == "msg":
                if ev.msg.get("event") == "truncated":
                    lost = ev.msg["lost"]
                    yield Failed(Conflict(
                        f"sandbox {sid}: process {pid}: output bytes {pos}..{pos + lost} were "
                        "dropped (past the sandbox's output bound) before they were read; "
                        f"attach again from offset {pos + lost} or later", sandbox_id=sid,
                        pid=pid, field="offset", output_start=pos + lost))
                    return
                continue
            if ev.kind in ("stdout", "stderr"):
                yield Chunk(ev.kind, ev.data, pos)
                pos += len(ev.data)
        try:
            info = await stream.finish()
        except AgentError as e:
            yield Failed(from_agent(sid, e))
            return
        if not info.get("running"):
            yield Exited(info["exit_code"], info["signal"], info["timed_out"], info["pid"])
    finally:
        stream.abandon()


async def _events(sid: str, stream: Stream) -> AsyncIterator[Event]:
    """The stream's frames as events; abandons the stream if the consumer goes away."""
    dec = {"stdout": codecs.getincrementaldecoder("utf-8")("replace"),
           "stderr": codecs.getincrementaldecoder("utf-8")("replace")}
    try:
        async for ev in stream:
            if ev.kind == "msg":
                if ev.msg.get("event") == "start":
                    yield Started(ev.msg["pid"])
                elif ev.msg.get("event") == "truncated":
                    yield Truncated(ev.msg["lost"])
                continue
            text = dec[ev.kind].decode(ev.data)
            if text:
                yield Output(ev.kind, text)
        for kind, d in dec.items():
            tail = d.decode(b"", final=True)
            if tail:
                yield Output(kind, tail)
        try:
            info = await stream.finish()
        except AgentError as e:
            yield Failed(from_agent(sid, e))
            return
        yield Exited(info["exit_code"], info["signal"], info["timed_out"], info["pid"])
    finally:
        stream.abandon()
