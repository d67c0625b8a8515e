"""The engine's state machine, exercised through `Engine` on the fake driver (no runsc).

Each test runs a real engine (records in SQLite, lifecycle, timers, watchdog, traffic) on
its own data dir in its own event loop, with `driver = "fake"`: sandboxes are in-memory
agents behind real channels, and the driver's failures and figures are set by the test.
`Engine.start()` binds nothing here: the preview listener is off (`preview_port=0`) and
the egress proxy has no listener of its own (it serves streams of the agents' channels).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable

import pytest
from conftest import make_data_dir

from torpor.config import Settings
from torpor.engine.manager import Engine
from torpor.engine.states import IllegalTransition, State
from torpor.errors import Conflict, NotFound, Unavailable
from torpor.runtime.fake import FakeDriver

WAIT = 10.0  # seconds a bounded wait allows for what the engine does on its own

# what the agent reports of a process with a deleted file open (torpor/agent/agent.py)
DELETED_FILE = {"kind": "deleted_file", "pid": 7, "fd": 3, "path": "/tmp/gone",
                "cmdline": "python3 app.py"}


@pytest.fixture
def run():
    """`run(body)`: `await body(engine)` on a started engine, stopped afterwards without
    hibernating anything; the data dir goes with the test."""
    data_dir = make_data_dir()

    def runner(body: Callable[[Engine], Awaitable[None]], **settings) -> None:
        async def main() -> None:
            # timers off unless a test sets its own: only the test moves the states
            engine = Engine(Settings(data_dir=data_dir, driver="fake", pool_size=0,
                                     preview_port=0, memory_watermark=0, egress_log_days=0,
                                     standby_after=0, hibernate_after=0, **settings))
            await engine.start()
            try:
                await body(engine)
            finally:
                await engine.stop(hibernate=False)

        asyncio.run(main())

    yield runner
    shutil.rmtree(data_dir, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------
def fake(engine: Engine) -> FakeDriver:
    assert isinstance(engine.driver, FakeDriver)
    return engine.driver


def transitions(engine: Engine, sid: str) -> list[tuple[str, str, str]]:
    """(from, to, reason) of the sandbox's recorded state events, in order. Read from the
    record layer: `engine.events` answers 404 for a deleted sandbox."""
    return [(e.from_state, e.to_state, e.reason)
            for e in engine.records.events(sid, kind="state")]


def calls(engine: Engine, sid: str) -> list[str]:
    """The driver operations done for the sandbox, in order."""
    return [op for op, s in fake(engine).calls if s == sid]


def running_agent(sid: str, frozen: bool = False) -> list[str]:
    """What `leftovers` lists of a sandbox whose agent lives, and its disk."""
    return [f"fake agent of {sid}" + (" (frozen)" if frozen else ""), f"fake disk of {sid}"]


async def until(pred: Callable[[], bool], what: str) -> None:
    """Until `pred()` holds; AssertionError naming `what` after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {WAIT:.0f}s: {what}")
        await asyncio.sleep(0.01)


async def answers(engine: Engine, sid: str) -> None:
    """A request reaches the sandbox's agent (waking it if it is parked)."""
    client = await engine.client(sid)
    assert (await client.ping(wait=5))["pid"] == 1


def crash(engine: Engine, sid: str) -> None:
    """The agent's end of the channel closes on its own, as when the agent exits or its
    runtime dies; the driver still believes it runs, as a real one does until stopped."""
    fake(engine).crash(sid)


# --- the way through the states -----------------------------------------------------------
def test_create_standby_hibernate_resume(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        assert engine.get(sid).state == State.RUNNING
        assert transitions(engine, sid) == [("creating", "running", "created")]
        assert calls(engine, sid) == ["start"]
        assert fake(engine).leftovers(sid) == running_agent(sid)

        assert (await engine.to_standby(sid)).state == State.STANDBY
        assert transitions(engine, sid)[-1] == ("running", "standby", "explicit")
        assert calls(engine, sid)[-1] == "freeze"
        assert fake(engine).leftovers(sid) == running_agent(sid, frozen=True)

        # from standby: thawed for the agent's hibernate_check, then checkpointed
        assert (await engine.hibernate(sid)).state == State.HIBERNATED
        assert transitions(engine, sid)[-1] == ("standby", "hibernated", "explicit")
        assert calls(engine, sid)[-2:] == ["thaw", "checkpoint"]
        assert fake(engine).leftovers(sid) == [f"fake disk of {sid}", f"fake image of {sid}"]
        assert engine.events(sid)[-1].detail["image_bytes"] > 0

        assert (await engine.resume(sid)).state == State.RUNNING
        assert transitions(engine, sid)[-1] == ("hibernated", "running", "explicit")
        assert engine.events(sid)[-1].detail["from"] == "hibernated"
        assert engine.records.find(sid).state == "running"  # a restore writes it at once
        assert calls(engine, sid)[-2:] == ["restore", "drop_image"]
        assert fake(engine).leftovers(sid) == running_agent(sid)  # the image dropped
        await answers(engine, sid)

    run(body)


def test_a_hot_resume_says_running_at_once_and_writes_its_record_after(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        await engine.to_standby(sid)
        # nothing in a hot resume waits on the event loop, so the deferred record cannot
        # have been written when it returns, however slow the machine
        assert (await engine.resume(sid)).state == State.RUNNING
        assert [s.id for s in engine.list(state="running")] == [sid]
        assert engine.records.find(sid).state == "standby"
        assert transitions(engine, sid)[-1] == ("running", "standby", "explicit")
        assert calls(engine, sid)[-1] == "thaw"
        assert fake(engine).leftovers(sid) == running_agent(sid)

        await until(lambda: engine.records.find(sid).state == "running",
                    "the deferred state record")
        assert transitions(engine, sid)[-1] == ("standby", "running", "explicit")
        assert engine.events(sid)[-1].detail["from"] == "standby"

    run(body)


def test_a_request_wakes_a_parked_sandbox(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        await engine.to_standby(sid)
        await answers(engine, sid)
        assert engine.get(sid).state == State.RUNNING
        assert calls(engine, sid)[-1] == "thaw"

        await engine.hibernate(sid)  # writes the hot resume's deferred record first
        await answers(engine, sid)
        assert engine.get(sid).state == State.RUNNING
        assert calls(engine, sid)[-2:] == ["restore", "drop_image"]
        assert transitions(engine, sid)[1:] == [
            ("running", "standby", "explicit"), ("standby", "running", "request"),
            ("running", "hibernated", "explicit"), ("hibernated", "running", "request")]

    run(body)


# --- operations in the wrong state ---------------------------------------------------------
def test_a_wrong_state_operation_answers_the_uniform_409_and_changes_nothing(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        await engine.hibernate(sid)
        before = transitions(engine, sid)
        with pytest.raises(Conflict) as e:
            await engine.to_standby(sid)
        assert e.value.status == 409
        assert e.value.message == ("cannot put into standby a sandbox in state hibernated "
                                   "(resume it first)")
        assert e.value.extra == {"sandbox_id": sid, "state": "hibernated"}
        assert engine.get(sid).state == State.HIBERNATED
        assert transitions(engine, sid) == before

        # asked again for the state it is in: nothing to do, nothing recorded
        assert (await engine.hibernate(sid)).state == State.HIBERNATED
        await engine.resume(sid)
        await engine.to_standby(sid)
        n = len(engine.events(sid))
        assert (await engine.to_standby(sid)).state == State.STANDBY
        assert len(engine.events(sid)) == n

        crashed = (await engine.create()).id
        crash(engine, crashed)
        await until(lambda: engine.get(crashed).state == State.FAILED, "the crash noticed")
        for op, action in ((engine.to_standby, "put into standby"),
                           (engine.hibernate, "hibernate")):
            with pytest.raises(Conflict) as e:
                await op(crashed)
            assert e.value.message == f"cannot {action} a sandbox in state failed"

    run(body)


def test_a_deleted_sandbox_is_gone_for_every_operation(run):
    async def body(engine: Engine) -> None:
        ids = [(await engine.create()).id for _ in range(3)]
        await engine.to_standby(ids[1])
        await engine.hibernate(ids[2])
        for sid in ids:
            state = engine.get(sid).state
            await engine.delete(sid)
            assert engine.records.find(sid).state == "deleted"
            assert transitions(engine, sid)[-1] == (state, "deleted", "explicit")
            assert calls(engine, sid)[-1] == "destroy"
            assert fake(engine).leftovers(sid) == []  # agent, disk and image alike
            for op in (engine.to_standby, engine.hibernate, engine.resume, engine.client,
                       engine.delete):
                with pytest.raises(NotFound, match=f"no sandbox {sid}"):
                    await op(sid)
            for sync_op in (engine.get, engine.events, engine.usage):
                with pytest.raises(NotFound):
                    sync_op(sid)
            with pytest.raises(NotFound):
                await engine.hold(sid, 10)
        assert engine.list() == []
        assert sorted(s.id for s in engine.list(state="deleted")) == sorted(ids)

    run(body)


# --- failures ------------------------------------------------------------------------------
def test_a_failed_checkpoint_leaves_the_sandbox_as_it_was(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        fake(engine).fail_next("checkpoint", "no space left on device")
        with pytest.raises(Unavailable) as e:
            await engine.hibernate(sid)
        assert e.value.status == 503
        assert f"sandbox {sid} could not hibernate and stays running" in e.value.message
        assert "no space left on device" in e.value.message
        assert engine.get(sid).state == State.RUNNING
        assert engine.records.find(sid).state == "running"
        assert transitions(engine, sid) == [("creating", "running", "created")]
        failed = engine.events(sid)[-1]
        assert (failed.kind, failed.from_state, failed.to_state, failed.reason) == (
            "hibernate_failed", "running", "running", "explicit")
        assert "no space left on device" in failed.detail["error"]
        assert fake(engine).leftovers(sid) == running_agent(sid)
        await answers(engine, sid)  # its channel survived the attempt

        assert (await engine.hibernate(sid)).state == State.HIBERNATED  # and it can again

    run(body)


def test_a_failed_restore_fails_the_sandbox_and_keeps_its_image(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        await engine.hibernate(sid)
        fake(engine).fail_next("restore", "image corrupt")
        with pytest.raises(Unavailable, match=f"sandbox {sid} could not be resumed: .*"
                                              "image corrupt"):
            await engine.resume(sid)
        info = engine.get(sid)
        assert info.state == State.FAILED
        assert info.reason.startswith("could not resume from hibernation: ")
        assert "image corrupt" in info.reason
        assert transitions(engine, sid)[-1] == ("hibernated", "failed", "restore_failed")
        assert engine.events(sid)[-1].detail["message"] == info.reason
        assert "drop_image" not in calls(engine, sid)
        assert fake(engine).leftovers(sid) == [f"fake disk of {sid}", f"fake image of {sid}"]

        with pytest.raises(Unavailable) as e:
            await engine.client(sid)
        assert e.value.status == 503
        assert e.value.message == (f"sandbox {sid} has failed: {info.reason}. Delete it and "
                                   "create a new one")

        await engine.delete(sid)
        assert fake(engine).leftovers(sid) == []

    run(body)


def test_a_failed_start_answers_503_and_leaves_a_failed_record_and_nothing_else(run):
    async def body(engine: Engine) -> None:
        fake(engine).fail_next("start", "runsc said no")
        with pytest.raises(Unavailable) as e:
            await engine.create()
        assert e.value.status == 503
        assert "could not start" in e.value.message and "runsc said no" in e.value.message
        [info] = engine.list(state="failed")
        sid = info.id
        assert e.value.extra == {"sandbox_id": sid}
        assert info.reason.startswith("could not start: ") and "runsc said no" in info.reason
        assert transitions(engine, sid) == [("creating", "failed", "start_failed")]
        assert calls(engine, sid) == ["start", "destroy"]
        assert fake(engine).leftovers(sid) == []

        assert (await engine.create()).state == State.RUNNING  # one failure, not a broken driver

    run(body)


def test_what_the_driver_cannot_checkpoint_is_refused_with_why(run):
    async def body(engine: Engine) -> None:
        driver = fake(engine)
        why = driver.checkpoint_refusal(DELETED_FILE)
        sid = (await engine.create()).id
        driver.set_problems(sid, [DELETED_FILE])
        for state in (State.RUNNING, State.STANDBY):
            if state == State.STANDBY:
                await engine.to_standby(sid)
            before = transitions(engine, sid)
            with pytest.raises(Conflict) as e:
                await engine.hibernate(sid)
            assert e.value.status == 409
            assert e.value.message == (f"sandbox {sid} cannot hibernate: {why}; the sandbox "
                                       f"stays {state}")
            assert e.value.extra["problems"] == [DELETED_FILE]
            assert engine.get(sid).state == state
            assert transitions(engine, sid) == before
            refused = engine.events(sid)[-1]
            assert (refused.kind, refused.from_state, refused.to_state) == (
                "hibernate_refused", state, state)
            assert refused.detail == {"problems": [DELETED_FILE]}
        assert "checkpoint" not in calls(engine, sid)
        # refused in standby: thawed for the check, frozen again after it
        assert calls(engine, sid)[-3:] == ["freeze", "thaw", "freeze"]
        assert driver.leftovers(sid) == running_agent(sid, frozen=True)

        # what this driver can save (sockets under epoll, unlike runsc) does not refuse
        driver.set_problems(sid, [{"kind": "epoll_socket", "pid": 7, "fds": [4],
                                   "cmdline": "python3 app.py"}])
        assert (await engine.hibernate(sid)).state == State.HIBERNATED

    run(body)


@pytest.mark.parametrize("oom_kills,reason,said", [
    (0, "crashed", "the sandbox stopped unexpectedly"),
    (1, "oom", "out of memory: the sandbox used more than its limit"),
])
def test_an_agent_that_goes_away_while_running_fails_the_sandbox(run, oom_kills, reason,
                                                                  said):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        if oom_kills:
            fake(engine).set_usage(sid, oom_kills=oom_kills)
        crash(engine, sid)
        await until(lambda: engine.get(sid).state == State.FAILED, "the crash noticed")
        info = engine.get(sid)
        assert info.reason.startswith(said)
        assert transitions(engine, sid)[-1] == ("running", "failed", reason)
        # the engine stops what is left of it and keeps its disk for inspection
        await until(lambda: calls(engine, sid)[-1:] == ["stop"], "the failed sandbox stopped")
        assert fake(engine).leftovers(sid) == [f"fake disk of {sid}"]
        with pytest.raises(Unavailable, match=f"sandbox {sid} has failed"):
            await engine.client(sid)

        await engine.delete(sid)
        assert transitions(engine, sid)[-1] == ("failed", "deleted", "explicit")
        assert fake(engine).leftovers(sid) == []

    run(body)


# --- timers and the bug guard ---------------------------------------------------------------
def test_idle_timers_park_a_sandbox_by_themselves(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create(standby_after=0.2, hibernate_after=0.2)).id
        await until(lambda: engine.get(sid).state == State.STANDBY, "standby when idle")
        await until(lambda: engine.get(sid).state == State.HIBERNATED, "hibernated when idle")
        assert transitions(engine, sid) == [
            ("creating", "running", "created"), ("running", "standby", "idle"),
            ("standby", "hibernated", "idle")]
        assert calls(engine, sid) == ["start", "freeze", "thaw", "checkpoint"]

    run(body)


def test_an_illegal_transition_written_directly_is_refused_as_a_bug(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        with pytest.raises(IllegalTransition, match=f"sandbox {sid}: running -> creating"):
            engine.records.set_state(sid, State.CREATING, None, "bug")
        assert engine.get(sid).state == State.RUNNING
        assert engine.records.find(sid).state == "running"
        assert transitions(engine, sid) == [("creating", "running", "created")]

    run(body)
def test_a_failed_checkpoint_leaves_a_standby_sandbox_frozen(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        await engine.to_standby(sid)
        fake(engine).fail_next("checkpoint", "no space left on device")
        with pytest.raises(Unavailable, match=f"sandbox {sid} could not hibernate and "
                                              "stays standby"):
            await engine.hibernate(sid)
        assert engine.get(sid).state == State.STANDBY
        assert calls(engine, sid)[-3:] == ["thaw", "checkpoint", "freeze"]
        assert fake(engine).leftovers(sid) == running_agent(sid, frozen=True)

    run(body)


def test_a_doors_state_is_kept_per_door_merged_and_survives_a_restart(run):
    async def body(engine: Engine) -> None:
        sid = (await engine.create()).id
        assert engine.door_state(sid, "e2b") == {}
        engine.set_door_state(sid, "e2b", token="t1", paused=True)
        engine.set_door_state(sid, "mcp", session="s")
        assert engine.set_door_state(sid, "e2b", paused=None, auto_resume=False) == {
            "token": "t1", "auto_resume": False}
        assert engine.door_state(sid, "mcp") == {"session": "s"}
        # a fresh record layer reads it back from the database
        engine.records.forget(sid)
        assert engine.door_state(sid, "e2b") == {"token": "t1", "auto_resume": False}
        with pytest.raises(NotFound):
            engine.door_state("nosuchsandbox", "e2b")

    run(body)
