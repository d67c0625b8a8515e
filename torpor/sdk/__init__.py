"""The Torpor Python SDK: `Sandbox` (sync) and `AsyncSandbox` (async) over the REST API.

    from torpor import Sandbox

    with Sandbox.create() as sbx:
        print(sbx.commands.run("echo hi").stdout)

See docs/sdk.md.
"""

from torpor.sdk.admin import AsyncKeys, AsyncTemplates, Keys, Templates
from torpor.sdk.commands import AsyncCommandHandle, AsyncCommands, CommandHandle, Commands
from torpor.sdk.errors import (
    AuthError,
    CommandExitError,
    CommandTimeoutError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServerUnavailableError,
    TorporError,
    TorporTimeoutError,
)
from torpor.sdk.files import AsyncFiles, AsyncFileStream, Files, FileStream
from torpor.sdk.models import (
    ApiKey,
    CommandResult,
    EntryInfo,
    Event,
    OutputEvent,
    ProcessInfo,
    ProcessOutput,
    SandboxInfo,
    Template,
    Usage,
    UsageSummary,
    UsageTotal,
    WriteInfo,
)
from torpor.sdk.sandbox import AsyncSandbox, Sandbox

__all__ = [
    "ApiKey", "AsyncCommandHandle", "AsyncCommands", "AsyncFileStream", "AsyncFiles",
    "AsyncKeys", "AsyncSandbox", "AsyncTemplates", "AuthError", "CommandExitError",
    "CommandHandle", "CommandResult", "CommandTimeoutError", "Commands", "ConflictError",
    "EntryInfo", "Event", "FileStream", "Files", "InvalidRequestError", "Keys",
    "NotFoundError", "OutputEvent", "PayloadTooLargeError", "ProcessInfo", "ProcessOutput",
    "Sandbox", "SandboxInfo", "ServerUnavailableError", "Template", "Templates", "TorporError",
    "TorporTimeoutError", "Usage", "UsageSummary", "UsageTotal", "WriteInfo",
]
