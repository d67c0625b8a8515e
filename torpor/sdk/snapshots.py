"""Snapshots of live sandboxes: `Snapshot` (sync) and `AsyncSnapshot` (async).

    snap = sbx.snapshot(name="before-migration")      # memory and files; sbx runs on
    other = Sandbox.create(snapshot=snap.id)           # a copy, processes as they were
    sbx.restore(snap.id)                               # roll sbx back, same id
    forks = sbx.fork(count=3)                          # three copies of sbx as it is now
    Snapshot.list(sandbox_id=sbx.id); Snapshot.delete(snap.id)

A snapshot outlives its sandbox. `memory=False` keeps its files only (a sandbox made from
it boots fresh over them). Deleting one that sandboxes use raises ConflictError unless
`force=True`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from torpor.sdk._api import CHECKPOINT_TIMEOUT, Call, _given, _model, _models, _nothing, _sbx
from torpor.sdk._api import long_timeout as _long
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT, ClientConfig
from torpor.sdk.models import SandboxInfo, Time, _Model


class SnapshotInfo(_Model):
    id: str  # snap_...
    name: str | None = None  # the label it was given
    sandbox_id: str  # the sandbox it was taken of (which may be gone)
    memory: bool  # processes and memory too (else files only)
    bytes: int  # what it takes on the server's disk
    created_at: Time
    template: str  # its digest in the server's template store
    cpu: float
    memory_mb: int
    disk_mb: int
    pause_ms: float | None = None  # how long the sandbox stood still for it


# --- requests ----------------------------------------------------------------------------

def _path(snap_id: str) -> str:
    return f"/v1/snapshots/{quote(snap_id, safe='')}"


def create_snapshot(sid: str, name: str | None, memory: bool) -> Call[SnapshotInfo]:
    return Call("snapshot sandbox", "POST", _sbx(sid, "/snapshots"), _model(SnapshotInfo),
                json=_given(name=name, memory=memory),
                timeout=_long(CHECKPOINT_TIMEOUT), sandbox_id=sid)


def list_snapshots(sandbox_id: str | None) -> Call[list[SnapshotInfo]]:
    return Call("list snapshots", "GET", "/v1/snapshots", _models(SnapshotInfo),
                params=_given(sandbox_id=sandbox_id))


def get_snapshot(snap_id: str) -> Call[SnapshotInfo]:
    return Call(f"get snapshot {snap_id}", "GET", _path(snap_id), _model(SnapshotInfo))


def delete_snapshot(snap_id: str, force: bool) -> Call[None]:
    return Call(f"delete snapshot {snap_id}", "DELETE", _path(snap_id), _nothing,
                params={"force": "true"} if force else None)


def restore(sid: str, snap_id: str) -> Call[SandboxInfo]:
    return Call(f"restore snapshot {snap_id}", "POST", _sbx(sid, "/restore"),
                _model(SandboxInfo), json={"snapshot": snap_id},
                timeout=_long(CHECKPOINT_TIMEOUT), sandbox_id=sid)


def fork(sid: str, count: int) -> Call[list[SandboxInfo]]:
    return Call(f"fork sandbox {count} times", "POST", _sbx(sid, "/fork"),
                _models(SandboxInfo), json={"count": count},
                timeout=_long(CHECKPOINT_TIMEOUT), sandbox_id=sid)


# --- clients -----------------------------------------------------------------------------

def _sync(call: Call[Any], url: str | None, api_key: str | None,
          request_timeout: float | None, transport: httpx.BaseTransport | None) -> Any:
    session = SyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)
    try:
        return session.call(call)
    finally:
        session.close()


async def _async(call: Call[Any], url: str | None, api_key: str | None,
                 request_timeout: float | None,
                 transport: httpx.AsyncBaseTransport | None) -> Any:
    session = AsyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)
    try:
        return await session.call(call)
    finally:
        await session.aclose()


class Snapshot:
    """Snapshots on the server, through classmethods (each one request); take one with
    `Sandbox.snapshot()`. NotFoundError: no such snapshot."""

    @classmethod
    def list(cls, sandbox_id: str | None = None, *, url: str | None = None,
             api_key: str | None = None,
             request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
             transport: httpx.BaseTransport | None = None) -> list[SnapshotInfo]:
        """Every snapshot, oldest first; only those of `sandbox_id` if given."""
        return _sync(list_snapshots(sandbox_id), url, api_key, request_timeout, transport)

    @classmethod
    def get(cls, snapshot_id: str, *, url: str | None = None, api_key: str | None = None,
            request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
            transport: httpx.BaseTransport | None = None) -> SnapshotInfo:
        return _sync(get_snapshot(snapshot_id), url, api_key, request_timeout, transport)

    @classmethod
    def delete(cls, snapshot_id: str, force: bool = False, *, url: str | None = None,
               api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> None:
        """ConflictError while sandboxes use it, unless `force` (its files then stay until
        they are gone)."""
        _sync(delete_snapshot(snapshot_id, force), url, api_key, request_timeout, transport)


class AsyncSnapshot:
    """`Snapshot`, async."""

    @classmethod
    async def list(cls, sandbox_id: str | None = None, *, url: str | None = None,
                   api_key: str | None = None,
                   request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                   transport: httpx.AsyncBaseTransport | None = None) -> list[SnapshotInfo]:
        return await _async(list_snapshots(sandbox_id), url, api_key, request_timeout,
                            transport)

    @classmethod
    async def get(cls, snapshot_id: str, *, url: str | None = None,
                  api_key: str | None = None,
                  request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                  transport: httpx.AsyncBaseTransport | None = None) -> SnapshotInfo:
        return await _async(get_snapshot(snapshot_id), url, api_key, request_timeout,
                            transport)

    @classmethod
    async def delete(cls, snapshot_id: str, force: bool = False, *, url: str | None = None,
                     api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> None:
        await _async(delete_snapshot(snapshot_id, force), url, api_key, request_timeout,
                     transport)
