"""Routes: commands and background processes."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from torpor.api.deps import engine_of, error_response, presented_key
from torpor.api.schemas import (
    MAX_COMMAND_TIMEOUT,
    CommandResultOut,
    ProcessOut,
    RunCommand,
    SignalIn,
    StdinIn,
)
from torpor.engine.manager import Engine
from torpor.engine.types import Chunk, Event, Exited, Failed, Output, Started, Truncated
from torpor.errors import TorporError, Unavailable

router = APIRouter(tags=["commands"])
RESULT_CAP = 16 << 20  # characters of stdout (and of stderr) kept in a waited-for result
Pid = Annotated[int, Path(ge=1, le=2**31 - 1)]


def event_body(ev: Event) -> dict:
    """An event as the API's JSON object (an NDJSON line, an SSE event's data)."""
    if isinstance(ev, Output):
        return {"type": ev.stream, "data": ev.data}
    if isinstance(ev, Started):
        return {"type": "start", "pid": ev.pid}
    if isinstance(ev, Truncated):
        return {"type": "truncated", "lost": ev.lost}
    if isinstance(ev, Exited):
        return {"type": "exit", "exit_code": ev.exit_code, "signal": ev.signal,
                "timed_out": ev.timed_out, "pid": ev.pid}
    return {"type": "error", "error": ev.error.to_dict(), "status": ev.error.status}


def chunk_body(ev: Chunk | Exited | Failed) -> dict:
    """An event of an attach (`encoding=base64`): output as base64 with its byte offset."""
    if isinstance(ev, Chunk):
        return {"type": ev.stream, "data": base64.b64encode(ev.data).decode(),
                "offset": ev.offset}
    return event_body(ev)


def stream_response(accept: str, events: AsyncIterator[Event],
                    body_of=event_body) -> StreamingResponse:
    """The events as NDJSON, or as server-sent events if `accept` (the request's Accept
    header) asks for text/event-stream."""
    sse = "text/event-stream" in accept

    async def body():
        async for ev in events:
            obj = body_of(ev)
            line = json.dumps(obj, separators=(",", ":"))
            yield f"event: {obj['type']}\ndata: {line}\n\n" if sse else line + "\n"

    media = "text/event-stream" if sse else "application/x-ndjson"
    return StreamingResponse(body(), media_type=media,
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.post("/sandboxes/{sid}/commands", responses={
    200: {"model": CommandResultOut, "description": "The command's result; with `stream: "
          "true`, its events as NDJSON lines, or as server-sent events when Accept asks "
          "for text/event-stream",
          "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                      "text/event-stream": {"schema": {"type": "string"}}}},
    201: {"model": ProcessOut, "description": "A background process, started"}})
async def run_command(sid: str, body: RunCommand, request: Request):
    # most requests never get here: FastCommands (below) answers them first
    return await command_response(engine_of(request), sid, body,
                                  request.headers.get("accept", ""))


async def command_response(engine: Engine, sid: str, body: RunCommand,
                           accept: str) -> Response:
    """Run a command as POST /v1/sandboxes/{sid}/commands asks: the route's whole work,
    shared by the route and FastCommands."""
    args = {"env": body.env, "cwd": body.cwd, "user": body.user, "tag": body.tag,
            "stdin": body.stdin}
    if body.background:
        # `timeout` is the command's, and a background process has none: it runs until it
        # exits or is signalled (the SDK sends its foreground default of 60 s for
        # background too)
        info = await engine.processes.start(sid, body.full_argv(), keep_alive=body.keep_alive,
                                            **args)
        return JSONResponse(ProcessOut(**info).model_dump(mode="json"), status_code=201)
    events = await engine.processes.run(sid, body.full_argv(), timeout=body.timeout, **args)
    if body.stream:
        return stream_response(accept, events)
    out = {"stdout": [], "stderr": []}
    size = {"stdout": 0, "stderr": 0}
    truncated = False
    pid = None
    async for ev in events:
        if isinstance(ev, Started):
            pid = ev.pid
        elif isinstance(ev, Output):
            if size[ev.stream] + len(ev.data) > RESULT_CAP:
                truncated = True
                continue
            out[ev.stream].append(ev.data)
            size[ev.stream] += len(ev.data)
        elif isinstance(ev, Failed):
            raise ev.error
        elif isinstance(ev, Exited):
            result = CommandResultOut(pid=ev.pid, exit_code=ev.exit_code,
                                      stdout="".join(out["stdout"]),
                                      stderr="".join(out["stderr"]), signal=ev.signal,
                                      timed_out=ev.timed_out, truncated=truncated)
            return JSONResponse(result.model_dump(mode="json"))
    raise Unavailable(f"sandbox {sid}: the command's stream ended early (pid {pid})",
                      sandbox_id=sid)


class FastCommands:
    """POST /v1/sandboxes/{id}/commands answered straight from ASGI, without FastAPI's
    per-request machinery (matching every route, solving dependencies, its request and
    response wrappers). It is the call an agent makes most and the one that wakes a sandbox:
    measured 0.64 -> 0.11 ms from the request to the engine call (of ~10 ms for a
    command). Same auth, the same pydantic model, the same work (command_response), the
    same error bodies. What it does not take goes on to the app unchanged, body included,
    so FastAPI answers it as before: a missing or bad key (401), a body that is not JSON
    or does not validate (422, FastAPI's own wording), a body cut short by BodyLimit (413).
    Sits inside BodyLimit and PortProxy, outside the router."""

    PATH = re.compile(r"^/v1/sandboxes/([^/]+)/commands$")

    def __init__(self, app, engine: Engine):
        self.app = app
        self.engine = engine

    async def __call__(self, scope, receive, send):
        m = (scope["type"] == "http" and scope["method"] == "POST"
             and self.PATH.match(scope["path"]))
        if not m:
            return await self.app(scope, receive, send)
        messages = []
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                break  # the whole body; or the client left, or BodyLimit answered 413
        headers: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), v)  # the first of a repeated header, as Starlette
        cmd = None
        if msg["type"] == "http.request":
            cmd = self._take(headers, b"".join(x.get("body", b"") for x in messages))
        if cmd is None:
            return await self.app(scope, _replay(messages, receive), send)
        try:
            resp = await command_response(self.engine, m.group(1), cmd,
                                          headers.get(b"accept", b"").decode("latin-1"))
        except TorporError as e:
            resp = error_response(e)
        await resp(scope, receive, send)

    def _take(self, headers: dict, body: bytes) -> RunCommand | None:
        """The command, if the request has a valid key and a valid JSON body; else None."""
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return None
        try:
            self.engine.keys.check(presented_key(
                headers.get(b"authorization", b"").decode("latin-1"),
                headers.get(b"x-api-key", b"").decode("latin-1")))
            # as FastAPI does it: json.loads, then the model in Python mode
            return RunCommand.model_validate(json.loads(body))
        except (TorporError, ValueError, ValidationError, RecursionError):
            return None  # FastAPI answers it, as it would have


def _replay(messages: list[dict], receive):
    """A receive() that gives back the messages already read, then reads on."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


@router.get("/sandboxes/{sid}/processes", response_model=list[ProcessOut])
async def list_processes(sid: str, request: Request):
    return await engine_of(request).processes.list(sid)


@router.get("/sandboxes/{sid}/processes/{pid}", response_model=ProcessOut)
async def process_info(sid: str, pid: Pid, request: Request):
    return await engine_of(request).processes.info(sid, pid)


@router.get("/sandboxes/{sid}/processes/{pid}/output", response_class=StreamingResponse,
            responses={200: {"description": "The process's events as NDJSON lines, or as "
                             "server-sent events when Accept asks for text/event-stream",
                             "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                                         "text/event-stream": {"schema": {"type": "string"}}}}})
async def process_output(sid: str, pid: Pid, request: Request, follow: bool = False,
                         offset: int | None = Query(None, ge=0, le=2**63 - 1),
                         encoding: Literal["utf-8", "base64"] = "utf-8"):
    # base64: the bytes exactly, each event with its offset, from `offset` strictly (409
    # naming the range kept if it is not): what a reader that comes back needs
    accept = request.headers.get("accept", "")
    if encoding == "base64":
        chunks = await engine_of(request).processes.attach(sid, pid, offset, follow)
        return stream_response(accept, chunks, chunk_body)
    events = await engine_of(request).processes.follow(sid, pid, offset, follow)
    return stream_response(accept, events)


@router.post("/sandboxes/{sid}/processes/{pid}/stdin")
async def process_stdin(sid: str, pid: Pid, body: StdinIn, request: Request):
    return await engine_of(request).processes.stdin(sid, pid, body.data, body.eof)


@router.post("/sandboxes/{sid}/processes/{pid}/signal")
async def process_signal(sid: str, pid: Pid, body: SignalIn, request: Request):
    return await engine_of(request).processes.signal(sid, pid, body.signal)


@router.post("/sandboxes/{sid}/processes/{pid}/wait", response_model=ProcessOut)
async def process_wait(sid: str, pid: Pid, request: Request,
                       timeout: float = Query(60.0, ge=0, le=MAX_COMMAND_TIMEOUT)):
    return await engine_of(request).processes.wait(sid, pid, timeout)
