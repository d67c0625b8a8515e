"""The native REST front door: app factory, auth, error mapping, body limits.

Routes live in sibling modules, each a thin translation onto one engine call; what they
share (the engine of a request, keys, error answers) is in `deps`.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from torpor._version import __version__
from torpor.api.deps import (
    ADMIN_ONLY,
    COMMON,
    ON_SANDBOX,
    error_response,
    require_key,
    scope_key,
)
from torpor.api.schemas import BUILD_BODY_MAX, PATTERN_WORDS
from torpor.compat.e2b.routing import E2BDoor
from torpor.engine.manager import Engine
from torpor.errors import TooLarge, TorporError
from torpor.mcp.server import McpDoor, McpMount

log = logging.getLogger("torpor.api")


# the member of a union (`user`: a name or a uid) pydantic adds to an error's location
_UNION_TAG = re.compile(r"^(constrained-)?(str|int|float|bool)$|^function-")
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "too_large"}


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, counting as they arrive (so a
    chunked body without Content-Length is caught too). File uploads stream and are exempt;
    a template build (its context inside) may have BUILD_BODY_MAX."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] == "PUT"
                                       and scope["path"].endswith("/files")):
            return await self.app(scope, receive, send)
        limit = (BUILD_BODY_MAX if scope["method"] == "POST" and scope["path"] == "/v1/templates"
                 else self.limit)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                return await self._too_large(send, limit)
        seen = 0
        answered = False

        async def counting_receive():
            nonlocal seen, answered
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    # answer now and tell the app the client left, so it stops reading
                    if not answered:
                        answered = True
                        await self._too_large(send, limit)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not answered:
                await send(msg)

        await self.app(scope, counting_receive, guarded_send)

    async def _too_large(self, send, limit: int):
        resp = error_response(TooLarge(f"request body over {limit} bytes; upload files "
                                       "with PUT /v1/sandboxes/{id}/files, which streams"))
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


class PortProxy:
    """`/v1/sandboxes/{id}/ports/{port}/{path}`: any method, streamed both ways, and
    WebSockets, forwarded to that port inside the sandbox (API key required, and never
    forwarded). Everything else goes on to the app."""

    PATH = re.compile(r"^/v1/sandboxes/([a-z0-9_]{1,32})/ports/(\d{1,5})(/.*)$")

    def __init__(self, app, engine: Engine):
        self.app = app
        self.engine = engine

    async def __call__(self, scope, receive, send):
        m = self.PATH.match(scope.get("path", "")) if scope["type"] in (
            "http", "websocket") else None
        if m is None:
            return await self.app(scope, receive, send)
        try:
            self.engine.keys.check(scope_key(scope))
        except TorporError as e:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 4401})
            resp = error_response(e)
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": resp.raw_headers})
            return await send({"type": "http.response.body", "body": resp.body})
        sid, port, path = m.group(1), int(m.group(2)), m.group(3)
        await self.engine.traffic.gateway.asgi(scope, receive, send, sid, port, path)


def create_app(engine: Engine, own_engine: bool = True) -> FastAPI:
    mcp = McpDoor(engine)  # the MCP door at /mcp: its sessions live within the lifespan

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own_engine:
            await engine.start()
        async with mcp.running():
            yield
        if own_engine:
            await engine.stop()

    app = FastAPI(title="Torpor", version=__version__, lifespan=lifespan,
                  description="Perpetual sandboxes for AI agents. Auth: `Authorization: "
                              "Bearer KEY` or `X-API-Key: KEY`.")
    app.state.engine = engine

    @app.exception_handler(TorporError)
    async def _torpor_error(request: Request, e: TorporError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": _json_syntax(first, e.body)}, status_code=422)
        loc = list(first.get("loc", []))
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]  # where it was sent; a body field may be called "path" too
        field = ".".join(str(x) for x in loc if not _UNION_TAG.match(str(x))) or None
        msg = f"{field or 'request'}: {_say(first)}"
        body = {"error": {"code": "invalid", "message": msg, "field": field,
                          "errors": [{"loc": list(map(str, x.get("loc", []))),
                                      "msg": _say(x)} for x in errs]}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        # Starlette's own answers (no route, wrong method, unreadable body) in our envelope
        what = f"{request.method} {request.url.path}"
        headers = dict(e.headers or {})
        if e.status_code == 405:  # Starlette names the methods of one route of the path
            headers["Allow"] = ", ".join(_allowed(request))
        message = {404: f"no route {what}; the routes are listed at /openapi.json",
                   405: f"{what}: method not allowed (allowed: {headers.get('Allow')})",
                   400: f"{what}: the request body could not be read as UTF-8 JSON"
                   }.get(e.status_code, f"{what}: {e.detail}")
        err = TorporError(message)
        err.status, err.code = e.status_code, _HTTP_CODES.get(e.status_code, "http_error")
        return error_response(err, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        # a bug: the traceback goes to the log (Starlette re-raises), the client gets JSON
        err = TorporError(f"{request.method} {request.url.path}: internal error "
                          f"({type(e).__name__}); the server's log has the details")
        return error_response(err)

    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"ok": True, "version": __version__, "runsc": engine.describe().get("version")}

    from torpor.api import (
        code,
        commands,
        files,
        keys,
        lifecycle,
        network,
        sandboxes,
        secrets,
        snapshots,
        templates,
        terminals,
        volumes,
    )

    deps = [Depends(require_key)]
    for module, responses in ((sandboxes, ON_SANDBOX), (keys, ADMIN_ONLY),
                              (commands, ON_SANDBOX), (code, ON_SANDBOX),
                              (files, ON_SANDBOX),
                              (lifecycle, ON_SANDBOX), (secrets, ADMIN_ONLY),
                              (network, ON_SANDBOX), (templates, COMMON),
                              (snapshots, ON_SANDBOX), (volumes, ON_SANDBOX),
                              (terminals, ON_SANDBOX)):
        app.include_router(module.router, prefix="/v1", dependencies=deps,
                           responses=responses)
    app.include_router(terminals.ws_router)  # a WebSocket checks the key itself
    app.add_middleware(commands.FastCommands, engine=engine)  # innermost: after body limits
    app.add_middleware(BodyLimit, limit=engine.settings.max_body_bytes)
    app.add_middleware(PortProxy, engine=engine)  # before body limits
    app.add_middleware(McpMount, door=mcp)  # MCP has its own body limit
    # outermost: E2B's sandbox traffic (by header or Host) and control plane (its own
    # error shapes and limits); everything else passes on unchanged
    app.add_middleware(E2BDoor, engine=engine, e2b_port=engine.settings.e2b_port)
    return app


def _json_syntax(err: dict, doc) -> dict:
    """A JSON syntax error as line and column (FastAPI gives a character offset as the
    error's location, which read as a field named "8")."""
    pos = err["loc"][-1] if isinstance(err["loc"][-1], int) else 0
    where = json.JSONDecodeError(err.get("ctx", {}).get("error", "invalid JSON"),
                                 doc if isinstance(doc, str) else "", pos)
    return {"code": "invalid", "field": None,
            "message": f"the body is not valid JSON: {where.msg} at line {where.lineno}, "
                       f"column {where.colno}", "line": where.lineno, "column": where.colno}


def _allowed(request: Request) -> list[str]:
    """The methods the OpenAPI document lists at the request's path."""
    methods: set[str] = set()
    for template, ops in request.app.openapi()["paths"].items():
        parts = re.split(r"(\{[^}]+\})", template)
        pattern = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
        if re.fullmatch(pattern, request.url.path):
            methods |= {m.upper() for m in ops}
    return sorted(methods)


def _say(err: dict) -> str:
    """A pydantic error in words a client can act on (it never quotes the input)."""
    kind, ctx = err.get("type"), err.get("ctx") or {}
    if kind == "string_unicode":
        return "must be UTF-8 text (it holds a lone surrogate)"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_WORDS:
        return PATTERN_WORDS[ctx["pattern"]]
    if kind == "value_error":
        return str(ctx.get("error") or err.get("msg", "invalid"))
    return err.get("msg", "invalid")
