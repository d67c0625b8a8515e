"""What every route of the REST door shares: the engine of a request, the API key it
presents, errors as JSON answers and the error answers the OpenAPI document lists.

Routers import this, never `app` (which imports the routers)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from torpor.api.schemas import ErrorOut
from torpor.engine.manager import Engine
from torpor.errors import TorporError


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def presented_key(authorization: str, x_api_key: str | None) -> str | None:
    """The API key a request presents: `Authorization: Bearer KEY`, else `X-API-Key`."""
    key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
    return key or x_api_key


def scope_key(scope) -> str | None:
    """`presented_key` of an ASGI request, for the layers that run before FastAPI."""
    authorization, x_api_key = "", None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            x_api_key = value.decode("latin-1")
    return presented_key(authorization, x_api_key)


async def require_key(request: Request) -> str:
    # async, so FastAPI runs it on the loop: as a plain def it went through the thread
    # pool on every request (a thread hop each way, ~5% of the server's CPU per command).
    # The check is a dict lookup after a key's first use.
    key = presented_key(request.headers.get("authorization", ""),
                        request.headers.get("x-api-key"))
    return request.app.state.engine.keys.check(key)  # raises Unauthorized


def error_response(e: TorporError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": e.to_dict()}, status_code=e.status, headers=headers)


def _doc(*statuses: int) -> dict:
    return {s: {"model": ErrorOut, "description": ERRORS[s]} for s in statuses}


# the error answers the OpenAPI document lists, by who can give them (`_doc`)
ERRORS = {
    400: "bad_request: the body could not be read (not UTF-8)",
    401: "unauthorized: no API key, or not a valid one",
    403: "forbidden: the key's scope does not allow this",
    404: "not_found: no such sandbox, process, file, secret, domain or key",
    409: "conflict: the sandbox's state, or what exists already, does not allow this",
    413: "too_large: the body is over the limit, or the sandbox's disk is full",
    422: "invalid: a parameter or a field of the body breaks the schema or a rule; `field` "
         "names it",
    503: "unavailable: the sandbox is not running (it failed, or stopped while the call ran)",
    504: "timeout: the sandbox did not answer in time, or the waited-for process still runs",
}
COMMON = _doc(400, 401, 413, 422)  # any route under /v1
ON_SANDBOX = {**COMMON, **_doc(404, 409, 503, 504)}  # routes that reach a sandbox
ADMIN_ONLY = {**COMMON, **_doc(403, 404, 409)}  # secrets and keys
