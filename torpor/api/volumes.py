"""Routes: volumes and drives (engine/volumes.py), their files without a sandbox, and the
drives of a sandbox."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from torpor.api.deps import engine_of
from torpor.api.schemas import NO_NUL, Strict

router = APIRouter()
NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
Name = Annotated[str, Path(min_length=1, max_length=63, pattern=NAME)]
FilePath = Annotated[str, Path(min_length=1, max_length=4096, pattern=NO_NUL)]
OCTET = {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                             "format": "binary"}}}}


class CreateVolume(Strict):
    name: str = Field(min_length=1, max_length=63, pattern=NAME)
    size_mb: int = Field(ge=16, le=1 << 20)


class UserOut(BaseModel):
    sandbox_id: str
    path: str
    read_only: bool


class VolumeOut(BaseModel):
    id: str
    name: str
    kind: str
    size_mb: int
    created_at: datetime
    used_bytes: int | None
    disk_bytes: int | None
    users: list[UserOut]


class FileEntryOut(BaseModel):
    name: str
    type: str  # file | dir | symlink | other
    size: int
    mtime: str


class WrittenOut(BaseModel):
    path: str
    bytes: int


class AttachDrive(Strict):
    drive: str = Field(min_length=1, max_length=63, pattern=NAME)
    # where it appears: /drives/<name> (default: the drive's name)
    path: str | None = Field(None, min_length=1, max_length=72,
                             pattern=r"^(/drives/)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class AttachedOut(BaseModel):
    kind: str
    name: str
    path: str
    read_only: bool


def _routes(kind: str, plural: str) -> None:
    tags = [plural]

    @router.post(f"/{plural}", status_code=201, response_model=VolumeOut, tags=tags,
                 name=f"create_{kind}")
    async def create(body: CreateVolume, request: Request):
        return asdict(engine_of(request).volumes.create(kind, body.name, body.size_mb))

    @router.get(f"/{plural}", response_model=list[VolumeOut], tags=tags,
                name=f"list_{plural}")
    async def list_all(request: Request):
        return [asdict(v) for v in engine_of(request).volumes.list(kind)]

    @router.get(f"/{plural}/{{name}}", response_model=VolumeOut, tags=tags,
                name=f"get_{kind}")
    async def get(name: Name, request: Request):
        return asdict(engine_of(request).volumes.get(kind, name))

    @router.delete(f"/{plural}/{{name}}", status_code=204, tags=tags, name=f"delete_{kind}")
    async def delete(name: Name, request: Request):
        engine_of(request).volumes.delete(kind, name)
        return Response(status_code=204)

    @router.get(f"/{plural}/{{name}}/entries", response_model=list[FileEntryOut], tags=tags,
                name=f"list_{kind}_files")
    async def entries(name: Name, request: Request,
                      path: str = Query("/", max_length=4096, pattern=NO_NUL)):
        return engine_of(request).volumes.list_files(kind, name, path)

    @router.get(f"/{plural}/{{name}}/files/{{path:path}}", response_class=StreamingResponse,
                tags=tags, name=f"read_{kind}_file",
                responses={200: {"description": "The file's bytes", **OCTET}})
    async def read(name: Name, path: FilePath, request: Request):
        size, chunks = engine_of(request).volumes.read(kind, name, path)
        return StreamingResponse(chunks, media_type="application/octet-stream",
                                 headers={"Content-Length": str(size)})

    @router.put(f"/{plural}/{{name}}/files/{{path:path}}", response_model=WrittenOut,
                tags=tags, name=f"write_{kind}_file",
                openapi_extra={"requestBody": {"required": False, **OCTET}})
    async def write(name: Name, path: FilePath, request: Request):
        n = await engine_of(request).volumes.write(kind, name, path, request.stream())
        return {"path": "/" + path.lstrip("/"), "bytes": n}


_routes("volume", "volumes")
_routes("drive", "drives")


@router.get("/sandboxes/{sid}/volumes", response_model=list[AttachedOut],
            tags=["volumes"])
async def sandbox_storage(sid: str, request: Request):
    """The volumes and drives a sandbox uses, and where."""
    return engine_of(request).sandbox_storage(sid)


@router.post("/sandboxes/{sid}/drives", response_model=AttachedOut, tags=["drives"])
async def attach_drive(sid: str, body: AttachDrive, request: Request):
    path = await engine_of(request).attach_drive(sid, body.drive, body.path)
    return {"kind": "drive", "name": body.drive, "path": path, "read_only": False}


@router.delete("/sandboxes/{sid}/drives/{name}", status_code=204, tags=["drives"])
async def detach_drive(sid: str, name: Name, request: Request):
    await engine_of(request).detach_drive(sid, name)
    return Response(status_code=204)
