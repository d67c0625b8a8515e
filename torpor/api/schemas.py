"""Request and response bodies of the REST API (pydantic). docs/api.md is the contract."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Str = Field(max_length=4096)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkIn(Strict):
    """An egress policy: `egress` is the default action, `allow` its exceptions under
    deny-all, `deny` always wins. Entries: domains, `*.` wildcards, IPs, CIDRs, `:port`."""

    egress: Literal["allow-all", "deny-all"] | None = None
    allow: list[str] | None = Field(None, max_length=256)
    deny: list[str] | None = Field(None, max_length=256)


class CreateSandbox(Strict):
    template: str = Field("base", max_length=64)
    env: dict[str, str] = Field(default_factory=dict, max_length=1000)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=100)
    cpu: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    disk_mb: int | None = Field(None, gt=0)
    standby_after: float | None = Field(None, ge=0)
    hibernate_after: float | None = Field(None, ge=0)
    ttl: float | None = Field(None, ge=0)
    idle_ttl: float | None = Field(None, ge=0)
    expire_action: Literal["delete", "hibernate"] | None = None
    network: NetworkIn | None = None
    # env var -> secret name: the variable holds a placeholder the egress proxy swaps
    secrets: dict[str, str] = Field(default_factory=dict, max_length=100)


class UpdateSandbox(Strict):
    standby_after: float | None = Field(None, ge=0)
    hibernate_after: float | None = Field(None, ge=0)
    ttl: float | None = Field(None, ge=0)
    idle_ttl: float | None = Field(None, ge=0)
    expire_action: Literal["delete", "hibernate"] | None = None


class KeepAliveIn(Strict):
    seconds: float = Field(300, gt=0, le=3600)


class KeepAliveOut(BaseModel):
    hold_id: str
    seconds: float


class UsageOut(BaseModel):
    sandbox_id: str
    state: str
    cpu_seconds: float
    memory_gib_seconds: float
    seconds_by_state: dict[str, float]
    disk_bytes: int
    metadata: dict[str, str]


class UsageTotal(BaseModel):
    cpu_seconds: float
    memory_gib_seconds: float
    disk_bytes: int


class UsageSummary(BaseModel):
    sandboxes: list[UsageOut]
    total: UsageTotal


class SandboxOut(BaseModel):
    id: str
    template: str
    state: str
    created_at: datetime
    updated_at: datetime
    cpu: float
    memory_mb: int
    disk_mb: int
    env: dict[str, str]
    metadata: dict[str, str]
    reason: str | None = None
    standby_after: float
    hibernate_after: float
    ttl: float | None = None
    idle_ttl: float | None = None
    expire_action: str
    last_active_at: datetime | None = None
    network: dict = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict)
    ports: dict[str, dict] = Field(default_factory=dict)


class EgressOut(BaseModel):
    id: int
    at: datetime
    protocol: str
    host: str
    port: int
    address: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    allowed: bool
    rule: str
    bytes_up: int
    bytes_down: int
    secrets: list[str]
    duration_ms: float


class EgressLog(BaseModel):
    entries: list[EgressOut]


class PortIn(Strict):
    public: bool = False


class PortOut(BaseModel):
    port: int
    public: bool
    url: str


class PreviewUrlIn(Strict):
    port: int = Field(ge=1, le=65535)
    expires_in: float = Field(3600, gt=0)


class PreviewUrlOut(BaseModel):
    url: str
    token: str
    port: int
    expires_at: int


class DomainIn(Strict):
    domain: str = Field(min_length=1, max_length=253)
    sandbox_id: str = Field(max_length=32)
    port: int = Field(ge=1, le=65535)
    public: bool = False


class DomainOut(BaseModel):
    domain: str
    sandbox_id: str
    port: int
    public: bool
    created_at: datetime
    url: str


class TemplateOut(BaseModel):
    name: str
    description: str
    cpu: float
    memory_mb: int
    disk_mb: int
    user: str
    workdir: str
    env: dict[str, str]


class CreateKey(Strict):
    name: str = Field(min_length=1, max_length=128)
    scope: Literal["user", "admin"] = "user"


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    scope: Literal["user", "admin"]
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    key: str | None = None


class EventOut(BaseModel):
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    reason: str | None
    detail: dict


class RunCommand(Strict):
    cmd: str | None = Field(None, max_length=262144)
    argv: list[str] | None = Field(None, min_length=1, max_length=10000)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(None, max_length=4096)
    user: str | int = "user"
    stdin: str | None = None
    timeout: float | None = Field(60.0, gt=0)
    background: bool = False
    stream: bool = False
    tag: str | None = Field(None, max_length=256)
    # a running background process with keep_alive holds the sandbox out of standby
    # (for at most an hour: a forgotten one cannot pin it forever)
    keep_alive: bool = False

    @model_validator(mode="after")
    def _one_of(self):
        if (self.cmd is None) == (self.argv is None):
            raise ValueError("give exactly one of cmd (a shell string) and argv (a list)")
        return self

    def full_argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.cmd] if self.cmd is not None else list(self.argv)


class ProcessOut(BaseModel):
    pid: int
    argv: list[str]
    tag: str | None = None
    started_at: float
    running: bool
    exit_code: int | None = None
    signal: str | None = None
    timed_out: bool = False
    output_bytes: int = 0


class CommandResultOut(BaseModel):
    pid: int
    exit_code: int | None
    stdout: str
    stderr: str
    signal: str | None = None
    timed_out: bool = False
    truncated: bool = False


class StdinIn(Strict):
    data: str = ""
    eof: bool = False


class SignalIn(Strict):
    signal: str = Field("SIGTERM", max_length=16)


class EntryOut(BaseModel):
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    uid: int
    gid: int
    owner: str
    mtime: float
    target: str | None = None


class MkdirIn(Strict):
    path: str = Field(max_length=4096)
    parents: bool = True
    user: str = "user"


class RenameIn(Strict):
    src: str = Field(max_length=4096)
    dst: str = Field(max_length=4096)
    overwrite: bool = False
    user: str = "user"
