"""Routes: the code interpreter of a sandbox (`code-interpreter` template): run code,
contexts. Translation only: `engine.code` does the work."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from torpor.api.deps import engine_of
from torpor.engine.code import (
    CodeDone,
    CodeError,
    CodeEvent,
    CodeExecution,
    CodeOutput,
    CodeResult,
    CodeTruncated,
    gather,
)
from torpor.errors import TorporError

router = APIRouter(tags=["code"])
ContextId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
NDJSON = "application/x-ndjson"


class RunCode(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(max_length=16 << 20)
    context: str | None = Field(None, description="a context's id (POST .../code/contexts); "
                                "default: the default context of `language`")
    language: str | None = Field(None, description="python (default) or bash; not with "
                                 "`context`")
    env: dict[str, str] | None = Field(None, description="environment variables for this "
                                       "run only")
    timeout: float | None = Field(None, gt=0, le=86400, description="seconds; past it the "
                                  "kernel is interrupted (the context keeps its state)")
    stream: bool = Field(False, description="answer with NDJSON lines as the code runs "
                         "(also when Accept is application/x-ndjson)")


class NewContext(BaseModel):
    model_config = ConfigDict(extra="forbid")
    language: str = "python"
    cwd: str | None = Field(None, description="its working directory, made if missing "
                            "(default /home/user)")


class ContextOut(BaseModel):
    id: str
    language: str
    cwd: str


class CodeErrorOut(BaseModel):
    name: str
    value: str
    traceback: str


class ExecutionOut(BaseModel):
    results: list[dict[str, Any]] = Field(description="each displayed value: its MIME forms "
                                          "(text, html, markdown, png, jpeg, svg, pdf, "
                                          "latex, json, javascript, extra) and "
                                          "is_main_result")
    logs: dict[str, list[str]] = Field(description="stdout and stderr, as chunks")
    error: CodeErrorOut | None
    execution_count: int | None
    truncated: list[str] = Field(description="streams cut at the interpreter's bound")


def event_body(ev: CodeEvent) -> dict:
    if isinstance(ev, CodeOutput):
        return {"type": ev.stream, "text": ev.text, "timestamp": ev.timestamp}
    if isinstance(ev, CodeResult):
        return {"type": "result", **ev.data, "is_main_result": ev.is_main_result}
    if isinstance(ev, CodeError):
        return {"type": "error", "name": ev.name, "value": ev.value,
                "traceback": ev.traceback}
    if isinstance(ev, CodeTruncated):
        return {"type": "truncated", "stream": ev.stream, "limit": ev.limit}
    assert isinstance(ev, CodeDone)
    return {"type": "end", "execution_count": ev.execution_count}


def execution_body(ex: CodeExecution) -> dict:
    return {"results": [{**r.data, "is_main_result": r.is_main_result} for r in ex.results],
            "logs": {"stdout": ex.stdout, "stderr": ex.stderr},
            "error": None if ex.error is None else {
                "name": ex.error.name, "value": ex.error.value,
                "traceback": ex.error.traceback},
            "execution_count": ex.execution_count, "truncated": ex.truncated}


@router.post("/sandboxes/{sid}/code", response_model=ExecutionOut, responses={
    200: {"description": "The execution: results, logs, error, execution_count. Streaming: "
          "NDJSON lines `stdout`/`stderr` {text}, `result` {MIME forms, is_main_result}, "
          "`error` {name, value, traceback}, `truncated` {stream, limit}, `end` "
          "{execution_count} last; an engine failure mid-run is a `failed` line "
          "{error, status}",
          "content": {NDJSON: {"schema": {"type": "string"}}}}})
async def run_code(sid: str, body: RunCode, request: Request) -> Response:
    events = await engine_of(request).code.run(
        sid, body.code, context=body.context, language=body.language, env=body.env,
        timeout=body.timeout)
    if body.stream or NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(_lines(events), media_type=NDJSON,
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})
    ex = await _gathered(request, events)
    if ex is None:
        return Response(status_code=499)  # the client left (nginx's code): nobody reads it
    return JSONResponse(execution_body(ex))


async def _gathered(request: Request,
                    events: AsyncIterator[CodeEvent]) -> CodeExecution | None:
    """The run's events gathered; a client that leaves first closes the run (the tunnel
    closes, the interpreter interrupts the kernel), as the streamed answer does."""
    ex = CodeExecution()

    async def consume() -> None:
        async for ev in events:
            gather(ex, ev)

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    run = asyncio.create_task(consume())
    gone = asyncio.create_task(client_gone())
    try:
        await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (run, gone):
            t.cancel()
        await asyncio.gather(run, gone, return_exceptions=True)
        await events.aclose()
    if run.cancelled():
        return None
    if run.exception() is not None:
        raise run.exception()
    return ex


async def _lines(events: AsyncIterator[CodeEvent]) -> AsyncIterator[str]:
    try:
        async for ev in events:
            yield json.dumps(event_body(ev), separators=(",", ":")) + "\n"
    except TorporError as e:
        yield json.dumps({"type": "failed", "error": e.to_dict(), "status": e.status}) + "\n"
    finally:
        await events.aclose()  # a client gone: the tunnel closes, the kernel is interrupted


@router.post("/sandboxes/{sid}/code/contexts", status_code=201, response_model=ContextOut)
async def create_context(sid: str, body: NewContext, request: Request):
    return await engine_of(request).code.create_context(sid, body.language, body.cwd)


@router.get("/sandboxes/{sid}/code/contexts", response_model=list[ContextOut])
async def list_contexts(sid: str, request: Request):
    return await engine_of(request).code.list_contexts(sid)


@router.post("/sandboxes/{sid}/code/contexts/{cid}/restart", response_model=ContextOut)
async def restart_context(sid: str, cid: ContextId, request: Request):
    return await engine_of(request).code.restart_context(sid, cid)


@router.delete("/sandboxes/{sid}/code/contexts/{cid}", status_code=204)
async def delete_context(sid: str, cid: ContextId, request: Request):
    await engine_of(request).code.delete_context(sid, cid)
    return Response(status_code=204)
