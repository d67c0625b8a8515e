"""Request and response bodies of the REST API (pydantic). docs/api.md is the contract."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

Str = Field(max_length=4096)

# Bounds on what a client sends, stated here so the OpenAPI document carries them.
MAX_COMMAND_TIMEOUT = 30 * 86400  # seconds: a command or a wait lasts at most 30 days
MAX_TIMER = 10 * 365 * 86400  # seconds: idle timers and TTLs (null or 0 turn them off)
MAX_UID = 4294967294  # (uid_t)-1 means "no change" to the kernel, so it is not a uid
HOST_CORES = os.cpu_count() or 1  # what the engine checks a sandbox's cpu against
HOST_MEMORY_MB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
# the OS takes no NUL inside a name, an argument or an environment variable; strings with
# a constraint also refuse lone surrogates (pydantic reads them as UTF-8)
NO_NUL = r"^[^\x00]*$"


def _utf8(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("must be UTF-8 text (it holds a lone surrogate)") from None
    return text


def _names_schema(schema: dict) -> None:
    """A dict with constrained keys, as JSON Schema says it: pydantic writes the key
    pattern as patternProperties, which lets any other key through."""
    for pattern, values in schema.pop("patternProperties", {}).items():
        schema["additionalProperties"] = values
        schema.setdefault("propertyNames", {})["pattern"] = pattern


Text = Annotated[str, AfterValidator(_utf8)]  # any text, NUL included, that UTF-8 can carry
Arg = Annotated[str, Field(max_length=131072, pattern=NO_NUL)]  # Linux's MAX_ARG_STRLEN
ENV_NAME = r"^[^\x00=]+$"
EnvName = Annotated[str, Field(min_length=1, max_length=1024, pattern=ENV_NAME)]
EnvValue = Annotated[str, Field(max_length=131072, pattern=NO_NUL)]
Path_ = Annotated[str, Field(min_length=1, max_length=4096, pattern=NO_NUL)]
# a user name, or a uid written in digits (at most 9 of them: larger ones go as integers)
USER_PATTERN = r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,9})$"
UserName = Annotated[str, Field(min_length=1, max_length=33, pattern=USER_PATTERN)]
Uid = Annotated[int, Field(ge=0, le=MAX_UID)]
Seconds = Annotated[float, Field(ge=0, le=MAX_TIMER)]
# a secret's rules, as the store checks them (engine/secrets.py; it counts the value's
# length in UTF-8 bytes, JSON Schema in characters)
SECRET_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
SECRET_VALUE = r"^[^\r\n\x00]*$"

# what a pattern means, for the validation errors (which never quote the input)
PATTERN_WORDS = {
    NO_NUL: "must not contain a NUL byte",
    ENV_NAME: "an environment variable name is not empty and has no '=' or NUL byte",
    USER_PATTERN: "must be a user name (user, root...) or a uid",
    SECRET_NAME: "a secret's name starts with a letter and has at most 64 letters, digits, "
                 "'_', '.' or '-'",
    SECRET_VALUE: "must not contain CR, LF or NUL characters (it is sent in HTTP headers); "
                  "strip the trailing newline",
}


class Strict(BaseModel):
    """A request body: unknown fields refused, and no coercion (`false` is not 0, `0` is
    not false, "1" is not 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ErrorDetail(BaseModel):
    """What went wrong: `code` is stable, `message` says what to do next; some errors
    add fields (`field`, `sandbox_id`, `templates`, `problems`...)."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


class NetworkIn(Strict):
    """An egress policy: `egress` is the default action, `allow` its exceptions under
    deny-all, `deny` always wins. Entries: domains, `*.` wildcards, IPs, CIDRs, `:port`."""

    egress: Literal["allow-all", "deny-all"] | None = None
    allow: list[Annotated[str, Field(min_length=1, max_length=300)]] | None = Field(
        None, max_length=256)
    deny: list[Annotated[str, Field(min_length=1, max_length=300)]] | None = Field(
        None, max_length=256)


class VolumeRef(Strict):
    volume: str = Field(min_length=1, max_length=63)
    read_only: bool = False


class CreateSandbox(Strict):
    template: str = Field("base", min_length=1, max_length=64)
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=1000,
                                         json_schema_extra=_names_schema)
    metadata: dict[Annotated[str, Field(max_length=256)],
                   Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict,
                                                                   max_length=100)
    cpu: float | None = Field(None, ge=0.1, le=HOST_CORES)
    memory_mb: int | None = Field(None, ge=64, le=HOST_MEMORY_MB)
    disk_mb: int | None = Field(None, ge=64, le=1 << 20)
    standby_after: Seconds | None = None
    hibernate_after: Seconds | None = None
    ttl: Seconds | None = None
    idle_ttl: Seconds | None = None
    expire_action: Literal["delete", "hibernate"] | None = None
    network: NetworkIn | None = None
    # env var -> secret name: the variable holds a placeholder the egress proxy swaps
    secrets: dict[EnvName, Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=dict, max_length=100, json_schema_extra=_names_schema)
    # mount path -> a volume's name, or {volume, read_only}
    volumes: dict[Annotated[str, Field(min_length=2, max_length=255, pattern=r"^/")],
                  Annotated[str, Field(min_length=1, max_length=63)] | VolumeRef] = Field(
        default_factory=dict, max_length=16)
    # a snapshot's id (snap_...): the sandbox starts from it (memory too, if it has it)
    snapshot: str | None = Field(None, min_length=1, max_length=32)


class UpdateSandbox(Strict):
    standby_after: Seconds | None = None
    hibernate_after: Seconds | None = None
    ttl: Seconds | None = None
    idle_ttl: Seconds | None = None
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
    snapshot_bytes: int = 0  # what every snapshot takes on the host's disk


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
    tag: str = "latest"
    digest: str = ""
    created_at: datetime | None = None
    snapshot: bool = False  # has a boot snapshot: a create restores it, start command running
    start_cmd: str | None = None
    parent: str | None = None  # the digest it was built on


class TemplateDetailOut(TemplateOut):
    """A template's whole configuration: how it was built and what it stacks."""

    ready: dict | None = None
    steps: list[dict] = Field(default_factory=list)
    layers: list[str] = Field(default_factory=list)


# --- template builds ---------------------------------------------------------------------
BUILD_BODY_MAX = 96 << 20  # bytes of a POST /v1/templates body (its context is base64)
Ref = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]
Package = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]
Command = Annotated[str, Field(min_length=1, max_length=262144, pattern=NO_NUL)]


class _Source(BaseModel):
    # sources are the engine's to check (their options grow with the sources it takes)
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class FromTemplateStep(Strict):
    """First step: build on a template of this server (`base` when there is no source)."""

    type: Literal["from_template"]
    template: Ref


class FromImageStep(_Source):
    """First step: an OCI image from a registry (`python:3.12-slim`)."""

    type: Literal["from_image"]
    image: Ref


class FromDebianStep(_Source):
    """First step: a Debian suite made with mmdebstrap (`bookworm`, `trixie`)."""

    type: Literal["from_debian"]
    suite: Ref


class FromArchiveStep(_Source):
    """First step: a `docker save` archive or an OCI layout in the build context."""

    type: Literal["from_archive"]
    src: Path_


class RunStep(Strict):
    """A shell command, as the template's user (or `user`), in a build sandbox."""

    type: Literal["run"]
    cmd: Command
    user: UserName | None = None


class AptInstallStep(Strict):
    type: Literal["apt_install"]
    packages: list[Package] = Field(min_length=1, max_length=1000)


class PipInstallStep(Strict):
    type: Literal["pip_install"]
    packages: list[Package] = Field(min_length=1, max_length=1000)


class CopyStep(Strict):
    """`src` of the build context (a file: into `dst`; a directory: its contents)."""

    type: Literal["copy"]
    src: Path_
    dst: Path_
    user: UserName | None = None


class EnvStep(Strict):
    type: Literal["env"]
    env: dict[EnvName, EnvValue] = Field(max_length=1000, json_schema_extra=_names_schema)


class WorkdirStep(Strict):
    type: Literal["workdir"]
    path: Path_


class UserStep(Strict):
    type: Literal["user"]
    name: UserName


class ReadyIn(Strict):
    """Exactly one: a port accepting on 127.0.0.1, a file existing, a command exiting 0."""

    port: int | None = Field(None, ge=1, le=65535)
    file: Path_ | None = None
    cmd: Command | None = None

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.port, self.file, self.cmd)) != 1:
            raise ValueError("give exactly one of port, file and cmd")
        return self


class StartCmdStep(Strict):
    """Last step: the command running (and ready) in the template's boot snapshot."""

    type: Literal["start_cmd"]
    cmd: Command
    ready: ReadyIn | None = None
    timeout: float | None = Field(None, gt=0, le=3600)


Step = Annotated[FromTemplateStep | FromImageStep | FromDebianStep | FromArchiveStep | RunStep
                 | AptInstallStep | PipInstallStep | CopyStep | EnvStep | WorkdirStep
                 | UserStep | StartCmdStep, Field(discriminator="type")]


class BuildTemplate(Strict):
    """At most one of `steps` and `dockerfile` (neither: the built-in template of that
    name, as `code-interpreter`). `context`: a tar or tar.gz, base64, holding what `copy`
    steps and COPY/ADD read. `network` narrows the server's build egress policy for this
    build's sandboxes (it cannot widen it)."""

    name: str = Field(min_length=1, max_length=63)
    tag: str = Field("latest", min_length=1, max_length=128)
    steps: list[Step] | None = Field(None, max_length=1000)
    dockerfile: str | None = Field(None, min_length=1, max_length=1 << 20, pattern=NO_NUL)
    build_args: dict[Annotated[str, Field(min_length=1, max_length=256)],
                     Annotated[str, Field(max_length=65536)]] = Field(default_factory=dict,
                                                                      max_length=200)
    context: str | None = Field(None, max_length=BUILD_BODY_MAX)
    cpu: float | None = Field(None, ge=0.1, le=HOST_CORES)
    memory_mb: int | None = Field(None, ge=64, le=HOST_MEMORY_MB)
    disk_mb: int | None = Field(None, ge=64, le=1 << 20)
    network: NetworkIn | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if self.steps is not None and self.dockerfile is not None:
            raise ValueError("give steps (a list) or dockerfile (its text), not both")
        if self.build_args and self.dockerfile is None:
            raise ValueError("build_args go with a dockerfile")
        return self


class BuildOut(BaseModel):
    """A template build: `state` running, succeeded or failed; `progress` has one entry per
    step started (`cached`: its layer was there already); `events` counts its events (the
    offset the next one will have)."""

    id: str
    name: str
    tag: str
    state: Literal["running", "succeeded", "failed"]
    started_at: datetime
    finished_at: datetime | None = None
    steps: list[dict]
    progress: list[dict] = Field(default_factory=list)
    digest: str | None = None
    error: dict | None = None
    events: int = 0
    url: str
    logs_url: str


class CreateKey(Strict):
    name: str = Field(min_length=1, max_length=128)
    scope: Literal["user", "admin"] = "user"
    # the key in E2B's form (e2b_ and 40 hex digits), for E2B's SDKs (E2B_API_KEY)
    e2b: bool = False


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
    """Exactly one of `cmd` and `argv`; `timeout` bounds a foreground command (a background
    process runs until it exits or is signalled)."""

    # the rule of _one_of below, for the OpenAPI document
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["cmd"], "properties": {"cmd": {"type": "string"},
                                             "argv": {"type": "null"}}},
        {"required": ["argv"], "properties": {"argv": {"type": "array"},
                                              "cmd": {"type": "null"}}}]})

    cmd: str | None = Field(None, max_length=262144, pattern=NO_NUL)
    argv: list[Arg] | None = Field(None, min_length=1, max_length=10000)
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=1000,
                                         json_schema_extra=_names_schema)
    # neither given: the template's user, in the template's working directory (`user` in
    # /home/user for `base`); a user given without cwd starts in that user's home
    cwd: Path_ | None = None
    user: UserName | Uid | None = None
    stdin: Text | None = None
    timeout: float | None = Field(60.0, gt=0, le=MAX_COMMAND_TIMEOUT)
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
    output_bytes: int = 0  # bytes of output so far: the offset where the next one goes
    output_start: int = 0  # offset of the oldest byte still kept (older ones were dropped)


class CommandResultOut(BaseModel):
    pid: int
    exit_code: int | None
    stdout: str
    stderr: str
    signal: str | None = None
    timed_out: bool = False
    truncated: bool = False


class StdinIn(Strict):
    data: Text = ""
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
    path: Path_
    parents: bool = True
    user: UserName = "user"


class RenameIn(Strict):
    src: Path_
    dst: Path_
    overwrite: bool = False
    user: UserName = "user"


class CreateSnapshot(Strict):
    name: str | None = Field(None, max_length=128)  # a label, for people
    memory: bool = True  # processes and memory too; false: files only


class SnapshotOut(BaseModel):
    id: str
    name: str | None
    sandbox_id: str
    memory: bool
    bytes: int
    created_at: datetime
    template: str
    cpu: float
    memory_mb: int
    disk_mb: int
    pause_ms: float | None = None


class RestoreIn(Strict):
    snapshot: str = Field(min_length=1, max_length=32)


class ForkIn(Strict):
    count: int = Field(1, ge=1, le=20)
