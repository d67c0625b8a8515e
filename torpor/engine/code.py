"""The code interpreter on the engine: `engine.code`.

The interpreter runs inside sandboxes of the `code-interpreter` template
(`torpor/interpreter/server.py`, on port 49999, E2B's protocol). The engine reaches it the
way previews reach a port: a stream through the agent's port tunnel (`connect(sid, port)`),
speaking HTTP/1.1 over it (h11), and turns its NDJSON lines into typed events. A run's
stream counts as the sandbox's activity (it stays out of standby while code runs); leaving
a run early closes the tunnel, which the server takes as a client gone: it interrupts the
kernel.

A tunnel whose answer ended cleanly is kept open (HTTP keep-alive, a few per sandbox) for
the next call, which saves the agent's connect and the server's accept (a few ms under
gVisor). An idle kept tunnel is `passive`: it does not keep the sandbox out of standby or
hibernation; one whose channel closed (a hibernation, a stop) is dropped, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11

from torpor.channel import Stream
from torpor.errors import Conflict, Invalid, NotFound, Timeout, TorporError, Unavailable

PORT = 49999  # the interpreter's port inside the sandbox (torpor/builtin_templates.py)
CONNECT_WAIT = 30.0  # seconds for the tunnel to open (it may wake a hibernated sandbox)
CALL_WAIT = 120.0  # seconds for a context call (a restart starts a kernel)
TIMEOUT_GRACE = 10.0  # seconds past a run's timeout before the engine gives up on it
LINE_MAX = 64 << 20  # bytes of one NDJSON line (a result holds base64 images)
KEEP_IDLE = 2  # idle tunnels kept per sandbox (concurrent runs open more, then close them)
LANGUAGES = ("python", "bash")


@dataclass
class CodeOutput:
    stream: str  # "stdout" or "stderr"
    text: str
    timestamp: str | None = None


@dataclass
class CodeResult:
    """One displayed value: its MIME forms under E2B's names (text, html, markdown, png,
    jpeg, svg, pdf, latex, json, javascript), other forms in `extra`."""
    data: dict
    is_main_result: bool = False


@dataclass
class CodeError:
    name: str
    value: str
    traceback: str = ""


@dataclass
class CodeTruncated:
    stream: str
    limit: int  # characters of that stream kept in this execution


@dataclass
class CodeDone:
    execution_count: int | None = None


CodeEvent = CodeOutput | CodeResult | CodeError | CodeTruncated | CodeDone


@dataclass
class CodeExecution:
    """A run's events gathered: what a caller that does not stream gets."""
    results: list[CodeResult] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    error: CodeError | None = None
    execution_count: int | None = None
    truncated: list[str] = field(default_factory=list)


class _Tunnel:
    """HTTP/1.1 over one agent port tunnel (a request at a time, kept alive)."""

    def __init__(self, st: Stream, sid: str):
        self.st, self.sid = st, sid
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=LINE_MAX)

    def reusable(self, chan: object) -> bool:
        """Idle, on the sandbox's current channel, and nothing came from the server since
        its last answer (an EOF or a close would be queued)."""
        return (self.st.chan is chan and not self.st.done.is_set() and self.st.events.empty()
                and self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE)

    async def open(self) -> None:
        try:
            kind, _ = await asyncio.wait_for(self.st.events.get(), CONNECT_WAIT)
        except TimeoutError:
            self.st.abandon()
            raise Timeout(f"sandbox {self.sid}: the code interpreter's port did not open in "
                          "time", sandbox_id=self.sid) from None
        if kind != "msg":
            err = self.st.error or {}
            if err.get("code") == "connection_refused":
                raise Conflict(f"sandbox {self.sid} runs no code interpreter (nothing listens "
                               f"on port {PORT}): create it from the code-interpreter "
                               "template", sandbox_id=self.sid)
            raise Unavailable(f"sandbox {self.sid}: the code interpreter could not be "
                              f"reached: {err.get('message', 'the tunnel closed')}",
                              sandbox_id=self.sid)

    async def send(self, method: str, path: str, body: dict | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", f"localhost:{PORT}"), ("Content-Length", str(len(data)))]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        out = self.conn.send(h11.Request(method=method, target=path, headers=headers))
        out += self.conn.send(h11.Data(data=data)) if data else b""
        out += self.conn.send(h11.EndOfMessage())
        await self.st.send(out)

    async def events(self) -> AsyncIterator[h11.Event]:
        """The response's h11 events; raises Unavailable if the tunnel ends mid-response."""
        it = aiter(self.st)
        closed = False
        while True:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError:
                ev = h11.ConnectionClosed()
            if ev is h11.NEED_DATA and not closed:
                try:
                    chunk = await anext(it)
                except StopAsyncIteration:
                    chunk = None
                if chunk is None or chunk.kind == "eof":
                    closed = True
                    self.conn.receive_data(b"")
                elif chunk.kind == "stdout":
                    self.conn.receive_data(chunk.data)
                continue
            if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
                raise Unavailable(f"sandbox {self.sid}: the code interpreter closed the "
                                  "connection mid-answer (did its kernel server stop?)",
                                  sandbox_id=self.sid)
            yield ev
            if isinstance(ev, h11.EndOfMessage):
                return

    def close(self) -> None:
        self.st.abandon()


def _error(sid: str, status: int, body: bytes) -> TorporError:
    try:
        obj = json.loads(body)
        message = obj.get("message") or body.decode(errors="replace")
    except ValueError:
        message = body.decode(errors="replace")[:500]
    extra = {"sandbox_id": sid}
    if status == 400:
        return Invalid(f"sandbox {sid}: {message}", **extra)
    if status == 404:
        return NotFound(f"sandbox {sid}: {message}", **extra)
    if status == 409:
        return Conflict(f"sandbox {sid}: {message}", **extra)
    return TorporError(f"sandbox {sid}: the code interpreter answered {status}: {message}",
                       **extra)


def event_of(obj: dict) -> CodeEvent | None:
    """An interpreter NDJSON line as a typed event (None: keepalive, unknown types)."""
    kind = obj.get("type")
    if kind in ("stdout", "stderr"):
        return CodeOutput(kind, obj.get("text", ""), obj.get("timestamp"))
    if kind == "result":
        data = {k: v for k, v in obj.items() if k not in ("type", "is_main_result")
                and v is not None}
        return CodeResult(data, bool(obj.get("is_main_result")))
    if kind == "error":
        return CodeError(str(obj.get("name", "")), str(obj.get("value", "")),
                         str(obj.get("traceback") or ""))
    if kind == "truncated":
        return CodeTruncated(obj.get("stream", ""), int(obj.get("limit", 0)))
    if kind == "number_of_executions":
        return CodeDone(obj.get("execution_count"))
    return None


class Code:
    """`connect(sid, port)` opens a port tunnel (waking the sandbox); `channel(sid)` gives
    the sandbox's current channel, woken too (it is what counts as activity), so a kept
    tunnel is reused only on a running sandbox and on the channel it was opened on."""

    def __init__(self, connect: Callable[[str, int], Awaitable[Stream]],
                 channel: Callable[[str], Awaitable[object]]):
        self.connect, self.channel = connect, channel
        self.idle: dict[str, list[_Tunnel]] = {}  # sandbox id -> kept tunnels

    async def _tunnel(self, sid: str, method: str, path: str, body: dict | None) -> _Tunnel:
        """A tunnel with the request sent: a kept one, or a new one with the request sent
        at once, before the agent says the port accepted (it queues a stream's bytes until
        then), which saves a round trip."""
        kept = self.idle.get(sid)
        if kept:
            chan = await self.channel(sid)
            while kept:
                t = kept.pop()
                if not t.reusable(chan):
                    t.close()
                    continue
                t.st.passive = False
                try:
                    await t.send(method, path, body)
                except BaseException:
                    t.close()
                    raise
                return t
        t = _Tunnel(await self.connect(sid, PORT), sid)
        try:
            await t.send(method, path, body)
            await t.open()
        except BaseException:
            t.close()
            raise
        return t

    def _release(self, t: _Tunnel) -> None:
        """Keep a tunnel whose answer ended cleanly for the next call, else close it."""
        try:
            t.conn.start_next_cycle()
        except h11.LocalProtocolError:  # not both sides done, or the server will close
            t.close()
            return
        kept = self.idle.setdefault(t.sid, [])
        if len(kept) >= KEEP_IDLE or t.st.done.is_set():
            t.close()
            return
        t.st.passive = True  # see Lifecycle.open_streams: an idle tunnel is not activity
        kept.append(t)
        # drop the tunnels of channels gone since (stopped, hibernated, deleted sandboxes)
        for sid in [s for s, ts in self.idle.items()
                    if not any(not x.st.done.is_set() for x in ts)]:
            for x in self.idle.pop(sid):
                x.close()

    async def _call(self, sid: str, method: str, path: str, body: dict | None = None):
        t = await self._tunnel(sid, method, path, body)
        ended = False
        try:
            async with asyncio.timeout(CALL_WAIT):
                status, data = 0, b""
                async for ev in t.events():
                    if isinstance(ev, h11.Response):
                        status = ev.status_code
                    elif isinstance(ev, h11.Data):
                        data += ev.data
                ended = True
        except TimeoutError:
            raise Timeout(f"sandbox {sid}: the code interpreter did not answer {method} "
                          f"{path} within {CALL_WAIT:.0f} s", sandbox_id=sid) from None
        finally:
            if ended:
                self._release(t)
            else:
                t.close()
        if status >= 300:
            raise _error(sid, status, data)
        return json.loads(data) if data else None

    # --- contexts ------------------------------------------------------------------------
    async def create_context(self, sid: str, language: str = "python",
                             cwd: str | None = None) -> dict:
        """A new context (its own kernel): {id, language, cwd}."""
        _check_language(language)
        return await self._call(sid, "POST", "/contexts", {"language": language, "cwd": cwd})

    async def list_contexts(self, sid: str) -> list[dict]:
        return await self._call(sid, "GET", "/contexts")

    async def restart_context(self, sid: str, cid: str) -> dict:
        """A new kernel for the context (same id, cwd): its state is gone."""
        return await self._call(sid, "POST", f"/contexts/{_cid(cid)}/restart")

    async def delete_context(self, sid: str, cid: str) -> None:
        await self._call(sid, "DELETE", f"/contexts/{_cid(cid)}")

    # --- running code --------------------------------------------------------------------
    async def run(self, sid: str, code: str, *, context: str | None = None,
                  language: str | None = None, env: dict[str, str] | None = None,
                  timeout: float | None = None) -> AsyncIterator[CodeEvent]:
        """Run `code` in a context (`context` by id, else the default context of
        `language`, python by default). Checks the request and opens the tunnel before it
        returns (errors raise here); the events then follow, CodeDone last. `timeout`
        (seconds) interrupts the kernel when it passes (a CodeError TimeoutError), and the
        context keeps its state. Closing the iterator early interrupts the kernel too."""
        if context and language:
            raise Invalid("give a context or a language, not both", field="language")
        if language is not None:
            _check_language(language)
        if timeout is not None and timeout <= 0:
            raise Invalid("timeout must be above 0 seconds", field="timeout")
        # raw_text: a result's text as the kernel gave it ('yes' for a string), not E2B's
        # with its quotes taken off (torpor/interpreter/server.py, result_line)
        body: dict = {"code": code, "raw_text": True}
        if context:
            body["context_id"] = _cid(context)
        if language:
            body["language"] = language
        if env:
            body["env_vars"] = dict(env)
        if timeout is not None:
            body["timeout"] = timeout
        t = await self._tunnel(sid, "POST", "/execute", body)
        try:
            it = t.events()
            status, data = 0, b""
            async for ev in it:  # the head, and the whole body of an error
                if isinstance(ev, h11.Response):
                    status = ev.status_code
                    if status < 300:
                        break
                elif isinstance(ev, h11.Data):
                    data += ev.data
        except BaseException:
            t.close()
            raise
        if status >= 300 or status == 0:
            if status:
                self._release(t)  # an error answered in full: the connection goes on
            else:
                t.close()
            raise _error(sid, status, data)
        return self._events(t, it, sid, timeout)

    async def _events(self, t: _Tunnel, it: AsyncIterator[h11.Event], sid: str,
                      timeout: float | None) -> AsyncIterator[CodeEvent]:
        deadline = None if timeout is None else time.monotonic() + timeout + TIMEOUT_GRACE
        buf = b""
        ended = complete = False
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    async with asyncio.timeout(left):
                        ev = await anext(it)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise Timeout(f"sandbox {sid}: the code interpreter did not end the run "
                                  f"within {timeout:g} s (+{TIMEOUT_GRACE:g} s): the run was "
                                  "abandoned, its kernel interrupted", sandbox_id=sid) \
                        from None
                if not isinstance(ev, h11.Data):
                    continue
                buf += ev.data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if obj.get("type") == "end_of_execution":
                        ended = True
                        continue
                    out = event_of(obj)
                    if out is not None:
                        yield out
            complete = True  # the whole answer was read
            if not ended:
                yield CodeError("UnexpectedEndOfExecution",
                                f"sandbox {sid}: the code interpreter's answer ended before "
                                "the execution did")
        finally:
            with contextlib.suppress(Exception):
                await it.aclose()
            # a run left early closes its tunnel: the server interrupts the kernel
            if complete and ended:
                self._release(t)
            else:
                t.close()

    async def execute(self, sid: str, code: str, **kw) -> CodeExecution:
        """`run`, gathered."""
        ex = CodeExecution()
        async for ev in await self.run(sid, code, **kw):
            gather(ex, ev)
        return ex


def gather(ex: CodeExecution, ev: CodeEvent) -> None:
    """Add one event to an execution's summary."""
    if isinstance(ev, CodeOutput):
        (ex.stdout if ev.stream == "stdout" else ex.stderr).append(ev.text)
    elif isinstance(ev, CodeResult):
        ex.results.append(ev)
    elif isinstance(ev, CodeError):
        ex.error = ev
    elif isinstance(ev, CodeTruncated):
        ex.truncated.append(ev.stream)
    elif isinstance(ev, CodeDone):
        ex.execution_count = ev.execution_count


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise Invalid(f"language {language!r} is not available; the code interpreter "
                      f"has {', '.join(LANGUAGES)}", field="language")


def _cid(cid: str) -> str:
    if not cid or not all(c.isalnum() or c in "-_" for c in cid) or len(cid) > 64:
        raise NotFound(f"no code context {cid!r}", field="context")
    return cid
