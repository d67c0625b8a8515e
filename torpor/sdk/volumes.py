"""Volumes and drives: `Volume`, `Drive` (sync) and `AsyncVolume`, `AsyncDrive`.

    Volume.create("data", size_mb=1024)
    sbx = Sandbox.create(volumes={"/data": "data"})             # one writer
    ro = Sandbox.create(volumes={"/data": {"volume": "data", "read_only": True}})
    Volume.upload("data", "/in/x.csv", b"...");  Volume.download("data", "/out.txt")

    Drive.create("team", size_mb=512)
    sbx.attach_drive("team")                                    # /drives/team, while it runs
    sbx.detach_drive("team")

A volume outlives every sandbox that used it; a second writer raises ConflictError naming
the sandbox that holds it. A drive is read and written by many running sandboxes at once.
Files go in and out without a sandbox; links inside are never followed.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from pydantic import Field

from torpor.sdk._api import Call, _given, _model, _models, _nothing, _sbx
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT, ClientConfig
from torpor.sdk.models import Time, _Model


class VolumeUser(_Model):
    sandbox_id: str
    path: str  # where it is mounted in that sandbox
    read_only: bool


class VolumeInfo(_Model):
    id: str
    name: str
    kind: str  # volume | drive
    size_mb: int
    created_at: Time
    used_bytes: int | None = None  # used inside it
    disk_bytes: int | None = None  # what its (sparse) image takes on the server's disk
    users: list[VolumeUser] = Field(default_factory=list)


class VolumeEntry(_Model):
    name: str
    type: str  # file | dir | symlink | other
    size: int
    mtime: str


# --- requests ----------------------------------------------------------------------------

def _path(plural: str, name: str, rest: str = "") -> str:
    return f"/v1/{plural}/{quote(name, safe='')}{rest}"


def _file(plural: str, name: str, path: str) -> str:
    return _path(plural, name, "/files/" + quote(path.lstrip("/"), safe="/"))


def create(plural: str, name: str, size_mb: int) -> Call[VolumeInfo]:
    return Call(f"create {plural[:-1]} {name}", "POST", f"/v1/{plural}", _model(VolumeInfo),
                json={"name": name, "size_mb": size_mb})


def list_all(plural: str) -> Call[list[VolumeInfo]]:
    return Call(f"list {plural}", "GET", f"/v1/{plural}", _models(VolumeInfo))


def get(plural: str, name: str) -> Call[VolumeInfo]:
    return Call(f"get {plural[:-1]} {name}", "GET", _path(plural, name), _model(VolumeInfo))


def delete(plural: str, name: str) -> Call[None]:
    return Call(f"delete {plural[:-1]} {name}", "DELETE", _path(plural, name), _nothing)


def upload(plural: str, name: str, path: str, data: bytes) -> Call[int]:
    return Call(f"write {path} of {plural[:-1]} {name}", "PUT", _file(plural, name, path),
                lambda r: r.json()["bytes"], content=data,
                headers={"Content-Type": "application/octet-stream"})


def download(plural: str, name: str, path: str) -> Call[bytes]:
    return Call(f"read {path} of {plural[:-1]} {name}", "GET", _file(plural, name, path),
                lambda r: r.content)


def attach_drive(sid: str, drive: str, path: str | None) -> Call[str]:
    return Call(f"attach drive {drive}", "POST", _sbx(sid, "/drives"),
                lambda r: r.json()["path"], json=_given(drive=drive, path=path),
                sandbox_id=sid)


def detach_drive(sid: str, drive: str) -> Call[None]:
    return Call(f"detach drive {drive}", "DELETE",
                _sbx(sid, "/drives/" + quote(drive, safe="")), _nothing, sandbox_id=sid)


def entries(plural: str, name: str, path: str) -> Call[list[VolumeEntry]]:
    return Call(f"list {path} of {plural[:-1]} {name}", "GET",
                _path(plural, name, "/entries"), _models(VolumeEntry), params={"path": path})


# --- clients -----------------------------------------------------------------------------

class _Sync:
    _plural = "volumes"

    @classmethod
    def _call(cls, call: Call[Any], url: str | None, api_key: str | None,
              request_timeout: float | None, transport: httpx.BaseTransport | None) -> Any:
        session = SyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)
        try:
            return session.call(call)
        finally:
            session.close()

    @classmethod
    def create(cls, name: str, size_mb: int, *, url: str | None = None,
               api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> VolumeInfo:
        """A new, empty one of `size_mb` (a real limit: writes past it fail with ENOSPC).
        InvalidError if the server's disk has not that much free."""
        return cls._call(create(cls._plural, name, size_mb), url, api_key, request_timeout,
                         transport)

    @classmethod
    def list(cls, *, url: str | None = None, api_key: str | None = None,
             request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
             transport: httpx.BaseTransport | None = None) -> list[VolumeInfo]:
        return cls._call(list_all(cls._plural), url, api_key, request_timeout, transport)

    @classmethod
    def get(cls, name: str, *, url: str | None = None, api_key: str | None = None,
            request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
            transport: httpx.BaseTransport | None = None) -> VolumeInfo:
        """Its size, what is used, and the sandboxes that use it."""
        return cls._call(get(cls._plural, name), url, api_key, request_timeout, transport)

    @classmethod
    def delete(cls, name: str, *, url: str | None = None, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> None:
        """Remove it and its files; ConflictError (naming them) while sandboxes use it."""
        cls._call(delete(cls._plural, name), url, api_key, request_timeout, transport)

    @classmethod
    def upload(cls, name: str, path: str, data: bytes, *, url: str | None = None,
               api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> int:
        """Write a file (directories made as needed, owned by the sandbox's user); the
        bytes written."""
        return cls._call(upload(cls._plural, name, path, data), url, api_key,
                         request_timeout, transport)

    @classmethod
    def download(cls, name: str, path: str, *, url: str | None = None,
                 api_key: str | None = None,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> bytes:
        return cls._call(download(cls._plural, name, path), url, api_key, request_timeout,
                         transport)

    @classmethod
    def files(cls, name: str, path: str = "/", *, url: str | None = None,
              api_key: str | None = None,
              request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
              transport: httpx.BaseTransport | None = None) -> list[VolumeEntry]:
        """The entries of a directory in it (links shown as links, not followed)."""
        return cls._call(entries(cls._plural, name, path), url, api_key, request_timeout,
                         transport)


class _Async:
    _plural = "volumes"

    @classmethod
    async def _call(cls, call: Call[Any], url: str | None, api_key: str | None,
                    request_timeout: float | None,
                    transport: httpx.AsyncBaseTransport | None) -> Any:
        session = AsyncSession(ClientConfig.resolve(url, api_key, request_timeout),
                               transport)
        try:
            return await session.call(call)
        finally:
            await session.aclose()

    @classmethod
    async def create(cls, name: str, size_mb: int, *, url: str | None = None,
                     api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> VolumeInfo:
        return await cls._call(create(cls._plural, name, size_mb), url, api_key,
                               request_timeout, transport)

    @classmethod
    async def list(cls, *, url: str | None = None, api_key: str | None = None,
                   request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                   transport: httpx.AsyncBaseTransport | None = None) -> list[VolumeInfo]:
        return await cls._call(list_all(cls._plural), url, api_key, request_timeout,
                               transport)

    @classmethod
    async def get(cls, name: str, *, url: str | None = None, api_key: str | None = None,
                  request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                  transport: httpx.AsyncBaseTransport | None = None) -> VolumeInfo:
        return await cls._call(get(cls._plural, name), url, api_key, request_timeout,
                               transport)

    @classmethod
    async def delete(cls, name: str, *, url: str | None = None, api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> None:
        await cls._call(delete(cls._plural, name), url, api_key, request_timeout, transport)

    @classmethod
    async def upload(cls, name: str, path: str, data: bytes, *, url: str | None = None,
                     api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> int:
        return await cls._call(upload(cls._plural, name, path, data), url, api_key,
                               request_timeout, transport)

    @classmethod
    async def download(cls, name: str, path: str, *, url: str | None = None,
                       api_key: str | None = None,
                       request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                       transport: httpx.AsyncBaseTransport | None = None) -> bytes:
        return await cls._call(download(cls._plural, name, path), url, api_key,
                               request_timeout, transport)

    @classmethod
    async def files(cls, name: str, path: str = "/", *, url: str | None = None,
                    api_key: str | None = None,
                    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                    transport: httpx.AsyncBaseTransport | None = None) -> list[VolumeEntry]:
        return await cls._call(entries(cls._plural, name, path), url, api_key,
                               request_timeout, transport)


class Volume(_Sync):
    """Volumes on the server, through classmethods (each one request). Mount one with
    `Sandbox.create(volumes={"/data": "name"})`. NotFoundError: no such volume."""

    _plural = "volumes"


class Drive(_Sync):
    """Drives on the server, through classmethods; attach one to a running sandbox with
    `sbx.attach_drive(name)` (it appears at /drives/<name>)."""

    _plural = "drives"


class AsyncVolume(_Async):
    """`Volume`, async."""

    _plural = "volumes"


class AsyncDrive(_Async):
    """`Drive`, async."""

    _plural = "drives"
