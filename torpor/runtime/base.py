"""The driver interface: everything the engine asks of an isolation runtime, and nothing else.

A driver turns a `SandboxSpec` into a running sandbox whose agent answers on a `Channel`,
freezes and thaws it, checkpoints it to disk and restores it, finds it again after the
server restarts, reports what it uses, and removes every trace of it. The engine holds a
`Driver` (chosen by settings: `torpor.runtime.driver_for`) and never sees how: runsc
command lines, cgroups, loop devices and holders are the gVisor driver's business
(`gvisor.py`). Errors cross this boundary as `DriverError` (or `OSError` from the host),
with a message that says what failed and what to look at.

`fake.py` implements the same interface in memory (no root, no runsc) for unit tests of the
engine; `tests/unit/test_driver_contract.py` holds both drivers to the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from torpor.channel import Channel
from torpor.templates import Template


class DriverError(Exception):
    """A driver operation failed; the message says what and what to look at."""


@dataclass(frozen=True)
class VolumeMount:
    """A volume (by id) mounted at `dest` inside the sandbox from its start."""
    volume: str
    dest: str
    read_only: bool = False


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
    volumes: list[VolumeMount] = field(default_factory=list)
    # drives attached now: the name under /drives -> the drive's volume id
    drives: dict[str, str] = field(default_factory=dict)


@dataclass
class Limits:
    """What the engine enforces for the driver (a runtime may have no guest OOM killer)."""
    soft_memory_bytes: int  # past this, the engine stops the sandbox's largest process
    tasks: int  # what the sandbox may hold of the host's tasks before it cannot make more


@dataclass
class Load:
    """The cheap figures the watchdog reads every tick."""
    tasks: int | None  # host tasks the sandbox holds now
    memory_charged: int | None  # bytes charged to it: an upper bound of memory in use


@dataclass
class Usage:
    cpu_seconds: float | None  # CPU used since it started or was last restored
    memory_bytes: int | None  # memory in use, without reclaimable file cache
    oom_kills: int  # times the host killed something of it for memory


@runtime_checkable
class Driver(Protocol):
    name: str
    # kinds of problems the agent's `hibernate_check` reports that this driver cannot
    # checkpoint without losing the sandbox: the engine refuses to hibernate while any is
    # present (empty: no check needed)
    checkpoint_blockers: frozenset[str]

    def describe(self) -> dict:
        """What the driver is and runs on (name, version, platform), for logs and errors."""

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, spec: SandboxSpec) -> Channel:
        """Create the sandbox's disk, start it, return a channel whose agent said hello."""

    async def adopt(self, spec: SandboxSpec, ping: bool = True) -> Channel:
        """Reconnect to a sandbox an earlier server started (`ping`: check the agent
        answers; a frozen one cannot). DriverError if it is not there to adopt."""

    def release(self, spec: SandboxSpec) -> None:
        """A hibernated sandbox found at start: make sure nothing of it stays mounted or
        held on the host (an older server, or one killed mid-checkpoint, may have left it)."""

    def stop(self, spec: SandboxSpec) -> None:
        """Stop whatever runs of the sandbox; keep its disk (a failed sandbox, for
        inspection until it is deleted)."""

    async def destroy(self, spec: SandboxSpec) -> None:
        """Stop the sandbox and remove everything it had on the host. Idempotent."""

    # --- standby and hibernation --------------------------------------------------------
    def freeze(self, spec: SandboxSpec, frozen: bool) -> None:
        """Stop (or let go on) every task of the sandbox; memory stays resident. Fast:
        the engine calls it on the event loop."""

    async def checkpoint(self, spec: SandboxSpec) -> dict:
        """Save the sandbox to disk and stop it (frozen or not). On failure the sandbox is
        as it was (running, or frozen) and any older image is kept. Returns figures for
        the record (seconds, image_bytes)."""

    async def restore(self, spec: SandboxSpec) -> Channel:
        """Start a checkpointed sandbox from its image; the image is kept until
        `drop_image`. On failure nothing of the attempt runs; the image stays."""

    def drop_image(self, sid: str) -> None:
        """Remove the image of a sandbox that was restored (it answered)."""

    def checkpoint_refusal(self, problem: dict) -> str:
        """Why one problem of `hibernate_check` blocks a checkpoint, for the 409."""

    # --- templates: layers and boot snapshots ------------------------------------------
    def capture(self, spec: SandboxSpec, dest: Path) -> None:
        """Stop the sandbox and copy what it changed on its disk into dest/root and
        dest/usr (a template's layer, overlayfs whiteouts included)."""

    def export_snapshot(self, spec: SandboxSpec, dest: Path) -> None:
        """Keep a checkpointed sandbox (its disk, image and configuration) in `dest` as a
        boot snapshot; the sandbox itself can then be destroyed."""

    async def start_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> Channel:
        """Start a new sandbox as a copy of a boot snapshot (its own disk; its processes as
        they were); the caller calls `drop_image` once it answered."""

    def snapshot_live(self, spec: SandboxSpec, dest: Path, memory: bool) -> dict:
        """Keep a running (or frozen) sandbox in `dest`, the sandbox running on after a
        short pause: with `memory`, as a boot snapshot (`start_from_snapshot` starts copies
        of it); without, what it changed on its disk as dest/root and dest/usr (a layer).
        On failure nothing of it is left in `dest` and the sandbox is as it was. Returns
        figures (pause_ms, bytes)."""

    # --- volumes and drives ------------------------------------------------------------
    # A volume (or a drive) is storage of a fixed size that outlives sandboxes: the
    # sandboxes that use it name it in `spec.volumes` (mounted from their start, also
    # after a restore or a restart) or `spec.drives` (attached and detached while they run,
    # at /drives/<name>).
    def create_volume(self, vid: str, size_mb: int) -> None:
        """Make the volume, empty, its root owned by the sandbox's user (uid 1000)."""

    def volume_path(self, vid: str) -> Path:
        """A host directory holding the volume's files (mounted if it was not), for the
        engine's own reads and writes. Its content is hostile: a sandbox wrote it."""

    def volume_usage(self, vid: str) -> dict:
        """used_bytes (of its file system), size_bytes, disk_bytes (what it takes on the
        host's disk)."""

    def volume_space(self) -> int:
        """Bytes free on the host's disk where volumes are kept."""

    def release_volume(self, vid: str) -> None:
        """Nothing running uses the volume: let go of what the host holds of it."""

    def delete_volume(self, vid: str) -> None:
        """Remove the volume and its files (nothing uses it). Idempotent."""

    def attach_drive(self, spec: SandboxSpec, name: str, vid: str) -> None:
        """Make the drive `vid` appear at /drives/<name> in the running sandbox (and in
        `spec.drives`). DriverError if this sandbox cannot take drives while it runs."""

    def detach_drive(self, spec: SandboxSpec, name: str) -> None:
        """Take /drives/<name> away from the sandbox (and from `spec.drives`)."""

    # --- what it uses -------------------------------------------------------------------
    def limits(self, spec: SandboxSpec) -> Limits: ...

    def load(self, spec: SandboxSpec) -> Load: ...

    def memory_in_use(self, spec: SandboxSpec) -> int | None:
        """Memory in use without reclaimable cache (dearer than `load`)."""

    def usage(self, spec: SandboxSpec) -> Usage: ...

    def memory_alert(self, spec: SandboxSpec, threshold: int) -> int | None:
        """An eventfd that becomes readable when the sandbox's memory crosses `threshold`
        bytes (the caller closes it), or None where the host cannot notify."""

    def disk_bytes(self, spec: SandboxSpec) -> int:
        """Bytes the sandbox takes on the host's disk: its layer and any image."""

    # --- housekeeping -------------------------------------------------------------------
    def reap(self) -> None:
        """Collect what exited of the driver's helper processes (called once a second)."""

    def close(self) -> None:
        """The server stops: let go of what the driver holds; sandboxes keep running."""

    def leftovers(self, sid: str) -> list[str]:
        """What of this sandbox still exists on the host (tests check it is nothing)."""
