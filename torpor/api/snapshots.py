"""Routes: snapshots of live sandboxes, restore in place, fork (engine/snapshots.py)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response

from torpor.api.deps import engine_of
from torpor.api.schemas import CreateSnapshot, ForkIn, RestoreIn, SandboxOut, SnapshotOut

router = APIRouter(tags=["snapshots"])


@router.post("/sandboxes/{sid}/snapshots", status_code=201, response_model=SnapshotOut)
async def create_snapshot(sid: str, body: CreateSnapshot, request: Request):
    return asdict(await engine_of(request).snapshot(sid, body.name, body.memory))


@router.get("/sandboxes/{sid}/snapshots", response_model=list[SnapshotOut])
async def sandbox_snapshots(sid: str, request: Request):
    return [asdict(s) for s in engine_of(request).list_snapshots(sandbox_id=sid)]


@router.get("/snapshots", response_model=list[SnapshotOut])
async def list_snapshots(request: Request, sandbox_id: str | None = None):
    return [asdict(s) for s in engine_of(request).list_snapshots(sandbox_id=sandbox_id)]


@router.get("/snapshots/{snap_id}", response_model=SnapshotOut)
async def get_snapshot(snap_id: str, request: Request):
    return asdict(engine_of(request).get_snapshot(snap_id))


@router.delete("/snapshots/{snap_id}", status_code=204)
async def delete_snapshot(snap_id: str, request: Request, force: bool = False):
    engine_of(request).delete_snapshot(snap_id, force)
    return Response(status_code=204)


@router.post("/sandboxes/{sid}/restore", response_model=SandboxOut)
async def restore(sid: str, body: RestoreIn, request: Request):
    return asdict(await engine_of(request).restore(sid, body.snapshot))


@router.post("/sandboxes/{sid}/fork", status_code=201, response_model=list[SandboxOut])
async def fork(sid: str, body: ForkIn, request: Request):
    return [asdict(i) for i in await engine_of(request).fork(sid, body.count)]
