"""The engine: the one surface every front door uses.

It composes the parts (docs/architecture.md): the record layer (`records.py`), the driver
(`torpor.runtime.driver_for`), the lifecycle that changes states (`lifecycle.py`), timers
(`standby.py`), the warm pool (`pool.py`), the watchdog (`watchdog.py`), metering, traffic
(egress and previews), secrets and keys; and offers typed methods for sandboxes, their
lifecycle, processes (`engine.processes`), files (`engine.files`) and network. Methods
return engine types and raise engine errors (`torpor/errors.py`); none of the parts imports
this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import string
import time
from datetime import datetime

from torpor.channel import Channel, ChannelClosed, Stream
from torpor.channel.client import AgentClient
from torpor.config import Settings
from torpor.engine.build_records import BuildRecords
from torpor.engine.builds import Builds
from torpor.engine.builtins import Builtins
from torpor.engine.code import Code
from torpor.engine.files import Files
from torpor.engine.keys import KeyStore
from torpor.engine.lifecycle import Lifecycle
from torpor.engine.metering import Metering
from torpor.engine.pool import WarmPool
from torpor.engine.processes import Processes
from torpor.engine.records import Records
from torpor.engine.secrets import SecretStore
from torpor.engine.snapshots import (
    MAX_FORKS,
    SnapshotInfo,
    Snapshots,
    is_snapshot_id,
    new_snapshot_id,
)
from torpor.engine.standby import Standby
from torpor.engine.states import State
from torpor.engine.terminals import Terminals
from torpor.engine.traffic import Traffic
from torpor.engine.types import SandboxInfo
from torpor.engine.volumes import Volumes
from torpor.engine.watchdog import Watchdog
from torpor.errors import Conflict, Invalid, NotFound, Unavailable
from torpor.runtime import driver_for
from torpor.sources import Sources
from torpor.store.db import open_db
from torpor.store.models import EventRow, SandboxRow
from torpor.templates import BASE, Template, TemplateStore

log = logging.getLogger("torpor.engine")

_ALPHABET = string.ascii_lowercase + string.digits


def new_id() -> str:
    # lowercase letters and digits only: the id is a DNS label in preview URLs
    return "sbx" + "".join(secrets.choice(_ALPHABET) for _ in range(13))


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
        self.driver = driver_for(settings)
        self.records = Records(self.sessions, last_active=self._last_active)
        self.lifecycle = Lifecycle(self.records, self.driver, self.templates, hooks=self)
        # volumes and drives (engine/volumes.py): the doors use engine.volumes
        self.volumes = Volumes(self.records, self.driver, self.lifecycle.specs.get)
        self.standby = Standby(self.records, self.lifecycle, settings.memory_watermark,
                               delete=self.delete)
        self.metering = Metering(self.records, self.driver, self.lifecycle.spec)
        self.pool = WarmPool(self.records, self.lifecycle, self.templates, settings.pool_size,
                             new_id, dropped=self._template_gc)
        self.watchdog = Watchdog(self.records, self.lifecycle, self.driver, self.metering,
                                 pooled=self.pool.pooled.__contains__)
        self.traffic = Traffic(settings, self.records, self.templates,
                               self.secrets, self.keys, touch=self.standby.touch,
                               connect=self.connect)
        self.processes = Processes(self.client, self.standby.hold_process,
                                   defaults_of=self._exec_defaults)
        self.terminals = Terminals(self.processes)
        self._defaults: dict[str, tuple[str, str | None]] = {}
        self.files = Files(self.client, await_running=self._await_running)
        # the code interpreter of code-interpreter sandboxes, through a port tunnel
        self.code = Code(self.connect, self.lifecycle.channel)
        self.builds = Builds(self.templates, self.lifecycle, self.processes,
                             boot=self._boot_for_build, delete=self._delete_any,
                             write_file=self._write_as_root, built=self.pool.wake,
                             network=self.traffic.build_policy,
                             refusals=self.traffic.refusals,
                             sources=Sources.for_settings(self.templates, settings))
        # builds as records every door sees (status, logs), run apart from who asked
        self.build_records = BuildRecords(self.builds, self.data_dir / "builds")
        # built-in templates, built on first use (as build records too)
        self.builtins = Builtins(self.builds, self.templates, self.build_records)
        # snapshots of live sandboxes: templates in the store, kept by their rows
        self.snapshots = Snapshots(self.sessions, self.records, self.lifecycle,
                                   self.templates, gc=self._template_gc,
                                   wake=self.lifecycle.channel)
        self._tasks: list[asyncio.Task] = []

    # --- what the lifecycle tells the rest (lifecycle.Hooks) ----------------------------
    def attached(self, sid: str, chan: Channel) -> None:
        self.traffic.attach(sid, chan)

    def touched(self, sid: str) -> None:
        self.standby.touch(sid)

    def changed(self, sid: str) -> None:
        self.standby.wake(sid)

    def banking(self, sid: str) -> None:
        self.metering.bank(sid)

    def hibernate_failed(self, sid: str) -> None:
        self.standby.act(sid).failed_at = time.monotonic()

    def storage(self, spec) -> None:
        self.volumes.fill(spec)

    def forgotten(self, sid: str) -> None:
        self.records.forget(sid)
        self.standby.forget(sid)
        self.watchdog.forget(sid)
        self.pool.forget(sid)
        self.traffic.forget(sid)
        self.volumes.forget(sid)
        self._defaults.pop(sid, None)

    def _last_active(self, sid: str) -> datetime | None:
        return self.standby.last_active(sid)

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
        await self.lifecycle.recover()
        await asyncio.to_thread(self.snapshots.recover)
        await asyncio.to_thread(self._template_gc)  # what a forced delete left
        self._tasks.append(self.pool.start())
        self._tasks.append(asyncio.create_task(self.watchdog.loop()))
        self._tasks.append(asyncio.create_task(self.standby.loop()))

    async def stop(self, hibernate: bool = True) -> None:
        """Stop the server. With `hibernate` (a graceful stop) every running or standby
        sandbox is hibernated first, within `shutdown_timeout`; the rest (and all of them
        after a kill) keep running under their holders and the next start adopts them."""
        await self.pool.stop()
        await self.builtins.close()
        await self.build_records.close()  # (each deletes its build sandboxes)
        for t in self._tasks:
            t.cancel()
        if hibernate:
            await self.standby.hibernate_all(time.monotonic() + self.settings.shutdown_timeout)
            await self.pool.drain()
        self.metering.flush()
        await self.traffic.stop()
        self.watchdog.close()
        await self.lifecycle.close()
        await asyncio.to_thread(self.driver.close)
        self.db.dispose()

    def describe(self) -> dict:
        """What this server runs sandboxes on (the driver's own description)."""
        return self.driver.describe()

    # --- templates ----------------------------------------------------------------------
    def list_templates(self) -> list[Template]:
        return self.templates.list()

    def template(self, name: str) -> Template:
        tpl = self.templates.get(name)
        if tpl is None:
            names = sorted({t.ref if t.tag != "latest" else t.name
                            for t in self.templates.list()})
            raise NotFound(f"no template {name!r}; known templates: {', '.join(names)}",
                           templates=names, field="template")
        return tpl

    async def build_builtin(self, name: str, tag: str = "latest",
                            network: dict | None = None):
        """Build a built-in template (`torpor/builtin_templates.py`) on purpose: the event
        iterator of `builds.build` (which does the same for a name of a built-in and no
        steps)."""
        return await self.builtins.build(name, tag, network)

    def delete_template(self, ref: str, force: bool = False) -> None:
        """Remove a template's name:tag. Refused (409, naming them) while sandboxes or
        other named templates use it, unless `force`; what it held on disk goes once
        nothing uses it any more (now, or at a later delete or start)."""
        tpl = self.template(ref)
        if tpl.name == BASE:
            raise Conflict("`base` is built in and cannot be deleted", field="template")
        users = [r.id for r in self.records.in_states(
            [State.CREATING, State.RUNNING, State.STANDBY, State.HIBERNATED, State.FAILED],
            pooled=False) if r.template_digest == tpl.digest]
        children = [t.ref for t in self.templates.list()
                    if t.parent == tpl.digest and t.digest != tpl.digest]
        if (users or children) and not force:
            who = ", ".join([f"sandbox {u}" for u in users[:10]]
                            + [f"template {c}" for c in children[:10]])
            raise Conflict(f"template {tpl.ref} is in use ({who}); delete those first, or "
                           "force it (what it holds stays until they are gone)",
                           sandboxes=users[:50], templates=children[:50])
        self.templates.untag(tpl.name, tpl.tag)
        self._template_gc()
        self.pool.wake()  # its pool sandboxes go, then what they held

    def _template_gc(self) -> None:
        live = {r.template_digest for r in self.records.in_states(
            [State.CREATING, State.RUNNING, State.STANDBY, State.HIBERNATED, State.FAILED])
            if r.template_digest}
        removed = self.templates.gc(live | self.snapshots.digests())
        if removed:
            log.info("templates: removed %d unused templates and layers", len(removed))

    async def _boot_for_build(self, tpl: Template, build: str, network: dict) -> str:
        """A sandbox of a template being built: no idle timers, the build's egress policy
        (`traffic.build_policy`), the proxy's environment."""
        row = SandboxRow(id=new_id(), template=build, template_digest=tpl.digest,
                         state=State.CREATING, cpu=tpl.cpu, memory_mb=tpl.memory_mb,
                         disk_mb=tpl.disk_mb, env={}, meta={"torpor.build": build},
                         pooled=False, **self._policy({"standby_after": 0,
                                                       "hibernate_after": 0}),
                         network=network, secrets={})
        self.records.add(row)
        await self.lifecycle.boot(row, self.traffic.sandbox_env({}, {}))
        return row.id

    async def _delete_any(self, sid: str, reason: str) -> None:
        row = self.records.find(sid)
        if row is not None and row.state != State.DELETED:
            await self.lifecycle.remove(row, reason)

    async def _write_as_root(self, sid: str, path: str, data: bytes) -> None:
        async def chunks():
            yield data

        await self.files.write(sid, path, "root", None, chunks())

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
                     volumes: dict | None = None,
                     snapshot: str | None = None, **policy) -> SandboxInfo:
        if snapshot is None and is_snapshot_id(template):
            snapshot = template  # a snapshot's id works as a template's name
        if snapshot is not None:
            tpl = self._snapshot_template(snapshot, memory_mb, disk_mb)
            template = snapshot
        else:
            await self.builtins.ensure(template)  # a built-in's first use builds it
            tpl = self.template(template)
        cpu = float(cpu if cpu is not None else tpl.cpu)
        memory_mb = int(memory_mb if memory_mb is not None else tpl.memory_mb)
        disk_mb = int(disk_mb if disk_mb is not None else tpl.disk_mb)
        self._validate(cpu, memory_mb, disk_mb)
        wanted = self.volumes.resolve(volumes)  # 404/422 before anything starts
        env = dict(env or {})
        metadata = dict(metadata or {})
        policy = self._policy(policy)
        policy["network"] = self.traffic.policy(network)
        policy["secrets"] = self.traffic.grants(secrets, env)
        # the template's env under the sandbox's own
        boot_env = self.traffic.sandbox_env(policy["secrets"], {**tpl.env, **env})
        # a pool sandbox runs already, without the volumes asked for
        sid = None if snapshot or wanted else await self.pool.take(
            tpl, (cpu, memory_mb, disk_mb), env, metadata, policy, boot_env)
        if sid is None:
            row = SandboxRow(id=new_id(), template=template, template_digest=tpl.digest,
                             snapshot_id=snapshot, state=State.CREATING, cpu=cpu,
                             memory_mb=memory_mb, disk_mb=disk_mb, env=env, meta=metadata,
                             pooled=False, **policy)
            self.volumes.check(wanted)  # 409 if one is taken; then no await until claimed
            self.records.add(row)
            self.volumes.claim(row.id, wanted)
            try:
                await self.lifecycle.boot(row, boot_env)
            except Unavailable:
                self.volumes.forget(row.id)  # a sandbox that never ran holds no volume
                raise
            sid = row.id
        self.standby.touch(sid)
        return self.get(sid)

    def _snapshot_template(self, snap_id: str, memory_mb: int | None,
                           disk_mb: int | None) -> Template:
        tpl = self.snapshots.template_of(snap_id)
        if tpl.snapshot:  # its memory image is of that memory and that disk
            for field, asked, had in (("memory_mb", memory_mb, tpl.memory_mb),
                                      ("disk_mb", disk_mb, tpl.disk_mb)):
                if asked is not None and int(asked) != had:
                    raise Invalid(f"snapshot {snap_id} holds memory: a sandbox made from it "
                                  f"has its {field} ({had}); leave {field} out",
                                  field=field)
        return tpl

    # --- snapshots, restore in place, fork (engine/snapshots.py) ------------------------
    async def snapshot(self, sid: str, name: str | None = None,
                       memory: bool = True) -> SnapshotInfo:
        """Snapshot a live sandbox, which runs on; with `memory`, its processes too."""
        return await self.snapshots.take(sid, name, memory)

    def list_snapshots(self, sandbox_id: str | None = None) -> list[SnapshotInfo]:
        return self.snapshots.list(sandbox_id)

    def get_snapshot(self, snap_id: str) -> SnapshotInfo:
        return self.snapshots.get(snap_id)

    def delete_snapshot(self, snap_id: str, force: bool = False) -> None:
        self.snapshots.delete(snap_id, force)

    async def restore(self, sid: str, snapshot: str) -> SandboxInfo:
        """Roll a sandbox back to a snapshot (of it, or of a sandbox of the same template):
        same id; processes and files as they were then."""
        tpl = self.snapshots.check_restorable(sid, snapshot)
        row = self.records.get(sid)
        env = self.traffic.sandbox_env(row.secrets or {}, {**tpl.env, **(row.env or {})})
        await self.lifecycle.rollback(sid, tpl, snapshot, env)
        self._defaults.pop(sid, None)
        await asyncio.to_thread(self._template_gc)  # what it stood on before, if unused
        self.standby.touch(sid)
        return self.get(sid)

    async def fork(self, sid: str, count: int = 1) -> list[SandboxInfo]:
        """Capture a sandbox once (memory and disk; it runs on) and start `count` copies of
        it, each with its own id, disk, previews and metering, the source's egress policy,
        secrets grants, environment, timers and exposed ports. All or none: a copy that
        fails to start removes the others."""
        if isinstance(count, bool) or not isinstance(count, int) or not (
                1 <= count <= MAX_FORKS):
            raise Invalid(f"count must be between 1 and {MAX_FORKS}", field="count")
        self.records.get(sid)  # 404 first
        snap_id = new_snapshot_id()
        t0 = time.monotonic()
        tpl, figures = await self.snapshots.capture(sid, snap_id, True)
        t1 = time.monotonic()
        rows: list[SandboxRow] = []
        try:
            src = self.records.get(sid)
            policy = {k: getattr(src, k) for k in ("standby_after", "hibernate_after", "ttl",
                                                   "idle_ttl", "expire_action")}
            env = dict(src.env or {})
            boot_env = self.traffic.sandbox_env(src.secrets or {}, {**tpl.env, **env})
            for _ in range(count):
                row = SandboxRow(id=new_id(), template=src.template,
                                 template_digest=tpl.digest, state=State.CREATING,
                                 cpu=src.cpu, memory_mb=tpl.memory_mb, disk_mb=tpl.disk_mb,
                                 env=env, meta={**(src.meta or {}), "torpor.fork_of": sid},
                                 pooled=False, network=dict(src.network or {}),
                                 secrets=dict(src.secrets or {}),
                                 ports=dict(src.ports or {}), **policy)
                self.records.add(row)
                rows.append(row)
            # all at once: two at a time (the cores here) was not faster (bench/snapshots.py)
            results = await asyncio.gather(*(self.lifecycle.boot(r, boot_env) for r in rows),
                                           return_exceptions=True)
            failed = [e for e in results if isinstance(e, BaseException)]
            if failed:
                for r in rows:
                    await self._delete_any(r.id, "fork_failed")
                self.templates.release(f"snapshot:{snap_id}")
                await asyncio.to_thread(self._template_gc)  # the capture, now unused
                raise failed[0]
        finally:
            self.templates.release(f"snapshot:{snap_id}")
        ids = [r.id for r in rows]
        for fid in ids:
            self.standby.touch(fid)
        self.records.event(sid, "forked", None, None, "explicit",
                           {"forks": ids, "pause_ms": figures.get("pause_ms"),
                            "capture_ms": round((t1 - t0) * 1000, 1),
                            "start_ms": round((time.monotonic() - t1) * 1000, 1)})
        return [self.get(fid) for fid in ids]

    # --- drives on sandboxes (engine/volumes.py) ------------------------------------------
    async def attach_drive(self, sid: str, drive: str, path: str | None = None) -> str:
        """Attach a drive to a sandbox at /drives/<name> (its path inside): at once if it
        runs or is in standby, at its resume if it is hibernated."""
        async with self.lifecycle.lock(sid):
            row = self.records.get(sid)
            state = self.records.state(sid)
            if state not in (State.RUNNING, State.STANDBY, State.HIBERNATED):
                raise Conflict(f"cannot attach a drive to a sandbox in state {state}",
                               sandbox_id=sid)
            path = await self.volumes.attach(sid, self.lifecycle.spec(row), state, drive,
                                             path)
        self.standby.touch(sid)
        return path

    async def detach_drive(self, sid: str, drive: str) -> None:
        """Take a drive away from a sandbox (a file one of its processes has open stays
        open; nothing more of the drive can be reached)."""
        async with self.lifecycle.lock(sid):
            row = self.records.get(sid)
            await self.volumes.detach(sid, self.lifecycle.spec(row), self.records.state(sid),
                                      drive)

    def sandbox_storage(self, sid: str) -> list[dict]:
        """The volumes and drives a sandbox uses: {kind, name, path, read_only}."""
        self.records.get(sid)
        return [{"kind": v.kind, "name": v.name, "read_only": a.read_only,
                 "path": "/drives/" + a.path if v.kind == "drive" else a.path}
                for a, v in self.records.attachments(sid)]

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
        row = self.records.get(sid)
        changes = {k: v for k, v in fields.items() if v is not None}
        merged = self._policy({k: getattr(row, k) for k in (
            "standby_after", "hibernate_after", "ttl", "idle_ttl", "expire_action")}
            | changes)
        self.records.update(sid, **merged)
        self.records.event(sid, "updated", None, None, "explicit", changes)
        self.standby.wake(sid)  # its timers may fall due sooner now
        if touch:
            self.standby.touch(sid)
        return self.get(sid)

    def door_state(self, sid: str, door: str) -> dict:
        """What the front door `door` keeps of the sandbox (an empty dict at first); 404
        for a sandbox that never was."""
        return dict((self.records.get(sid).doors or {}).get(door) or {})

    def set_door_state(self, sid: str, door: str, **fields) -> dict:
        """Merge `fields` into what `door` keeps of the sandbox (a None value removes its
        key) and return the result. The engine stores it and never reads it."""
        doors = dict(self.records.get(sid).doors or {})
        state = {**(doors.get(door) or {}), **fields}
        doors[door] = {k: v for k, v in state.items() if v is not None}
        self.records.update(sid, doors=doors)
        return dict(doors[door])

    def update_network(self, sid: str, network: dict) -> SandboxInfo:
        """Change a sandbox's egress policy; its open egress connections close."""
        self.records.get(sid)
        self.traffic.update_policy(sid, network)
        self.standby.touch(sid)
        return self.get(sid)

    def list(self, state: str | None = None,
             metadata: dict[str, str] | None = None) -> list[SandboxInfo]:
        # running and standby are told by the in-memory state (a hot resume writes its
        # record a moment later): filter on what _info says, not on the record
        out = []
        for r in self.records.visible(deleted=state == State.DELETED):
            meta = r.meta or {}
            if metadata and any(meta.get(k) != v for k, v in metadata.items()):
                continue
            info = self._info(r)
            if state is None or info.state == state:
                out.append(info)
        return out

    def _info(self, row: SandboxRow) -> SandboxInfo:
        state = self.records.states.get(row.id)
        return SandboxInfo.of(row, self.standby.last_active(row.id),
                              str(state) if state is not None else None,
                              **self.traffic.info(row))

    def get(self, sid: str) -> SandboxInfo:
        return self._info(self.records.get(sid))

    async def delete(self, sid: str, reason: str = "explicit") -> None:
        await self.lifecycle.remove(self.records.get(sid), reason)

    def events(self, sid: str) -> list[EventRow]:
        self.records.get(sid)
        return self.records.events(sid)

    # --- standby, hibernation, keep-alive, usage ----------------------------------------
    async def to_standby(self, sid: str, reason: str = "explicit") -> SandboxInfo:
        await self.lifecycle.standby(sid, reason)
        return self.get(sid)

    async def hibernate(self, sid: str, reason: str = "explicit") -> SandboxInfo:
        await self.lifecycle.hibernate(sid, reason)
        return self.get(sid)

    async def resume(self, sid: str, reason: str = "explicit") -> SandboxInfo:
        self.records.get(sid)  # 404 first
        await self.lifecycle.resume(sid, reason)
        await self.lifecycle.channel(sid)  # a failed sandbox answers 503
        return self.get(sid)

    async def hold(self, sid: str, seconds: float) -> tuple[str, float]:
        """Keep the sandbox from standby for `seconds` (at most MAX_HOLD)."""
        await self.lifecycle.channel(sid)  # wakes it, and it must exist
        return self.standby.hold(sid, seconds)

    def release(self, sid: str, hold_id: str) -> None:
        self.records.get(sid)
        self.standby.release(sid, hold_id)

    def usage(self, sid: str) -> dict:
        self.records.get(sid)
        return self.metering.usage(sid)

    def metrics(self, sid: str) -> dict:
        """The sandbox's use at this moment: cpu_seconds (in all), memory_bytes (in use
        now), disk_bytes; it does not wake the sandbox."""
        self.records.get(sid)
        return self.metering.now(sid)

    # --- the agent ----------------------------------------------------------------------
    async def channel(self, sid: str) -> Channel:
        """The agent channel of a sandbox, resumed first if it is in standby or hibernated.
        Every call on a sandbox comes through here: this is what counts as activity."""
        return await self.lifecycle.channel(sid)

    def _exec_defaults(self, sid: str) -> tuple[str, str | None]:
        """The user and working directory of the template a sandbox started from, for
        commands that name no user (a sandbox's template never changes: kept per id)."""
        found = self._defaults.get(sid)
        if found is None:
            row = self.records.find(sid)
            tpl = self.templates.by_digest(row.template_digest) if row is not None else None
            found = (tpl.user, tpl.workdir) if tpl is not None else ("user", None)
            if row is not None:
                self._defaults[sid] = found
        return found

    async def _await_running(self, sid: str) -> None:
        """Return once the sandbox runs with a channel, without waking it (a watch
        waiting out a hibernation); NotFound once it is deleted."""
        while True:
            self.records.get(sid)
            chan = self.lifecycle.channels.get(sid)
            if (chan is not None and not chan.closed.is_set()
                    and self.records.states.get(sid) == State.RUNNING):
                return
            await asyncio.sleep(0.1)

    async def client(self, sid: str) -> AgentClient:
        """The typed agent client of a sandbox, resumed first if parked (see channel)."""
        return AgentClient(await self.lifecycle.channel(sid))

    async def connect(self, sid: str, port: int) -> Stream:
        """A stream to 127.0.0.1:`port` inside the sandbox (previews), woken first."""
        chan = await self.lifecycle.channel(sid)
        try:
            return AgentClient(chan).connect(port)
        except ChannelClosed:
            raise Unavailable(f"sandbox {sid}: the sandbox stopped", sandbox_id=sid) from None
