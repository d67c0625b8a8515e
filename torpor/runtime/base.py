"""The isolation driver interface. The engine talks to sandboxes only through this.

A driver turns a `SandboxSpec` into a running sandbox whose agent answers on a `Channel`,
and can find such a sandbox again after the server restarts. gVisor is the first driver;
a microVM driver plugs in behind the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torpor.channel import Channel
from torpor.templates import Template


class DriverError(Exception):
    """A driver operation failed; the message says what and what to look at."""


@dataclass
class SandboxSpec:
    id: str
    template: Template
    cpu: float
    memory_mb: int
    disk_mb: int
    pids: int = 512  # processes the sandbox may run at once
    hostname: str = "sandbox"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Stats:
    memory_bytes: int | None
    cpu_seconds: float | None
    disk_bytes: int
    oom_kills: int


class Driver(Protocol):
    name: str

    async def start(self, spec: SandboxSpec) -> Channel:
        """Create storage, start the sandbox, return a channel whose agent said hello."""

    async def adopt(self, spec: SandboxSpec) -> Channel:
        """Reconnect to a sandbox started by an earlier server process."""

    async def destroy(self, spec: SandboxSpec) -> None:
        """Stop the sandbox and remove everything it had on the host. Idempotent."""

    def stats(self, spec: SandboxSpec) -> Stats: ...

    def leftovers(self, sandbox_id: str) -> list[str]:
        """What of this sandbox still exists on the host (for tests and `doctor`)."""
