"""What the engine hands to every front door: a sandbox's record (`SandboxInfo`), a
command's events, as types, and the one place where the agent channel's failures become
engine errors (`torpor/errors.py`), so no door ever sees the channel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from torpor.channel import AgentError, ChannelClosed
from torpor.errors import Timeout, TorporError, Unavailable, from_agent
from torpor.store.models import SandboxRow


@dataclass(frozen=True)
class Started:
    """The command runs (first event of `Processes.run`)."""

    pid: int


@dataclass(frozen=True)
class Output:
    """Output of the command, decoded as UTF-8 (bad bytes replaced), in order."""

    stream: Literal["stdout", "stderr"]
    data: str


@dataclass(frozen=True)
class Truncated:
    """The agent dropped `lost` bytes of output before they were read (its buffer is
    bounded; a follow from an old offset starts past what it no longer has)."""

    lost: int


@dataclass(frozen=True)
class Exited:
    """The command ended (last event): `signal` names the signal that killed it, if one
    did; `timed_out` if the agent killed it for its timeout."""

    exit_code: int | None
    signal: str | None
    timed_out: bool
    pid: int


@dataclass(frozen=True)
class Failed:
    """The operation failed instead of ending (last event): the sandbox stopped, the
    command could not start, ..."""

    error: TorporError


@dataclass(frozen=True)
class Chunk:
    """Output as bytes, with the offset of its first byte in the process's output (stdout
    and stderr share one count): what `Processes.attach` gives, so a reader can come back
    from exactly where it stopped."""

    stream: Literal["stdout", "stderr"]
    data: bytes
    offset: int


@dataclass(frozen=True)
class FsEvent:
    """A change under a watched directory (`Files.watch`): `type` is create, write,
    remove, rename (from `old_path`), chmod, overflow (events were lost) or gone (the
    watched directory itself went; the last event); `path` is relative to the watched
    directory ("" is the directory itself)."""

    type: str
    path: str
    dir: bool = False
    old_path: str | None = None


Event = Started | Output | Truncated | Exited | Failed


@contextmanager
def agent_errors(sid: str, op: str | None) -> Iterator[None]:
    """Turn the channel's failures inside the block into engine errors naming the sandbox
    and the operation (`op`, the agent's word; None while a stream opens)."""
    try:
        yield
    except AgentError as e:
        raise from_agent(sid, e) from None
    except ChannelClosed:
        during = f" during {op}" if op else ""
        raise Unavailable(f"sandbox {sid}: the sandbox stopped{during}",
                          sandbox_id=sid) from None
    except TimeoutError:
        raise Timeout(f"sandbox {sid}: the agent did not answer {op or 'a request'} in time; "
                      "the sandbox may be overloaded: try again, or look at its events",
                      sandbox_id=sid) from None


@dataclass
class SandboxInfo:
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
    reason: str | None
    standby_after: float
    hibernate_after: float
    ttl: float | None
    idle_ttl: float | None
    expire_action: str
    last_active_at: datetime | None
    network: dict = field(default_factory=dict)  # the egress policy in force
    secrets: dict = field(default_factory=dict)  # env var -> secret name
    ports: dict = field(default_factory=dict)  # "8000" -> {"public": true}

    @classmethod
    def of(cls, row: SandboxRow, last_active: datetime | None = None,
           state: str | None = None, **extra: Any) -> SandboxInfo:
        return cls(id=row.id, template=row.template, state=state or row.state,
                   created_at=row.created_at, updated_at=row.updated_at, cpu=row.cpu,
                   memory_mb=row.memory_mb, disk_mb=row.disk_mb, env=dict(row.env or {}),
                   metadata=dict(row.meta or {}), reason=row.reason,
                   standby_after=row.standby_after, hibernate_after=row.hibernate_after,
                   ttl=row.ttl, idle_ttl=row.idle_ttl, expire_action=row.expire_action,
                   last_active_at=last_active or row.last_active_at, **extra)
