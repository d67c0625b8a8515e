"""Routes: files. Contents stream both ways through the agent channel, so the server holds
at most a flow-control window of any file, whatever its size."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from torpor.api.deps import engine_of
from torpor.api.schemas import NO_NUL, USER_PATTERN, EntryOut, MkdirIn, RenameIn
from torpor.engine.types import FsEvent
from torpor.errors import Invalid, TorporError

router = APIRouter(tags=["files"])
FilePath = Annotated[str, Query(min_length=1, max_length=4096, pattern=NO_NUL)]
User = Annotated[str, Query(min_length=1, max_length=33, pattern=USER_PATTERN)]
OCTET = {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                             "format": "binary"}}}}


@router.get("/sandboxes/{sid}/files", response_class=StreamingResponse,
            responses={200: {"description": "The file's bytes", **OCTET}})
async def read_file(sid: str, path: FilePath, request: Request, user: User = "user"):
    # the engine answers once it has the size (or the error), so errors get their status
    size, contents = await engine_of(request).files.read(sid, path, user)
    headers = {"Content-Length": str(size)} if size is not None else {}
    return StreamingResponse(contents, media_type="application/octet-stream",
                             headers=headers)


# an empty body is an empty file
@router.put("/sandboxes/{sid}/files", openapi_extra={"requestBody": {"required": False,
                                                                     **OCTET}})
async def write_file(sid: str, path: FilePath, request: Request, user: User = "user",
                     mode: str | None = Query(None, pattern=r"^(?:0o?)?[0-7]{1,4}$")):
    try:
        perm = int(mode, 8) if mode is not None else None
    except ValueError:
        raise Invalid("mode must be octal, like 0644", field="mode") from None
    return await engine_of(request).files.write(sid, path, user, perm, request.stream())


@router.get("/sandboxes/{sid}/files/stat", response_model=EntryOut)
async def stat(sid: str, path: FilePath, request: Request, user: User = "user"):
    return await engine_of(request).files.stat(sid, path, user)


@router.get("/sandboxes/{sid}/files/list", response_model=list[EntryOut])
async def list_dir(sid: str, path: FilePath, request: Request,
                   depth: int = Query(1, ge=1, le=1000), user: User = "user"):
    return await engine_of(request).files.list(sid, path, depth, user)


@router.get("/sandboxes/{sid}/files/exists")
async def exists(sid: str, path: FilePath, request: Request, user: User = "user"):
    return await engine_of(request).files.exists(sid, path, user)


@router.post("/sandboxes/{sid}/files/mkdir")
async def mkdir(sid: str, body: MkdirIn, request: Request):
    return await engine_of(request).files.mkdir(sid, **body.model_dump())


@router.post("/sandboxes/{sid}/files/rename")
async def rename(sid: str, body: RenameIn, request: Request):
    return await engine_of(request).files.rename(sid, **body.model_dump())


@router.delete("/sandboxes/{sid}/files", status_code=204)
async def remove(sid: str, path: FilePath, request: Request, recursive: bool = False,
                 user: User = "user"):
    await engine_of(request).files.remove(sid, path, recursive, user)
    return Response(status_code=204)


def _watch_body(ev: FsEvent) -> dict:
    body = {"type": ev.type, "path": ev.path, "dir": ev.dir}
    if ev.old_path is not None:
        body["old_path"] = ev.old_path
    return body


@router.get("/sandboxes/{sid}/files/watch", response_class=StreamingResponse,
            responses={200: {"description": "Changes under the directory, as NDJSON lines, "
                             "or as server-sent events when Accept asks for "
                             "text/event-stream: first {type: watching, path}, then {type: "
                             "create|write|remove|rename|chmod|overflow|gone, path, dir, "
                             "old_path?}",
                             "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                                         "text/event-stream": {"schema": {"type": "string"}}}}})
async def watch(sid: str, path: FilePath, request: Request, recursive: bool = True,
                user: User = "user"):
    # the engine answers once the watch is in place (or with the error: 404, 409)
    events = await engine_of(request).files.watch(sid, path, recursive, user)
    sse = "text/event-stream" in request.headers.get("accept", "")

    def line(obj: dict) -> str:
        text = json.dumps(obj, separators=(",", ":"))
        return f"event: {obj['type']}\ndata: {text}\n\n" if sse else text + "\n"

    async def body():
        yield line({"type": "watching", "path": path})
        try:
            async for ev in events:
                yield line(_watch_body(ev))
        except TorporError as e:
            yield line({"type": "error", "error": e.to_dict(), "status": e.status})
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream" if sse
                             else "application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
