"""Torpor: self-hosted perpetual sandboxes for AI agents.

`from torpor import Sandbox, AsyncSandbox` and the SDK's errors. They load lazily (module
`__getattr__`): the server and the per-sandbox holder import this package too, and must
not pay for httpx and pydantic at start-up.
"""

TYPE_CHECKING = False  # not from typing: importing typing costs start-up time
if TYPE_CHECKING:
    from torpor._version import __version__
    from torpor.sdk import (
        ApiKey,
        AsyncDomains,
        AsyncDrive,
        AsyncKeys,
        AsyncSandbox,
        AsyncSecret,
        AsyncSnapshot,
        AsyncTemplate,
        AsyncTemplates,
        AsyncVolume,
        AuthError,
        CommandExitError,
        CommandHandle,
        CommandResult,
        CommandTimeoutError,
        ConflictError,
        Domains,
        Drive,
        EntryInfo,
        Event,
        InvalidRequestError,
        Keys,
        NotFoundError,
        PayloadTooLargeError,
        ProcessInfo,
        Sandbox,
        SandboxInfo,
        Secret,
        SecretInfo,
        ServerUnavailableError,
        Snapshot,
        SnapshotInfo,
        Template,
        TemplateBuildError,
        TemplateInfo,
        Templates,
        TorporError,
        TorporTimeoutError,
        Usage,
        UsageSummary,
        Volume,
        VolumeInfo,
        wait_for_cmd,
        wait_for_file,
        wait_for_port,
    )

__all__ = [
    "ApiKey",
    "AsyncDomains",
    "AsyncDrive",
    "AsyncKeys",
    "AsyncSandbox",
    "AsyncSecret",
    "AsyncSnapshot",
    "AsyncTemplate",
    "AsyncTemplates",
    "AsyncVolume",
    "AuthError",
    "CommandExitError",
    "CommandHandle",
    "CommandResult",
    "CommandTimeoutError",
    "ConflictError",
    "Domains",
    "Drive",
    "EntryInfo",
    "Event",
    "InvalidRequestError",
    "Keys",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProcessInfo",
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
    "Volume",
    "VolumeInfo",
    "__version__",
    "wait_for_cmd",
    "wait_for_file",
    "wait_for_port",
]


def __getattr__(name: str):
    if name in __all__ and name != "__version__":
        from torpor import sdk

        value = getattr(sdk, name)
    elif name == "__version__":
        from torpor._version import __version__ as value
    else:  # also lets `from torpor import server` fall through to the submodule import
        raise AttributeError(f"module 'torpor' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
