"""The native REST front door: app factory, auth, error mapping, body limits.

Routes live in sibling modules, each a thin translation onto one engine call.
"""

from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from torpor._version import __version__
from torpor.engine.manager import Engine
from torpor.errors import TooLarge, TorporError

log = logging.getLogger("torpor.api")


def error_response(e: TorporError) -> JSONResponse:
    return JSONResponse({"error": e.to_dict()}, status_code=e.status)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, counting as they arrive (so a
    chunked body without Content-Length is caught too). File uploads stream and are exempt."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] == "PUT"
                                       and scope["path"].endswith("/files")):
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await self._too_large(send)
        seen = 0
        answered = False

        async def counting_receive():
            nonlocal seen, answered
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    # answer now and tell the app the client left, so it stops reading
                    if not answered:
                        answered = True
                        await self._too_large(send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not answered:
                await send(msg)

        await self.app(scope, counting_receive, guarded_send)

    async def _too_large(self, send):
        resp = error_response(TooLarge(f"request body over {self.limit} bytes; upload files "
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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        try:
            self.engine.keys.check(presented_key(headers.get("authorization", ""),
                                                 headers.get("x-api-key")))
        except TorporError as e:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 4401})
            resp = error_response(e)
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": resp.raw_headers})
            return await send({"type": "http.response.body", "body": resp.body})
        sid, port, path = m.group(1), int(m.group(2)), m.group(3)
        await self.engine.network.gateway.asgi(scope, receive, send, sid, port, path)


def create_app(engine: Engine, own_engine: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own_engine:
            await engine.start()
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
        loc = [str(x) for x in first.get("loc", []) if x not in ("body", "query", "path")]
        field = ".".join(loc) or None
        msg = f"{field or 'request'}: {first.get('msg', 'invalid')}"
        body = {"error": {"code": "invalid", "message": msg, "field": field,
                          "errors": [{"loc": list(map(str, x.get("loc", []))),
                                      "msg": x.get("msg")} for x in errs]}}
        return JSONResponse(body, status_code=422)

    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"ok": True, "version": __version__, "runsc": engine.driver.version}

    from torpor.api import commands, files, keys, lifecycle, network, sandboxes, secrets

    deps = [Depends(require_key)]
    app.include_router(sandboxes.router, prefix="/v1", dependencies=deps)
    app.include_router(keys.router, prefix="/v1", dependencies=deps)  # and admin scope
    app.include_router(commands.router, prefix="/v1", dependencies=deps)
    app.include_router(files.router, prefix="/v1", dependencies=deps)
    app.include_router(lifecycle.router, prefix="/v1", dependencies=deps)
    app.include_router(secrets.router, prefix="/v1", dependencies=deps)
    app.include_router(network.router, prefix="/v1", dependencies=deps)
    app.add_middleware(commands.FastCommands, engine=engine)  # innermost: after body limits
    app.add_middleware(BodyLimit, limit=engine.settings.max_body_bytes)
    app.add_middleware(PortProxy, engine=engine)  # outermost: before body limits
    return app


async def require_key(request: Request) -> str:
    # async, so FastAPI runs it on the loop: as a plain def it went through the thread
    # pool on every request (a thread hop each way, ~5% of the server's CPU per command).
    # The check is a dict lookup after a key's first use.
    key = presented_key(request.headers.get("authorization", ""),
                        request.headers.get("x-api-key"))
    return request.app.state.engine.keys.check(key)  # raises Unauthorized


def presented_key(authorization: str, x_api_key: str | None) -> str | None:
    """The API key a request presents: `Authorization: Bearer KEY`, else `X-API-Key`."""
    key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
    return key or x_api_key


def engine_of(request: Request) -> Engine:
    return request.app.state.engine
