"""The record layer: sandbox records, their events and state writes; domains; the egress log.

Everything of the engine that reads or writes a sandbox's record comes through here, never
through SQLAlchemy directly, so this is the one seam to swap the store (SQLite today, a
shared PostgreSQL later). It also keeps the records' states in memory (`states`), which is
what the hot path reads: every state write goes through `set_state`, which checks the
transition (`states.check_transition`) and updates both.

A hot resume writes its record a moment later (`defer_state`): any other write for that
sandbox writes the deferred one first, so records keep their order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select

from torpor.engine.states import LIVE, State, check_transition
from torpor.errors import NotFound
from torpor.store.models import (
    AttachmentRow,
    DomainRow,
    EgressRow,
    EventRow,
    SandboxRow,
    VolumeRow,
    now,
)

log = logging.getLogger("torpor.records")


class States(dict):
    """The records' states by sandbox id, for the hot path, with the running ones kept in a
    set beside them: the watchdog visits only those, so a parked sandbox costs it nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.running: set[str] = set()

    def __setitem__(self, sid: str, state: str) -> None:
        super().__setitem__(sid, State(state))
        if state == State.RUNNING:
            self.running.add(sid)
        else:
            self.running.discard(sid)

    def __delitem__(self, sid: str) -> None:
        super().__delitem__(sid)
        self.running.discard(sid)

    def pop(self, sid: str, *default):
        self.running.discard(sid)
        return super().pop(sid, *default)


class Records:
    def __init__(self, sessions, last_active: Callable[[str], datetime | None] | None = None):
        self.sessions = sessions
        self.states = States()
        # when a sandbox was last active, if the caller knows better than its record
        self.last_active = last_active or (lambda sid: None)
        self._deferred: dict[str, tuple[asyncio.TimerHandle, tuple]] = {}

    # --- reads ----------------------------------------------------------------------------
    def find(self, sid: str) -> SandboxRow | None:
        """The record, whatever its state (pooled and deleted ones too)."""
        with self.sessions() as s:
            return s.get(SandboxRow, sid)

    def get(self, sid: str) -> SandboxRow:
        """The record of a sandbox the API shows (not deleted, not in the warm pool)."""
        row = self.find(sid)
        if row is None or row.state == State.DELETED or row.pooled:
            raise NotFound(f"no sandbox {sid}; `torpor sandbox list` shows yours",
                           sandbox_id=sid)
        return row

    def state(self, sid: str) -> State:
        """The sandbox's state as the server knows it now (a deferred write included)."""
        cached = self.states.get(sid)
        return cached if cached is not None else State(self.get(sid).state)

    def in_states(self, states: Iterable[State], pooled: bool | None = None,
                  template: str | None = None) -> list[SandboxRow]:
        with self.sessions() as s:
            q = select(SandboxRow).where(SandboxRow.state.in_([str(x) for x in states]))
            if pooled is not None:
                q = q.where(SandboxRow.pooled.is_(pooled))
            if template is not None:
                q = q.where(SandboxRow.template == template)
            return list(s.scalars(q.order_by(SandboxRow.created_at)))

    def live(self) -> list[SandboxRow]:
        """Records of the sandboxes that exist (not pooled, not failed or deleted)."""
        return self.in_states(LIVE, pooled=False)

    def visible(self, deleted: bool = False) -> list[SandboxRow]:
        """What the API lists: the deleted ones, or all the others (pool excluded)."""
        with self.sessions() as s:
            q = select(SandboxRow).where(SandboxRow.pooled.is_(False))
            q = q.where(SandboxRow.state == State.DELETED) if deleted else q.where(
                SandboxRow.state != State.DELETED)
            return list(s.scalars(q.order_by(SandboxRow.created_at)))

    def events(self, sid: str, kind: str | None = None) -> list[EventRow]:
        with self.sessions() as s:
            q = select(EventRow).where(EventRow.sandbox_id == sid)
            if kind is not None:
                q = q.where(EventRow.kind == kind)
            return list(s.scalars(q.order_by(EventRow.id)))

    # --- writes ---------------------------------------------------------------------------
    def add(self, row: SandboxRow) -> None:
        with self.sessions.begin() as s:
            s.add(row)

    def update(self, sid: str, event: tuple[str, str | None, dict] | None = None,
               **fields: Any) -> SandboxRow | None:
        """Set fields of the record (and `updated_at`); with `event` = (kind, reason,
        detail), record that event in the same transaction. None if there is no record."""
        self.flush(sid)
        with self.sessions.begin() as s:
            row = s.get(SandboxRow, sid)
            if row is None:
                return None
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = now()
            if event is not None:
                kind, reason, detail = event
                s.add(EventRow(sandbox_id=sid, kind=kind, from_state=row.state,
                               to_state=row.state, reason=reason, detail=detail))
        return row

    def add_usage(self, sid: str, cpu_seconds: float = 0.0,
                  memory_gib_seconds: float = 0.0) -> None:
        with self.sessions.begin() as s:
            row = s.get(SandboxRow, sid)
            if row is not None:
                row.cpu_seconds += cpu_seconds
                row.memory_gib_seconds += memory_gib_seconds

    def add_memory(self, gib_seconds: dict[str, float]) -> None:
        """Add memory GiB-seconds to many records in one transaction."""
        with self.sessions.begin() as s:
            for sid, v in gib_seconds.items():
                row = s.get(SandboxRow, sid)
                if row is not None and v:
                    row.memory_gib_seconds += v

    def event(self, sid: str, kind: str, from_state: str | None, to_state: str | None,
              reason: str | None, detail: dict) -> None:
        with self.sessions.begin() as s:
            s.add(EventRow(sandbox_id=sid, kind=kind, from_state=from_state,
                           to_state=to_state, reason=reason, detail=detail))

    def set_state(self, sid: str, state: State, message: str | None, reason: str,
                  duration_ms: int | None = None, extra: dict | None = None,
                  at: datetime | None = None) -> None:
        """Change the sandbox's state: check the transition, write the record and its
        `state` event in one transaction, then the in-memory state."""
        self.flush(sid)  # a deferred write, if any, comes first
        detail = dict(extra or {})
        if message:
            detail["message"] = message
        if duration_ms is not None:
            detail["duration_ms"] = duration_ms
        with self.sessions.begin() as s:
            row = s.get(SandboxRow, sid)
            old = row.state
            check_transition(sid, old, state)
            row.state = str(state)
            row.updated_at = at or now()
            last = self.last_active(sid)
            if last is not None:
                row.last_active_at = last
            if state == State.FAILED:
                row.reason = message
            if state == State.DELETED:
                row.deleted_at = now()
            s.add(EventRow(sandbox_id=sid, kind="state", from_state=old, to_state=str(state),
                           reason=reason, detail=detail, at=at or now()))
        self.states[sid] = state

    def defer_state(self, sid: str, state: State, reason: str, duration_ms: int,
                    extra: dict, delay: float) -> None:
        """Take `state` in memory now and write its record `delay` seconds later (or at the
        next write for this sandbox, whichever comes first)."""
        self.states[sid] = state
        args = (sid, state, None, reason, duration_ms, extra, now())
        timer = asyncio.get_running_loop().call_later(delay, self._write_deferred, sid)
        self._deferred[sid] = (timer, args)

    def flush(self, sid: str) -> None:
        """Write the sandbox's deferred state record now, if one is pending."""
        pending = self._deferred.get(sid)
        if pending is not None:
            pending[0].cancel()
            self._write_deferred(sid)

    def _write_deferred(self, sid: str) -> None:
        pending = self._deferred.pop(sid, None)
        if pending is None:
            return
        try:
            self.set_state(*pending[1])
        except Exception:  # the sandbox runs; only its record lags: say so, go on
            log.exception("sandbox %s: writing its deferred state record", sid)

    def forget(self, sid: str) -> None:
        """Drop what is kept in memory of a deleted sandbox."""
        self.flush(sid)
        self.states.pop(sid, None)

    # --- the network's records: custom domains, the egress log ---------------------------
    def domain(self, name: str) -> DomainRow | None:
        with self.sessions() as s:
            return s.get(DomainRow, name)

    def domains(self) -> list[DomainRow]:
        with self.sessions() as s:
            return list(s.scalars(select(DomainRow).order_by(DomainRow.domain)))

    def add_domain(self, row: DomainRow) -> bool:
        """False if the domain is mapped already."""
        with self.sessions.begin() as s:
            if s.get(DomainRow, row.domain) is not None:
                return False
            s.add(row)
        return True

    def remove_domain(self, name: str) -> bool:
        with self.sessions.begin() as s:
            row = s.get(DomainRow, name)
            if row is None:
                return False
            s.delete(row)
        return True

    def remove_domains_of(self, sid: str) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(DomainRow).where(DomainRow.sandbox_id == sid))

    def add_egress(self, batch: list[dict]) -> None:
        cols = {c.name for c in EgressRow.__table__.columns} - {"id", "at"}
        with self.sessions.begin() as s:
            for r in batch:
                s.add(EgressRow(**{k: v for k, v in r.items() if k in cols}))

    def egress(self, sid: str, limit: int, before: int | None = None) -> list[EgressRow]:
        with self.sessions() as s:
            q = select(EgressRow).where(EgressRow.sandbox_id == sid)
            if before is not None:
                q = q.where(EgressRow.id < before)
            return list(s.scalars(q.order_by(EgressRow.id.desc()).limit(limit)))

    def prune_egress(self, before: datetime) -> int:
        with self.sessions.begin() as s:
            return s.execute(delete(EgressRow).where(EgressRow.at < before)).rowcount

    # --- volumes and drives, and the sandboxes that use them -----------------------------
    def volume(self, kind: str, name: str) -> VolumeRow | None:
        with self.sessions() as s:
            return s.scalars(select(VolumeRow).where(VolumeRow.kind == kind,
                                                     VolumeRow.name == name)).first()

    def volumes(self, kind: str) -> list[VolumeRow]:
        with self.sessions() as s:
            q = select(VolumeRow).where(VolumeRow.kind == kind).order_by(VolumeRow.name)
            return list(s.scalars(q))

    def add_volume(self, row: VolumeRow) -> None:
        with self.sessions.begin() as s:
            s.add(row)

    def remove_volume(self, vid: str) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(AttachmentRow).where(AttachmentRow.volume_id == vid))
            s.execute(delete(VolumeRow).where(VolumeRow.id == vid))

    def attachments(self, sid: str) -> list[tuple[AttachmentRow, VolumeRow]]:
        """What the sandbox uses, oldest first."""
        with self.sessions() as s:
            q = (select(AttachmentRow, VolumeRow)
                 .join(VolumeRow, VolumeRow.id == AttachmentRow.volume_id)
                 .where(AttachmentRow.sandbox_id == sid).order_by(AttachmentRow.id))
            return [(a, v) for a, v in s.execute(q)]

    def users(self, vid: str) -> list[AttachmentRow]:
        """The attachments of a volume to sandboxes that are not deleted."""
        with self.sessions() as s:
            q = (select(AttachmentRow)
                 .join(SandboxRow, SandboxRow.id == AttachmentRow.sandbox_id)
                 .where(AttachmentRow.volume_id == vid, SandboxRow.state != State.DELETED)
                 .order_by(AttachmentRow.id))
            return list(s.scalars(q))

    def attach(self, rows: list[AttachmentRow]) -> None:
        with self.sessions.begin() as s:
            s.add_all(rows)

    def detach(self, sid: str, vid: str | None = None) -> None:
        """Drop the sandbox's attachment of `vid` (all of its attachments: None)."""
        with self.sessions.begin() as s:
            q = delete(AttachmentRow).where(AttachmentRow.sandbox_id == sid)
            if vid is not None:
                q = q.where(AttachmentRow.volume_id == vid)
            s.execute(q)
