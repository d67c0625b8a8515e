"""The state machine and the record layer, on a real SQLite file (no runsc)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from conftest import make_data_dir

from torpor.engine.records import Records
from torpor.engine.states import (
    TRANSITIONS,
    IllegalTransition,
    State,
    check_transition,
    require,
)
from torpor.errors import Conflict, NotFound
from torpor.store.db import open_db
from torpor.store.models import SandboxRow


@pytest.fixture
def records():
    d = make_data_dir()
    db, sessions = open_db(d / "torpor.db")
    try:
        yield Records(sessions)
    finally:
        db.dispose()
        shutil.rmtree(d, ignore_errors=True)


def add(records: Records, sid: str, state: State = State.CREATING, pooled: bool = False):
    records.add(SandboxRow(id=sid, template="base", state=str(state), cpu=1, memory_mb=256,
                           disk_mb=256, env={}, meta={}, pooled=pooled))


def test_every_state_has_its_transitions_and_deleted_is_final():
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.DELETED] == frozenset()
    for old, new in [("creating", "running"), ("running", "standby"), ("standby", "running"),
                     ("standby", "hibernated"), ("hibernated", "running"),
                     ("running", "failed"), ("failed", "deleted")]:
        check_transition("sbx", old, new)
    for old, new in [("deleted", "running"), ("failed", "running"), ("hibernated", "standby"),
                     ("creating", "standby"), ("running", "creating")]:
        with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
            check_transition("sbx", old, new)


def test_an_operation_in_the_wrong_state_is_one_uniform_409():
    require("sbx1", State.RUNNING, "hibernate", [State.RUNNING, State.STANDBY])
    with pytest.raises(Conflict) as e:
        require("sbx1", State.FAILED, "hibernate", [State.RUNNING, State.STANDBY])
    assert e.value.status == 409
    assert e.value.message == "cannot hibernate a sandbox in state failed"
    assert e.value.extra == {"sandbox_id": "sbx1", "state": "failed"}


def test_state_writes_are_checked_and_recorded_with_their_event(records):
    add(records, "sbxa")
    records.set_state("sbxa", State.RUNNING, None, "created", duration_ms=5)
    assert records.states["sbxa"] == State.RUNNING and "sbxa" in records.states.running
    with pytest.raises(IllegalTransition):
        records.set_state("sbxa", State.CREATING, None, "bug")
    assert records.find("sbxa").state == "running"  # the illegal write changed nothing
    records.set_state("sbxa", State.FAILED, "it broke", "crashed")
    row = records.find("sbxa")
    assert (row.state, row.reason) == ("failed", "it broke")
    assert "sbxa" not in records.states.running
    evs = records.events("sbxa", kind="state")
    assert [(e.from_state, e.to_state, e.reason) for e in evs] == [
        ("creating", "running", "created"), ("running", "failed", "crashed")]
    assert evs[0].detail == {"duration_ms": 5}


def test_the_api_sees_neither_pooled_nor_deleted_records(records):
    add(records, "sbxpool", pooled=True)
    add(records, "sbxgone")
    records.set_state("sbxgone", State.DELETED, None, "explicit")
    for sid in ("sbxpool", "sbxgone", "sbxnone"):
        with pytest.raises(NotFound):
            records.get(sid)
    assert records.find("sbxgone").deleted_at is not None
    assert [r.id for r in records.visible(deleted=True)] == ["sbxgone"]


def test_a_deferred_state_write_comes_before_any_later_one(records):
    async def scenario():
        add(records, "sbxd")
        records.set_state("sbxd", State.RUNNING, None, "created")
        records.set_state("sbxd", State.STANDBY, None, "idle")
        records.defer_state("sbxd", State.RUNNING, "request", 1, {"from": "standby"}, 60.0)
        # in memory at once, on record only later ...
        assert records.states["sbxd"] == State.RUNNING
        assert records.find("sbxd").state == "standby"
        # ... or as soon as anything else is written for it, in order
        records.set_state("sbxd", State.HIBERNATED, None, "idle")
        kinds = [(e.from_state, e.to_state) for e in records.events("sbxd", kind="state")]
        assert kinds[-2:] == [("standby", "running"), ("running", "hibernated")]
        # and once written, the timer writes nothing more
        await asyncio.sleep(0)
        assert records.find("sbxd").state == "hibernated"

    asyncio.run(scenario())


def test_a_deferred_write_lands_by_itself_after_its_delay(records):
    async def scenario():
        add(records, "sbxt")
        records.set_state("sbxt", State.RUNNING, None, "created")
        records.set_state("sbxt", State.STANDBY, None, "idle")
        records.defer_state("sbxt", State.RUNNING, "request", 1, {}, 0.01)
        for _ in range(500):
            if records.find("sbxt").state == "running":
                break
            await asyncio.sleep(0.01)
        assert records.find("sbxt").state == "running"

    asyncio.run(scenario())
