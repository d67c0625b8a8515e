"""The warm pool: booted sandboxes kept ready per template, handed out by a create.

The pool keeps `pool_size` sandboxes of `base` and of each template with a boot snapshot
(restored, so their start command runs already), with the template's default resources,
recorded with `pooled = true` (invisible to the API). A create with those resources takes
one (its env is set through the agent's `configure`) and the pool refills in the
background; a graceful stop deletes the pool's sandboxes (they hold nothing of anyone's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from torpor.channel import AgentError, ChannelClosed
from torpor.channel.client import AgentClient
from torpor.engine.lifecycle import Lifecycle
from torpor.engine.records import Records
from torpor.engine.states import State
from torpor.errors import TorporError
from torpor.store.models import SandboxRow, now
from torpor.templates import BASE, LATEST, Template, TemplateStore

log = logging.getLogger("torpor.pool")

POOL_STOP_SECONDS = 30.0  # a graceful stop waits this long for a pool sandbox's boot
RETRY_AFTER = 5.0  # seconds before a template whose boot failed is tried again


class WarmPool:
    def __init__(self, records: Records, lifecycle: Lifecycle, templates: TemplateStore,
                 size: int, new_id: Callable[[], str],
                 dropped: Callable[[], None] = lambda: None):
        self.records = records
        self.lifecycle = lifecycle
        self.templates = templates
        self.size = size
        self.new_id = new_id
        self.dropped = dropped  # called after stale pool sandboxes were deleted
        self.pooled: set[str] = set()  # booted, waiting to be handed out
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self._loop())
        return self._task

    def wake(self) -> None:
        """Look at the templates again now (one was built or deleted)."""
        self._wakeup.set()

    def forget(self, sid: str) -> None:
        self.pooled.discard(sid)

    def _ready(self, tpl: Template) -> list[SandboxRow]:
        """Its booted pool sandboxes (of this very digest: a rebuilt name has new ones)."""
        return [r for r in self.records.in_states([State.RUNNING], pooled=True)
                if r.template_digest == tpl.digest
                or (r.template_digest is None and r.template == tpl.name == BASE)]

    def _pooled_templates(self) -> list[Template]:
        """`base`, and every named template with a boot snapshot: those a create can take
        from the pool (a template without one boots its layers on demand)."""
        return [t for t in self.templates.list() if t.name == BASE or t.snapshot]

    async def _drop_stale(self, wanted: set[str]) -> None:
        """Pool sandboxes of templates no longer pooled (deleted, or their name rebuilt)."""
        dropped = False
        for row in self.records.in_states([State.RUNNING], pooled=True):
            digest = row.template_digest or (self.templates.get(BASE).digest
                                             if row.template == BASE else None)
            if digest not in wanted:
                try:
                    await self.lifecycle.remove(row, "pool_stale")
                except (TorporError, OSError) as e:
                    log.warning("warm pool: %s could not be deleted: %s", row.id, e)
                dropped = True
        if dropped:
            self.dropped()  # what the templates held may go now

    async def take(self, tpl: Template, resources: tuple[float, int, int], env: dict,
                   metadata: dict, policy: dict, boot_env: dict) -> str | None:
        """Hand out a pool sandbox for a create with these (cpu, memory_mb, disk_mb): its
        id, or None if the pool has none that fits (the caller boots a new one)."""
        if resources != (tpl.cpu, tpl.memory_mb, tpl.disk_mb):
            return None
        async with self._lock:
            for row in self._ready(tpl):
                chan = self.lifecycle.channels.get(row.id)
                if chan is None or chan.closed.is_set():
                    continue
                t = now()
                self.records.update(
                    row.id, event=("handed_out", "created", {"pool": True}), pooled=False,
                    env=env, meta=metadata, created_at=t, **policy)
                self.pooled.discard(row.id)
                self._wakeup.set()
                if boot_env:
                    try:
                        await AgentClient(chan).configure(boot_env)
                    except (AgentError, ChannelClosed) as e:
                        await self.lifecycle.fail(row.id, f"could not configure: {e}",
                                                  "start_failed")
                        continue
                return row.id
        self._wakeup.set()
        return None

    async def _loop(self) -> None:
        """Keep `size` booted sandboxes per template, with the template's defaults."""
        while not self._stopping:
            self._wakeup.clear()
            if self.size > 0:
                pooled = self._pooled_templates()
                await self._drop_stale({t.digest for t in pooled})
                for tpl in pooled:
                    while not self._stopping and len(self._ready(tpl)) < self.size:
                        row = SandboxRow(id=self.new_id(),
                                         template=tpl.name if tpl.tag == LATEST else tpl.ref,
                                         template_digest=tpl.digest,
                                         state=State.CREATING, cpu=tpl.cpu,
                                         memory_mb=tpl.memory_mb, disk_mb=tpl.disk_mb, env={},
                                         meta={}, pooled=True)
                        self.records.add(row)
                        try:
                            await self.lifecycle.boot(row, {})
                        except TorporError as e:
                            log.error("warm pool: %s", e)
                            await asyncio.sleep(RETRY_AFTER)
                            break
                        self.pooled.add(row.id)
            if self._stopping:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), 30)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        """Let the loop finish the boot it may be in (cancelling it there would leave a
        sandbox starting in a thread with nobody to record it), then end it."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), POOL_STOP_SECONDS)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def drain(self) -> None:
        """On a graceful stop: the pool's sandboxes hold nothing of anyone's, so they are
        deleted rather than hibernated; the next start boots a fresh pool. Nothing of them
        (runtime, helpers, mounts) outlives the server."""
        for row in self.records.in_states([State.RUNNING, State.CREATING], pooled=True):
            try:
                await self.lifecycle.remove(row, "shutdown")
            except (TorporError, OSError) as e:
                log.warning("shutdown: pool sandbox %s could not be deleted: %s", row.id, e)
