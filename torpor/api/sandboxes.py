"""Routes: sandboxes (templates: templates.py)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response

from torpor.api.deps import engine_of
from torpor.api.schemas import CreateSandbox, EventOut, SandboxOut

router = APIRouter()


@router.post("/sandboxes", status_code=201, response_model=SandboxOut, tags=["sandboxes"])
async def create_sandbox(body: CreateSandbox, request: Request):
    info = await engine_of(request).create(**body.model_dump())
    return asdict(info)


@router.get("/sandboxes", response_model=list[SandboxOut], tags=["sandboxes"])
async def list_sandboxes(request: Request, state: str | None = None):
    meta = {k[len("metadata."):]: v for k, v in request.query_params.items()
            if k.startswith("metadata.")}
    return [asdict(i) for i in engine_of(request).list(state=state, metadata=meta)]


@router.get("/sandboxes/{sid}", response_model=SandboxOut, tags=["sandboxes"])
async def get_sandbox(sid: str, request: Request):
    return asdict(engine_of(request).get(sid))


@router.delete("/sandboxes/{sid}", status_code=204, tags=["sandboxes"])
async def delete_sandbox(sid: str, request: Request):
    await engine_of(request).delete(sid)
    return Response(status_code=204)


@router.get("/sandboxes/{sid}/events", response_model=list[EventOut], tags=["sandboxes"])
async def sandbox_events(sid: str, request: Request):
    return [EventOut.model_validate(e, from_attributes=True)
            for e in engine_of(request).events(sid)]

