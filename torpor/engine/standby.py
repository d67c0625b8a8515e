"""Perpetual standby: activity, idle timers, expiry and memory pressure.

A sandbox is `running`; after `standby_after` seconds without activity it goes to `standby`
(every task frozen in its cgroup, memory resident, no CPU); after `hibernate_after` more it
is `hibernated` (checkpointed to disk, nothing of it left on the host). Any request that
needs it resumes it first, once, however many requests arrive together.

Activity is: an API call on the sandbox (the engine calls `touch`), a stream open on its
channel (command output, process follow, file transfer, egress and preview connections),
and keep-alive holds (explicit, or a process started with keep_alive), each bounded by
`max_hold` seconds.

Timers are deadlines, not a poll: each sandbox has one due time in a heap (when its next
timer could fire), checked then and set again. Activity only moves deadlines later, so
`touch` costs nothing; what can bring one earlier (a state change, an update of the timers)
calls `wake`. A parked sandbox with no timer left costs the server no work at all.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from torpor.channel import AgentError, ChannelClosed
from torpor.channel.client import AgentClient
from torpor.engine.records import Records
from torpor.engine.states import LIVE, State
from torpor.errors import Conflict, Invalid, NotFound, Unavailable
from torpor.store.models import SandboxRow, now

if TYPE_CHECKING:
    from torpor.engine.lifecycle import Lifecycle

log = logging.getLogger("torpor.standby")

RUNNING, STANDBY, HIBERNATED = State.RUNNING, State.STANDBY, State.HIBERNATED
IDLE_TICK = 1.0  # seconds before a due timer held off (busy, refused) is checked again
PRESSURE_EVERY = 1.0  # seconds between checks of host memory in use
MAX_HOLD = 3600.0  # the longest a keep-alive hold lasts, so a forgotten one cannot pin
RETRY_AFTER = 60.0  # seconds before an automatic hibernation that failed is tried again


@dataclass
class Activity:
    last: float = field(default_factory=time.monotonic)
    holds: dict[str, float] = field(default_factory=dict)  # hold id -> monotonic expiry
    proc_holds: dict[int, float] = field(default_factory=dict)  # pid -> monotonic expiry
    failed_at: float = 0.0  # last failed automatic hibernation


class Standby:
    def __init__(self, records: Records, lifecycle: Lifecycle, memory_watermark: float,
                 delete: Callable[[str, str], Awaitable[None]]):
        self.records = records
        self.lifecycle = lifecycle
        self.memory_watermark = memory_watermark
        self.delete = delete  # (sid, reason): the engine's delete
        self.activity: dict[str, Activity] = {}
        # timers: sandbox -> when to check it next (inf: nothing to check until a state or
        # timer change), and a heap of (due, sandbox) whose stale entries are skipped
        self.due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._wakeup = asyncio.Event()

    # --- activity -------------------------------------------------------------------------
    def act(self, sid: str) -> Activity:
        a = self.activity.get(sid)
        if a is None:
            a = self.activity[sid] = Activity()
        return a

    def touch(self, sid: str) -> None:
        self.act(sid).last = time.monotonic()
        if sid not in self.due:  # new to the timers (created, handed out, recovered)
            self.wake(sid)

    def wake(self, sid: str, at: float | None = None) -> None:
        """Check the sandbox's timers at `at` (now if not given), or sooner if already due
        sooner. Called on what can bring a deadline earlier: a change of state or timers."""
        at = time.monotonic() if at is None else at
        current = self.due.get(sid)
        if current is not None and current <= at:
            return
        self.due[sid] = at
        if at < math.inf:
            heapq.heappush(self._heap, (at, sid))
            if self._heap[0][1] == sid:
                self._wakeup.set()

    def forget(self, sid: str) -> None:
        """A deleted sandbox: its activity and timers go."""
        self.activity.pop(sid, None)
        self.due.pop(sid, None)

    def last_active(self, sid: str) -> datetime | None:
        a = self.activity.get(sid)
        return to_datetime(a.last) if a is not None else None

    def hold(self, sid: str, seconds: float) -> tuple[str, float]:
        if not 0 < seconds <= MAX_HOLD:
            raise Invalid(f"a keep-alive hold lasts 0 < seconds <= {MAX_HOLD:.0f}",
                          field="seconds")
        hid = "hold_" + secrets.token_hex(6)
        self.act(sid).holds[hid] = time.monotonic() + seconds
        self.touch(sid)
        return hid, seconds

    def release(self, sid: str, hid: str) -> None:
        if self.act(sid).holds.pop(hid, None) is None:
            raise NotFound(f"sandbox {sid}: no keep-alive hold {hid}", sandbox_id=sid)
        self.touch(sid)

    def hold_process(self, sid: str, pid: int, seconds: float = MAX_HOLD) -> None:
        self.act(sid).proc_holds[pid] = time.monotonic() + min(seconds, MAX_HOLD)

    async def busy(self, sid: str) -> bool:
        """True if something other than time says the sandbox is in use."""
        a = self.act(sid)
        t = time.monotonic()
        if self.lifecycle.open_streams(sid):
            return True
        a.holds = {h: exp for h, exp in a.holds.items() if exp > t}
        if a.holds:
            return True
        a.proc_holds = {p: exp for p, exp in a.proc_holds.items() if exp > t}
        for pid in list(a.proc_holds):
            try:
                info = await AgentClient(self.lifecycle.channels[sid]).proc_info(pid, wait=5)
            except (TimeoutError, AgentError, ChannelClosed, KeyError):
                info = {"running": False}
            if info.get("running"):
                return True
            a.proc_holds.pop(pid, None)
        return False

    def idle_seconds(self, sid: str) -> float:
        return time.monotonic() - self.act(sid).last

    # --- automatic ------------------------------------------------------------------------
    async def loop(self) -> None:
        """Check each sandbox's timers when they fall due, and host memory every
        PRESSURE_EVERY seconds; between these the loop sleeps."""
        next_pressure = time.monotonic() + PRESSURE_EVERY
        while True:
            t = time.monotonic()
            wait = min(next_pressure, self._heap[0][0] if self._heap else math.inf) - t
            if wait > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except TimeoutError:
                    pass
                continue
            try:
                await self.run_due(t)
                if t >= next_pressure:
                    next_pressure = t + PRESSURE_EVERY
                    await self.relieve_memory_pressure()
            except Exception:  # the loop must outlive any one sandbox's trouble
                log.exception("standby loop")

    async def run_due(self, t: float) -> None:
        """Check every sandbox whose timers are due at `t`."""
        while self._heap and self._heap[0][0] <= t:
            at, sid = heapq.heappop(self._heap)
            if self.due.get(sid) != at:
                continue  # superseded by an earlier wake, or checked already
            del self.due[sid]
            try:
                nxt = await self.check(sid)
            except Exception:
                log.exception("sandbox %s: checking its timers", sid)
                nxt = time.monotonic() + IDLE_TICK
            if nxt is not None:
                self.wake(sid, nxt)

    async def check(self, sid: str) -> float | None:
        """Act on the sandbox's timer that is due, if one is; return when to check it next
        (inf: no timer in its state; None: it is gone, pooled or failed)."""
        row = self.records.find(sid)
        if row is None or row.pooled or row.state not in LIVE:
            return None
        state = self.records.states.get(sid, row.state)  # a resume's record may be deferred
        t = time.monotonic()
        idle = t - self.act(sid).last
        age = (now() - row.created_at).total_seconds()
        parked_for_good = row.expire_action == "hibernate" and state == HIBERNATED
        if row.ttl and age >= row.ttl and not parked_for_good:
            await self._expire(row, f"older than its ttl of {row.ttl:.0f}s", ttl=True)
            return t + IDLE_TICK
        if (row.idle_ttl and idle >= row.idle_ttl and not parked_for_good
                and not await self._busy_quiet(row, state)):
            await self._expire(row, f"idle longer than its idle_ttl of {row.idle_ttl:.0f}s",
                               ttl=False)
            return t + IDLE_TICK
        if state == RUNNING and row.standby_after and idle >= row.standby_after:
            if not await self._busy_quiet(row, state):
                await self._try(self.lifecycle.standby(sid, "idle"))
            return t + IDLE_TICK  # busy, refused or done (done: standby() woke it anew)
        hibernate_at = max(row.standby_after + row.hibernate_after - idle,
                           self.act(sid).failed_at + RETRY_AFTER - t)
        if state == STANDBY and row.hibernate_after and hibernate_at <= 0:
            await self._try(self.lifecycle.hibernate(sid, "idle"))
            return t + IDLE_TICK
        # nothing due: the earliest deadline of the state it is in
        due = []
        if row.ttl and not parked_for_good:
            due.append(row.ttl - age)
        if row.idle_ttl and not parked_for_good:
            due.append(row.idle_ttl - idle)
        if state == RUNNING and row.standby_after:
            due.append(row.standby_after - idle)
        if state == STANDBY and row.hibernate_after:
            due.append(hibernate_at)
        return t + max(min(due), 0.0) if due else math.inf

    async def _busy_quiet(self, row: SandboxRow, state: str) -> bool:
        if state != RUNNING:
            return False
        return await self.busy(row.id)

    async def _expire(self, row: SandboxRow, why: str, ttl: bool) -> None:
        if row.expire_action == "hibernate" and row.state == HIBERNATED:
            return
        log.info("sandbox %s expired (%s): %s", row.id, why, row.expire_action)
        self.records.event(row.id, "expired", row.state, None, "expired",
                           {"why": why, "action": row.expire_action})
        if row.expire_action == "hibernate":
            if ttl:
                # a ttl fires once: the sandbox may be woken and used again afterwards
                self.records.update(row.id, ttl=0, event=("updated", "explicit", {"ttl": 0}))
            await self._try(self.lifecycle.hibernate(row.id, "expired", force=True))
        else:
            await self._try(self.delete(row.id, "expired"))

    async def relieve_memory_pressure(self) -> None:
        """Past the watermark of host memory in use, hibernate the least recently active
        sandboxes (standby first, then idle running ones) until under it again."""
        watermark = self.memory_watermark
        if not watermark or _host_memory_used_fraction() < watermark:
            return
        rows = [r for r in self.records.live() if r.state in (RUNNING, STANDBY)]
        rows.sort(key=lambda r: (r.state != STANDBY, -self.idle_seconds(r.id)))
        for row in rows:
            if _host_memory_used_fraction() < watermark:
                return
            if row.state == RUNNING and await self.busy(row.id):
                continue
            if time.monotonic() - self.act(row.id).failed_at <= RETRY_AFTER:
                continue
            await self._try(self.lifecycle.hibernate(row.id, "memory_pressure"))

    async def _try(self, coro) -> None:
        try:
            await coro
        except (Conflict, Unavailable) as err:
            log.info("%s", err.message)

    async def hibernate_all(self, deadline: float) -> None:
        """On shutdown: hibernate what runs or stands by, until the deadline."""
        for row in self.records.live():
            if row.state not in (RUNNING, STANDBY):
                continue
            if time.monotonic() > deadline:
                log.warning("shutdown: out of time; %s stays %s (adopted at next start)",
                            row.id, row.state)
                continue
            await self._try(self.lifecycle.hibernate(row.id, "shutdown", force=True))


def _host_memory_used_fraction() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            info[k] = int(v.split()[0])
    return 1 - info["MemAvailable"] / info["MemTotal"]


def to_datetime(mono: float) -> datetime:
    """A monotonic instant as wall-clock time (for last_active_at)."""
    return datetime.fromtimestamp(time.time() - (time.monotonic() - mono), tz=now().tzinfo)
