"""Routes: templates and their builds.

`POST /v1/templates` checks a build (steps, or a Dockerfile translated by
`torpor.dockerfile`) and starts it on the engine (`engine.build_records`), which runs it
apart from the request: with `Accept: application/x-ndjson` the answer streams its events
(a first `{"type": "build", "id": ...}`), otherwise it is 202 with the build's record. A
client that goes away does not stop the build.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import tarfile
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from torpor.api.deps import engine_of
from torpor.api.schemas import (
    BuildOut,
    BuildTemplate,
    ErrorOut,
    TemplateDetailOut,
    TemplateOut,
)
from torpor.dockerfile import DockerfileError, TarContext, translate
from torpor.engine.build_records import BuildRecord
from torpor.engine.manager import Engine
from torpor.errors import Invalid, NotFound

NDJSON = "application/x-ndjson"
_STREAM = {"application/x-ndjson": {"schema": {"type": "string"}}}
RESPONSES = {
    404: {"model": ErrorOut, "description": "not_found: no such template or build (or the "
          "template a build starts from)"},
    409: {"model": ErrorOut, "description": "conflict: a build of that name runs already, "
          "or the template is in use (the error names its users)"},
}
router = APIRouter(tags=["templates"], responses=RESPONSES)


def _build_out(rec: BuildRecord) -> dict:
    url = f"/v1/templates/builds/{rec.id}"
    return BuildOut(**rec.to_dict(), url=url, logs_url=url + "/logs").model_dump(mode="json")


def _ndjson(events: AsyncIterator[dict], first: dict | None = None) -> StreamingResponse:
    async def body():
        if first is not None:
            yield json.dumps(first, separators=(",", ":")) + "\n"
        async for ev in events:
            yield json.dumps(ev, separators=(",", ":")) + "\n"

    return StreamingResponse(body(), media_type=NDJSON,
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _dockerfile(engine: Engine, body: BuildTemplate) -> tuple[list[dict], bytes | None]:
    """The steps of the body's Dockerfile and the context they read (renamed COPY sources
    added to it). Raises Invalid naming the field (and the line)."""
    context = None
    ctx = None
    if body.context is not None:
        try:
            context = base64.b64decode(body.context, validate=True)
            ctx = TarContext(context)
        except (binascii.Error, ValueError):
            raise Invalid("context must be base64", field="context") from None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise Invalid(f"the build context is not a tar or tar.gz archive: {e}",
                          field="context") from None

    def is_template(ref: str) -> bool:
        try:
            engine.template(ref)
        except NotFound:
            return False
        return True

    try:
        out = translate(body.dockerfile, build_args=body.build_args, is_template=is_template,
                        context=ctx)
    except DockerfileError as e:
        raise Invalid(f"Dockerfile: {e}", field="dockerfile", line=e.line,
                      instruction=e.instruction) from None
    if ctx is not None and out.staged:
        context = ctx.with_staged(out.staged)
    return out.steps, context


@router.post("/templates", status_code=202, response_model=BuildOut, responses={
    200: {"description": "With `Accept: application/x-ndjson`: the build's events as NDJSON "
          "lines, the first `{\"type\": \"build\", \"id\", \"url\"}`, the last `done` (with "
          "the template) or `error` (with its `status`)", "content": _STREAM},
    202: {"model": BuildOut, "description": "The build, started (follow its `logs_url`)"}})
async def build_template(body: BuildTemplate, request: Request):
    engine = engine_of(request)
    if body.dockerfile is not None:
        steps, context = await asyncio.to_thread(_dockerfile, engine, body)
    else:
        steps = [s.model_dump(exclude_none=True) for s in body.steps or []]
        context = body.context
    resources = {"cpu": body.cpu, "memory_mb": body.memory_mb, "disk_mb": body.disk_mb}
    network = body.network.model_dump(exclude_none=True) if body.network else None
    rec = await engine.build_records.start(body.name, body.tag, steps, context, resources,
                                           network)
    out = _build_out(rec)
    if NDJSON in request.headers.get("accept", ""):
        events = await engine.build_records.follow(rec.id, 0, follow=True)
        first = {"type": "build", "id": rec.id, "name": rec.name, "tag": rec.tag,
                 "url": out["url"]}
        return _ndjson(events, first)
    return JSONResponse(out, status_code=202, headers={"Location": out["url"]})


@router.get("/templates", response_model=list[TemplateOut])
async def list_templates(request: Request):
    return [t.to_dict() for t in engine_of(request).list_templates()]


@router.get("/templates/builds", response_model=list[BuildOut])
async def list_builds(request: Request):
    """Template builds, newest first (this server's last 100)."""
    return [_build_out(r) for r in engine_of(request).build_records.list()]


@router.get("/templates/builds/{build_id}", response_model=BuildOut)
async def get_build(build_id: str, request: Request):
    return _build_out(engine_of(request).build_records.get(build_id))


@router.get("/templates/builds/{build_id}/logs", response_class=StreamingResponse,
            responses={200: {"description": "The build's events as NDJSON lines from "
                             "`offset` (a count of events); with `follow`, until it ends",
                             "content": _STREAM}})
async def build_logs(build_id: str, request: Request, follow: bool = False,
                     offset: int = Query(0, ge=0, le=2**63 - 1)):
    events = await engine_of(request).build_records.follow(build_id, offset, follow)
    return _ndjson(events)


@router.get("/templates/{ref}", response_model=TemplateDetailOut)
async def get_template(ref: str, request: Request):
    """A template by name, name:tag or digest (sha256:...)."""
    return engine_of(request).template(ref).to_dict()


@router.delete("/templates/{ref}", status_code=204)
async def delete_template(ref: str, request: Request, force: bool = False):
    """Remove a name:tag. 409 while sandboxes or templates use it, unless `force` (what it
    holds stays until they are gone)."""
    engine_of(request).delete_template(ref, force)
    return Response(status_code=204)
