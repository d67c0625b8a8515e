"""`sbx.commands`: run commands, stream their output, manage background processes.

`Commands` / `CommandHandle` (sync) and `AsyncCommands` / `AsyncCommandHandle` (async) are
twins: both build their requests with `_api` and read output with `_streams`.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import inspect
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from torpor.sdk import _api
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk._streams import Callback, OutputCollector, finish, parse_event
from torpor.sdk.errors import (
    CommandTimeoutError,
    ConflictError,
    ServerUnavailableError,
    TorporError,
    TorporTimeoutError,
    error_from_payload,
)
from torpor.sdk.models import CommandResult, OutputEvent, ProcessInfo, ProcessOutput

Cmd = str | Sequence[str]
RECONNECT_FOR = 60.0  # seconds a reattached reader keeps trying to come back
RETRY_EVERY = 0.5


@dataclass(frozen=True)
class OutputChunk:
    """Output bytes of a process as they were written, with the offset of the first one
    (stdout and stderr share one count): `handle.offset` after it is where to come back."""

    stream: str
    data: bytes
    offset: int


class _Attach:
    """The state of a reattachable reader: where it is, and the lines it reads."""

    def __init__(self, handle: CommandHandle | AsyncCommandHandle):
        self.h = handle

    def line(self, line: str) -> OutputChunk | OutputEvent | None:
        """A chunk (offset checked and taken), the exit event, or None; raises errors."""
        line = line.strip()
        if not line:
            return None
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise TorporError(f"the server sent a line that is not an output event: "
                              f"{line[:200]!r}", code="bad_stream") from e
        t = obj.get("type")
        h = self.h
        if t in ("stdout", "stderr"):
            off = obj["offset"]
            if h.offset is not None and off != h.offset:
                raise TorporError(f"process {h.pid}: output came from offset {off}, expected "
                                  f"{h.offset}", code="bad_stream", sandbox_id=h.sandbox_id)
            data = base64.b64decode(obj["data"])
            h.offset = off + len(data)
            return OutputChunk(t, data, off)
        if t == "exit":
            return OutputEvent.model_validate(obj)
        if t == "error":
            raise error_from_payload(obj.get("error") or {"message": "reading failed"},
                                     status=obj.get("status"), sandbox_id=h.sandbox_id,
                                     operation=f"attach to process {h.pid}")
        return None


def _text_feeder(col: OutputCollector):
    """(chunk) -> the callback hits of its text: bytes decoded per stream, incrementally."""
    dec = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in ("stdout", "stderr")}

    def feed(c: OutputChunk | None):
        if c is None:
            return [col.feed(OutputEvent(type=k, data=d.decode(b"", final=True)))
                    for k, d in dec.items()]
        text = dec[c.stream].decode(c.data)
        return [col.feed(OutputEvent(type=c.stream, data=text))] if text else []
    return feed


def _wait_timed_out(pid: int, timeout: float | None, out: ProcessOutput,
                    sid: str) -> CommandTimeoutError:
    return CommandTimeoutError(f"process {pid} still runs after {timeout}s (it was not "
                               "killed: wait again, or kill() it)", result=out,
                               sandbox_id=sid, operation=f"wait for process {pid}")


# --- sync --------------------------------------------------------------------------------

def _consume(session: SyncSession, call: _api.Call[Any], col: OutputCollector,
             deadline: float | None = None) -> None:
    resp = session.open(call)
    lines = session.iter_lines(resp, call)
    try:
        for line in lines:
            ev = parse_event(line)
            if ev is None:
                continue
            hit = col.feed(ev)
            if hit:
                hit[0](hit[1])
            if col.done or (deadline is not None and time.monotonic() > deadline):
                break
    finally:
        lines.close()


class CommandHandle:
    """A background process: `pid`, `wait()`, `kill()`, `send_stdin()`, `output()`, and
    iteration over its output events (until it exits)."""

    def __init__(self, session: SyncSession, sandbox_id: str, pid: int, *,
                 on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                 offset: int | None = None):
        self._s, self.sandbox_id, self.pid = session, sandbox_id, pid
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        # where a reattached reader is (connect(from_offset=...)): None until then
        self.offset: int | None = offset
        self._attached = offset is not None

    def __repr__(self) -> str:
        return f"CommandHandle(sandbox_id={self.sandbox_id!r}, pid={self.pid})"

    def chunks(self, *, follow: bool = True,
               reconnect_for: float = RECONNECT_FOR) -> Iterator[OutputChunk]:
        """The output's bytes from `self.offset` (None: the oldest kept), each once and in
        order, advancing `offset`; with `follow`, until the process exits. A connection
        that breaks (the server restarted, the network) is made again from `offset`, for up
        to `reconnect_for` seconds. ConflictError if `offset` is no longer kept (its
        message and `details` name the range that is)."""
        att = _Attach(self)
        self.exit: OutputEvent | None = None
        gave_up = None
        while True:
            call = _api.attach_output(self.sandbox_id, self.pid, follow, self.offset)
            try:
                resp = self._s.open(call)
                gave_up = None
                for line in self._s.iter_lines(resp, call):
                    got = att.line(line)
                    if isinstance(got, OutputChunk):
                        yield got
                    elif got is not None:
                        self.exit = got
                        return
                if not follow:
                    return
            except ServerUnavailableError:
                gave_up = gave_up or time.monotonic() + reconnect_for
                if time.monotonic() > gave_up:
                    raise
            time.sleep(RETRY_EVERY)  # the stream ended early: come back from `offset`

    def info(self) -> ProcessInfo:
        return self._s.call(_api.get_process(self.sandbox_id, self.pid))

    def wait(self, timeout: float | None = None, *, on_stdout: Callback | None = None,
             on_stderr: Callback | None = None, check: bool = False) -> CommandResult:
        """Follow the output until the process exits and return its result. Callbacks
        (default: those given to `run`) get output as it arrives, from the start.
        Raises CommandTimeoutError if it still runs after about `timeout` seconds (the
        process is left running) or if its own command timeout killed it."""
        col = OutputCollector(on_stdout or self._on_stdout, on_stderr or self._on_stderr,
                              pid=self.pid, sandbox_id=self.sandbox_id,
                              operation=f"wait for process {self.pid}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._attached:  # from connect(from_offset=...): bytes exactly, across breaks
            feed = _text_feeder(col)
            for c in self.chunks():
                for hit in feed(c):
                    if hit:
                        hit[0](hit[1])
                if deadline is not None and time.monotonic() > deadline:
                    break
            else:
                for hit in feed(None):
                    if hit:
                        hit[0](hit[1])
                if self.exit is not None:
                    col.feed(self.exit)
        call = _api.process_output(self.sandbox_id, self.pid, True, None, timeout)
        try:
            if not self._attached:
                _consume(self._s, call, col, deadline)
        except TorporTimeoutError as e:
            if isinstance(e, CommandTimeoutError) or timeout is None:
                raise
        if not col.done and deadline is not None and time.monotonic() >= deadline:
            raise _wait_timed_out(self.pid, timeout, col.snapshot(), self.sandbox_id)
        return finish(col.result(), check=check, timeout=None, sandbox_id=self.sandbox_id,
                      operation=col.operation)

    def events(self, *, follow: bool = True, offset: int | None = None
               ) -> Iterator[OutputEvent]:
        """Output events (stdout, stderr, exit, ...) from `offset`; with `follow`, until the
        process exits."""
        call = _api.process_output(self.sandbox_id, self.pid, follow, offset)
        resp = self._s.open(call)
        for line in self._s.iter_lines(resp, call):
            ev = parse_event(line)
            if ev is not None:
                yield ev

    __iter__ = events

    def output(self) -> ProcessOutput:
        """The output so far, without waiting; `exit_code` is None while it runs."""
        col = OutputCollector(pid=self.pid, sandbox_id=self.sandbox_id,
                              operation=f"read output of process {self.pid}")
        _consume(self._s, _api.process_output(self.sandbox_id, self.pid, False, None), col)
        return col.snapshot()

    def send_stdin(self, data: str | bytes, *, eof: bool = False) -> None:
        self._s.call(_api.send_stdin(self.sandbox_id, self.pid, data, eof))

    def close_stdin(self) -> None:
        self._s.call(_api.send_stdin(self.sandbox_id, self.pid, "", True))

    def kill(self, signal: str = "SIGKILL") -> bool:
        """Send `signal`; False if the process had already exited."""
        try:
            self._s.call(_api.signal_process(self.sandbox_id, self.pid, signal))
        except ConflictError:
            return False
        return True


class Commands:
    """`sbx.commands`."""

    def __init__(self, session: SyncSession, sandbox_id: str):
        self._s, self._sid = session, sandbox_id

    @overload
    def run(self, cmd: Cmd, *, on_stdout: Callback | None = ..., on_stderr: Callback | None = ...,
            background: Literal[False] = ..., timeout: float | None = ...,
            env: Mapping[str, str] | None = ..., cwd: str | None = ...,
            user: str | int | None = ..., stdin: str | bytes | None = ..., check: bool = ...,
            tag: str | None = ..., keep_alive: bool = ...) -> CommandResult: ...

    @overload
    def run(self, cmd: Cmd, *, on_stdout: Callback | None = ..., on_stderr: Callback | None = ...,
            background: Literal[True], timeout: float | None = ...,
            env: Mapping[str, str] | None = ..., cwd: str | None = ...,
            user: str | int | None = ..., stdin: str | bytes | None = ..., check: bool = ...,
            tag: str | None = ..., keep_alive: bool = ...) -> CommandHandle: ...

    def run(self, cmd: Cmd, *, on_stdout: Callback | None = None,
            on_stderr: Callback | None = None, background: bool = False,
            timeout: float | None = 60, env: Mapping[str, str] | None = None,
            cwd: str | None = None, user: str | int | None = None,
            stdin: str | bytes | None = None, check: bool = False,
            tag: str | None = None, keep_alive: bool = False) -> CommandResult | CommandHandle:
        """Run `cmd` (a string for /bin/sh -c, or an argv list) and wait for it.

        With `on_stdout` / `on_stderr`, output streams to them as it arrives. Returns a
        CommandResult whatever the exit code (`check=True` raises CommandExitError on
        non-zero); a run past `timeout` seconds (None: no limit) is killed and raises
        CommandTimeoutError. `background=True` returns a CommandHandle at once; with
        `keep_alive=True` too, the sandbox stays out of standby while the process runs
        (for at most an hour). A foreground command keeps it awake anyway."""
        streaming = not background and (on_stdout is not None or on_stderr is not None)
        call = _api.run_command(self._sid, cmd, env=env, cwd=cwd, user=user, stdin=stdin,
                                timeout=timeout, background=background, stream=streaming,
                                tag=tag, keep_alive=keep_alive)
        if background:
            info: ProcessInfo = self._s.call(call)
            return CommandHandle(self._s, self._sid, info.pid, on_stdout=on_stdout,
                                 on_stderr=on_stderr)
        if streaming:
            col = OutputCollector(on_stdout, on_stderr, sandbox_id=self._sid,
                                  operation=call.operation)
            _consume(self._s, call, col)
            result = col.result()
        else:
            result = self._s.call(call)
        return finish(result, check=check, timeout=timeout, sandbox_id=self._sid,
                      operation=call.operation)

    def list(self) -> list[ProcessInfo]:
        return self._s.call(_api.list_processes(self._sid))

    def connect(self, pid: int, *, on_stdout: Callback | None = None,
                on_stderr: Callback | None = None,
                from_offset: int | None = None) -> CommandHandle:
        """A handle on a running (or finished) background process; NotFoundError if none.

        With `from_offset` (a byte offset of its output: 0 for all of it, a handle's
        `offset` to go on where it stopped), the handle reads the exact bytes from there:
        `chunks()`, and `wait()` with callbacks, each byte once and in order, coming back
        by itself if the connection breaks. ConflictError names the range still kept if
        `from_offset` is not in it."""
        info = self._s.call(_api.get_process(self._sid, pid))
        if from_offset is not None and not (info.output_start <= from_offset
                                            <= info.output_bytes):
            raise ConflictError(f"process {pid}: output offset {from_offset} is not kept; "
                                f"bytes {info.output_start}..{info.output_bytes} are",
                                sandbox_id=self._sid, operation=f"attach to process {pid}",
                                details={"output_start": info.output_start,
                                         "output_end": info.output_bytes})
        return CommandHandle(self._s, self._sid, pid, on_stdout=on_stdout, on_stderr=on_stderr,
                             offset=from_offset)

    def kill(self, pid: int, signal: str = "SIGKILL") -> bool:
        return CommandHandle(self._s, self._sid, pid).kill(signal)

    def send_stdin(self, pid: int, data: str | bytes, *, eof: bool = False) -> None:
        self._s.call(_api.send_stdin(self._sid, pid, data, eof))


# --- async -------------------------------------------------------------------------------

async def _invoke(hit: tuple[Callback, str] | None) -> None:
    if hit:
        r = hit[0](hit[1])
        if inspect.isawaitable(r):
            await r


async def _aconsume(session: AsyncSession, call: _api.Call[Any], col: OutputCollector,
                    deadline: float | None = None) -> None:
    resp = await session.open(call)
    lines = session.iter_lines(resp, call)
    try:
        async for line in lines:
            ev = parse_event(line)
            if ev is None:
                continue
            await _invoke(col.feed(ev))
            if col.done or (deadline is not None and time.monotonic() > deadline):
                break
    finally:
        await lines.aclose()


class AsyncCommandHandle:
    """The async twin of CommandHandle; callbacks may be plain or async functions."""

    def __init__(self, session: AsyncSession, sandbox_id: str, pid: int, *,
                 on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                 offset: int | None = None):
        self._s, self.sandbox_id, self.pid = session, sandbox_id, pid
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        self.offset: int | None = offset
        self._attached = offset is not None

    def __repr__(self) -> str:
        return f"AsyncCommandHandle(sandbox_id={self.sandbox_id!r}, pid={self.pid})"

    async def chunks(self, *, follow: bool = True,
                     reconnect_for: float = RECONNECT_FOR) -> AsyncIterator[OutputChunk]:
        """As CommandHandle.chunks."""
        att = _Attach(self)
        self.exit: OutputEvent | None = None
        gave_up = None
        while True:
            call = _api.attach_output(self.sandbox_id, self.pid, follow, self.offset)
            try:
                resp = await self._s.open(call)
                gave_up = None
                async for line in self._s.iter_lines(resp, call):
                    got = att.line(line)
                    if isinstance(got, OutputChunk):
                        yield got
                    elif got is not None:
                        self.exit = got
                        return
                if not follow:
                    return
            except ServerUnavailableError:
                gave_up = gave_up or time.monotonic() + reconnect_for
                if time.monotonic() > gave_up:
                    raise
            await asyncio.sleep(RETRY_EVERY)

    async def info(self) -> ProcessInfo:
        return await self._s.call(_api.get_process(self.sandbox_id, self.pid))

    async def wait(self, timeout: float | None = None, *, on_stdout: Callback | None = None,
                   on_stderr: Callback | None = None, check: bool = False) -> CommandResult:
        col = OutputCollector(on_stdout or self._on_stdout, on_stderr or self._on_stderr,
                              pid=self.pid, sandbox_id=self.sandbox_id,
                              operation=f"wait for process {self.pid}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._attached:
            feed = _text_feeder(col)
            done = True
            async for c in self.chunks():
                for hit in feed(c):
                    await _invoke(hit)
                if deadline is not None and time.monotonic() > deadline:
                    done = False
                    break
            if done:
                for hit in feed(None):
                    await _invoke(hit)
                if self.exit is not None:
                    col.feed(self.exit)
        call = _api.process_output(self.sandbox_id, self.pid, True, None, timeout)
        try:
            if not self._attached:
                await _aconsume(self._s, call, col, deadline)
        except TorporTimeoutError as e:
            if isinstance(e, CommandTimeoutError) or timeout is None:
                raise
        if not col.done and deadline is not None and time.monotonic() >= deadline:
            raise _wait_timed_out(self.pid, timeout, col.snapshot(), self.sandbox_id)
        return finish(col.result(), check=check, timeout=None, sandbox_id=self.sandbox_id,
                      operation=col.operation)

    async def events(self, *, follow: bool = True, offset: int | None = None
                     ) -> AsyncIterator[OutputEvent]:
        call = _api.process_output(self.sandbox_id, self.pid, follow, offset)
        resp = await self._s.open(call)
        async for line in self._s.iter_lines(resp, call):
            ev = parse_event(line)
            if ev is not None:
                yield ev

    def __aiter__(self) -> AsyncIterator[OutputEvent]:
        return self.events()

    async def output(self) -> ProcessOutput:
        col = OutputCollector(pid=self.pid, sandbox_id=self.sandbox_id,
                              operation=f"read output of process {self.pid}")
        await _aconsume(self._s, _api.process_output(self.sandbox_id, self.pid, False, None),
                        col)
        return col.snapshot()

    async def send_stdin(self, data: str | bytes, *, eof: bool = False) -> None:
        await self._s.call(_api.send_stdin(self.sandbox_id, self.pid, data, eof))

    async def close_stdin(self) -> None:
        await self._s.call(_api.send_stdin(self.sandbox_id, self.pid, "", True))

    async def kill(self, signal: str = "SIGKILL") -> bool:
        try:
            await self._s.call(_api.signal_process(self.sandbox_id, self.pid, signal))
        except ConflictError:
            return False
        return True


class AsyncCommands:
    """`sbx.commands` of an AsyncSandbox."""

    def __init__(self, session: AsyncSession, sandbox_id: str):
        self._s, self._sid = session, sandbox_id

    @overload
    async def run(self, cmd: Cmd, *, on_stdout: Callback | None = ...,
                  on_stderr: Callback | None = ..., background: Literal[False] = ...,
                  timeout: float | None = ..., env: Mapping[str, str] | None = ...,
                  cwd: str | None = ..., user: str | int | None = ...,
                  stdin: str | bytes | None = ..., check: bool = ...,
                  tag: str | None = ..., keep_alive: bool = ...) -> CommandResult: ...

    @overload
    async def run(self, cmd: Cmd, *, on_stdout: Callback | None = ...,
                  on_stderr: Callback | None = ..., background: Literal[True],
                  timeout: float | None = ..., env: Mapping[str, str] | None = ...,
                  cwd: str | None = ..., user: str | int | None = ...,
                  stdin: str | bytes | None = ..., check: bool = ...,
                  tag: str | None = ..., keep_alive: bool = ...) -> AsyncCommandHandle: ...

    async def run(self, cmd: Cmd, *, on_stdout: Callback | None = None,
                  on_stderr: Callback | None = None, background: bool = False,
                  timeout: float | None = 60, env: Mapping[str, str] | None = None,
                  cwd: str | None = None, user: str | int | None = None,
                  stdin: str | bytes | None = None, check: bool = False,
                  tag: str | None = None,
                  keep_alive: bool = False) -> CommandResult | AsyncCommandHandle:
        """As Commands.run; returns CommandResult, or AsyncCommandHandle if background."""
        streaming = not background and (on_stdout is not None or on_stderr is not None)
        call = _api.run_command(self._sid, cmd, env=env, cwd=cwd, user=user, stdin=stdin,
                                timeout=timeout, background=background, stream=streaming,
                                tag=tag, keep_alive=keep_alive)
        if background:
            info: ProcessInfo = await self._s.call(call)
            return AsyncCommandHandle(self._s, self._sid, info.pid, on_stdout=on_stdout,
                                      on_stderr=on_stderr)
        if streaming:
            col = OutputCollector(on_stdout, on_stderr, sandbox_id=self._sid,
                                  operation=call.operation)
            await _aconsume(self._s, call, col)
            result = col.result()
        else:
            result = await self._s.call(call)
        return finish(result, check=check, timeout=timeout, sandbox_id=self._sid,
                      operation=call.operation)

    async def list(self) -> list[ProcessInfo]:
        return await self._s.call(_api.list_processes(self._sid))

    async def connect(self, pid: int, *, on_stdout: Callback | None = None,
                      on_stderr: Callback | None = None,
                      from_offset: int | None = None) -> AsyncCommandHandle:
        """As Commands.connect."""
        info = await self._s.call(_api.get_process(self._sid, pid))
        if from_offset is not None and not (info.output_start <= from_offset
                                            <= info.output_bytes):
            raise ConflictError(f"process {pid}: output offset {from_offset} is not kept; "
                                f"bytes {info.output_start}..{info.output_bytes} are",
                                sandbox_id=self._sid, operation=f"attach to process {pid}",
                                details={"output_start": info.output_start,
                                         "output_end": info.output_bytes})
        return AsyncCommandHandle(self._s, self._sid, pid, on_stdout=on_stdout,
                                  on_stderr=on_stderr, offset=from_offset)

    async def kill(self, pid: int, signal: str = "SIGKILL") -> bool:
        return await AsyncCommandHandle(self._s, self._sid, pid).kill(signal)

    async def send_stdin(self, pid: int, data: str | bytes, *, eof: bool = False) -> None:
        await self._s.call(_api.send_stdin(self._sid, pid, data, eof))
