"""Routes: secrets. Write-only: no answer ever carries a secret's value, not even an error
(the app's validation handler reports only where and what, never the input)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from torpor.api.deps import engine_of
from torpor.api.keys import require_admin
from torpor.api.schemas import SECRET_NAME, SECRET_VALUE

router = APIRouter()

# the store's rules, also written here for the OpenAPI document
SecretName = Annotated[str, Field(pattern=SECRET_NAME)]
SecretValue = Annotated[str, Field(min_length=1, max_length=65536, pattern=SECRET_VALUE)]
HostList = Annotated[list[Annotated[str, Field(min_length=1, max_length=300)]],
                     Field(min_length=1, max_length=64)]
# writing a secret (its value, its allowed_hosts) changes what every sandbox granted it
# sends where, server-wide: admin only; reading names and hosts and granting stay open
ADMIN = [Depends(require_admin)]


class CreateSecret(BaseModel):
    """POST /v1/secrets. Field rules (name, value, host patterns) are checked by the
    store (engine/secrets.py), which names the field at fault."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, strict=True)

    name: SecretName
    value: SecretValue
    allowed_hosts: HostList
    inject_body: bool = False


class UpdateSecret(BaseModel):
    """PUT /v1/secrets/{name}: the fields given change, the others stay."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, strict=True)

    value: SecretValue | None = None
    allowed_hosts: HostList | None = None
    inject_body: bool | None = None


class SecretOut(BaseModel):
    name: str
    allowed_hosts: list[str]
    inject_body: bool
    created_at: datetime
    updated_at: datetime


class SecretList(BaseModel):
    secrets: list[SecretOut]


@router.post("/secrets", status_code=201, response_model=SecretOut, tags=["secrets"],
             dependencies=ADMIN)
async def create_secret(body: CreateSecret, request: Request):
    info = engine_of(request).secrets.create(body.name, body.value, body.allowed_hosts,
                                             inject_body=body.inject_body)
    return asdict(info)


@router.get("/secrets", response_model=SecretList, tags=["secrets"])
async def list_secrets(request: Request):
    return {"secrets": [asdict(i) for i in engine_of(request).secrets.list()]}


@router.get("/secrets/{name}", response_model=SecretOut, tags=["secrets"])
async def get_secret(name: str, request: Request):
    return asdict(engine_of(request).secrets.get(name))


@router.put("/secrets/{name}", response_model=SecretOut, tags=["secrets"],
            dependencies=ADMIN)
async def update_secret(name: str, body: UpdateSecret, request: Request):
    info = engine_of(request).secrets.replace(name, value=body.value,
                                              allowed_hosts=body.allowed_hosts,
                                              inject_body=body.inject_body)
    return asdict(info)


@router.delete("/secrets/{name}", status_code=204, tags=["secrets"], dependencies=ADMIN)
async def delete_secret(name: str, request: Request):
    engine_of(request).secrets.delete(name)
    return Response(status_code=204)
