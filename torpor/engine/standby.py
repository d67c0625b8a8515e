"""Perpetual standby: activity, idle timers, standby (frozen), hibernation (on disk), wake.

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
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from torpor.channel import AgentError, ChannelClosed
from torpor.errors import Conflict, Invalid, Unavailable
from torpor.runtime.base import DriverError
from torpor.store.models import SandboxRow, now

if TYPE_CHECKING:
    from torpor.engine.manager import Engine

log = logging.getLogger("torpor.standby")

RUNNING, STANDBY, HIBERNATED, FAILED, DELETED = (
    "running", "standby", "hibernated", "failed", "deleted")
IDLE_TICK = 1.0  # seconds before a due timer held off (busy, refused) is checked again
PRESSURE_EVERY = 1.0  # seconds between checks of host memory in use
MAX_HOLD = 3600.0  # the longest a keep-alive hold lasts, so a forgotten one cannot pin
RECORD_RESUME_AFTER = 0.05  # seconds after a resume before its state record is written
STREAM_GRACE = 1.0  # seconds a standby or hibernation waits for streams already closing
RETRY_AFTER = 60.0  # seconds before an automatic hibernation that failed is tried again


@dataclass
class Activity:
    last: float = field(default_factory=time.monotonic)
    holds: dict[str, float] = field(default_factory=dict)  # hold id -> monotonic expiry
    proc_holds: dict[int, float] = field(default_factory=dict)  # pid -> monotonic expiry
    failed_at: float = 0.0  # last failed automatic hibernation


class Standby:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.activity: dict[str, Activity] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.transitioning: set[str] = set()  # channel closes here are expected
        # resumes whose state record is still to be written (see _resumed)
        self.pending_resumes: dict[str, tuple[asyncio.TimerHandle, tuple]] = {}
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
            from torpor.errors import NotFound

            raise NotFound(f"sandbox {sid}: no keep-alive hold {hid}", sandbox_id=sid)
        self.touch(sid)

    def hold_process(self, sid: str, pid: int, seconds: float = MAX_HOLD) -> None:
        self.act(sid).proc_holds[pid] = time.monotonic() + min(seconds, MAX_HOLD)

    def open_streams(self, sid: str) -> int:
        chan = self.engine.channels.get(sid)
        return len(chan.streams) if chan is not None else 0

    async def _refuse_open_streams(self, sid: str, running: bool) -> None:
        """409 if streams are open, once those already closing have had STREAM_GRACE
        seconds to go: an egress connection outlives the command that made it by a few ms,
        and a standby or hibernation asked for right after that command should not fail
        for it. (A frozen agent closes nothing: no wait then.)"""
        deadline = time.monotonic() + (STREAM_GRACE if running else 0.0)
        while (n := self.open_streams(sid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if n:
            chan = self.engine.channels.get(sid)
            names = sorted(st.what for st in chan.streams.values()) if chan else []
            shown = "; ".join(names[:5]) + ("; ..." if len(names) > 5 else "")
            raise Conflict(f"sandbox {sid} has {n} open streams ({shown}): command output, "
                           "follows, transfers, egress or preview connections; close them "
                           "first", sandbox_id=sid, streams=names[:20])

    async def busy(self, sid: str) -> bool:
        """True if something other than time says the sandbox is in use."""
        a = self.act(sid)
        t = time.monotonic()
        if self.open_streams(sid):
            return True
        a.holds = {h: exp for h, exp in a.holds.items() if exp > t}
        if a.holds:
            return True
        a.proc_holds = {p: exp for p, exp in a.proc_holds.items() if exp > t}
        for pid in list(a.proc_holds):
            try:
                info = await self.engine.channels[sid].call("proc_info", timeout=5, pid=pid)
            except (TimeoutError, AgentError, ChannelClosed, KeyError):
                info = {"running": False}
            if info.get("running"):
                return True
            a.proc_holds.pop(pid, None)
        return False

    def idle_seconds(self, sid: str) -> float:
        return time.monotonic() - self.act(sid).last

    def flush_resume(self, sid: str) -> None:
        """Write a resume's state record now if it is still pending (see _resumed)."""
        pending = self.pending_resumes.get(sid)
        if pending is not None:
            timer, args = pending
            timer.cancel()
            self._record_resume(*args)

    def lock(self, sid: str) -> asyncio.Lock:
        """The sandbox's transition lock; a resume's pending record is written first."""
        self.flush_resume(sid)
        lk = self.locks.get(sid)
        if lk is None:
            lk = self.locks[sid] = asyncio.Lock()
        return lk

    # --- transitions ----------------------------------------------------------------------
    async def standby(self, sid: str, reason: str, force: bool = False) -> None:
        e = self.engine
        async with self.lock(sid):
            row = e._row(sid)
            if row.state != RUNNING:
                if row.state == STANDBY:
                    return
                raise Conflict(f"sandbox {sid} is {row.state}; only a running sandbox can go "
                               "to standby (resume it first)", sandbox_id=sid)
            if not force:
                await self._refuse_open_streams(sid, True)
            t0 = time.monotonic()
            await asyncio.to_thread(e.driver.freeze, e._specs[sid], True)
            e._set_state(sid, STANDBY, None, reason, _ms(t0))
            self.wake(sid)

    async def hibernate(self, sid: str, reason: str, force: bool = False) -> None:
        e = self.engine
        async with self.lock(sid):
            row = e._row(sid)
            if row.state == HIBERNATED:
                return
            if row.state not in (RUNNING, STANDBY):
                raise Conflict(f"sandbox {sid} is {row.state}; it cannot hibernate",
                               sandbox_id=sid)
            if not force:
                await self._refuse_open_streams(sid, row.state == RUNNING)
            spec = e._specs[sid]
            await self._check_hibernatable(sid, row.state, reason)
            t0 = time.monotonic()
            self.transitioning.add(sid)
            try:
                e.metering.bank(sid)  # the cgroup's CPU count goes away with the container
                result = await e.driver.hibernate(spec)
            except (DriverError, OSError) as err:
                self.transitioning.discard(sid)
                self.act(sid).failed_at = time.monotonic()
                if row.state == STANDBY:
                    await asyncio.to_thread(e.driver.freeze, spec, True)
                e._event(sid, "hibernate_failed", row.state, row.state, reason,
                         {"error": str(err)})
                log.warning("sandbox %s: hibernation failed, it stays %s: %s", sid,
                            row.state, err)
                raise Unavailable(f"sandbox {sid} could not hibernate and stays {row.state}: "
                                  f"{err}", sandbox_id=sid) from None
            chan = e.channels.pop(sid, None)
            if chan is not None:
                await chan.close()
            self.transitioning.discard(sid)
            e._set_state(sid, HIBERNATED, None, reason, _ms(t0), result)
            self.wake(sid)

    async def _check_hibernatable(self, sid: str, state: str, reason: str) -> None:
        """Refuse (409) what the driver cannot checkpoint without killing the sandbox
        (`driver.checkpoint_limits`: on runsc 0.0~20240729, a file deleted while open on the
        sandbox's disk; older runsc also epoll-watched sockets)."""
        e = self.engine
        chan = e.channels.get(sid)
        if chan is None or not e.driver.checkpoint_limits:
            return
        frozen = state == STANDBY
        if frozen:
            await asyncio.to_thread(e.driver.freeze, e._specs[sid], False)
        try:
            res = await chan.call("hibernate_check", timeout=30)
        except (AgentError, ChannelClosed, TimeoutError) as err:
            res = {"problems": [{"error": f"the agent did not answer the check: {err}"}]}
        # what the check reports that this runsc can save after all
        problems = [p for p in res.get("problems") or []
                    if p.get("kind", "error") in e.driver.checkpoint_limits | {"error"}]
        if problems and frozen:
            # refused: back to standby. (Passed: it stays thawed for the checkpoint, which
            # pauses it itself; freezing it again would race the checkpoint.)
            await asyncio.to_thread(e.driver.freeze, e._specs[sid], True)
        if problems:
            self.act(sid).failed_at = time.monotonic()
            e._event(sid, "hibernate_refused", state, state, reason, {"problems": problems[:20]})
            first = problems[0]
            who = f"process {first.get('pid')} ({first.get('cmdline', '')[:80]})"
            if first.get("kind") == "epoll_socket":
                why = (f"{who} waits on TCP/UDP sockets with epoll (an event-loop server or "
                       "client), which this runsc cannot checkpoint. Stop it, or keep the "
                       "sandbox in standby")
            elif "path" in first:
                why = (f"{who} holds {first.get('path')}, a file deleted while open on disk, "
                       "which this runsc cannot checkpoint. Close it, or keep such files in "
                       "/tmp or /dev/shm (memory)")
            else:
                why = str(first.get("error", "the check failed"))
            raise Conflict(f"sandbox {sid} cannot hibernate: {why}; the sandbox stays {state}",
                           sandbox_id=sid, problems=problems[:20])

    async def resume(self, sid: str, reason: str) -> None:
        """Bring a sandbox in standby or hibernated back to running; a no-op otherwise."""
        e = self.engine
        if e._state.get(sid) == RUNNING:
            return
        async with self.lock(sid):
            state = e._state.get(sid)
            if state == RUNNING:
                return  # another request resumed it while this one waited
            if state == STANDBY and sid in e._specs:
                # the hot path: the in-process state is the record's (every change goes
                # through _set_state), so no read; the thaw is one cgroup write
                t0 = time.monotonic()
                e.driver.freeze(e._specs[sid], False)
                self._resumed(sid, reason, t0, STANDBY)
                return
            await self._resume_locked(sid, reason)

    def _resumed(self, sid: str, reason: str, t0: float, was: str) -> None:
        """The sandbox runs again. After a thaw its state record is written
        RECORD_RESUME_AFTER later, once the caller's command has most likely run: written
        at once, its ~2 ms of CPU competed with that command (measured: standby -> echo
        2 ms slower than running -> echo; 0.4 ms deferred). Any other state write or
        transition writes it first (flush_resume), so records keep their order; reads use
        the in-process state. A server killed meanwhile finds "standby": thawing again is
        a no-op. After a restore the record is written at once (a restart that believed
        it still hibernated would look for an image that is gone)."""
        self.engine._state[sid] = RUNNING
        self.touch(sid)
        self.wake(sid)
        args = (sid, reason, _ms(t0), now(), was)
        if was != STANDBY:
            self._record_resume(*args)
            return
        timer = asyncio.get_running_loop().call_later(RECORD_RESUME_AFTER,
                                                      self._record_resume, *args)
        self.pending_resumes[sid] = (timer, args)

    async def _tell_resumed(self, sid: str, chan) -> None:
        """Have a restored agent check its environment again (`resumed`)."""
        try:
            await chan.call("resumed", timeout=10)
        except AgentError:
            pass  # an agent from before this op: it had SIGHUP, which does the same
        except (ChannelClosed, TimeoutError) as err:
            log.warning("sandbox %s: after the restore: %s", sid, err)

    def _record_resume(self, sid: str, reason: str, ms: int, at: datetime, was: str) -> None:
        self.pending_resumes.pop(sid, None)
        try:
            self.engine._set_state(sid, RUNNING, None, reason, ms, {"from": was}, at)
        except Exception:  # the sandbox runs; only its record lags: say so, go on
            log.exception("sandbox %s: recording its resume", sid)

    async def _resume_locked(self, sid: str, reason: str) -> None:
        e = self.engine
        row = e._row(sid)
        if row.state == RUNNING:
            return
        t0 = time.monotonic()
        spec = e._spec(row)
        if row.state == STANDBY:
            e.driver.freeze(spec, False)  # one small cgroup write: no thread hop
            self._resumed(sid, reason, t0, STANDBY)
            return
        if row.state != HIBERNATED:
            raise Unavailable(f"sandbox {sid} is {row.state}", sandbox_id=sid)
        self.transitioning.add(sid)
        try:
            chan = await e.driver.restore(spec)
        except (DriverError, OSError) as err:
            self.transitioning.discard(sid)
            # the image stays on disk: never removed before a restore succeeded
            await e._fail(sid, f"could not resume from hibernation: {err}",
                          "restore_failed")
            raise Unavailable(f"sandbox {sid} could not be resumed: {err}",
                              sandbox_id=sid) from None
        self.transitioning.discard(sid)
        e._attach(sid, spec, chan)
        # not awaited: the agent takes its frames in order, so it has checked itself
        # again before it sees the caller's request
        asyncio.get_running_loop().create_task(self._tell_resumed(sid, chan))
        self._resumed(sid, reason, t0, HIBERNATED)
        e.driver.drop_image(sid)  # only once the record says running

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
        e = self.engine
        with e.sessions() as s:
            row = s.get(SandboxRow, sid)
        if row is None or row.pooled or row.state not in (RUNNING, STANDBY, HIBERNATED):
            return None
        state = e._state.get(sid, row.state)  # a resume's record may be pending
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
                await self._try(self.standby(sid, "idle"))
            return t + IDLE_TICK  # busy, refused or done (done: standby() woke it anew)
        hibernate_at = max(row.standby_after + row.hibernate_after - idle,
                           self.act(sid).failed_at + RETRY_AFTER - t)
        if state == STANDBY and row.hibernate_after and hibernate_at <= 0:
            await self._try(self.hibernate(sid, "idle"))
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
        self.engine._event(row.id, "expired", row.state, None, "expired",
                           {"why": why, "action": row.expire_action})
        if row.expire_action == "hibernate":
            if ttl:
                # a ttl fires once: the sandbox may be woken and used again afterwards
                self.engine.update(row.id, ttl=0, touch=False)
            await self._try(self.hibernate(row.id, "expired", force=True))
        else:
            await self._try(self.engine.delete(row.id, reason="expired"))

    async def relieve_memory_pressure(self) -> None:
        """Past the watermark of host memory in use, hibernate the least recently active
        sandboxes (standby first, then idle running ones) until under it again."""
        e = self.engine
        watermark = e.settings.memory_watermark
        if not watermark or _host_memory_used_fraction() < watermark:
            return
        rows = [r for r in e.live_rows() if r.state in (RUNNING, STANDBY)]
        rows.sort(key=lambda r: (r.state != STANDBY, -self.idle_seconds(r.id)))
        for row in rows:
            if _host_memory_used_fraction() < watermark:
                return
            if row.state == RUNNING and await self.busy(row.id):
                continue
            if time.monotonic() - self.act(row.id).failed_at <= RETRY_AFTER:
                continue
            await self._try(self.hibernate(row.id, "memory_pressure"))

    async def _try(self, coro) -> None:
        try:
            await coro
        except (Conflict, Unavailable) as err:
            log.info("%s", err.message)

    async def hibernate_all(self, deadline: float) -> None:
        """On shutdown: hibernate what runs or stands by, until the deadline."""
        for row in self.engine.live_rows():
            if row.state not in (RUNNING, STANDBY):
                continue
            if time.monotonic() > deadline:
                log.warning("shutdown: out of time; %s stays %s (adopted at next start)",
                            row.id, row.state)
                continue
            await self._try(self.hibernate(row.id, "shutdown", force=True))


def _ms(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


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
