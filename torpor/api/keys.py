"""Routes: API keys, all admin-only; and `require_admin`, the scope check other admin-only
routes (secret management) share."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from torpor.api.deps import engine_of, presented_key
from torpor.api.schemas import CreateKey, KeyOut


async def require_admin(request: Request) -> str:
    """401 for a missing, wrong or revoked key; 403 for a valid key of scope user."""
    key = presented_key(request.headers.get("authorization", ""),
                        request.headers.get("x-api-key"))
    operation = f"{request.method} {request.url.path}"
    return engine_of(request).keys.check_admin(key, operation)


router = APIRouter(dependencies=[Depends(require_admin)], tags=["keys"])


@router.post("/keys", status_code=201, response_model=KeyOut)
async def create_key(body: CreateKey, request: Request):
    row, key = engine_of(request).keys.create(body.name, admin=body.scope == "admin",
                                              e2b=body.e2b)
    out = KeyOut.model_validate(row, from_attributes=True)
    out.key = key
    return out


@router.get("/keys", response_model=list[KeyOut])
async def list_keys(request: Request):
    return [KeyOut.model_validate(r, from_attributes=True)
            for r in engine_of(request).keys.list()]


@router.delete("/keys/{key_id}", status_code=204)
async def revoke_key(key_id: str, request: Request):
    engine_of(request).keys.revoke(key_id)
    return Response(status_code=204)
