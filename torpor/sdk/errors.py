"""Typed errors raised by the SDK.

Every error is a `TorporError` carrying the HTTP `status` (None when no answer came), the
server's stable `code`, its `message` (which says what to do next), the `sandbox_id` when
the call was about one sandbox, and the `operation` that failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from torpor.sdk.models import CommandResult, ProcessOutput


class TorporError(Exception):
    """Base of every SDK error."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 sandbox_id: str | None = None, operation: str | None = None,
                 details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.sandbox_id = sandbox_id
        self.operation = operation
        self.details = details or {}

    def __str__(self) -> str:
        text = self.message
        if self.sandbox_id and self.sandbox_id not in text:
            text = f"sandbox {self.sandbox_id}: {text}"
        return f"{self.operation}: {text}" if self.operation else text


class AuthError(TorporError):
    """401: the API key is missing, wrong or revoked."""


class NotFoundError(TorporError):
    """404: no such sandbox, template, file or process."""


class ConflictError(TorporError):
    """409: the request clashes with the current state (exists, not running, ...)."""


class InvalidRequestError(TorporError):
    """422: a request value was refused; `field` names it when the server said which."""

    @property
    def field(self) -> str | None:
        return self.details.get("field")


class PayloadTooLargeError(TorporError):
    """413: the body is over the limit, or the sandbox's disk is full."""


class TorporTimeoutError(TorporError):
    """504 from the server, or no answer from it in time."""


class CommandTimeoutError(TorporTimeoutError):
    """A command ran past its `timeout` and was killed (or, from `wait`, still runs).

    `result` holds the output gathered until then, when there is any."""

    def __init__(self, message: str, *, result: ProcessOutput | None = None, **kw: Any):
        super().__init__(message, code=kw.pop("code", "timeout"), **kw)
        self.result = result


class CommandExitError(TorporError):
    """A command run with `check=True` exited non-zero; `result` is its CommandResult."""

    def __init__(self, result: CommandResult, *, sandbox_id: str | None = None,
                 operation: str | None = None):
        tail = result.stderr.strip().splitlines()[-1:] if result.stderr else []
        msg = f"command exited with code {result.exit_code}"
        if tail:
            msg += f": {tail[0][:300]}"
        super().__init__(msg, code="exit", sandbox_id=sandbox_id, operation=operation)
        self.result = result

    @property
    def exit_code(self) -> int:
        return self.result.exit_code


class TemplateBuildError(TorporError):
    """A template build failed: a step exited non-zero (`exit_code`, `output_tail`: its
    last lines), a ready check timed out, or a source could not be fetched. `build_id`
    names the build (its whole log: `Templates().logs(build_id)`). The template's name
    still points at what it pointed at before."""

    @property
    def exit_code(self) -> int | None:
        return self.details.get("exit_code")

    @property
    def output_tail(self) -> list[str]:
        return list(self.details.get("output_tail") or [])

    @property
    def build_id(self) -> str | None:
        return self.details.get("build_id")


class ServerUnavailableError(TorporError):
    """The server cannot be reached (connection refused, dropped), or answered 503."""


_BY_STATUS: dict[int, type[TorporError]] = {
    401: AuthError, 403: AuthError, 404: NotFoundError, 409: ConflictError,
    413: PayloadTooLargeError, 422: InvalidRequestError, 503: ServerUnavailableError,
    504: TorporTimeoutError,
}
_BY_CODE: dict[str, type[TorporError]] = {
    "unauthorized": AuthError, "not_found": NotFoundError, "conflict": ConflictError,
    "too_large": PayloadTooLargeError, "invalid": InvalidRequestError,
    "unavailable": ServerUnavailableError, "timeout": TorporTimeoutError,
}


def error_from_payload(payload: dict[str, Any], *, status: int | None,
                       sandbox_id: str | None = None,
                       operation: str | None = None) -> TorporError:
    """Build the typed error for an error body `{"code", "message", ...extra}`."""
    code = payload.get("code")
    cls = _BY_STATUS.get(status or 0) or _BY_CODE.get(code or "", TorporError)
    message = str(payload.get("message") or code or f"HTTP {status}")
    details = {k: v for k, v in payload.items() if k not in ("code", "message")}
    sid = sandbox_id or details.get("sandbox_id")
    if cls is NotFoundError and details.get("templates"):
        known = ", ".join(map(str, details["templates"]))
        if known not in message:
            message += f" (known templates: {known})"
    if cls is AuthError and status == 401:
        message += (" (the SDK reads the key from api_key=, then TORPOR_API_KEY, then "
                    "$TORPOR_DATA/api-key)")
    return cls(message, status=status, code=code, sandbox_id=sid, operation=operation,
               details=details)


def error_from_response(response: httpx.Response, *, sandbox_id: str | None = None,
                        operation: str | None = None) -> TorporError:
    """Map an error answer onto its typed error. The body must have been read.

    Understands the contract's `{"error": {...}}`, FastAPI's own `{"detail": ...}`, and
    anything else (kept as text)."""
    payload: dict[str, Any]
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        payload = body["error"]
    elif isinstance(body, dict) and "detail" in body:
        payload = _from_fastapi_detail(body["detail"])
    else:
        text = response.text.strip()[:500] if response.content else ""
        payload = {"message": text or f"HTTP {response.status_code} {response.reason_phrase}"}
    return error_from_payload(payload, status=response.status_code, sandbox_id=sandbox_id,
                              operation=operation)


def _from_fastapi_detail(detail: Any) -> dict[str, Any]:
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = [str(x) for x in detail[0].get("loc", []) if x not in ("body", "query", "path")]
        field = ".".join(loc) or None
        return {"message": f"{field or 'request'}: {detail[0].get('msg', 'invalid')}",
                "field": field}
    return {"message": str(detail)}
