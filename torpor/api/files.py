"""Routes: files. Contents stream both ways through the agent channel, so the server holds
at most a flow-control window of any file, whatever its size."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from torpor.api.app import engine_of
from torpor.api.schemas import NO_NUL, USER_PATTERN, EntryOut, MkdirIn, RenameIn
from torpor.channel import AgentError, ChannelClosed
from torpor.errors import Invalid, from_agent

router = APIRouter(tags=["files"])
FilePath = Annotated[str, Query(min_length=1, max_length=4096, pattern=NO_NUL)]
User = Annotated[str, Query(min_length=1, max_length=33, pattern=USER_PATTERN)]
OCTET = {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                             "format": "binary"}}}}


@router.get("/sandboxes/{sid}/files", response_class=StreamingResponse,
            responses={200: {"description": "The file's bytes", **OCTET}})
async def read_file(sid: str, path: FilePath, request: Request, user: User = "user"):
    engine = engine_of(request)
    stream = await engine.open(sid, "fs_read", path=path, user=user)
    # wait for the size (or the error) before answering, so errors get their status code
    it = stream.__aiter__()
    first = await anext(it, None)
    if first is None or first.kind != "msg":
        try:
            await stream.finish()
        except AgentError as e:
            raise from_agent(sid, e) from None
    size = first.msg.get("size") if first is not None and first.msg else None

    async def body():
        try:
            async for ev in it:
                if ev.kind == "stdout":
                    yield ev.data
            await stream.finish()
        finally:
            stream.abandon()

    headers = {"Content-Length": str(size)} if size is not None else {}
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


# an empty body is an empty file
@router.put("/sandboxes/{sid}/files", openapi_extra={"requestBody": {"required": False,
                                                                     **OCTET}})
async def write_file(sid: str, path: FilePath, request: Request, user: User = "user",
                     mode: str | None = Query(None, pattern=r"^(?:0o?)?[0-7]{1,4}$")):
    engine = engine_of(request)
    try:
        perm = int(mode, 8) if mode is not None else None
    except ValueError:
        raise Invalid("mode must be octal, like 0644", field="mode") from None
    stream = await engine.open(sid, "fs_write", path=path, user=user, mode=perm)
    try:
        async for chunk in request.stream():
            if chunk:
                await stream.send(chunk)
                if stream.done.is_set():
                    break
        await stream.send_eof()
    except ChannelClosed:
        pass  # the agent closed the stream early: its error is in finish()
    try:
        return await stream.finish()
    except AgentError as e:
        raise from_agent(sid, e) from None


@router.get("/sandboxes/{sid}/files/stat", response_model=EntryOut)
async def stat(sid: str, path: FilePath, request: Request, user: User = "user"):
    return await engine_of(request).call(sid, "fs_stat", path=path, user=user)


@router.get("/sandboxes/{sid}/files/list", response_model=list[EntryOut])
async def list_dir(sid: str, path: FilePath, request: Request,
                   depth: int = Query(1, ge=1, le=1000), user: User = "user"):
    return await engine_of(request).call(sid, "fs_list", path=path, depth=depth, user=user)


@router.get("/sandboxes/{sid}/files/exists")
async def exists(sid: str, path: FilePath, request: Request, user: User = "user"):
    return await engine_of(request).call(sid, "fs_exists", path=path, user=user)


@router.post("/sandboxes/{sid}/files/mkdir")
async def mkdir(sid: str, body: MkdirIn, request: Request):
    return await engine_of(request).call(sid, "fs_mkdir", **body.model_dump())


@router.post("/sandboxes/{sid}/files/rename")
async def rename(sid: str, body: RenameIn, request: Request):
    return await engine_of(request).call(sid, "fs_rename", **body.model_dump())


@router.delete("/sandboxes/{sid}/files", status_code=204)
async def remove(sid: str, path: FilePath, request: Request, recursive: bool = False,
                 user: User = "user"):
    await engine_of(request).call(sid, "fs_remove", path=path, recursive=recursive, user=user)
    return Response(status_code=204)
