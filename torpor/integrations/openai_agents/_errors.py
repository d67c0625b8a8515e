"""Torpor SDK errors as the Agents SDK's own (`agents.sandbox.errors`).

Every mapped error keeps the Torpor error as its `cause` and puts what it said (message,
HTTP status, stable code, sandbox id) in `context`, so nothing is lost on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agents.sandbox.errors import (
    ConfigurationError,
    ErrorCode,
    ExecTimeoutError,
    ExecTransportError,
    SandboxRuntimeError,
    WorkspaceRootNotFoundError,
    WorkspaceStartError,
)

from torpor.sdk.errors import (
    AuthError,
    CommandTimeoutError,
    InvalidRequestError,
    NotFoundError,
    ServerUnavailableError,
    TorporError,
    TorporTimeoutError,
)

BACKEND = "torpor"


def sandbox_gone(error: BaseException) -> bool:
    """Whether `error` says the sandbox itself no longer exists (deleted, or never was), as
    opposed to a file or process in it."""
    return isinstance(error, NotFoundError) and error.message.startswith("no sandbox ")


def retryable(error: TorporError) -> bool | None:
    """True for what a retry may cure (the server unreachable or overloaded), False for
    what it cannot (refused, unknown, conflicting), None when it cannot be told."""
    if isinstance(error, (ServerUnavailableError, TorporTimeoutError)):
        return True
    if error.status is not None and 400 <= error.status < 500:
        return False
    return None


def context(error: TorporError, **extra: object) -> dict[str, object]:
    ctx: dict[str, object] = {"backend": BACKEND, "provider_error": str(error)}
    if error.status is not None:
        ctx["http_status"] = error.status
    if error.code:
        ctx["provider_error_code"] = error.code
    if error.sandbox_id:
        ctx["sandbox_id"] = error.sandbox_id
    if sandbox_gone(error):
        ctx["reason"] = "sandbox_not_found"
    ctx.update(extra)
    return ctx


def exec_error(error: TorporError, command: Sequence[str | Path], timeout: float | None,
               workspace_root: str | None = None) -> SandboxRuntimeError:
    """A failed command call: its timeout, the workspace root gone from under it (when the
    command ran there), or the transport (the sandbox gone, the server unreachable, a
    refused request)."""
    if (workspace_root is not None and isinstance(error, InvalidRequestError)
            and error.details.get("agent_code") == "bad_cwd"):
        return WorkspaceRootNotFoundError(path=Path(workspace_root), context=context(error),
                                          cause=error)
    if isinstance(error, CommandTimeoutError):
        ctx = context(error)
        if error.result is not None:
            ctx["stdout"] = error.result.stdout[-4096:]
            ctx["stderr"] = error.result.stderr[-4096:]
        return ExecTimeoutError(command=command, timeout_s=timeout, context=ctx, cause=error)
    return ExecTransportError(command=command, context=context(error), cause=error,
                              message=f"Torpor exec failed: {error}",
                              retryable=retryable(error))


def create_error(error: TorporError, root: str) -> ConfigurationError | WorkspaceStartError:
    """A refused create (bad options, unknown template, bad key) is the caller's to fix: a
    ConfigurationError; anything else (server unreachable, boot failed) a start error."""
    if isinstance(error, (InvalidRequestError, NotFoundError, AuthError)):
        field = error.details.get("field")
        return ConfigurationError(
            message=f"Torpor refused to create the sandbox: {error}",
            error_code=ErrorCode.SANDBOX_CONFIG_INVALID, op="start",
            context=context(error, **({"field": field} if field else {})), cause=error,
            retryable=False)
    return WorkspaceStartError(path=Path(root), context=context(error), cause=error,
                               message=f"failed to start session: Torpor could not create "
                                       f"the sandbox: {error}",
                               retryable=retryable(error))
