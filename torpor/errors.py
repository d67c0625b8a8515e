"""Errors the engine raises; the front doors turn them into HTTP answers.

Each carries a stable `code`, an HTTP status, and a message that says what to do next.
"""

from __future__ import annotations


class TorporError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, **self.extra}


class NotFound(TorporError):
    status = 404
    code = "not_found"


class Conflict(TorporError):
    status = 409
    code = "conflict"


class Invalid(TorporError):
    status = 422
    code = "invalid"


class TooLarge(TorporError):
    status = 413
    code = "too_large"


class Unauthorized(TorporError):
    status = 401
    code = "unauthorized"


class Forbidden(TorporError):
    status = 403
    code = "forbidden"


class Unavailable(TorporError):
    status = 503
    code = "unavailable"


class Timeout(TorporError):
    status = 504
    code = "timeout"


# agent error codes -> engine errors
_AGENT = {
    "not_found": NotFound, "no_such_process": NotFound, "unknown_user": Invalid,
    "bad_request": Invalid, "bad_path": Invalid, "bad_cwd": Invalid, "bad_signal": Invalid,
    "exists": Conflict, "is_directory": Conflict, "not_directory": Conflict,
    "not_running": Conflict, "stdin_closed": Conflict, "permission_denied": Conflict,
    "no_space": TooLarge, "too_many": TooLarge, "channel_closed": Unavailable,
    "not_empty": Conflict, "name_too_long": Invalid, "read_only": Conflict,
    "cross_device": Conflict, "busy": Conflict, "not_a_terminal": NotFound,
}


def from_agent(sandbox_id: str, err) -> TorporError:
    """Map an AgentError (runtime.channel) onto an engine error naming the sandbox."""
    cls = _AGENT.get(err.code, TorporError)
    if err.code == "channel_closed":
        return cls(f"sandbox {sandbox_id} stopped while the operation ran; its state and "
                   "events say why", sandbox_id=sandbox_id)
    extra = {k: v for k, v in err.detail.items() if k not in ("code", "message")}
    e = cls(f"sandbox {sandbox_id}: {err.message}", sandbox_id=sandbox_id,
            agent_code=err.code, **extra)
    return e
