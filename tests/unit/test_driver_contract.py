"""The fake driver keeps the driver contract (tests/driver_contract.py), and its own knobs
(figures, problems, injected failures) do what engine tests rely on; `driver_for` picks
drivers by the `driver` setting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from driver_contract import CHECKS, Harness, closed

from torpor.channel import AgentError
from torpor.config import Settings
from torpor.runtime import driver_for
from torpor.runtime.base import DriverError, Limits, Load, Usage
from torpor.runtime.fake import FakeDriver
from torpor.templates import Template


def failing_spec(h: Harness):
    h.driver.fail_next("start", "runsc said no")
    return h.spec()


def harness(driver: FakeDriver | None = None) -> Harness:
    # never read: the fake builds nothing from a template
    template = Template(name="base", path=Path("/nonexistent/templates/base"))
    return Harness(driver or FakeDriver(), template, failing_spec)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_fake_driver_keeps_the_contract(check):
    asyncio.run(check(harness()))


def test_the_fake_agent_answers_as_the_agent_does():
    async def main():
        h = harness()
        spec = h.spec()
        chan = await h.driver.start(spec)
        st = chan.open("exec", argv=["/bin/sh", "-c", "echo 'two words'"])
        events = [e async for e in st]
        info = await st.finish()
        assert events[0].msg == {"event": "start", "pid": info["pid"]}
        assert events[1].data == b"two words\n" and info["exit_code"] == 0
        st = chan.open("exec", argv=["ls", "/"])
        err = b"".join([e.data async for e in st if e.kind == "stderr"])
        assert (await st.finish())["exit_code"] == 127 and b"ls" in err
        assert [p["pid"] for p in await chan.call("proc_list")] == [info["pid"], info["pid"] + 1]
        assert (await chan.call("proc_info", pid=info["pid"]))["exit_code"] == 0
        with pytest.raises(AgentError) as e:
            await chan.call("proc_info", pid=999)
        assert e.value.code == "no_such_process"
        background = await chan.call("exec", argv=["echo"], background=True, tag="t")
        assert background["tag"] == "t" and background["exit_code"] == 0
        assert await chan.call("oom_kill") == {"killed": None}
        assert await chan.call("pids_kill") == {"killed": None}
        assert await chan.call("resumed") == {}
        with pytest.raises(AgentError) as e:
            await chan.call("fs_read", path="/etc/hostname")
        assert e.value.code == "unknown_op" and "'fs_read'" in e.value.message
        with pytest.raises(AgentError) as e:
            await chan.call("exec", argv=[])
        assert e.value.code == "bad_request"
        await h.driver.destroy(spec)

    asyncio.run(main())


def test_hibernate_check_problems_are_the_tests_to_set():
    async def main():
        d = FakeDriver()
        spec = harness(d).spec()
        chan = await d.start(spec)
        assert await chan.call("hibernate_check") == {"problems": []}
        problem = {"kind": "deleted_file", "pid": 9, "fd": 4, "path": "/home/user/x",
                   "cmdline": "python3 app.py"}
        d.set_problems(spec.id, [problem])
        assert await chan.call("hibernate_check") == {"problems": [problem]}
        assert "deleted_file" in d.checkpoint_blockers
        assert "python3 app.py" in d.checkpoint_refusal(problem)
        await d.destroy(spec)
        with pytest.raises(ValueError, match="not running"):
            d.set_problems(spec.id, [])

    asyncio.run(main())


def test_figures_are_the_tests_to_set():
    async def main():
        d = FakeDriver()
        spec = harness(d).spec()
        assert d.usage(spec) == Usage(None, None, 0) and d.load(spec) == Load(None, None)
        await d.start(spec)
        assert d.usage(spec) == Usage(0.0, 0, 0) and d.disk_bytes(spec) == 0
        assert d.limits(spec) == Limits(256 << 20, spec.pids)
        d.set_usage(spec.id, cpu_seconds=1.5, memory_bytes=300 << 20, oom_kills=2)
        d.set_load(spec.id, tasks=40, memory_charged=310 << 20)
        d.set_limits(spec.id, soft_memory_bytes=100 << 20, tasks=64)
        d.set_disk(spec.id, 5 << 20)
        assert d.usage(spec) == Usage(1.5, 300 << 20, 2)
        assert d.memory_in_use(spec) == 300 << 20
        assert d.load(spec) == Load(40, 310 << 20)
        assert d.limits(spec) == Limits(100 << 20, 64)
        assert d.memory_alert(spec, 1 << 20) is None
        figures = await d.checkpoint(spec)
        assert d.disk_bytes(spec) == (5 << 20) + figures["image_bytes"]
        await d.destroy(spec)  # and the figures go with it
        assert d.usage(spec) == Usage(None, None, 0) and d.disk_bytes(spec) == 0

    asyncio.run(main())


def test_injected_failures_leave_the_sandbox_as_the_real_driver_does():
    async def main():
        d = FakeDriver()
        spec = harness(d).spec()
        chan = await d.start(spec)
        d.freeze(spec, True)
        d.fail_next("checkpoint", "disk full")
        with pytest.raises(DriverError, match=f"{spec.id}.*disk full"):
            await d.checkpoint(spec)
        assert d.leftovers(spec.id) == [f"fake agent of {spec.id} (frozen)",
                                        f"fake disk of {spec.id}"]  # still in standby
        d.freeze(spec, False)
        await chan.ping(timeout=5)
        await d.checkpoint(spec)
        await closed(chan)
        d.fail_next("restore", "image corrupt")
        with pytest.raises(DriverError, match="image corrupt"):
            await d.restore(spec)
        assert d.leftovers(spec.id) == [f"fake disk of {spec.id}", f"fake image of {spec.id}"]
        chan = await d.restore(spec)  # once only: the image was kept
        await chan.ping(timeout=5)
        with pytest.raises(DriverError, match="already running"):
            await d.start(spec)
        with pytest.raises(ValueError, match="start, checkpoint, restore"):
            d.fail_next("freeze")
        await d.destroy(spec)
        assert [op for op, sid in d.calls if sid == spec.id] == [
            "start", "freeze", "checkpoint", "thaw", "checkpoint", "restore", "restore",
            "start", "destroy"]

    asyncio.run(main())


def test_a_fake_sandbox_lives_with_its_driver_and_event_loop():
    d = FakeDriver()
    spec = harness(d).spec()

    async def start():
        chan = await d.start(spec)
        await chan.close()  # the "server" goes; the sandbox runs on
        chan = await d.adopt(spec)  # a new one finds it
        await chan.close()

    async def adopt(driver):
        with pytest.raises(DriverError, match="no fake holder"):
            await driver.adopt(spec)

    async def main():
        await start()
        await adopt(FakeDriver())  # another driver knows nothing of it
        d.close()
        await d.adopt(spec)  # closing the driver leaves its sandboxes running
        await d.destroy(spec)

    asyncio.run(main())
    asyncio.run(start())
    asyncio.run(adopt(d))  # its event loop ended, and the sandbox with it
    d.stop(spec)  # (from no loop at all: harmless)


def test_driver_for_picks_by_the_driver_setting(tmp_path):
    assert isinstance(driver_for(Settings(data_dir=tmp_path, driver="fake")), FakeDriver)
    with pytest.raises(ValueError, match=r"unknown driver 'firecracker' \(known: gvisor, "
                                         r"fake\)"):
        driver_for(Settings(data_dir=tmp_path, driver="firecracker"))
    # checked before runsc is looked for
    with pytest.raises(ValueError, match="image_compression must be none or flate, not "
                                         "'zstd'"):
        driver_for(Settings(data_dir=tmp_path, driver="gvisor", image_compression="zstd"))
    f = tmp_path / "torpor.toml"
    f.write_text('driver = "fake"\n')
    assert Settings.from_file(f).driver == "fake"
