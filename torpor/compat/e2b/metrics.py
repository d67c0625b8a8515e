"""E2B's sandbox metrics: samples of CPU, memory and disk in E2B's shape.

E2B samples every sandbox every 5 s in the background. The door samples when asked instead
(`GET /sandboxes/{id}/metrics` takes one if the last is STEP old or more), from the engine's
`metrics` (CPU seconds so far, memory in use now, disk bytes), so the first call already
answers one sample and a sandbox nobody asks about costs nothing. CPU % is the CPU time used
between two samples over the time between them (the first: since the sandbox started)."""

from __future__ import annotations

import time
from collections import deque
from datetime import UTC, datetime

from torpor.compat.e2b import sandboxes as sbx

STEP = 5.0  # seconds between samples, as E2B's collection buckets
KEEP = 720  # samples kept per sandbox (an hour at one every 5 s)
MIB = 1 << 20


class Samples:
    def __init__(self):
        self.by_sid: dict[str, deque] = {}

    def forget(self, sid: str) -> None:
        self.by_sid.pop(sid, None)

    def take(self, engine, info) -> None:
        now = time.time()
        kept = self.by_sid.setdefault(info.id, deque(maxlen=KEEP))
        if kept and now - kept[-1]["t"] < STEP:
            return
        used = engine.metrics(info.id)
        cpus = max(1, round(info.cpu))
        if kept:
            prev_t, prev_cpu = kept[-1]["t"], kept[-1]["cpu_seconds"]
        else:
            prev_t, prev_cpu = sbx._aware(info.created_at).timestamp(), 0.0
        span = max(now - prev_t, 1e-3)
        pct = max(0.0, min(100.0, (used["cpu_seconds"] - prev_cpu) / span / cpus * 100))
        kept.append({"t": now, "cpu_seconds": used["cpu_seconds"], "pct": round(pct, 2),
                     "mem": int(used["memory_bytes"]), "disk": int(used["disk_bytes"]),
                     "cpus": cpus, "mem_total": info.memory_mb * MIB,
                     "disk_total": info.disk_mb * MIB})

    def series(self, sid: str, start: int | None, end: int | None) -> list[dict]:
        """The samples from `start` to `end` (unix seconds, `end`'s whole second
        included), in E2B's `SandboxMetric` shape, oldest first."""
        out = []
        for s in self.by_sid.get(sid, ()):
            if (start is not None and s["t"] < start) or (end is not None and s["t"] >= end + 1):
                continue
            out.append({"timestamp": datetime.fromtimestamp(s["t"], UTC).isoformat()
                        .replace("+00:00", "Z"), "timestampUnix": int(s["t"]),
                        "cpuCount": s["cpus"], "cpuUsedPct": s["pct"], "memUsed": s["mem"],
                        "memTotal": s["mem_total"], "memCache": 0, "diskUsed": s["disk"],
                        "diskTotal": s["disk_total"]})
        return out
