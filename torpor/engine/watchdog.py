"""The watchdog: memory and task limits the runtime does not enforce itself, and metering's
samples of memory in use.

A runtime may have no guest OOM killer (gVisor here: past the cgroup limit the host kills
the whole sandbox), so past the driver's soft memory limit the watchdog asks the agent to
kill the sandbox's largest process; and near its task limit (a fork bomb) the process
session with the most processes. It visits only running sandboxes: a parked one costs it
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from torpor.channel import AgentError, Channel, ChannelClosed
from torpor.channel.client import AgentClient
from torpor.engine.lifecycle import Lifecycle
from torpor.engine.metering import Metering
from torpor.engine.records import Records
from torpor.engine.states import State
from torpor.runtime.base import Driver

log = logging.getLogger("torpor.watchdog")

WATCH_INTERVAL = 0.1  # seconds between memory and task checks of running sandboxes
MIN_WATCH_INTERVAL = 0.005  # the shortest, when memory alerts keep coming
METER_INTERVAL = 1.0  # seconds between samples of memory in use for metering
RUNAWAY_SHARE = 0.4  # of the task limit, past which the largest session is killed
RUNAWAY_STEP = 256  # host tasks more than at the last kill before acting again


class Watchdog:
    def __init__(self, records: Records, lifecycle: Lifecycle, driver: Driver,
                 metering: Metering, pooled: Callable[[str], bool]):
        self.records = records
        self.lifecycle = lifecycle
        self.driver = driver
        self.metering = metering
        self.pooled = pooled
        self._tasks_mark: dict[str, int] = {}  # host tasks at the last runaway kill
        self._memory_fds: dict[str, int | None] = {}  # sid -> its memory alert (eventfd)
        self._memory_alert = asyncio.Event()

    def forget(self, sid: str) -> None:
        self._tasks_mark.pop(sid, None)

    # --- memory alerts ------------------------------------------------------------------
    def _sync_memory_alerts(self) -> None:
        """A memory notification (`driver.memory_alert`) for each running sandbox, none
        for the others."""
        loop = asyncio.get_running_loop()
        running = self.records.states.running
        for sid in [s for s in self._memory_fds if s not in running]:
            self._close_memory_alert(loop, sid)
        for sid in running:
            spec = self.lifecycle.specs.get(sid)
            if sid in self._memory_fds or spec is None:
                continue
            try:
                fd = self.driver.memory_alert(spec, self.driver.limits(spec).soft_memory_bytes)
            except OSError:
                continue  # the sandbox is on its way (a start, a restore): next tick
            self._memory_fds[sid] = fd
            if fd is not None:
                loop.add_reader(fd, self._on_memory_alert, fd)

    def _close_memory_alert(self, loop: asyncio.AbstractEventLoop, sid: str) -> None:
        fd = self._memory_fds.pop(sid, None)
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)

    def _on_memory_alert(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except OSError:
            pass
        self._memory_alert.set()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sid in list(self._memory_fds):
            self._close_memory_alert(loop, sid)

    # --- the loop -----------------------------------------------------------------------
    async def _stop_runaway(self, sid: str, chan: Channel, tasks: tuple[int, int]) -> None:
        """Past its task limit the sandbox cannot make threads and its runtime dies, so
        before that the agent kills the command session with the most processes."""
        t0 = time.monotonic()
        try:
            res = await AgentClient(chan).pids_kill(wait=5)
        except (TimeoutError, AgentError, ChannelClosed) as e:
            log.warning("sandbox %s near its task limit (%d/%d): the agent did not stop the "
                        "runaway in %.1fs (%r)", sid, tasks[0], tasks[1],
                        time.monotonic() - t0, e)
            return
        if res.get("killed"):
            log.warning("sandbox %s near its task limit (%d/%d host threads): killed %d "
                        "processes of session %s (%s)", sid, tasks[0], tasks[1],
                        res.get("processes", 0), res.get("session"), res.get("cmdline"))
            self.records.event(sid, "pids_kill", State.RUNNING, State.RUNNING, "pids_limit",
                               {"host_threads": tasks[0], "limit": tasks[1], **res})

    async def loop(self) -> None:
        next_sample = time.monotonic()
        while True:
            # every WATCH_INTERVAL, or at once when a sandbox's memory crosses its soft
            # limit (a kernel notification, where the host has one): 1 GiB allocated in
            # one go outran a 100 ms tick now and then, and the host killed the sentry
            self._sync_memory_alerts()
            try:
                await asyncio.wait_for(self._memory_alert.wait(), WATCH_INTERVAL)
                await asyncio.sleep(MIN_WATCH_INTERVAL)  # a sandbox hovering at the limit
            except TimeoutError:
                pass
            self._memory_alert.clear()
            # metering wants memory in use without file cache: once a second; the watchdog
            # checks the cheap upper bound (`load`) every tick, the exact figure only past
            # the limit (with 200 running sandboxes this loop was ~30% of a core)
            sample = time.monotonic() >= next_sample
            if sample:
                next_sample = time.monotonic() + METER_INTERVAL
                self.driver.reap()  # once a second too: ~0.1 ms with 500 sandboxes
            in_use = await self.check_running(sample)
            if sample:
                self.metering.sample({k: v for k, v in in_use.items() if not self.pooled(k)})

    async def check_running(self, sample: bool) -> dict[str, int]:
        """One pass over the running sandboxes; memory in use of each when `sample`."""
        in_use: dict[str, int] = {}
        for sid in list(self.records.states.running):  # frozen or hibernated: nothing
            spec = self.lifecycle.specs.get(sid)
            chan = self.lifecycle.channels.get(sid)
            if spec is None or chan is None or chan.closed.is_set():
                continue
            load, limits = self.driver.load(spec), self.driver.limits(spec)
            # a runtime may keep the host threads it made (gVisor's sentry, in Go, never
            # ends them), so the count is a high-water mark: act again only once it grew
            if (load.tasks and load.tasks > RUNAWAY_SHARE * limits.tasks
                    and load.tasks > self._tasks_mark.get(sid, 0) + RUNAWAY_STEP):
                self._tasks_mark[sid] = load.tasks
                await self._stop_runaway(sid, chan, (load.tasks, limits.tasks))
            soft = limits.soft_memory_bytes
            if not sample and (load.memory_charged or 0) <= soft:
                continue
            used = self.driver.memory_in_use(spec)
            if used is not None and sample:
                in_use[sid] = used
            if used is None or used <= soft:
                continue
            try:
                res = await AgentClient(chan).oom_kill(wait=5)
            except (TimeoutError, AgentError, ChannelClosed):
                continue
            if res.get("killed"):
                log.warning("sandbox %s over memory (%d MiB): killed pid %s (%s)", sid,
                            used >> 20, res["killed"], res.get("cmdline"))
                self.records.event(sid, "oom_kill", State.RUNNING, State.RUNNING,
                                   "memory_limit",
                                   {"used_bytes": used, "limit_mb": spec.memory_mb, **res})
        return in_use
