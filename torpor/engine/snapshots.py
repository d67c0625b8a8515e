"""Snapshots of live sandboxes, sandboxes created from them, restore in place, fork.

A snapshot is a template made from a live sandbox (docs/snapshots.md): the sandbox's
template with the sandbox's resources and, with memory, a boot snapshot of the sandbox as
it was (its checkpoint image and a copy of its disk: `Driver.snapshot_live`), or without
memory, what the sandbox changed on its disk as one more layer. It lives in the template
store under its own digest, unnamed; the `snapshots` table is what keeps it (the store's
gc keeps every digest a snapshot row or a sandbox names), and holds its metadata.

- A half snapshot is never listed: it is written under a temporary name, moved into the
  store whole, and its row is added last (a server killed in between leaves an unnamed
  template nothing keeps, which the next gc removes; `recover` removes the rest).
- A snapshot outlives its source, and its source's template (its parent, kept by gc).
- Deleting one that sandboxes use is refused (409) unless forced; forced, its files stay
  until the last of them is gone.
- A fork captures once (a snapshot with no row, held while the copies start) and starts
  the copies from it; each copy then keeps it, until the last copy is deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import shutil
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from torpor.engine.lifecycle import Lifecycle
from torpor.engine.records import Records
from torpor.engine.states import State
from torpor.errors import Conflict, Invalid, NotFound
from torpor.store.models import SnapshotRow
from torpor.templates import LATEST, Template, TemplateStore

log = logging.getLogger("torpor.snapshots")

PREFIX = "snap_"
MAX_FORKS = 20
NAME_MAX = 128
_ALPHABET = string.ascii_lowercase + string.digits
# states of sandboxes that hold what they started from
HOLDING = [State.CREATING, State.RUNNING, State.STANDBY, State.HIBERNATED, State.FAILED]


def new_snapshot_id() -> str:
    return PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(12))


def is_snapshot_id(ref: str | None) -> bool:
    return bool(ref) and ref.startswith(PREFIX)


def is_snapshot_template(t: Template) -> bool:
    return bool(t.steps) and t.steps[-1].get("type") == "snapshot"


def origin_of(t: Template) -> str:
    """The digest of the template (not a snapshot) a sandbox or snapshot stems from: a
    snapshot's parent is always that template, never another snapshot."""
    return (t.parent or t.digest) if is_snapshot_template(t) else t.digest


@dataclass
class SnapshotInfo:
    id: str
    name: str | None
    sandbox_id: str
    memory: bool
    bytes: int
    created_at: datetime
    template: str  # its digest in the template store
    cpu: float
    memory_mb: int
    disk_mb: int
    pause_ms: float | None

    @classmethod
    def of(cls, row: SnapshotRow) -> SnapshotInfo:
        d = row.detail or {}
        return cls(id=row.id, name=row.name, sandbox_id=row.sandbox_id, memory=row.memory,
                   bytes=row.bytes, created_at=row.created_at, template=row.template_digest,
                   cpu=d.get("cpu", 1.0), memory_mb=d.get("memory_mb", 0),
                   disk_mb=d.get("disk_mb", 0), pause_ms=d.get("pause_ms"))


class Snapshots:
    def __init__(self, sessions: sessionmaker[Session], records: Records,
                 lifecycle: Lifecycle, templates: TemplateStore,
                 gc: Callable[[], None], wake: Callable[[str], Awaitable[object]]):
        self.sessions = sessions
        self.records = records
        self.lifecycle = lifecycle
        self.templates = templates
        self.gc = gc  # the engine's template gc (which keeps what `digests` names)
        self.wake = wake  # sid -> resumes a parked sandbox (a snapshot is activity)
        self.tmp_root = templates.images

    # --- reading ----------------------------------------------------------------------
    def _row(self, snap_id: str) -> SnapshotRow:
        with self.sessions() as s:
            row = s.get(SnapshotRow, snap_id) if is_snapshot_id(snap_id) else None
        if row is None:
            raise NotFound(f"no snapshot {snap_id!r}; list them with GET /v1/snapshots",
                           snapshot_id=snap_id)
        return row

    def get(self, snap_id: str) -> SnapshotInfo:
        return SnapshotInfo.of(self._row(snap_id))

    def list(self, sandbox_id: str | None = None) -> list[SnapshotInfo]:
        q = select(SnapshotRow).order_by(SnapshotRow.created_at)
        if sandbox_id:
            q = q.where(SnapshotRow.sandbox_id == sandbox_id)
        with self.sessions() as s:
            return [SnapshotInfo.of(r) for r in s.scalars(q)]

    def digests(self) -> set[str]:
        """Template digests the snapshots keep (the template gc must not remove them)."""
        with self.sessions() as s:
            return set(s.scalars(select(SnapshotRow.template_digest)))

    def bytes_total(self) -> int:
        with self.sessions() as s:
            return sum(s.scalars(select(SnapshotRow.bytes)))

    def template_of(self, snap_id: str) -> Template:
        """The template a snapshot is; Conflict if its files are gone from the store."""
        row = self._row(snap_id)
        tpl = self.templates.by_digest(row.template_digest)
        if tpl is None or (row.memory and not (tpl.snapshot_dir / "image").is_dir()):
            raise Conflict(f"snapshot {snap_id}: its template {row.template_digest} is gone "
                           "from the template store; delete the snapshot",
                           snapshot_id=snap_id)
        return tpl

    def users(self, digest: str) -> list[str]:
        return [r.id for r in self.records.in_states(HOLDING, pooled=False)
                if r.template_digest == digest]

    # --- taking -------------------------------------------------------------------------
    async def take(self, sid: str, name: str | None = None, memory: bool = True) -> SnapshotInfo:
        """Snapshot a live sandbox (a parked one is resumed first: a snapshot is activity);
        it runs on. 409 for what cannot be captured (as for a hibernation), 503 (the
        sandbox as it was) when it failed, e.g. the disk is full."""
        if name is not None and (not isinstance(name, str) or len(name) > NAME_MAX):
            raise Invalid(f"name must be a string of at most {NAME_MAX} characters",
                          field="name")
        snap_id = new_snapshot_id()
        tpl, figures = await self.capture(sid, snap_id, memory)
        try:
            row = SnapshotRow(id=snap_id, name=name, sandbox_id=sid,
                              template_digest=tpl.digest, source_digest=tpl.parent,
                              memory=memory, bytes=figures.get("bytes", 0),
                              detail={"cpu": tpl.cpu, "memory_mb": tpl.memory_mb,
                                      "disk_mb": tpl.disk_mb,
                                      "pause_ms": figures.get("pause_ms"),
                                      "checkpoint_ms": figures.get("checkpoint_ms"),
                                      "disk_ms": figures.get("disk_ms"),
                                      "copy_ms": figures.get("copy_ms"),
                                      "staged": figures.get("staged")})
            with self.sessions.begin() as s:
                s.add(row)
        finally:
            self.templates.release(f"snapshot:{snap_id}")
        self.records.event(sid, "snapshot", None, None, "explicit",
                           {"snapshot": snap_id, "memory": memory,
                            "pause_ms": figures.get("pause_ms")})
        log.info("sandbox %s: snapshot %s (memory=%s, %d bytes, paused %s ms)", sid,
                 snap_id, memory, figures.get("bytes", 0), figures.get("pause_ms"))
        return self.get(snap_id)

    async def capture(self, sid: str, snap_id: str, memory: bool) -> tuple[Template, dict]:
        """Snapshot a sandbox into the template store, unnamed and held for
        `snapshot:<snap_id>` (the caller records it, then releases the hold)."""
        await self.wake(sid)
        row = self.records.get(sid)
        src = self.lifecycle.spec(row).template
        key = hashlib.sha256(f"snapshot:{snap_id}".encode()).hexdigest()
        steps = [*src.steps, {"type": "snapshot", "id": snap_id, "sandbox": sid,
                              "memory": memory}]
        tpl = dataclasses.replace(
            src, name="snap-" + snap_id.removeprefix(PREFIX), tag=LATEST,
            parent=origin_of(src), base_rootfs=str(src.rootfs), cpu=row.cpu,
            memory_mb=row.memory_mb, disk_mb=row.disk_mb, snapshot=memory, steps=steps,
            description=f"snapshot {snap_id} of sandbox {sid}")
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_root / f".snap-{snap_id}.tmp"
        owner = f"snapshot:{snap_id}"
        self.templates.hold(owner, digest=tpl.parent)
        try:
            if memory:
                tmp.mkdir()
                figures = await self.lifecycle.snapshot_live(sid, tmp / "snapshot", True)
                stored = await asyncio.to_thread(self.templates.put, tpl, tmp / "snapshot")
            else:
                layer_tmp = self.templates.layer_tmp(key)
                try:
                    figures = await self.lifecycle.snapshot_live(sid, layer_tmp, False)
                    self.templates.hold(owner, layer=key)
                    self.templates.commit_layer(layer_tmp, key)
                finally:
                    shutil.rmtree(layer_tmp, ignore_errors=True)
                tpl = dataclasses.replace(tpl, layers=[*src.layers, key], start_cmd=None,
                                          ready=None)
                stored = await asyncio.to_thread(self.templates.put, tpl)
        except BaseException:
            self.templates.release(owner)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.templates.hold(owner, digest=stored.digest)
        return stored, figures

    # --- deleting -----------------------------------------------------------------------
    def delete(self, snap_id: str, force: bool = False) -> None:
        """Delete a snapshot: refused (409, naming them) while sandboxes use it, unless
        `force` (its files then stay until the last of them is gone)."""
        row = self._row(snap_id)
        users = self.users(row.template_digest)
        if users and not force:
            raise Conflict(f"snapshot {snap_id} is in use by {len(users)} sandboxes ("
                           + ", ".join(users[:10]) + "); delete them first, or force it "
                           "(its files stay until they are gone)", snapshot_id=snap_id,
                           sandboxes=users[:50])
        with self.sessions.begin() as s:
            found = s.get(SnapshotRow, snap_id)
            if found is not None:
                s.delete(found)
        self.gc()

    def recover(self) -> None:
        """At start: what a snapshot interrupted by a kill left (never listed)."""
        for tmp in self.tmp_root.glob(".snap-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("removed an unfinished snapshot: %s", tmp.name)
        self.templates.layers.mkdir(parents=True, exist_ok=True)
        for tmp in self.templates.layers.glob(".*.tmp.disk"):
            shutil.rmtree(tmp, ignore_errors=True)

    # --- restore in place ---------------------------------------------------------------
    def check_restorable(self, sid: str, snap_id: str) -> Template:
        """The snapshot's template, if the sandbox may be rolled back to it: a snapshot of
        this sandbox, or of any sandbox stemming from the same template."""
        row = self.records.get(sid)
        snap = self._row(snap_id)
        tpl = self.template_of(snap_id)
        if snap.sandbox_id != sid:
            mine = self.templates.by_digest(row.template_digest or "")
            if mine is None or origin_of(mine) != origin_of(tpl):
                raise Conflict(f"snapshot {snap_id} is of sandbox {snap.sandbox_id}, which "
                               f"stems from another template than sandbox {sid}; create a "
                               "sandbox from it instead", snapshot_id=snap_id,
                               sandbox_id=sid)
        return tpl

