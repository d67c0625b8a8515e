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
    state: str  # creating, running, failed, deleted (standby, hibernated later)
    created_at: Time
    updated_at: Time
    cpu: float
    memory_mb: int
    disk_mb: int
    env: dict[str, str] = {}
    metadata: dict[str, str] = {}
    reason: str | None = None  # why the sandbox is `failed`


class Template(_Model):
    name: str
    description: str = ""
    cpu: float
    memory_mb: int
    disk_mb: int
    user: str = "user"
    workdir: str = "/home/user"
    env: dict[str, str] = {}


class ApiKey(_Model):
    id: str
    name: str
    prefix: str
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
    output_bytes: int = 0


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


def _signal_number(sig: Any) -> int | None:
    if isinstance(sig, int):
        return sig
    if isinstance(sig, str):
        if sig.isdigit():
            return int(sig)
        num = getattr(_signal, sig.upper(), None)
        return int(num) if isinstance(num, int) else None
    return None
