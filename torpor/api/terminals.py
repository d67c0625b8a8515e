"""Routes: terminals (a program on a pseudo-terminal, a login shell by default).

REST for their life (create, info, list, resize, kill, wait) and a WebSocket for their
bytes: `GET /v1/sandboxes/{sid}/pty/{pid}/ws[?offset=N|?replay=N]`. On it, binary frames
from the server are the terminal's output; binary frames from the client are keystrokes;
text frames are JSON: the client sends {"resize": [cols, rows]} (or {"input": "text"}),
the server sends {"type": "attached", "offset", "pid", "cols", "rows"} first, then
{"type": "exit", "exit_code", "signal"} when the program has exited and its output is all
out (then it closes, code 1000), or {"type": "error", "error": {...}} for a refused message.
A client that drops the socket leaves the terminal running; the next socket replays its
recent output (or from `offset`, to miss nothing and see nothing twice) and goes on live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from torpor.api.deps import engine_of, presented_key
from torpor.api.schemas import (
    MAX_COMMAND_TIMEOUT,
    Arg,
    EnvName,
    EnvValue,
    Path_,
    Strict,
    Uid,
    UserName,
    _names_schema,
)
from torpor.engine.terminals import MAX_SIZE, REPLAY
from torpor.errors import Invalid, TorporError

router = APIRouter(tags=["terminals"])
ws_router = APIRouter(tags=["terminals"])  # no key dependency: the socket checks its own
Pid = Annotated[int, Path(ge=1, le=2**31 - 1)]
Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]


class PtyIn(Strict):
    """`cmd` absent: the user's login shell (`$SHELL -l`, else bash, else sh). A string
    runs through `/bin/sh -c`; a list is the argv."""

    cols: Size = 80
    rows: Size = 24
    cmd: str | list[Arg] | None = Field(None, max_length=262144)
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=1000,
                                         json_schema_extra=_names_schema)
    cwd: Path_ | None = None
    user: UserName | Uid | None = None
    tag: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _cmd(self):
        if isinstance(self.cmd, list) and not self.cmd:
            raise ValueError("cmd: give a string, a non-empty list, or nothing for a shell")
        if isinstance(self.cmd, str) and "\0" in self.cmd:
            raise ValueError("cmd: must not contain a NUL byte")
        return self


class ResizeIn(Strict):
    cols: Size
    rows: Size


class KillIn(Strict):
    signal: str = Field("SIGKILL", max_length=16)


class PtySize(BaseModel):
    cols: int
    rows: int


class TerminalOut(BaseModel):
    pid: int
    argv: list[str]
    tag: str | None = None
    started_at: float
    running: bool
    exit_code: int | None = None
    signal: str | None = None
    output_bytes: int = 0  # offset after the last byte of output so far
    output_start: int = 0  # offset of the oldest byte still kept (a reattach may start here)
    pty: PtySize


@router.post("/sandboxes/{sid}/pty", status_code=201, response_model=TerminalOut)
async def create_terminal(sid: str, body: PtyIn, request: Request):
    cmd = ["/bin/sh", "-c", body.cmd] if isinstance(body.cmd, str) else body.cmd
    return await engine_of(request).terminals.create(
        sid, body.cols, body.rows, cmd=cmd, env=body.env, cwd=body.cwd, user=body.user,
        tag=body.tag)


@router.get("/sandboxes/{sid}/pty", response_model=list[TerminalOut])
async def list_terminals(sid: str, request: Request):
    return await engine_of(request).terminals.list(sid)


@router.get("/sandboxes/{sid}/pty/{pid}", response_model=TerminalOut)
async def terminal_info(sid: str, pid: Pid, request: Request):
    return await engine_of(request).terminals.info(sid, pid)


@router.post("/sandboxes/{sid}/pty/{pid}/resize", response_model=PtySize)
async def resize_terminal(sid: str, pid: Pid, body: ResizeIn, request: Request):
    return await engine_of(request).terminals.resize(sid, pid, body.cols, body.rows)


@router.post("/sandboxes/{sid}/pty/{pid}/kill")
async def kill_terminal(sid: str, pid: Pid, request: Request, body: KillIn | None = None):
    return await engine_of(request).terminals.kill(sid, pid, (body or KillIn()).signal)


@router.post("/sandboxes/{sid}/pty/{pid}/wait", response_model=TerminalOut)
async def wait_terminal(sid: str, pid: Pid, request: Request,
                        timeout: float = Query(60.0, ge=0, le=MAX_COMMAND_TIMEOUT)):
    return await engine_of(request).terminals.wait(sid, pid, timeout)


@ws_router.websocket("/v1/sandboxes/{sid}/pty/{pid}/ws")
async def terminal_socket(ws: WebSocket, sid: str, pid: int):
    engine = ws.app.state.engine
    try:
        engine.keys.check(presented_key(ws.headers.get("authorization", ""),
                                        ws.headers.get("x-api-key")))
        offset = _query_int(ws, "offset", None)
        replay = _query_int(ws, "replay", REPLAY)
        att = await engine.terminals.attach(sid, pid, offset=offset, replay=replay)
    except TorporError as e:
        await _refuse(ws, e)
        return
    try:
        await ws.accept()
        await ws.send_text(json.dumps({"type": "attached", "pid": pid, "offset": att.offset,
                                       **att.size}))
        out = asyncio.ensure_future(_pump_out(ws, att))
        inp = asyncio.ensure_future(_pump_in(ws, engine, sid, pid, att))
        done, _ = await asyncio.wait({out, inp}, return_when=asyncio.FIRST_COMPLETED)
        for t in (out, inp):
            if t not in done:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        for t in done:
            t.result()
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away: the terminal runs on
    finally:
        att.close()


async def _pump_out(ws: WebSocket, att) -> None:
    try:
        async for data in att.output():
            await ws.send_bytes(data)
    except TorporError as e:
        await ws.send_text(json.dumps({"type": "error", "error": e.to_dict()}))
        await ws.close(1011)
        return
    info = att.info or {}
    await ws.send_text(json.dumps({"type": "exit", "exit_code": info.get("exit_code"),
                                   "signal": info.get("signal")}))
    await ws.close(1000)


async def _pump_in(ws: WebSocket, engine, sid: str, pid: int, att) -> None:
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        data = msg.get("bytes")
        if data is not None:
            try:
                await att.send(data)
            except TorporError:
                pass  # it has exited: the output side says so, then closes
            continue
        try:
            obj = json.loads(msg.get("text") or "")
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            await _say(ws, Invalid('a text frame is JSON: {"resize": [cols, rows]} or '
                                   '{"input": "text"}; keystrokes go as binary frames',
                                   field="message"))
            continue
        try:
            if "resize" in obj:
                size = obj["resize"]
                if not (isinstance(size, list) and len(size) == 2):
                    raise Invalid('resize is [cols, rows]', field="resize")
                await engine.terminals.resize(sid, pid, size[0], size[1])
            elif isinstance(obj.get("input"), str):
                await att.send(obj["input"].encode())
            else:
                raise Invalid('unknown message: send {"resize": [cols, rows]} or '
                              '{"input": "text"}', field="message")
        except TorporError as e:
            await _say(ws, e)


async def _say(ws: WebSocket, e: TorporError) -> None:
    await ws.send_text(json.dumps({"type": "error", "error": e.to_dict(), "status": e.status}))


def _query_int(ws: WebSocket, name: str, default):
    raw = ws.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise Invalid(f"{name} must be a whole number of bytes", field=name) from None
    if v < 0:
        raise Invalid(f"{name} must be 0 or more", field=name)
    return v


async def _refuse(ws: WebSocket, e: TorporError) -> None:
    """Say no before the handshake: an HTTP answer with the error's status and JSON body
    where the server can send one, else accept and close at once with 4000 + status."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": e.to_dict()},
                                                   status_code=e.status))
        return
    await ws.accept()
    await _say(ws, e)
    await ws.close(4000 + e.status)
