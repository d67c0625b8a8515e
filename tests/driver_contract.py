"""The driver contract: what the engine relies on of every driver, checked the same way
for each (`tests/unit/test_driver_contract.py` runs it on the fake driver,
`tests/integration/test_driver_contract.py` on gVisor).

Each check is `async def check_...(h: Harness)`: it starts its own sandboxes, removes
them, and ends by asserting that nothing of them is left on the host.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from torpor.channel import Channel
from torpor.runtime.base import Driver, DriverError, Limits, Load, SandboxSpec, Usage
from torpor.templates import Template

FROZEN_PING = 1.0  # seconds a ping to a frozen sandbox waits before it counts as unanswered
SETTLE = 10.0  # seconds a closing channel may take to report it


@dataclass
class Harness:
    driver: Driver
    template: Template
    # arrange for the next start of the returned spec to fail, as the driver's real failures
    # do (the fake: fail_next; gVisor: a template runsc cannot build a container from)
    failing_spec: Callable[[Harness], SandboxSpec]
    host_disk: bool = False  # disk_bytes are the host's, so a started sandbox has some

    def spec(self, template: Template | None = None) -> SandboxSpec:
        # unique, short (socket paths) and recognisable among other tests' sandboxes
        return SandboxSpec(id=f"dc{uuid.uuid4().hex[:10]}", template=template or self.template,
                           cpu=1, memory_mb=256, disk_mb=256)

    def assert_clean(self, spec: SandboxSpec) -> None:
        self.driver.reap()
        assert self.driver.leftovers(spec.id) == []


async def closed(chan: Channel) -> None:
    await asyncio.wait_for(chan.closed.wait(), SETTLE)
    await chan.close()


async def echo(chan: Channel, word: str) -> tuple[bytes, dict]:
    st = chan.open("exec", argv=["echo", word])
    out = b"".join([e.data async for e in st if e.kind == "stdout"])
    return out, await st.finish()


async def check_is_a_driver(h: Harness) -> None:
    d = h.driver
    assert isinstance(d, Driver)
    assert d.describe()["driver"] == d.name
    assert isinstance(d.checkpoint_blockers, frozenset)
    why = d.checkpoint_refusal({"kind": "deleted_file", "pid": 7, "fd": 3, "path": "/x",
                                "cmdline": "python3 app.py"})
    assert isinstance(why, str) and "7" in why
    d.reap()


async def check_start_freeze_thaw(h: Harness) -> None:
    d, spec = h.driver, h.spec()
    try:
        chan = await d.start(spec)
        assert chan.hello is not None  # it said HELLO
        await chan.ping(timeout=5)
        assert (await chan.call("ping"))["pid"] == 1  # the sandbox's first process
        out, info = await echo(chan, "contract")
        assert out == b"contract\n" and info["exit_code"] == 0 and not info["running"]
        limits, load, usage = d.limits(spec), d.load(spec), d.usage(spec)
        assert isinstance(limits, Limits) and limits.soft_memory_bytes >= 256 << 20
        assert limits.tasks >= spec.pids
        assert isinstance(load, Load) and isinstance(usage, Usage)
        assert isinstance(usage.oom_kills, int) and usage.oom_kills == 0
        assert isinstance(d.memory_in_use(spec), int | None)
        fd = d.memory_alert(spec, 200 << 20)
        assert fd is None or isinstance(fd, int)
        if fd is not None:
            os.close(fd)
        assert (d.disk_bytes(spec) > 0) if h.host_disk else d.disk_bytes(spec) >= 0

        await asyncio.to_thread(d.freeze, spec, True)  # as the engine calls it
        with pytest.raises(TimeoutError):
            await chan.ping(timeout=FROZEN_PING)
        d.freeze(spec, False)  # and this on the event loop
        await chan.ping(timeout=5)
        d.freeze(spec, False)  # thawing a running sandbox changes nothing
        assert (await echo(chan, "again"))[0] == b"again\n"
    finally:
        await d.destroy(spec)
    h.assert_clean(spec)


async def check_checkpoint_and_restore(h: Harness) -> None:
    d, spec = h.driver, h.spec()
    try:
        chan = await d.start(spec)
        await chan.call("configure", env={"CONTRACT": "kept"})
        await asyncio.to_thread(d.freeze, spec, True)  # from standby, the common way
        figures = await d.checkpoint(spec)
        assert isinstance(figures, dict) and figures["seconds"] >= 0
        assert figures["image_bytes"] > 0
        await closed(chan)  # the sandbox stopped
        with_image = d.disk_bytes(spec)
        assert with_image >= figures["image_bytes"]
        await asyncio.to_thread(d.release, spec)  # nothing of it is held: harmless

        chan = await d.restore(spec)
        await chan.ping(timeout=5)
        assert (await chan.call("configure"))["env"] == {"CONTRACT": "kept"}  # its memory
        await chan.call("resumed")
        d.drop_image(spec.id)
        assert d.disk_bytes(spec) < with_image
        with pytest.raises(DriverError):  # no image: refused, and the sandbox runs on
            await d.restore(spec)
        assert (await echo(chan, "restored"))[0] == b"restored\n"

        figures = await d.checkpoint(spec)  # again, this time from running
        await closed(chan)
        chan = await d.restore(spec)
        assert (await chan.call("configure"))["env"] == {"CONTRACT": "kept"}
        d.drop_image(spec.id)
    finally:
        await d.destroy(spec)
    h.assert_clean(spec)


async def check_adopt(h: Harness) -> None:
    d, spec = h.driver, h.spec()
    try:
        first = await d.start(spec)
        second = await d.adopt(spec)  # as a restarted server does
        await second.ping(timeout=5)
        await closed(first)  # one server at a time
        await asyncio.to_thread(d.freeze, spec, True)
        third = await d.adopt(spec, ping=False)  # a frozen one cannot answer
        await closed(second)
        with pytest.raises(TimeoutError):
            await third.ping(timeout=FROZEN_PING)
        d.freeze(spec, False)
        await third.ping(timeout=5)
        await third.close()
    finally:
        await d.destroy(spec)
    h.assert_clean(spec)
    never = h.spec()
    try:
        with pytest.raises(DriverError):
            await d.adopt(never)
    finally:
        await d.destroy(never)
    h.assert_clean(never)


async def check_stop_keeps_the_disk_until_destroy(h: Harness) -> None:
    d, spec = h.driver, h.spec()
    try:
        chan = await d.start(spec)
        await asyncio.to_thread(d.freeze, spec, True)  # a frozen one must stop too
        await asyncio.to_thread(d.stop, spec)
        await closed(chan)
        assert d.leftovers(spec.id) != []  # its disk, for inspection
        with pytest.raises(DriverError):  # nothing runs to adopt
            await d.adopt(spec)
        await asyncio.to_thread(d.stop, spec)  # stopping a stopped one changes nothing
        await d.destroy(spec)
        await d.destroy(spec)  # idempotent
    finally:
        await d.destroy(spec)
    h.assert_clean(spec)


async def check_start_failure(h: Harness) -> None:
    d = h.driver
    spec = h.failing_spec(h)
    try:
        with pytest.raises(DriverError):
            await d.start(spec)
    finally:
        await d.destroy(spec)
    h.assert_clean(spec)


CHECKS = [check_is_a_driver, check_start_freeze_thaw, check_checkpoint_and_restore,
          check_adopt, check_stop_keeps_the_disk_until_destroy, check_start_failure]
