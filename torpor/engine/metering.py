"""Metering: active CPU seconds, memory GiB-seconds while running, seconds in each state,
bytes on disk. CPU comes from the sandbox's cgroup, which a hibernation ends (a restore
makes a new one), so what a cgroup counted is banked in the database before it goes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy import select

from torpor.store.models import EventRow, SandboxRow, now

if TYPE_CHECKING:
    from torpor.engine.manager import Engine

GIB = float(1 << 30)
FLUSH_EVERY = 10.0  # seconds between writes of the memory integral


class Metering:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.mem: dict[str, float] = {}  # GiB-seconds not yet written to the database
        self._last_sample = time.monotonic()
        self._last_flush = time.monotonic()

    def sample(self, running: dict[str, int]) -> None:
        """Add memory in use x time for running sandboxes ({id: bytes in use})."""
        t = time.monotonic()
        dt, self._last_sample = t - self._last_sample, t
        for sid, used in running.items():
            self.mem[sid] = self.mem.get(sid, 0.0) + used / GIB * dt
        if t - self._last_flush > FLUSH_EVERY:
            self.flush()

    def flush(self, only: str | None = None) -> None:
        self._last_flush = time.monotonic()
        items = [(only, self.mem.pop(only, 0.0))] if only else list(self.mem.items())
        if only is None:
            self.mem.clear()
        with self.engine.sessions.begin() as s:
            for sid, gib_s in items:
                row = s.get(SandboxRow, sid)
                if row is not None and gib_s:
                    row.memory_gib_seconds += gib_s

    def bank(self, sid: str) -> None:
        """Move the cgroup's CPU count into the record (before the cgroup goes away)."""
        cpu = self.engine.driver.cgroup(sid).cpu_seconds() or 0.0
        with self.engine.sessions.begin() as s:
            row = s.get(SandboxRow, sid)
            if row is not None:
                row.cpu_seconds += cpu
        self.flush(sid)

    def usage(self, sid: str) -> dict:
        e = self.engine
        with e.sessions() as s:
            row = s.get(SandboxRow, sid)
            events = list(s.scalars(select(EventRow).where(
                EventRow.sandbox_id == sid, EventRow.kind == "state").order_by(EventRow.id)))
        live_cpu = 0.0
        if row.state in ("running", "standby"):
            live_cpu = e.driver.cgroup(sid).cpu_seconds() or 0.0
        by_state: dict[str, float] = {}
        for a, b in zip(events, events[1:] + [None], strict=False):
            end = b.at if b is not None else now()
            if a.to_state and a.to_state != "deleted":
                by_state[a.to_state] = by_state.get(a.to_state, 0.0) + max(
                    (end - a.at).total_seconds(), 0.0)
        disk = 0
        if row.state != "deleted":
            spec = e._spec(row)
            disk = e.driver.layer(spec).disk_bytes() + e.driver.image_bytes(sid)
        return {
            "sandbox_id": sid,
            "state": row.state,
            "cpu_seconds": round(row.cpu_seconds + live_cpu, 6),
            "memory_gib_seconds": round(row.memory_gib_seconds + self.mem.get(sid, 0.0), 6),
            "seconds_by_state": {k: round(v, 3) for k, v in by_state.items()},
            "disk_bytes": disk,
            "metadata": dict(row.meta or {}),
        }
