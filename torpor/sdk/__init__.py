"""The Torpor Python SDK: `Sandbox` (sync) and `AsyncSandbox` (async) over the REST API.

    from torpor import Sandbox

    with Sandbox.create() as sbx:
        print(sbx.commands.run("echo hi").stdout)

See docs/sdk.md.
"""

from torpor.sdk.admin import AsyncDomains, AsyncKeys, AsyncTemplates, Domains, Keys, Templates
from torpor.sdk.code import CodeContext, Execution, ExecutionError, Logs, Result
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
    TemplateBuildError,
    TorporError,
    TorporTimeoutError,
)
from torpor.sdk.files import AsyncFiles, AsyncFileStream, Files, FileStream
from torpor.sdk.models import (
    ApiKey,
    BuildInfo,
    CommandResult,
    Domain,
    EgressEntry,
    EntryInfo,
    Event,
    OutputEvent,
    Port,
    PreviewUrl,
    ProcessInfo,
    ProcessOutput,
    SandboxInfo,
    TemplateInfo,
    Usage,
    UsageSummary,
    UsageTotal,
    WriteInfo,
)
from torpor.sdk.sandbox import AsyncSandbox, Sandbox
from torpor.sdk.secrets import AsyncSecret, Secret, SecretInfo
from torpor.sdk.snapshots import AsyncSnapshot, Snapshot, SnapshotInfo
from torpor.sdk.templates import (
    AsyncTemplate,
    Template,
    wait_for_cmd,
    wait_for_file,
    wait_for_port,
)
from torpor.sdk.volumes import (
    AsyncDrive,
    AsyncVolume,
    Drive,
    Volume,
    VolumeEntry,
    VolumeInfo,
)

__all__ = [
    "ApiKey",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncDomains",
    "AsyncDrive",
    "AsyncFileStream",
    "AsyncFiles",
    "AsyncKeys",
    "AsyncSandbox",
    "AsyncSecret",
    "AsyncSnapshot",
    "AsyncTemplate",
    "AsyncTemplates",
    "AsyncVolume",
    "AuthError",
    "BuildInfo",
    "CodeContext",
    "CommandExitError",
    "CommandHandle",
    "CommandResult",
    "CommandTimeoutError",
    "Commands",
    "ConflictError",
    "Domain",
    "Domains",
    "Drive",
    "EgressEntry",
    "EntryInfo",
    "Event",
    "Execution",
    "ExecutionError",
    "FileStream",
    "Files",
    "InvalidRequestError",
    "Keys",
    "Logs",
    "NotFoundError",
    "OutputEvent",
    "PayloadTooLargeError",
    "Port",
    "PreviewUrl",
    "ProcessInfo",
    "ProcessOutput",
    "Result",
    "Sandbox",
    "SandboxInfo",
    "Secret",
    "SecretInfo",
    "ServerUnavailableError",
    "Snapshot",
    "SnapshotInfo",
    "Template",
    "TemplateBuildError",
    "TemplateInfo",
    "Templates",
    "TorporError",
    "TorporTimeoutError",
    "Usage",
    "UsageSummary",
    "UsageTotal",
    "Volume",
    "VolumeEntry",
    "VolumeInfo",
    "WriteInfo",
    "wait_for_cmd",
    "wait_for_file",
    "wait_for_port",
]
