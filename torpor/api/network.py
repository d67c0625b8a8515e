"""Routes: egress policy, the egress log, exposed ports, preview URLs, custom domains.

The preview proxy itself (`/v1/sandboxes/{id}/ports/{port}/...`) is not a route here: it
is the `PortProxy` ASGI layer in `app.py`, because it forwards any method, streams both
ways and carries WebSockets.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from torpor.api.deps import engine_of
from torpor.api.schemas import (
    DomainIn,
    DomainOut,
    EgressLog,
    EgressOut,
    NetworkIn,
    PortIn,
    PortOut,
    PreviewUrlIn,
    PreviewUrlOut,
    SandboxOut,
)

router = APIRouter(tags=["network"])
Port = Annotated[int, Path(ge=1, le=65535)]


@router.patch("/sandboxes/{sid}/network", response_model=SandboxOut)
async def update_network(sid: str, body: NetworkIn, request: Request):
    info = engine_of(request).update_network(sid, body.model_dump(exclude_none=True))
    return asdict(info)


@router.get("/sandboxes/{sid}/egress", response_model=EgressLog)
async def egress_log(sid: str, request: Request, limit: int = Query(100, ge=1, le=1000),
                     before: int | None = Query(None, ge=1, le=2**63 - 1)):
    rows = engine_of(request).traffic.egress_log(sid, limit=limit, before=before)
    return {"entries": [EgressOut.model_validate(r, from_attributes=True) for r in rows]}


@router.get("/sandboxes/{sid}/ports", response_model=list[PortOut])
async def list_ports(sid: str, request: Request):
    engine = engine_of(request)
    info = engine.get(sid)
    return [{"port": int(p), "public": bool(v.get("public")),
             "url": engine.traffic.preview_base(sid, int(p))} for p, v in info.ports.items()]


@router.put("/sandboxes/{sid}/ports/{port}", response_model=PortOut)
async def expose_port(sid: str, port: Port, body: PortIn, request: Request):
    return engine_of(request).traffic.set_port(sid, port, body.public)


@router.delete("/sandboxes/{sid}/ports/{port}", status_code=204)
async def unexpose_port(sid: str, port: Port, request: Request):
    engine_of(request).traffic.set_port(sid, port, False)
    return Response(status_code=204)


@router.post("/sandboxes/{sid}/preview-urls", status_code=201, response_model=PreviewUrlOut)
async def preview_url(sid: str, body: PreviewUrlIn, request: Request):
    return engine_of(request).traffic.preview_url(sid, body.port, body.expires_in)


def _domain_out(request: Request, row) -> dict:
    s = engine_of(request).settings
    return {"domain": row.domain, "sandbox_id": row.sandbox_id, "port": row.port,
            "public": row.public, "created_at": row.created_at,
            "url": f"http://{row.domain}:{s.preview_port}/"}


@router.post("/domains", status_code=201, response_model=DomainOut)
async def add_domain(body: DomainIn, request: Request):
    row = engine_of(request).traffic.add_domain(body.domain, body.sandbox_id, body.port,
                                                body.public)
    return _domain_out(request, row)


@router.get("/domains", response_model=list[DomainOut])
async def list_domains(request: Request):
    return [_domain_out(request, r) for r in engine_of(request).traffic.domains()]


@router.delete("/domains/{domain}", status_code=204)
async def remove_domain(domain: str, request: Request):
    engine_of(request).traffic.remove_domain(domain)
    return Response(status_code=204)
