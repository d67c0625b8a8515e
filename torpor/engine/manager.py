"""The engine: the one place that decides a sandbox's state.

It owns the sandbox records (SQLite), the runtime driver, each sandbox's agent channel,
the warm pool, the memory watchdog, and recovery after a restart. Front doors call its
methods; none of them touches the driver or the database directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import string
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from torpor.channel import AgentError, Channel, ChannelClosed
from torpor.config import Settings
from torpor.engine.keys import KeyStore
from torpor.engine.metering import Metering
from torpor.engine.secrets import SecretStore
from torpor.engine.standby import HIBERNATED, STANDBY, Standby, to_datetime
from torpor.engine.traffic import Traffic
from torpor.errors import Invalid, NotFound, TorporError, Unavailable, from_agent
from torpor.runtime.base import DriverError, SandboxSpec
from torpor.runtime.gvisor import GVisorDriver
from torpor.store.db import open_db
from torpor.store.models import EventRow, SandboxRow, now
from torpor.templates import Template, TemplateStore

log = logging.getLogger("torpor.engine")

RUNNING, CREATING, FAILED, DELETED = "running", "creating", "failed", "deleted"
_ALPHABET = string.ascii_lowercase + string.digits
WATCH_INTERVAL = 0.1  # seconds between memory and task checks of running sandboxes
MIN_WATCH_INTERVAL = 0.005  # the shortest, when memory alerts keep coming
METER_INTERVAL = 1.0  # seconds between samples of memory in use for metering
POOL_STOP_SECONDS = 30.0  # a graceful stop waits this long for a pool sandbox's boot


class States(dict):
    """The records' states by sandbox id, for the hot path, with the running ones kept in a
    set beside them: the watchdog visits only those, so a parked sandbox costs it nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.running: set[str] = set()

    def __setitem__(self, sid: str, state: str) -> None:
        super().__setitem__(sid, state)
        if state == RUNNING:
            self.running.add(sid)
        else:
            self.running.discard(sid)

    def __delitem__(self, sid: str) -> None:
        super().__delitem__(sid)
        self.running.discard(sid)

    def pop(self, sid: str, *default):
        self.running.discard(sid)
        return super().pop(sid, *default)


def new_id() -> str:
    # lowercase letters and digits only: the id is a DNS label in preview URLs
    return "sbx" + "".join(secrets.choice(_ALPHABET) for _ in range(13))


@dataclass
class SandboxInfo:
    id: str
    template: str
    state: str
    created_at: datetime
    updated_at: datetime
    cpu: float
    memory_mb: int
    disk_mb: int
    env: dict[str, str]
    metadata: dict[str, str]
    reason: str | None
    standby_after: float
    hibernate_after: float
    ttl: float | None
    idle_ttl: float | None
    expire_action: str
    last_active_at: datetime | None
    network: dict = field(default_factory=dict)  # the egress policy in force
    secrets: dict = field(default_factory=dict)  # env var -> secret name
    ports: dict = field(default_factory=dict)  # "8000" -> {"public": true}

    @classmethod
    def of(cls, row: SandboxRow, last_active: datetime | None = None,
           state: str | None = None, **extra: Any) -> SandboxInfo:
        return cls(id=row.id, template=row.template, state=state or row.state,
                   created_at=row.created_at, updated_at=row.updated_at, cpu=row.cpu,
                   memory_mb=row.memory_mb, disk_mb=row.disk_mb, env=dict(row.env or {}),
                   metadata=dict(row.meta or {}), reason=row.reason,
                   standby_after=row.standby_after, hibernate_after=row.hibernate_after,
                   ttl=row.ttl, idle_ttl=row.idle_ttl, expire_action=row.expire_action,
                   last_active_at=last_active or row.last_active_at, **extra)


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.data_dir = settings.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.db, self.sessions = open_db(settings.db_path)
        self.keys = KeyStore(self.sessions)
        self.secrets = SecretStore(self.sessions, self.data_dir / "secrets.key")
        self.templates = TemplateStore(self.data_dir)
        self.templates.ensure_base()
        if settings.image_compression not in ("none", "flate"):
            raise ValueError(f"image_compression must be none or flate, not "
                             f"{settings.image_compression!r}")
        self.driver = GVisorDriver(self.data_dir, runsc=settings.runsc,
                                   platform=settings.platform,
                                   image_compression=settings.image_compression)
        self.channels: dict[str, Channel] = {}
        self._state = States()  # cache of the records' states, for the hot path
        self._pooled: set[str] = set()  # booted, waiting in the warm pool
        self.standby = Standby(self)
        self.metering = Metering(self)
        self._specs: dict[str, SandboxSpec] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._pids_mark: dict[str, int] = {}  # host threads at the last runaway kill
        self._pool_lock = asyncio.Lock()
        self._pool_wakeup = asyncio.Event()
        self._pool_task: asyncio.Task | None = None
        self._memory_fds: dict[str, int | None] = {}  # sid -> its memory alert (eventfd)
        self._memory_alert = asyncio.Event()
        self._pool_stopping = False
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.traffic = Traffic(self)

    # --- start and stop -----------------------------------------------------------------
    def ensure_admin_key(self) -> str | None:
        """On first start, make an admin key: store its hash, write it to <data>/api-key
        (mode 0600) and return it so the caller can print it once."""
        if self.keys.has_any():
            return None
        _, key = self.keys.create("admin", admin=True)
        path = self.settings.api_key_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key

    async def start(self) -> None:
        await self.traffic.start()
        await self.recover()
        self._pool_task = asyncio.create_task(self._pool_loop())
        self._tasks.append(self._pool_task)
        self._tasks.append(asyncio.create_task(self._watchdog_loop()))
        self._tasks.append(asyncio.create_task(self.standby.loop()))

    async def stop(self, hibernate: bool = True) -> None:
        """Stop the server. With `hibernate` (a graceful stop) every running or standby
        sandbox is hibernated first, within `shutdown_timeout`; the rest (and all of them
        after a kill) keep running under their holders and the next start adopts them."""
        await self._stop_pool_loop()
        for t in self._tasks:
            t.cancel()
        if hibernate:
            await self.standby.hibernate_all(time.monotonic() + self.settings.shutdown_timeout)
            await self._drain_pool()
        self.metering.flush()
        await self.traffic.stop()
        self._closing = True
        loop = asyncio.get_running_loop()
        for sid in list(self._memory_fds):
            self._close_memory_alert(loop, sid)
        for t in list(self._watchers.values()):
            t.cancel()
        for chan in list(self.channels.values()):
            await chan.close()
        self.channels.clear()
        await asyncio.to_thread(self.driver.close)
        self.db.dispose()

    async def _stop_pool_loop(self) -> None:
        """Let the pool loop finish the boot it may be in (cancelling it there would leave a
        sandbox starting in a thread with nobody to record it), then end it."""
        self._pool_stopping = True
        self._pool_wakeup.set()
        if self._pool_task is not None and not self._pool_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._pool_task), POOL_STOP_SECONDS)
            except (TimeoutError, asyncio.CancelledError):
                self._pool_task.cancel()

    async def _drain_pool(self) -> None:
        """On a graceful stop: the warm pool's sandboxes hold nothing of anyone's, so they are
        deleted rather than hibernated; the next start boots a fresh pool. Nothing of them
        (runsc, gofer, holder, mounts) outlives the server."""
        with self.sessions() as s:
            rows = list(s.scalars(select(SandboxRow).where(
                SandboxRow.pooled.is_(True), SandboxRow.state.in_([RUNNING, CREATING]))))
        for row in rows:
            try:
                await self._remove(row, "shutdown")
            except (TorporError, OSError) as e:
                log.warning("shutdown: pool sandbox %s could not be deleted: %s", row.id, e)

    async def recover(self) -> None:
        """Bring back every sandbox the database says exists: adopt the running ones (their
        holders survived us), and mark the rest failed with the reason. Nothing is dropped."""
        with self.sessions() as s:
            rows = list(s.scalars(select(SandboxRow).where(
                SandboxRow.state.in_([RUNNING, CREATING, STANDBY, HIBERNATED]))))
        for row in rows:
            spec = self._spec(row)
            self._state[row.id] = row.state
            self.standby.wake(row.id)  # its timers, from now
            if row.state == HIBERNATED:
                # its image waits on disk; the first request restores it. Nothing of it stays
                # mounted (an older server, or one killed mid-hibernation, left its layer so)
                try:
                    await asyncio.to_thread(self.driver.layer(spec).unmount)
                except OSError as e:
                    log.warning("sandbox %s: hibernated, but its layer stays mounted: %s",
                                row.id, e)
                continue
            if row.state == CREATING:
                await self._fail(row.id, "the server stopped while the sandbox was created",
                                 "restore_failed", destroy=True)
                continue
            try:
                await asyncio.to_thread(self.driver.layer(spec).mount)
                # a frozen agent cannot answer a ping: adopt it as it is, wake it on request
                chan = await self.driver.adopt(spec, ping=row.state != STANDBY)
            except (DriverError, OSError) as e:
                if row.pooled:
                    await self.driver.destroy(spec)
                    self._set_state(row.id, DELETED, "pool sandbox lost at restart", "restore")
                else:
                    await self._fail(row.id, f"could not be adopted after restart: {e}",
                                     "restore_failed")
                    # whatever still runs of it is unreachable: stop it, keep its disk
                    await asyncio.to_thread(self.driver.stop_keep_disk, spec)
                continue
            self._attach(row.id, spec, chan)
            self._event(row.id, "adopted", row.state, row.state, "restart", {})

    # --- records ------------------------------------------------------------------------
    def _spec(self, row: SandboxRow) -> SandboxSpec:
        spec = self._specs.get(row.id)
        if spec is None:
            tpl = self.templates.get(row.template)
            if tpl is None:
                raise Unavailable(f"sandbox {row.id}: template {row.template} is gone")
            spec = SandboxSpec(id=row.id, template=tpl, cpu=row.cpu, memory_mb=row.memory_mb,
                               disk_mb=row.disk_mb, hostname="sandbox")
            self._specs[row.id] = spec
        return spec

    def _row(self, sid: str) -> SandboxRow:
        with self.sessions() as s:
            row = s.get(SandboxRow, sid)
        if row is None or row.state == DELETED or row.pooled:
            raise NotFound(f"no sandbox {sid}; `torpor sandbox list` shows yours",
                           sandbox_id=sid)
        return row

    def _event(self, sid: str, kind: str, from_state, to_state, reason: str | None,
               detail: dict) -> None:
        with self.sessions.begin() as s:
            s.add(EventRow(sandbox_id=sid, kind=kind, from_state=from_state,
                           to_state=to_state, reason=reason, detail=detail))

    def _set_state(self, sid: str, state: str, message: str | None, reason: str,
                   duration_ms: int | None = None, extra: dict | None = None,
                   at: datetime | None = None) -> None:
        self.standby.flush_resume(sid)  # a resume's record, if pending, comes first
        detail = dict(extra or {})
        if message:
            detail["message"] = message
        if duration_ms is not None:
            detail["duration_ms"] = duration_ms
        with self.sessions.begin() as s:
            row = s.get(SandboxRow, sid)
            old = row.state
            row.state = state
            row.updated_at = at or now()
            if sid in self.standby.activity:
                row.last_active_at = to_datetime(self.standby.activity[sid].last)
            if state == FAILED:
                row.reason = message
            if state == DELETED:
                row.deleted_at = now()
            s.add(EventRow(sandbox_id=sid, kind="state", from_state=old, to_state=state,
                           reason=reason, detail=detail, at=at or now()))
        self._state[sid] = state

    async def _detach(self, sid: str, bank: bool = True) -> None:
        """Bank what the sandbox's cgroup counted (once: only a live one has a count not
        banked yet) and let go of its channel."""
        if bank:
            try:
                self.metering.bank(sid)
            except OSError:
                pass
        chan = self.channels.pop(sid, None)
        if chan:
            await chan.close()

    async def _fail(self, sid: str, message: str, reason: str, destroy: bool = False) -> None:
        log.warning("sandbox %s failed: %s", sid, message)
        await self._detach(sid)
        with self.sessions() as s:
            row = s.get(SandboxRow, sid)
        if destroy and row is not None:
            try:
                await self.driver.destroy(self._spec(row))
            except TorporError:
                pass
        self._set_state(sid, FAILED, message, reason)

    # --- templates ----------------------------------------------------------------------
    def list_templates(self) -> list[Template]:
        return self.templates.list()

    def template(self, name: str) -> Template:
        tpl = self.templates.get(name)
        if tpl is None:
            names = [t.name for t in self.templates.list()]
            raise NotFound(f"no template {name!r}; known templates: {', '.join(names)}",
                           templates=names, field="template")
        return tpl

    # --- sandboxes ----------------------------------------------------------------------
    def _validate(self, cpu: float, memory_mb: int, disk_mb: int) -> None:
        cores = os.cpu_count() or 1
        if not 0.1 <= cpu <= cores:
            raise Invalid(f"cpu must be between 0.1 and {cores} (this host's cores)",
                          field="cpu")
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        if not 64 <= memory_mb <= total_mb:
            raise Invalid(f"memory_mb must be between 64 and {total_mb}", field="memory_mb")
        if not 64 <= disk_mb <= 1 << 20:
            raise Invalid("disk_mb must be between 64 and 1048576", field="disk_mb")

    async def create(self, template: str = "base", env: dict | None = None,
                     metadata: dict | None = None, cpu: float | None = None,
                     memory_mb: int | None = None, disk_mb: int | None = None,
                     network: dict | None = None, secrets: dict | None = None,
                     **policy) -> SandboxInfo:
        tpl = self.template(template)
        cpu = float(cpu if cpu is not None else tpl.cpu)
        memory_mb = int(memory_mb if memory_mb is not None else tpl.memory_mb)
        disk_mb = int(disk_mb if disk_mb is not None else tpl.disk_mb)
        self._validate(cpu, memory_mb, disk_mb)
        env = dict(env or {})
        metadata = dict(metadata or {})
        policy = self._policy(policy)
        policy["network"] = self.traffic.policy(network)
        policy["secrets"] = self.traffic.grants(secrets, env)
        boot_env = self.traffic.sandbox_env(policy["secrets"], env)
        pooled = await self._take_from_pool(tpl, cpu, memory_mb, disk_mb, env, metadata,
                                            policy, boot_env)
        if pooled is not None:
            return pooled
        row = SandboxRow(id=new_id(), template=tpl.name, state=CREATING, cpu=cpu,
                         memory_mb=memory_mb, disk_mb=disk_mb, env=env, meta=metadata,
                         pooled=False, **policy)
        with self.sessions.begin() as s:
            s.add(row)
        await self._boot(row, boot_env)
        self.standby.touch(row.id)
        return self.get(row.id)

    def _policy(self, given: dict) -> dict:
        """Idle timers and expiry, with the server's defaults for what is not given."""
        out = {"standby_after": self.settings.standby_after,
               "hibernate_after": self.settings.hibernate_after,
               "ttl": None, "idle_ttl": None, "expire_action": "delete"}
        out.update({k: v for k, v in given.items() if v is not None})
        for k in ("standby_after", "hibernate_after", "ttl", "idle_ttl"):
            if out[k] is not None and out[k] < 0:
                raise Invalid(f"{k} must be >= 0 seconds (0 turns it off)", field=k)
        if out["expire_action"] not in ("delete", "hibernate"):
            raise Invalid("expire_action must be delete or hibernate", field="expire_action")
        return out

    def update(self, sid: str, touch: bool = True, **fields) -> SandboxInfo:
        """Change a sandbox's idle timers or expiry; the next idle check uses them."""
        self._row(sid)
        changes = {k: v for k, v in fields.items() if v is not None}
        with self.sessions() as s:
            row = s.get(SandboxRow, sid)
            merged = self._policy({k: getattr(row, k) for k in (
                "standby_after", "hibernate_after", "ttl", "idle_ttl", "expire_action")}
                | changes)
        with self.sessions.begin() as s:
            row = s.get(SandboxRow, sid)
            for k, v in merged.items():
                setattr(row, k, v)
            row.updated_at = now()
        self._event(sid, "updated", None, None, "explicit", changes)
        self.standby.wake(sid)  # its timers may fall due sooner now
        if touch:
            self.standby.touch(sid)
        return self.get(sid)

    def update_network(self, sid: str, network: dict) -> SandboxInfo:
        """Change a sandbox's egress policy; its open egress connections close."""
        self._row(sid)
        self.traffic.update_policy(sid, network)
        self.standby.touch(sid)
        return self.get(sid)

    async def _boot(self, row: SandboxRow, env: dict) -> None:
        spec = self._spec(row)
        try:
            chan = await self.driver.start(spec)
            if env:  # a pool sandbox is configured when it is handed out
                await chan.call("configure", env=env)
        except (DriverError, ChannelClosed, AgentError, OSError, TimeoutError) as e:
            await self._fail(row.id, f"could not start: {e}", "start_failed", destroy=True)
            raise Unavailable(f"sandbox {row.id} could not start: {e}",
                              sandbox_id=row.id) from None
        self._attach(row.id, spec, chan)
        if row.pooled:
            self._pooled.add(row.id)
        self._set_state(row.id, RUNNING, None, "created")

    def _attach(self, sid: str, spec: SandboxSpec, chan: Channel) -> None:
        self.traffic.attach(sid, chan)
        self.channels[sid] = chan
        self._specs[sid] = spec
        self._watchers[sid] = asyncio.create_task(self._watch_channel(sid, chan))

    async def _watch_channel(self, sid: str, chan: Channel) -> None:
        """A channel that closes while its sandbox should run means the sandbox died."""
        await chan.closed.wait()
        self._watchers.pop(sid, None)
        if self._closing or self.channels.get(sid) is not chan:
            return
        self.channels.pop(sid, None)
        if sid in self.standby.transitioning:
            return  # a hibernation stops the container on purpose
        with self.sessions() as s:
            row = s.get(SandboxRow, sid)
        if row is None or row.state not in (RUNNING, STANDBY):
            return
        spec = self._spec(row)
        stats = self.driver.stats(spec)
        if stats.oom_kills:
            msg = (f"out of memory: the sandbox used more than its limit "
                   f"({row.memory_mb} MiB) faster than processes could be stopped")
            reason = "oom"
        else:
            msg = "the sandbox stopped unexpectedly (its agent exited or runsc died)"
            reason = "crashed"
        await self._fail(sid, msg, reason, destroy=False)
        # stop what is left of it, keep its disk for inspection until it is deleted
        await asyncio.to_thread(self.driver.stop_keep_disk, spec)

    def live_rows(self) -> list[SandboxRow]:
        """Records of the sandboxes that exist (not pooled, not failed or deleted)."""
        with self.sessions() as s:
            return list(s.scalars(select(SandboxRow).where(
                SandboxRow.pooled.is_(False),
                SandboxRow.state.in_([RUNNING, STANDBY, HIBERNATED]))))

    def list(self, state: str | None = None,
             metadata: dict[str, str] | None = None) -> list[SandboxInfo]:
        with self.sessions() as s:
            q = select(SandboxRow).where(SandboxRow.pooled.is_(False))
            # running and standby are told by the in-process state (a hot resume writes
            # its record a moment later): filter on what _info says, not on the record
            q = q.where(SandboxRow.state == DELETED) if state == DELETED else q.where(
                SandboxRow.state != DELETED)
            rows = list(s.scalars(q.order_by(SandboxRow.created_at)))
        out = []
        for r in rows:
            meta = r.meta or {}
            if metadata and any(meta.get(k) != v for k, v in metadata.items()):
                continue
            info = self._info(r)
            if state is None or info.state == state:
                out.append(info)
        return out

    def _info(self, row: SandboxRow) -> SandboxInfo:
        a = self.standby.activity.get(row.id)
        return SandboxInfo.of(row, to_datetime(a.last) if a else None,
                              self._state.get(row.id), **self.traffic.info(row))

    def get(self, sid: str) -> SandboxInfo:
        return self._info(self._row(sid))

    async def delete(self, sid: str, reason: str = "explicit") -> None:
        await self._remove(self._row(sid), reason)

    async def _remove(self, row: SandboxRow, reason: str) -> None:
        sid = row.id
        await self._detach(sid, bank=row.state in (RUNNING, STANDBY))
        self._set_state(sid, DELETED, None, reason)
        await self.driver.destroy(self._spec(row))
        self._specs.pop(sid, None)
        self.standby.activity.pop(sid, None)
        self.standby.locks.pop(sid, None)
        self.standby.due.pop(sid, None)
        self._pids_mark.pop(sid, None)
        self._pooled.discard(sid)
        self.traffic.forget(sid)

    def events(self, sid: str) -> list[EventRow]:
        self._row(sid)
        with self.sessions() as s:
            return list(s.scalars(select(EventRow).where(EventRow.sandbox_id == sid)
                                  .order_by(EventRow.id)))

    # --- the agent ----------------------------------------------------------------------
    async def channel(self, sid: str) -> Channel:
        """The agent channel of a sandbox, resumed first if it is in standby or hibernated.
        Every API call on a sandbox comes through here: this is what counts as activity."""
        cached = self._state.get(sid)
        if cached in (STANDBY, HIBERNATED) or (
                cached != RUNNING and self._row(sid).state in (STANDBY, HIBERNATED)):
            await self.standby.resume(sid, "request")  # reads the record under its lock
        self.standby.touch(sid)
        chan = self.channels.get(sid)
        if chan is not None and not chan.closed.is_set():
            return chan
        row = self._row(sid)
        if row.state == FAILED:
            raise Unavailable(f"sandbox {sid} has failed: {row.reason}. Delete it and create "
                              "a new one", sandbox_id=sid)
        raise Unavailable(f"sandbox {sid} is {row.state}, not running", sandbox_id=sid)

    async def call(self, sid: str, op: str, timeout: float | None = 60.0, **args: Any) -> Any:
        chan = await self.channel(sid)
        try:
            return await chan.call(op, timeout=timeout, **args)
        except AgentError as e:
            raise from_agent(sid, e) from None
        except ChannelClosed:
            raise Unavailable(f"sandbox {sid}: the sandbox stopped during {op}",
                              sandbox_id=sid) from None

    async def open(self, sid: str, op: str, **args: Any):
        chan = await self.channel(sid)
        try:
            return chan.open(op, **args)
        except ChannelClosed:
            raise Unavailable(f"sandbox {sid}: the sandbox stopped", sandbox_id=sid) from None

    # --- warm pool ----------------------------------------------------------------------
    def _pool_rows(self, template: str) -> list[SandboxRow]:
        with self.sessions() as s:
            return list(s.scalars(select(SandboxRow).where(
                SandboxRow.pooled.is_(True), SandboxRow.state == RUNNING,
                SandboxRow.template == template).order_by(SandboxRow.created_at)))

    async def _take_from_pool(self, tpl: Template, cpu, memory_mb, disk_mb, env,
                              metadata, policy, boot_env) -> SandboxInfo | None:
        if (cpu, memory_mb, disk_mb) != (tpl.cpu, tpl.memory_mb, tpl.disk_mb):
            return None
        async with self._pool_lock:
            for row in self._pool_rows(tpl.name):
                chan = self.channels.get(row.id)
                if chan is None or chan.closed.is_set():
                    continue
                with self.sessions.begin() as s:
                    r = s.get(SandboxRow, row.id)
                    r.pooled = False
                    self._pooled.discard(row.id)
                    r.env = env
                    r.meta = metadata
                    r.created_at = r.updated_at = now()
                    for k, v in policy.items():
                        setattr(r, k, v)
                    s.add(EventRow(sandbox_id=r.id, kind="handed_out", from_state=RUNNING,
                                   to_state=RUNNING, reason="created", detail={"pool": True}))
                self._pool_wakeup.set()
                if boot_env:
                    try:
                        await chan.call("configure", env=boot_env)
                    except (AgentError, ChannelClosed) as e:
                        await self._fail(row.id, f"could not configure: {e}", "start_failed")
                        continue
                self.standby.touch(row.id)
                return self.get(row.id)
        self._pool_wakeup.set()
        return None

    async def _pool_loop(self) -> None:
        """Keep `pool_size` booted sandboxes per template, with the template's defaults."""
        while not self._pool_stopping:
            self._pool_wakeup.clear()
            if self.settings.pool_size > 0:
                for tpl in self.templates.list():
                    while (not self._pool_stopping
                           and len(self._pool_rows(tpl.name)) < self.settings.pool_size):
                        row = SandboxRow(id=new_id(), template=tpl.name, state=CREATING,
                                         cpu=tpl.cpu, memory_mb=tpl.memory_mb,
                                         disk_mb=tpl.disk_mb, env={}, meta={}, pooled=True)
                        with self.sessions.begin() as s:
                            s.add(row)
                        try:
                            await self._boot(row, {})
                        except TorporError as e:
                            log.error("warm pool: %s", e)
                            await asyncio.sleep(5)
                            break
            if self._pool_stopping:
                return
            try:
                await asyncio.wait_for(self._pool_wakeup.wait(), 30)
            except TimeoutError:
                pass

    async def _stop_runaway(self, sid: str, chan: Channel, pids: tuple[int, int]) -> None:
        """Past the pids cgroup limit the sentry cannot make threads and dies, so before that
        the agent kills the command session with the most processes (a fork bomb)."""
        t0 = time.monotonic()
        try:
            res = await chan.call("pids_kill", timeout=5)
        except (TimeoutError, AgentError, ChannelClosed) as e:
            log.warning("sandbox %s near its task limit (%d/%d): the agent did not stop the "
                        "runaway in %.1fs (%r)", sid, pids[0], pids[1], time.monotonic() - t0, e)
            return
        if res.get("killed"):
            log.warning("sandbox %s near its task limit (%d/%d host threads): killed %d "
                        "processes of session %s (%s)", sid, pids[0], pids[1],
                        res.get("processes", 0), res.get("session"), res.get("cmdline"))
            self._event(sid, "pids_kill", RUNNING, RUNNING, "pids_limit",
                        {"host_threads": pids[0], "limit": pids[1], **res})

    # --- memory watchdog -----------------------------------------------------------------
    def _sync_memory_alerts(self) -> None:
        """A memory notification (`Cgroup.memory_alert`) for each running sandbox, none
        for the others."""
        loop = asyncio.get_running_loop()
        running = self._state.running
        for sid in [s for s in self._memory_fds if s not in running]:
            self._close_memory_alert(loop, sid)
        for sid in running:
            spec = self._specs.get(sid)
            if sid in self._memory_fds or spec is None:
                continue
            try:
                fd = self.driver.cgroup(sid).memory_alert(self.driver.soft_memory_limit(spec))
            except OSError:
                continue  # the cgroup is on its way (a start, a restore): next tick
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

    async def _watchdog_loop(self) -> None:
        """gVisor has no guest OOM killer here: past the cgroup limit the host kills the
        whole sentry. So the engine watches usage and, past the sandbox's memory_mb (plus
        sentry overhead), kills the sandbox's largest process before the hard limit hits."""
        next_sample = time.monotonic()
        while True:
            # every WATCH_INTERVAL, or at once when a sandbox's memory crosses its soft
            # limit (a kernel notification, where the cgroups have one): 1 GiB allocated
            # in one go outran a 100 ms tick now and then, and the host killed the sentry
            self._sync_memory_alerts()
            try:
                await asyncio.wait_for(self._memory_alert.wait(), WATCH_INTERVAL)
                await asyncio.sleep(MIN_WATCH_INTERVAL)  # a sandbox hovering at the limit
            except TimeoutError:
                pass
            self._memory_alert.clear()
            # metering wants memory in use without file cache (memory.stat): once a second;
            # the watchdog checks the cheap upper bound every tick, the exact figure only
            # past the limit (with 200 running sandboxes this loop was ~30% of a core)
            sample = time.monotonic() >= next_sample
            if sample:
                next_sample = time.monotonic() + METER_INTERVAL
                # once a second too: the kernel's waitid() walks every child (a holder per
                # sandbox), ~0.1 ms with 500
                self.driver.reap_holders()
            in_use: dict[str, int] = {}
            for sid in list(self._state.running):  # frozen or hibernated: nothing to watch
                spec = self._specs.get(sid)
                chan = self.channels.get(sid)
                if spec is None or chan is None or chan.closed.is_set():
                    continue
                cg = self.driver.cgroup(sid)
                tasks, limit = cg.tasks(), self.driver.host_threads_limit(spec)
                # the sentry keeps the host threads it made (Go never ends them), so the
                # count is a high-water mark: act again only once it has grown further
                if (tasks and tasks > 0.4 * limit
                        and tasks > self._pids_mark.get(sid, 0) + 256):
                    self._pids_mark[sid] = tasks
                    await self._stop_runaway(sid, chan, (tasks, limit))
                soft = self.driver.soft_memory_limit(spec)
                if not sample and (cg.memory_charged() or 0) <= soft:
                    continue
                used = cg.memory_bytes()
                if used is not None and sample:
                    in_use[sid] = used
                if used is None or used <= soft:
                    continue
                try:
                    res = await chan.call("oom_kill", timeout=5)
                except (TimeoutError, AgentError, ChannelClosed):
                    continue
                if res.get("killed"):
                    log.warning("sandbox %s over memory (%d MiB): killed pid %s (%s)", sid,
                                used >> 20, res["killed"], res.get("cmdline"))
                    self._event(sid, "oom_kill", RUNNING, RUNNING, "memory_limit",
                                {"used_bytes": used, "limit_mb": spec.memory_mb, **res})
            if sample:
                self.metering.sample({k: v for k, v in in_use.items()
                                      if k not in self._pooled})
