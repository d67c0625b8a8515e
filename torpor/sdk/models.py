"""The objects the API returns, as pydantic models shared by the sync and async clients.

Unknown fields from a newer server are kept (`extra="allow"`), so an older SDK still works.
"""

from __future__ import annotations

import signal as _signal
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator, model_validator

# The server keeps UTC; a time it sends without an offset is UTC, not the client's zone.
Time = Annotated[datetime, AfterValidator(lambda t: t if t.tzinfo else t.replace(tzinfo=UTC))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class SandboxInfo(_Model):
    id: str
    template: str
    state: str  # creating, running, standby, hibernated, failed, deleted
    created_at: Time
    updated_at: Time
    cpu: float
    memory_mb: int
    disk_mb: int
    env: dict[str, str] = {}
    metadata: dict[str, str] = {}
    reason: str | None = None  # why the sandbox is `failed`
    # idle timers and expiry, in seconds; 0 (or None) means off. None from an older server.
    standby_after: float | None = None  # idle seconds before standby
    hibernate_after: float | None = None  # further seconds in standby before hibernation
    ttl: float | None = None  # lifetime from creation, then `expire_action`
    idle_ttl: float | None = None  # idle seconds, then `expire_action`
    expire_action: str | None = None  # delete or hibernate
    last_active_at: Time | None = None  # its last activity (a request on it, mostly)
    # egress policy in force: {"egress": "allow-all"|"deny-all", "allow": [...], "deny": [...]}
    network: dict[str, Any] = {}
    secrets: dict[str, str] = {}  # env var -> secret name (the sandbox sees a placeholder)
    ports: dict[str, dict[str, Any]] = {}  # exposed ports: {"8000": {"public": True}}


class Usage(_Model):
    """What one sandbox has consumed (`Sandbox.usage()`)."""

    sandbox_id: str
    state: str
    cpu_seconds: float = 0.0  # CPU time used, all states together
    memory_gib_seconds: float = 0.0  # memory in use x time, while running
    seconds_by_state: dict[str, float] = {}  # e.g. {"running": 12.5, "standby": 600.0}
    disk_bytes: int = 0  # its writable layer plus any hibernation image
    metadata: dict[str, str] = {}


class UsageTotal(_Model):
    cpu_seconds: float = 0.0
    memory_gib_seconds: float = 0.0
    disk_bytes: int = 0


class UsageSummary(_Model):
    """Usage of many sandboxes (`Sandbox.usage_all()`), and their sum."""

    sandboxes: list[Usage] = []
    total: UsageTotal = UsageTotal()


class Event(_Model):
    """One entry of a sandbox's history (`Sandbox.events()`). `kind` is "state" for a
    change of state (`from_state` -> `to_state`, with `reason`: created, idle, request,
    explicit, memory_pressure, shutdown, expired, restore_failed, ...); other kinds
    include "updated" (timers changed; `detail` holds the changes), "hibernate_failed",
    "hibernate_refused", "adopted", "oom_kill" and "pids_kill"."""

    at: Time
    kind: str
    from_state: str | None = None
    to_state: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = {}

    @property
    def duration_ms(self) -> int | None:
        """How long the transition took, when the server measured it."""
        v = self.detail.get("duration_ms")
        return int(v) if isinstance(v, int | float) else None


class TemplateInfo(_Model):
    """A template as the server has it (`Template` is the builder that makes one)."""

    name: str
    description: str = ""
    cpu: float
    memory_mb: int
    disk_mb: int
    user: str = "user"
    workdir: str = "/home/user"
    env: dict[str, str] = {}
    tag: str = "latest"
    digest: str = ""  # sha256:... of its configuration: what a sandbox records
    created_at: Time | None = None
    snapshot: bool = False  # has a boot snapshot: sandboxes start with start_cmd running
    start_cmd: str | None = None
    parent: str | None = None  # the digest it was built on
    # from Template.get only
    ready: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    layers: list[str] = []

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


class BuildInfo(_Model):
    """A template build: `state` is running, succeeded or failed."""

    id: str
    name: str
    tag: str = "latest"
    state: str
    started_at: Time
    finished_at: Time | None = None
    steps: list[dict[str, Any]] = []
    progress: list[dict[str, Any]] = []  # one per step started: index, type, cached
    digest: str | None = None
    error: dict[str, Any] | None = None
    events: int = 0


class ApiKey(_Model):
    id: str
    name: str
    prefix: str
    scope: str = "user"  # "admin" (manages keys and secrets) or "user"
    created_at: Time
    last_used_at: Time | None = None
    revoked_at: Time | None = None
    key: str | None = None  # the secret, only in the answer to `Keys.create`


class ProcessInfo(_Model):
    pid: int
    argv: list[str]
    tag: str | None = None
    started_at: Time
    running: bool
    exit_code: int | None = None
    signal: str | None = None
    timed_out: bool = False
    output_bytes: int = 0  # output so far, in bytes: the offset the next byte will have
    output_start: int = 0  # offset of the oldest byte still kept (commands.connect)


class EntryInfo(_Model):
    name: str
    path: str
    type: str  # file, dir, symlink, other
    size: int
    mode: int  # permission bits, e.g. 0o644
    uid: int
    gid: int
    owner: str
    mtime: Time
    target: str | None = None  # where a symlink points

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, v: Any) -> Any:
        return int(v, 8) if isinstance(v, str) and v.isdigit() else v

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


class WriteInfo(_Model):
    path: str
    size: int


class ProcessOutput(_Model):
    """Output of a process so far; `exit_code` is None while it still runs."""

    pid: int | None = None
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: str | None = None
    timed_out: bool = False
    truncated: bool = False  # output beyond the 16 MiB per stream kept was dropped

    @model_validator(mode="before")
    @classmethod
    def _signal_exit_code(cls, data: Any) -> Any:
        # a process killed by a signal reports 128 + its number, as shells do
        if isinstance(data, dict) and data.get("exit_code") is None:
            num = _signal_number(data.get("signal"))
            if num is not None:
                data = {**data, "exit_code": 128 + num}
            elif cls.exit_code_required:
                data = {**data, "exit_code": -1}
        return data

    exit_code_required: ClassVar[bool] = False


class CommandResult(ProcessOutput):
    """A finished command. Non-zero `exit_code` is not an error unless `check=True`."""

    exit_code: int
    exit_code_required: ClassVar[bool] = True

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class OutputEvent(_Model):
    """One line of a command's NDJSON stream: start, stdout, stderr, exit or error."""

    type: str
    pid: int | None = None
    data: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    timed_out: bool = False
    error: dict[str, Any] | None = None
    status: int | None = None
    offset: int | None = None  # of the first byte of `data` (base64 attach streams)


def _signal_number(sig: Any) -> int | None:
    if isinstance(sig, int):
        return sig
    if isinstance(sig, str):
        if sig.isdigit():
            return int(sig)
        num = getattr(_signal, sig.upper(), None)
        return int(num) if isinstance(num, int) else None
    return None


class EgressEntry(_Model):
    """One egress connection, or one HTTP request the proxy saw (`Sandbox.egress_log()`)."""

    id: int
    at: Time
    protocol: str  # http, https, connect, socks, dns
    host: str
    port: int
    address: str | None = None  # the IP connected to
    method: str | None = None
    path: str | None = None
    status: int | None = None
    allowed: bool
    rule: str  # why it was allowed or denied
    bytes_up: int = 0
    bytes_down: int = 0
    secrets: list[str] = []  # names of the secrets injected
    duration_ms: float = 0.0


class PreviewUrl(_Model):
    url: str
    token: str
    port: int
    expires_at: int


class Port(_Model):
    port: int
    public: bool
    url: str


class Domain(_Model):
    domain: str
    sandbox_id: str
    port: int
    public: bool
    created_at: Time
    url: str
