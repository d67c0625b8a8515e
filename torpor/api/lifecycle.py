"""Routes: standby, hibernation, resume, idle timers, keep-alive holds, usage."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response

from torpor.api.deps import engine_of
from torpor.api.schemas import (
    KeepAliveIn,
    KeepAliveOut,
    SandboxOut,
    UpdateSandbox,
    UsageOut,
    UsageSummary,
)

router = APIRouter(tags=["standby"])


@router.post("/sandboxes/{sid}/standby", response_model=SandboxOut)
async def standby(sid: str, request: Request):
    return asdict(await engine_of(request).to_standby(sid))


@router.post("/sandboxes/{sid}/hibernate", response_model=SandboxOut)
async def hibernate(sid: str, request: Request):
    return asdict(await engine_of(request).hibernate(sid))


@router.post("/sandboxes/{sid}/resume", response_model=SandboxOut)
async def resume(sid: str, request: Request):
    return asdict(await engine_of(request).resume(sid))


@router.patch("/sandboxes/{sid}", response_model=SandboxOut)
async def update(sid: str, body: UpdateSandbox, request: Request):
    return asdict(engine_of(request).update(sid, **body.model_dump()))


@router.post("/sandboxes/{sid}/keepalive", response_model=KeepAliveOut, status_code=201)
async def keep_alive(sid: str, body: KeepAliveIn, request: Request):
    hid, seconds = await engine_of(request).hold(sid, body.seconds)
    return KeepAliveOut(hold_id=hid, seconds=seconds)


@router.delete("/sandboxes/{sid}/keepalive/{hold_id}", status_code=204)
async def release(sid: str, hold_id: str, request: Request):
    engine_of(request).release(sid, hold_id)
    return Response(status_code=204)


@router.get("/sandboxes/{sid}/usage", response_model=UsageOut)
async def usage(sid: str, request: Request):
    return engine_of(request).usage(sid)


@router.get("/usage", response_model=UsageSummary)
async def usage_all(request: Request, state: str | None = None):
    engine = engine_of(request)
    meta = {k[len("metadata."):]: v for k, v in request.query_params.items()
            if k.startswith("metadata.")}
    items = [engine.usage(i.id) for i in engine.list(state=state, metadata=meta)]
    total = {"cpu_seconds": round(sum(u["cpu_seconds"] for u in items), 6),
             "memory_gib_seconds": round(sum(u["memory_gib_seconds"] for u in items), 6),
             "disk_bytes": sum(u["disk_bytes"] for u in items),
             "snapshot_bytes": sum(s.bytes for s in engine.list_snapshots())}
    return {"sandboxes": items, "total": total}
