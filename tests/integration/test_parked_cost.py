"""A parked sandbox costs the host nothing but its disk: a hibernated one keeps no mount,
loop device or process (and comes back whole), and the server does no work for sandboxes
in standby or hibernated. Real runsc, a real server, a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import Server, make_data_dir, run, teardown_data_dir, wait_for
from sqlalchemy import event

from torpor.config import Settings
from torpor.engine.manager import Engine
from torpor.runtime.cgroups import Cgroup
from torpor.runtime.gvisor import GVisorDriver, purge
from torpor.runtime.layers import Layer
from torpor.templates import TemplateStore

NO_TIMERS = {"standby_after": 0, "hibernate_after": 0}
COUNTER = ("i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done")


def mounts_of(path: Path) -> list[str]:
    """Lines of /proc/self/mountinfo whose mount point or source lies under `path`."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) + "/" in line]


def loops_of(image: Path) -> list[str]:
    """Loop devices backed by `image`."""
    out = []
    for dev in Path("/sys/block").glob("loop*"):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == str(image):
            out.append(dev.name)
    return out


def holder_pid(data_dir: Path, sid: str) -> int:
    import json

    return json.loads((data_dir / "sandboxes" / sid / "status.json").read_text())["holder_pid"]


def state_events(api, sid: str) -> list[tuple[str, str]]:
    return [(e["to_state"], e["reason"]) for e in api.get(f"/v1/sandboxes/{sid}/events").json()
            if e["kind"] == "state"]


def test_hibernated_sandbox_holds_no_mount_loop_or_process(server, api):
    sid = api.post("/v1/sandboxes", json=NO_TIMERS).json()["id"]
    try:
        sdir = server.data_dir / "sandboxes" / sid
        run(api, sid, "echo kept > /home/user/kept.txt")
        pid = api.post(f"/v1/sandboxes/{sid}/commands",
                       json={"cmd": COUNTER, "background": True}).json()["pid"]
        wait_for(lambda: run(api, sid, "cat /tmp/count 2>/dev/null")["stdout"])
        holder = holder_pid(server.data_dir, sid)
        assert mounts_of(sdir) and loops_of(sdir / "disk.img")  # running: mounted

        assert api.post(f"/v1/sandboxes/{sid}/hibernate").status_code == 200
        assert mounts_of(sdir) == []
        assert loops_of(sdir / "disk.img") == []
        # no process of its own: the holder is gone and reaped (not even a zombie), and
        # nothing on the host names the sandbox
        # (the holder waits up to 10 s for runsc's gofer to exit, then the server reaps it
        # within a second: 5 s was not always enough with the whole suite running)
        wait_for(lambda: not os.path.exists(f"/proc/{holder}"), timeout=20, every=0.05)
        assert [x for x in GVisorDriver(server.data_dir).leftovers(sid)
                if x.startswith(("process", "mount", "cgroup"))] == []

        # an explicit resume is recorded as such; files and processes are as they were
        assert api.post(f"/v1/sandboxes/{sid}/resume").json()["state"] == "running"
        assert state_events(api, sid)[-1] == ("running", "explicit")
        assert run(api, sid, "cat /home/user/kept.txt")["stdout"] == "kept\n"
        assert any(p["pid"] == pid and p["running"]
                   for p in api.get(f"/v1/sandboxes/{sid}/processes").json())
        first = int(run(api, sid, "cat /tmp/count")["stdout"])
        wait_for(lambda: int(run(api, sid, "cat /tmp/count")["stdout"]) > first, timeout=5)
        assert mounts_of(sdir) and loops_of(sdir / "disk.img")

        # hibernated again, a request wakes it (reason `request`), written files and all
        run(api, sid, "echo again >> /home/user/kept.txt")
        assert api.post(f"/v1/sandboxes/{sid}/hibernate").status_code == 200
        assert mounts_of(sdir) == []
        assert run(api, sid, "cat /home/user/kept.txt")["stdout"] == "kept\nagain\n"
        assert state_events(api, sid)[-1] == ("running", "request")
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


@pytest.fixture
def own_server():
    srv = Server(make_data_dir(), pool_size=0).start()
    yield srv
    teardown_data_dir(srv)


def test_restart_unmounts_what_a_hibernated_sandbox_left_mounted(own_server):
    srv = own_server
    with srv.client() as c:
        sid = c.post("/v1/sandboxes", json=NO_TIMERS).json()["id"]
        run(c, sid, "echo kept > /home/user/kept.txt")
        assert c.post(f"/v1/sandboxes/{sid}/hibernate").status_code == 200
    srv.stop(signal.SIGKILL)
    # as an older server (or one killed between the checkpoint and the unmount) left it
    sdir = srv.data_dir / "sandboxes" / sid
    Layer(sdir, TemplateStore(srv.data_dir).get("base"), 4096).mount()
    assert mounts_of(sdir)
    srv.start()
    with srv.client() as c:
        assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "hibernated"
        assert mounts_of(sdir) == [] and loops_of(sdir / "disk.img") == []
        assert run(c, sid, "cat /home/user/kept.txt")["stdout"] == "kept\n"


def test_parked_sandboxes_cost_the_server_no_work():
    """With its sandboxes in standby or hibernated, the server reads no cgroup, polls no
    holder and runs no SQL while it idles; once one runs again, it is watched again."""
    data_dir = make_data_dir()
    work: Counter[str] = Counter()

    async def scenario() -> None:
        engine = Engine(Settings(data_dir=data_dir, pool_size=0, preview_port=0,
                                 memory_watermark=0, egress_log_days=0))
        await engine.start()
        try:
            sids = [(await engine.create(**NO_TIMERS)).id for _ in range(3)]
            await engine.to_standby(sids[0])
            await engine.to_standby(sids[1])
            await engine.hibernate(sids[2])
            await asyncio.sleep(0.5)  # the transitions' records are written
            # the hibernated one's holder exits and is reaped, by the server (once a second)
            # or here; either way before the count starts, so its reaping is not counted
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(
                    p.poll() is None for p in list(engine.driver._holders.values())) > 2:
                await asyncio.sleep(0.1)
            work.clear()
            await asyncio.sleep(2.5)  # 25 watchdog rounds, 2 of the idle checks there were
            idle = dict(work)
            await engine.resume(sids[0])
            await asyncio.sleep(0.5)
            assert idle == {}, f"work done for parked sandboxes: {idle}"
            assert work["cgroup reads"] > 0  # a running sandbox is watched
        finally:
            for sid in sids:
                await engine.delete(sid)
            await engine.stop(hibernate=False)

    def count(what):
        def wrap(fn):
            def counted(*a, **kw):
                work[what] += 1
                return fn(*a, **kw)
            return counted
        return wrap

    real_init = Engine.__init__

    def init(self, settings):
        real_init(self, settings)
        event.listen(self.db, "before_cursor_execute",
                     lambda *a: work.update(["SQL statements"]))

    patches = [(Cgroup, "_read_int", count("cgroup reads")),
               (Cgroup, "_read", count("cgroup reads")),
               (subprocess.Popen, "poll", count("holder polls")),
               (Engine, "__init__", lambda _: init)]
    saved = [getattr(cls, name) for cls, name, _ in patches]
    try:
        for (cls, name, wrap), fn in zip(patches, saved, strict=True):
            setattr(cls, name, wrap(fn))
        asyncio.run(scenario())
    finally:
        for (cls, name, _), fn in zip(patches, saved, strict=True):
            setattr(cls, name, fn)
        purge(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_timers_follow_an_update_and_a_wake(api):
    """Timers are deadlines, not a poll: shortening one takes effect at once, and a sandbox
    woken from hibernation (where it had no timer) goes back to standby on its own."""
    sid = api.post("/v1/sandboxes", json={"standby_after": 600, "hibernate_after": 0}).json()["id"]
    try:
        assert api.patch(f"/v1/sandboxes/{sid}", json={"standby_after": 1}).status_code == 200
        wait_for(lambda: api.get(f"/v1/sandboxes/{sid}").json()["state"] == "standby",
                 timeout=10)
        assert api.post(f"/v1/sandboxes/{sid}/hibernate").status_code == 200
        assert run(api, sid, "echo up")["stdout"] == "up\n"  # woken by the request
        wait_for(lambda: api.get(f"/v1/sandboxes/{sid}").json()["state"] == "standby",
                 timeout=10)
        assert state_events(api, sid)[-1] == ("standby", "idle")
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
