"""E2B's control plane over the engine: `create_control_app(engine)`, a FastAPI app.

v1 and v2 paths as E2B's SDKs call them (2.45.1 and the newest): create, connect, list,
info, kill, timeout, refresh, metrics, pause, resume, snapshots, fork, network, template
aliases and delete. Each route is a few lines over engine calls and `sandboxes.py`; every
error is E2B's `{"code": int, "message": str}` at E2B's status. Auth: `X-API-KEY` (any
Torpor key; `torpor keys create --e2b` makes one in E2B's `e2b_<hex>` form).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from datetime import UTC, datetime

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from torpor.compat.e2b import metrics as e2b_metrics
from torpor.compat.e2b import sandboxes as sbx
from torpor.compat.e2b.wire import Body
from torpor.errors import Invalid, NotFound, TorporError, Unauthorized

log = logging.getLogger("torpor.e2b")

BODY_MAX = 1 << 20
LIST_MAX = 100
IDEMPOTENCY_TTL = 3600.0
_STATUS = {"invalid": 400, "too_large": 400}  # the rest: the engine error's own status
_RETRY_SAFE = ("GET", "DELETE", "PUT")


class E2BError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error(request: Request, status: int, message: str) -> JSONResponse:
    # the newest SDK retries 429/502/503/504 unless told: only requests that can be repeated
    retry = "true" if request.method in _RETRY_SAFE and status in (429, 503) else "false"
    return JSONResponse({"code": status, "message": message}, status_code=status,
                        headers={"Should-Retry": retry})


def create_control_app(engine) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.idempotent = {}  # Idempotency-Key -> (monotonic time, future of the answer)
    app.state.samples = e2b_metrics.Samples()

    @app.exception_handler(E2BError)
    async def _e2b(request: Request, e: E2BError):
        return error(request, e.status, e.message)

    @app.exception_handler(TorporError)
    async def _torpor(request: Request, e: TorporError):
        return error(request, _STATUS.get(e.code, e.status), e.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        field = ".".join(str(x) for x in first.get("loc", [])[1:]) or "request"
        return error(request, 400, f"{field}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        what = f"{request.method} {request.url.path}"
        return error(request, e.status_code, f"{what}: {e.detail}"
                     if e.status_code != 404 else f"{what}: no such route in Torpor's "
                     "E2B-compatible API")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("E2B %s %s", request.method, request.url.path)
        return error(request, 500, f"{request.method} {request.url.path}: internal error "
                     f"({type(e).__name__}); the server's log has the details")

    auth = [Depends(_key)]
    from torpor.compat.e2b import routes

    routes.add(app, engine, auth)
    return app


async def _key(request: Request) -> str:
    key = request.headers.get("x-api-key")
    if not key:
        bearer = request.headers.get("authorization", "")
        key = bearer[7:].strip() if bearer[:7].lower() == "bearer " else None
    if not key:
        raise Unauthorized("missing API key: send it as X-API-KEY (E2B_API_KEY)")
    try:
        request.state.key_id = request.app.state.engine.keys.check(key)
    except Unauthorized:
        raise Unauthorized("invalid API key") from None
    return request.state.key_id


async def read_body(request: Request, where: str = "body") -> Body:
    """The request's JSON object (empty if there is no body), at most BODY_MAX bytes."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > BODY_MAX:
            raise Invalid(f"request body over {BODY_MAX} bytes", field=where)
    if not data.strip():
        return Body({}, where)
    try:
        return Body(json.loads(data), where)
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"the body is not valid JSON: {e}", field=where) from None


def view_or_404(engine, sid: str) -> sbx.View:
    v = sbx.view(engine, sid)
    if v is None:
        raise NotFound(f"sandbox {sid} not found")
    return v


# --- paging ---------------------------------------------------------------------------------
def page(items: list, limit: int | None, token: str | None, key,
         desc: bool = False) -> tuple[list, str | None]:
    """A page of `items` (sorted by `key`, descending if `desc`) after the cursor `token`,
    and the cursor of the next page (None on the last). The cursor is the last item's key,
    so a page does not shift when items before it go."""
    if limit is None:
        limit = LIST_MAX
    if not 1 <= limit <= LIST_MAX:
        raise Invalid(f"limit must be between 1 and {LIST_MAX}", field="limit")
    if token:
        try:
            after = json.loads(base64.urlsafe_b64decode(token.encode() + b"==="))
        except ValueError:
            raise Invalid("nextToken is not a token this server gave", field="nextToken") \
                from None
        items = [x for x in items if (key(x) < after if desc else key(x) > after)]
    chunk = items[:limit]
    nxt = None
    if len(items) > limit:
        nxt = base64.urlsafe_b64encode(json.dumps(key(chunk[-1])).encode()).decode()
        nxt = nxt.rstrip("=")
    return chunk, nxt


def new_token() -> str:
    return secrets.token_hex(32)


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


async def once(app, key: str | None, make):
    """Run `make()` once per Idempotency-Key (an hour): a retried create gets the first
    one's answer, not a second sandbox."""
    if not key:
        return await make()
    table = app.state.idempotent
    now = time.monotonic()
    for k in [k for k, (t, _) in table.items() if now - t > IDEMPOTENCY_TTL]:
        table.pop(k, None)
    found = table.get(key)
    if found is None:
        fut = asyncio.get_running_loop().create_future()
        table[key] = (now, fut)
        try:
            fut.set_result(await make())
        except BaseException as e:
            table.pop(key, None)
            fut.set_exception(e)
            fut.exception()  # retrieved: a failure is the caller's, not a stray warning
            raise
        return fut.result()
    return await asyncio.shield(found[1])
