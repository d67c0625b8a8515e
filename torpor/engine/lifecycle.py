"""The sandbox lifecycle: the one place that changes a sandbox's state.

Start (`boot`), standby (freeze), hibernation (checkpoint), resume (thaw or restore),
failure, deletion and recovery after a restart all live here, each under the sandbox's
transition lock, each written through the record layer (which checks the transition) and
done through the driver interface. The lifecycle owns the live sandboxes' specs and agent
channels; it tells the rest of the engine what happened through `Hooks` (timers, traffic,
metering, the warm pool), so none of those imports it back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Protocol

from torpor.channel import AgentError, Channel, ChannelClosed
from torpor.channel.client import AgentClient
from torpor.engine.records import Records
from torpor.engine.states import IN_MEMORY, PARKED, State, require
from torpor.errors import Conflict, TorporError, Unavailable
from torpor.runtime.base import Driver, DriverError, SandboxSpec
from torpor.store.models import SandboxRow
from torpor.templates import Template, TemplateStore

log = logging.getLogger("torpor.lifecycle")

RECORD_RESUME_AFTER = 0.05  # seconds after a hot resume before its state record is written
STREAM_GRACE = 1.0  # seconds a standby or hibernation waits for streams already closing


class Hooks(Protocol):
    """What the lifecycle tells the rest of the engine."""

    def attached(self, sid: str, chan: Channel) -> None:
        """The sandbox's agent answers on `chan` (started, restored or adopted)."""

    def touched(self, sid: str) -> None:
        """A request reached the sandbox: activity."""

    def changed(self, sid: str) -> None:
        """Its state changed: its timers may fall due sooner."""

    def banking(self, sid: str) -> None:
        """Its container is about to go: count what it used so far."""

    def hibernate_failed(self, sid: str) -> None: ...

    def storage(self, spec: SandboxSpec) -> None:
        """A sandbox's spec is made: put in the volumes and drives it uses."""

    def forgotten(self, sid: str) -> None:
        """It was deleted: drop what is kept of it in memory."""


def _ms(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


class Lifecycle:
    def __init__(self, records: Records, driver: Driver, templates: TemplateStore,
                 hooks: Hooks):
        self.records = records
        self.driver = driver
        self.templates = templates
        self.hooks = hooks
        self.channels: dict[str, Channel] = {}
        self.specs: dict[str, SandboxSpec] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.transitioning: set[str] = set()  # channel closes here are expected
        self._watchers: dict[str, asyncio.Task] = {}
        self.closing = False

    # --- what a live sandbox has --------------------------------------------------------
    def spec(self, row: SandboxRow) -> SandboxSpec:
        spec = self.specs.get(row.id)
        if spec is None:
            # the digest it started from: a rebuilt name does not change it
            tpl = (self.templates.by_digest(row.template_digest) if row.template_digest
                   else self.templates.get(row.template))
            if tpl is None:
                raise Unavailable(f"sandbox {row.id}: template {row.template} "
                                  f"({row.template_digest or 'no digest'}) is gone")
            spec = SandboxSpec(id=row.id, template=tpl, cpu=row.cpu, memory_mb=row.memory_mb,
                               disk_mb=row.disk_mb, hostname="sandbox")
            self.hooks.storage(spec)
            self.specs[row.id] = spec
        return spec

    def lock(self, sid: str) -> asyncio.Lock:
        """The sandbox's transition lock; a hot resume's deferred record is written first."""
        self.records.flush(sid)
        lk = self.locks.get(sid)
        if lk is None:
            lk = self.locks[sid] = asyncio.Lock()
        return lk

    def open_streams(self, sid: str) -> int:
        """Streams that keep the sandbox busy: all but `passive` ones (file watches, which
        wait on the sandbox rather than use it, and outlive its standby and hibernation)."""
        chan = self.channels.get(sid)
        if chan is None:
            return 0
        return sum(1 for st in chan.streams.values() if not getattr(st, "passive", False))

    async def channel(self, sid: str) -> Channel:
        """The agent channel of a sandbox, resumed first if it is in standby or hibernated.
        Every call on a sandbox comes through here: this is what counts as activity."""
        cached = self.records.states.get(sid)
        if cached in PARKED or (cached != State.RUNNING
                                and self.records.get(sid).state in PARKED):
            await self.resume(sid, "request")  # reads the record under its lock
        self.hooks.touched(sid)
        chan = self.channels.get(sid)
        if chan is not None and not chan.closed.is_set():
            return chan
        row = self.records.get(sid)
        if row.state == State.FAILED:
            raise Unavailable(f"sandbox {sid} has failed: {row.reason}. Delete it and create "
                              "a new one", sandbox_id=sid)
        raise Unavailable(f"sandbox {sid} is {row.state}, not running", sandbox_id=sid)

    # --- start, attach, fail, remove ----------------------------------------------------
    async def boot(self, row: SandboxRow, env: dict) -> None:
        """Start a sandbox whose record is `creating`; `env` configures its agent."""
        spec = self.spec(row)
        tpl = spec.template
        restored = tpl.snapshot and (spec.memory_mb, spec.disk_mb) == (tpl.memory_mb,
                                                                       tpl.disk_mb)
        try:
            if restored:
                # its start command runs already: a restore of the template's boot
                # snapshot, not a boot (other memory or disk than the template's: a boot)
                chan = await self.driver.start_from_snapshot(spec, tpl.snapshot_dir)
                # in one round trip (a pool sandbox is configured when it is handed out);
                # `resumed` last: the agent warms up right after answering it
                client = AgentClient(chan)
                await asyncio.gather(*([client.configure(env)] if env else []),
                                     client.resumed(warm_up=True, wait=10))
            else:
                chan = await self.driver.start(spec)
                if env:  # a pool sandbox is configured when it is handed out
                    await AgentClient(chan).configure(env)
        except (DriverError, ChannelClosed, AgentError, OSError, TimeoutError) as e:
            await self.fail(row.id, f"could not start: {e}", "start_failed", destroy=True)
            raise Unavailable(f"sandbox {row.id} could not start: {e}",
                              sandbox_id=row.id) from None
        self.attach(row.id, spec, chan)
        self.records.set_state(row.id, State.RUNNING, None, "created",
                               extra={"boot_snapshot": True} if restored else None)
        if restored:  # once the create has answered: not the caller's wait
            asyncio.get_running_loop().call_soon(self.driver.drop_image, row.id)

    def attach(self, sid: str, spec: SandboxSpec, chan: Channel) -> None:
        self.hooks.attached(sid, chan)
        self.channels[sid] = chan
        self.specs[sid] = spec
        self._watchers[sid] = asyncio.create_task(self._watch_channel(sid, chan))

    async def _watch_channel(self, sid: str, chan: Channel) -> None:
        """A channel that closes while its sandbox should run means the sandbox died."""
        await chan.closed.wait()
        self._watchers.pop(sid, None)
        if self.closing or self.channels.get(sid) is not chan:
            return
        self.channels.pop(sid, None)
        if sid in self.transitioning:
            return  # a hibernation stops the container on purpose
        row = self.records.find(sid)
        if row is None or row.state not in IN_MEMORY:
            return
        spec = self.spec(row)
        if self.driver.usage(spec).oom_kills:
            msg = (f"out of memory: the sandbox used more than its limit "
                   f"({row.memory_mb} MiB) faster than processes could be stopped")
            reason = "oom"
        else:
            msg = "the sandbox stopped unexpectedly (its agent exited or its runtime died)"
            reason = "crashed"
        await self.fail(sid, msg, reason, destroy=False)
        # stop what is left of it, keep its disk for inspection until it is deleted
        await asyncio.to_thread(self.driver.stop, spec)

    async def detach(self, sid: str, bank: bool = True) -> None:
        """Count what the sandbox used (once: only a live container has a count not banked
        yet) and let go of its channel."""
        if bank:
            try:
                self.hooks.banking(sid)
            except OSError:
                pass
        chan = self.channels.pop(sid, None)
        if chan:
            await chan.close()

    async def fail(self, sid: str, message: str, reason: str, destroy: bool = False) -> None:
        log.warning("sandbox %s failed: %s", sid, message)
        await self.detach(sid)
        row = self.records.find(sid)
        if destroy and row is not None:
            try:
                await self.driver.destroy(self.spec(row))
            except (TorporError, DriverError, OSError):
                pass
        self.records.set_state(sid, State.FAILED, message, reason)

    async def remove(self, row: SandboxRow, reason: str) -> None:
        sid = row.id
        await self.detach(sid, bank=row.state in IN_MEMORY)
        self.records.set_state(sid, State.DELETED, None, reason)
        await self.driver.destroy(self.spec(row))
        self.specs.pop(sid, None)
        self.locks.pop(sid, None)
        self.hooks.forgotten(sid)

    # --- templates: layers and boot snapshots ------------------------------------------
    async def capture(self, sid: str, dest: Path) -> None:
        """Keep what a (build) sandbox changed on its disk in `dest` as a template layer,
        then delete the sandbox."""
        async with self.lock(sid):
            row = self.records.get(sid)
            require(sid, row.state, "capture the layer of", [State.RUNNING])
            spec = self.specs[sid]
            self.transitioning.add(sid)  # its channel closes on purpose
            try:
                await self.detach(sid)
                await asyncio.to_thread(self.driver.capture, spec, dest)
            finally:
                self.transitioning.discard(sid)
        await self.remove(self.records.find(sid), "captured")

    async def snapshot(self, sid: str, dest: Path) -> None:
        """Checkpoint a (build) sandbox and keep it in `dest` as a template's boot
        snapshot, then delete the sandbox."""
        await self.hibernate(sid, "boot_snapshot", force=True)
        async with self.lock(sid):
            row = self.records.get(sid)
            await asyncio.to_thread(self.driver.export_snapshot, self.spec(row), dest)
        await self.remove(self.records.find(sid), "captured")

    # --- snapshots of live sandboxes, restore in place --------------------------------
    async def snapshot_live(self, sid: str, dest: Path, memory: bool) -> dict:
        """Keep a running or standby sandbox in `dest` (see `Driver.snapshot_live`); it
        runs on. With memory, refused (409) for what a checkpoint cannot save, as a
        hibernation is; a failure leaves the sandbox as it was (Unavailable)."""
        async with self.lock(sid):
            row = self.records.get(sid)
            require(sid, row.state, "snapshot", IN_MEMORY,
                    "resume it first" if row.state == State.HIBERNATED else "")
            state = State(row.state)
            spec = self.specs[sid]
            if memory:
                await self._check_hibernatable(sid, state, "snapshot", "be snapshotted")
            try:
                return await asyncio.to_thread(self.driver.snapshot_live, spec, dest, memory)
            except (DriverError, OSError) as err:
                self.records.event(sid, "snapshot_failed", state, state, "explicit",
                                   {"error": str(err)})
                raise Unavailable(f"sandbox {sid}: the snapshot failed, the sandbox runs on "
                                  f"as it was: {err}", sandbox_id=sid) from None
            finally:
                if memory and state == State.STANDBY:
                    # the check thawed it (when it passed): back to standby, as it was
                    await asyncio.to_thread(self.driver.freeze, spec, True)

    async def rollback(self, sid: str, tpl: Template, snapshot_id: str, env: dict) -> None:
        """Restore a sandbox in place from a snapshot's template `tpl`: its container is
        replaced by one started from the snapshot (memory and processes as they were, or
        its files alone), under the same id. `env` configures the new agent. A failure
        after the old container went leaves the sandbox failed (the snapshot stays: a
        delete and a create from it, or another restore, bring it back)."""
        async with self.lock(sid):
            row = self.records.get(sid)
            require(sid, row.state, "restore a snapshot into",
                    [State.RUNNING, State.STANDBY, State.HIBERNATED])
            state = State(row.state)
            t0 = time.monotonic()
            try:
                old = self.spec(row)  # (with its volumes and drives)
            except Unavailable:  # its template is gone: enough to destroy the container
                old = SandboxSpec(id=sid, template=tpl, cpu=row.cpu, memory_mb=row.memory_mb,
                                  disk_mb=row.disk_mb, hostname="sandbox")
                self.hooks.storage(old)
            # what else it has (its storage) stays; its template and sizes are the snapshot's
            spec = dataclasses.replace(old, template=tpl, memory_mb=tpl.memory_mb,
                                       disk_mb=tpl.disk_mb)
            self.transitioning.add(sid)
            try:
                await self.detach(sid, bank=state in IN_MEMORY)
                if state == State.STANDBY:
                    await asyncio.to_thread(self.driver.freeze, old, False)
                await self.driver.destroy(old)
                self.specs[sid] = spec
                self.records.update(sid, event=("restoring", "explicit",
                                                {"snapshot": snapshot_id}),
                                    template_digest=tpl.digest, snapshot_id=snapshot_id,
                                    memory_mb=spec.memory_mb, disk_mb=spec.disk_mb)
                if tpl.snapshot:
                    chan = await self.driver.start_from_snapshot(spec, tpl.snapshot_dir)
                    await AgentClient(chan).resumed(wait=10)
                else:
                    chan = await self.driver.start(spec)
                if env:
                    await AgentClient(chan).configure(env)
            except (DriverError, ChannelClosed, AgentError, OSError, TimeoutError) as e:
                self.transitioning.discard(sid)
                await self.fail(sid, f"could not restore snapshot {snapshot_id}: {e}",
                                "restore_failed", destroy=True)
                raise Unavailable(f"sandbox {sid}: could not restore snapshot "
                                  f"{snapshot_id}: {e}; it has failed (delete it, or "
                                  "create a sandbox from the snapshot)",
                                  sandbox_id=sid) from None
            self.transitioning.discard(sid)
            self.attach(sid, spec, chan)
            detail = {"snapshot": snapshot_id, "from": str(state)}
            if state == State.RUNNING:
                self.records.update(sid, event=("restored", "explicit",
                                                detail | {"duration_ms": _ms(t0)}))
            else:
                self.records.set_state(sid, State.RUNNING, None, "restored", _ms(t0), detail)
            if tpl.snapshot:
                self.driver.drop_image(sid)
            self.hooks.touched(sid)
            self.hooks.changed(sid)

    async def close(self) -> None:
        """The server stops: let go of every channel; the sandboxes keep running."""
        self.closing = True
        for t in list(self._watchers.values()):
            t.cancel()
        for chan in list(self.channels.values()):
            await chan.close()
        self.channels.clear()

    # --- recovery -----------------------------------------------------------------------
    async def recover(self) -> None:
        """Bring back every sandbox the records say exists: adopt the running ones (their
        holders survived us), and mark the rest failed with the reason. Nothing is dropped."""
        rows = self.records.in_states([State.RUNNING, State.CREATING, State.STANDBY,
                                       State.HIBERNATED])
        for row in rows:
            spec = self.spec(row)
            self.records.states[row.id] = row.state
            self.hooks.changed(row.id)  # its timers, from now
            if row.state == State.HIBERNATED:
                # its image waits on disk; the first request restores it
                try:
                    await asyncio.to_thread(self.driver.release, spec)
                except OSError as e:
                    log.warning("sandbox %s: hibernated, but its layer stays mounted: %s",
                                row.id, e)
                continue
            if row.state == State.CREATING:
                await self.fail(row.id, "the server stopped while the sandbox was created",
                                "restore_failed", destroy=True)
                continue
            try:
                # a frozen agent cannot answer a ping: adopt it as it is, wake it on request
                chan = await self.driver.adopt(spec, ping=row.state != State.STANDBY)
            except (DriverError, OSError) as e:
                if row.pooled:
                    await self.driver.destroy(spec)
                    self.records.set_state(row.id, State.DELETED,
                                           "pool sandbox lost at restart", "restore")
                else:
                    await self.fail(row.id, f"could not be adopted after restart: {e}",
                                    "restore_failed")
                    # whatever still runs of it is unreachable: stop it, keep its disk
                    await asyncio.to_thread(self.driver.stop, spec)
                continue
            self.attach(row.id, spec, chan)
            self.records.event(row.id, "adopted", row.state, row.state, "restart", {})

    # --- standby and hibernation --------------------------------------------------------
    async def _refuse_open_streams(self, sid: str, running: bool) -> None:
        """409 if streams are open, once those already closing have had STREAM_GRACE
        seconds to go: an egress connection outlives the command that made it by a few ms,
        and a standby or hibernation asked for right after that command should not fail
        for it. (A frozen agent closes nothing: no wait then.)"""
        deadline = time.monotonic() + (STREAM_GRACE if running else 0.0)
        while (n := self.open_streams(sid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if n:
            chan = self.channels.get(sid)
            names = sorted(st.what for st in chan.streams.values()
                           if not getattr(st, "passive", False)) if chan else []
            shown = "; ".join(names[:5]) + ("; ..." if len(names) > 5 else "")
            raise Conflict(f"sandbox {sid} has {n} open streams ({shown}): command output, "
                           "follows, transfers, egress or preview connections; close them "
                           "first", sandbox_id=sid, streams=names[:20])

    async def standby(self, sid: str, reason: str, force: bool = False) -> None:
        async with self.lock(sid):
            row = self.records.get(sid)
            if row.state == State.STANDBY:
                return
            require(sid, row.state, "put into standby", [State.RUNNING],
                    "resume it first" if row.state == State.HIBERNATED else "")
            if not force:
                await self._refuse_open_streams(sid, True)
            t0 = time.monotonic()
            await asyncio.to_thread(self.driver.freeze, self.specs[sid], True)
            self.records.set_state(sid, State.STANDBY, None, reason, _ms(t0))
            self.hooks.changed(sid)

    async def hibernate(self, sid: str, reason: str, force: bool = False) -> None:
        async with self.lock(sid):
            row = self.records.get(sid)
            if row.state == State.HIBERNATED:
                return
            require(sid, row.state, "hibernate", IN_MEMORY)
            state = State(row.state)
            if not force:
                await self._refuse_open_streams(sid, state == State.RUNNING)
            spec = self.specs[sid]
            await self._check_hibernatable(sid, state, reason)
            t0 = time.monotonic()
            self.transitioning.add(sid)
            try:
                self.hooks.banking(sid)  # the container's CPU count goes away with it
                result = await self.driver.checkpoint(spec)
            except (DriverError, OSError) as err:
                self.transitioning.discard(sid)
                if state == State.STANDBY:
                    # the check thawed it for the checkpoint: back to standby, as it was
                    await asyncio.to_thread(self.driver.freeze, spec, True)
                self.hooks.hibernate_failed(sid)
                self.records.event(sid, "hibernate_failed", state, state, reason,
                                   {"error": str(err)})
                log.warning("sandbox %s: hibernation failed, it stays %s: %s", sid, state,
                            err)
                raise Unavailable(f"sandbox {sid} could not hibernate and stays {state}: "
                                  f"{err}", sandbox_id=sid) from None
            chan = self.channels.pop(sid, None)
            if chan is not None:
                await chan.close()
            self.transitioning.discard(sid)
            self.records.set_state(sid, State.HIBERNATED, None, reason, _ms(t0), result)
            self.hooks.changed(sid)

    async def _check_hibernatable(self, sid: str, state: State, reason: str,
                                  action: str = "hibernate") -> None:
        """Refuse (409) what the driver cannot checkpoint without losing the sandbox
        (`driver.checkpoint_blockers`, found by the agent's `hibernate_check`)."""
        chan = self.channels.get(sid)
        if chan is None or not self.driver.checkpoint_blockers:
            return
        frozen = state == State.STANDBY
        if frozen:
            await asyncio.to_thread(self.driver.freeze, self.specs[sid], False)
        try:
            res = await AgentClient(chan).hibernate_check(wait=30)
        except (AgentError, ChannelClosed, TimeoutError) as err:
            res = {"problems": [{"error": f"the agent did not answer the check: {err}"}]}
        # what the check reports that this driver can save after all
        problems = [p for p in res.get("problems") or []
                    if p.get("kind", "error") in self.driver.checkpoint_blockers | {"error"}]
        if problems and frozen:
            # refused: back to standby. (Passed: it stays thawed for the checkpoint, which
            # pauses it itself; freezing it again would race the checkpoint.)
            await asyncio.to_thread(self.driver.freeze, self.specs[sid], True)
        if problems:
            self.hooks.hibernate_failed(sid)
            self.records.event(sid, "hibernate_refused", state, state, reason,
                               {"problems": problems[:20]})
            why = self.driver.checkpoint_refusal(problems[0])
            raise Conflict(f"sandbox {sid} cannot {action}: {why}; the sandbox stays {state}",
                           sandbox_id=sid, problems=problems[:20])

    async def resume(self, sid: str, reason: str) -> None:
        """Bring a sandbox in standby or hibernated back to running; a no-op if it runs."""
        states = self.records.states
        if states.get(sid) == State.RUNNING:
            return
        async with self.lock(sid):
            state = states.get(sid)
            if state == State.RUNNING:
                return  # another request resumed it while this one waited
            if state == State.STANDBY and sid in self.specs:
                # the hot path: the in-memory state is the record's (every change goes
                # through the record layer), so no read; the thaw is one small write
                t0 = time.monotonic()
                self.driver.freeze(self.specs[sid], False)
                self._resumed(sid, reason, t0, State.STANDBY)
                return
            await self._resume_locked(sid, reason)

    def _resumed(self, sid: str, reason: str, t0: float, was: State) -> None:
        """The sandbox runs again. After a thaw its state record is written
        RECORD_RESUME_AFTER later, once the caller's command has most likely run: written
        at once, its ~2 ms of CPU competed with that command (measured: standby -> echo
        2 ms slower than running -> echo; 0.4 ms deferred). Any other write for it writes
        the deferred one first, so records keep their order; reads use the in-memory
        state. A server killed meanwhile finds "standby": thawing again is a no-op. After a
        restore the record is written at once (a restart that believed it still
        hibernated would look for an image that is gone)."""
        if was == State.STANDBY:
            self.records.defer_state(sid, State.RUNNING, reason, _ms(t0), {"from": str(was)},
                                     RECORD_RESUME_AFTER)
        else:
            self.records.set_state(sid, State.RUNNING, None, reason, _ms(t0),
                                   {"from": str(was)})
        self.hooks.touched(sid)
        self.hooks.changed(sid)

    async def _tell_resumed(self, sid: str, chan: Channel) -> None:
        """Have a restored agent check its environment again (`resumed`)."""
        try:
            await AgentClient(chan).resumed(wait=10)
        except AgentError:
            pass  # an agent from before this op: it had SIGHUP, which does the same
        except (ChannelClosed, TimeoutError) as err:
            log.warning("sandbox %s: after the restore: %s", sid, err)

    async def _resume_locked(self, sid: str, reason: str) -> None:
        row = self.records.get(sid)
        if row.state == State.RUNNING:
            return
        t0 = time.monotonic()
        spec = self.spec(row)
        if row.state == State.STANDBY:
            self.driver.freeze(spec, False)  # one small write: no thread hop
            self._resumed(sid, reason, t0, State.STANDBY)
            return
        if row.state != State.HIBERNATED:
            raise Unavailable(f"sandbox {sid} is {row.state}", sandbox_id=sid)
        self.transitioning.add(sid)
        try:
            chan = await self.driver.restore(spec)
        except (DriverError, OSError) as err:
            self.transitioning.discard(sid)
            # the image stays on disk: never removed before a restore succeeded
            await self.fail(sid, f"could not resume from hibernation: {err}",
                            "restore_failed")
            raise Unavailable(f"sandbox {sid} could not be resumed: {err}",
                              sandbox_id=sid) from None
        self.transitioning.discard(sid)
        self.attach(sid, spec, chan)
        # not awaited: the agent takes its frames in order, so it has checked itself
        # again before it sees the caller's request
        asyncio.get_running_loop().create_task(self._tell_resumed(sid, chan))
        self._resumed(sid, reason, t0, State.HIBERNATED)
        self.driver.drop_image(sid)  # only once the record says running
