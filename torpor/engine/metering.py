"""Metering: active CPU seconds, memory GiB-seconds while running, seconds in each state,
bytes on disk. CPU is what the driver counted for the sandbox's container (`usage`), which
a hibernation ends (a restore starts a new count), so it is banked in the record first."""

from __future__ import annotations

import time
from collections.abc import Callable

from torpor.engine.records import Records
from torpor.engine.states import IN_MEMORY, State
from torpor.runtime.base import Driver, SandboxSpec
from torpor.store.models import SandboxRow, now

GIB = float(1 << 30)
FLUSH_EVERY = 10.0  # seconds between writes of the memory integral


class Metering:
    def __init__(self, records: Records, driver: Driver,
                 spec_of: Callable[[SandboxRow], SandboxSpec]):
        self.records = records
        self.driver = driver
        self.spec_of = spec_of
        self.mem: dict[str, float] = {}  # GiB-seconds not yet written to the records
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
        if only is not None:
            items = {only: self.mem.pop(only, 0.0)}
        else:
            items, self.mem = self.mem, {}
        self.records.add_memory(items)

    def _live_cpu(self, row: SandboxRow) -> float:
        """What the sandbox's container counted (a restore starts a new count)."""
        return self.driver.usage(self.spec_of(row)).cpu_seconds or 0.0

    def bank(self, sid: str) -> None:
        """Move the container's CPU count into the record (before the container goes)."""
        row = self.records.find(sid)
        if row is None:
            return
        self.records.add_usage(sid, cpu_seconds=self._live_cpu(row))
        self.flush(sid)

    def now(self, sid: str) -> dict:
        """What the sandbox uses at this moment: its CPU seconds so far, memory in use
        (0 unless its processes are in memory), bytes on its disk."""
        row = self.records.find(sid)
        live = self.driver.usage(self.spec_of(row)) if row.state in IN_MEMORY else None
        return {"cpu_seconds": round(row.cpu_seconds + ((live and live.cpu_seconds) or 0.0), 6),
                "memory_bytes": (live and live.memory_bytes) or 0,
                "disk_bytes": self.driver.disk_bytes(self.spec_of(row))
                if row.state != State.DELETED else 0}

    def usage(self, sid: str) -> dict:
        row = self.records.find(sid)
        events = self.records.events(sid, kind="state")
        live_cpu = self._live_cpu(row) if row.state in IN_MEMORY else 0.0
        by_state: dict[str, float] = {}
        for a, b in zip(events, events[1:] + [None], strict=False):
            end = b.at if b is not None else now()
            if a.to_state and a.to_state != State.DELETED:
                by_state[a.to_state] = by_state.get(a.to_state, 0.0) + max(
                    (end - a.at).total_seconds(), 0.0)
        disk = 0
        if row.state != State.DELETED:
            disk = self.driver.disk_bytes(self.spec_of(row))
        return {
            "sandbox_id": sid,
            "state": row.state,
            "cpu_seconds": round(row.cpu_seconds + live_cpu, 6),
            "memory_gib_seconds": round(row.memory_gib_seconds + self.mem.get(sid, 0.0), 6),
            "seconds_by_state": {k: round(v, 3) for k, v in by_state.items()},
            "disk_bytes": disk,
            "metadata": dict(row.meta or {}),
        }
