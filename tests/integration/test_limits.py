"""Resource limits: memory (the offender dies, the sandbox lives), CPU, pids."""

from __future__ import annotations

import time

from conftest import run

from torpor.runtime.gvisor import GVisorDriver


def test_memory_hog_is_killed_and_sandbox_lives(api):
    sid = api.post("/v1/sandboxes", json={"memory_mb": 256}).json()["id"]
    try:
        hog = ("python3 -c \"import time\nchunks=[]\nfor i in range(200):\n"
               "  chunks.append(bytearray(16<<20)); time.sleep(0.02)\"")
        out = run(api, sid, hog, timeout=120)
        assert out["exit_code"] == 137
        out = run(api, sid, "python3 -c 'x = bytearray(1 << 30)'", timeout=120)
        assert out["exit_code"] == 137
        assert run(api, sid, "echo alive")["stdout"] == "alive\n"
        info = api.get(f"/v1/sandboxes/{sid}").json()
        assert info["state"] == "running"
        events = api.get(f"/v1/sandboxes/{sid}/events").json()
        kills = [e for e in events if e["kind"] == "oom_kill"]
        assert kills and kills[0]["detail"]["limit_mb"] == 256
        assert "python3" in kills[0]["detail"]["cmdline"]
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_cpu_and_pids_limits_reach_the_cgroup(server, api):
    sid = api.post("/v1/sandboxes", json={"cpu": 0.5}).json()["id"]
    try:
        cg = GVisorDriver(server.data_dir).cgroup(sid)
        if cg.v2:
            quota, period = (cg._path("cpu") / "cpu.max").read_text().split()
        else:
            quota = (cg._path("cpu") / "cpu.cfs_quota_us").read_text().strip()
            period = (cg._path("cpu") / "cpu.cfs_period_us").read_text().strip()
        assert int(quota) / int(period) == 0.5
        pids = (cg._path("pids") / "pids.max").read_text().strip()
        assert pids.isdigit() and int(pids) > 0
        # a busy loop gets about half a core
        t0 = cg.cpu_seconds()
        run(api, sid, "timeout 2 sh -c 'while :; do :; done'; true", timeout=30)
        used = cg.cpu_seconds() - t0
        assert used < 1.6, f"used {used:.2f} CPU seconds in 2 s with cpu=0.5"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_fork_bomb_is_contained(server, api):
    """A fork bomb grows faster than anything inside gVisor's ptrace platform can stop it
    (the agent gets no CPU among thousands of tasks): its sandbox may die, reported as
    failed with the reason, but the host and the neighbours do not notice."""
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        api.post(f"/v1/sandboxes/{sid}/commands", timeout=60,
                 json={"cmd": "bomb() { bomb | bomb & }; (bomb) >/dev/null 2>&1 & sleep 10",
                       "timeout": 30})
        assert run(api, other, "echo fine")["stdout"] == "fine\n"
        info = api.get(f"/v1/sandboxes/{sid}").json()
        if info["state"] == "failed":
            assert "memory" in info["reason"] or "stopped" in info["reason"]
        else:
            assert info["state"] == "running"
        cg = GVisorDriver(server.data_dir).cgroup(sid)
        if cg.exists():
            cur, limit = cg.pids()
            assert cur <= limit
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        api.delete(f"/v1/sandboxes/{other}")


def test_runaway_process_count_is_stopped_and_sandbox_lives(api):
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        # ~500 processes cost the host ~5000 threads: past 40% of the sandbox's limit
        api.post(f"/v1/sandboxes/{sid}/commands", timeout=120,
                 json={"cmd": "for i in $(seq 600); do sleep 1000 & sleep 0.01; done",
                       "timeout": 90})
        deadline = time.monotonic() + 30
        kills = []
        while time.monotonic() < deadline and not kills:
            events = api.get(f"/v1/sandboxes/{sid}/events").json()
            kills = [e for e in events if e["kind"] == "pids_kill"]
            time.sleep(0.5)
        assert kills and kills[0]["detail"]["processes"] >= 100
        assert run(api, sid, "echo alive")["stdout"] == "alive\n"
        assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_the_kernel_tells_the_watchdog_when_memory_crosses_the_soft_limit(server, api):
    """The watchdog does not wait for its 100 ms tick when memory climbs: the cgroup's
    threshold notification (cgroup v1) wakes it. Here the same kind of notification is
    registered on a sandbox's cgroup and must fire once the sandbox's memory passes it."""
    import os
    import select

    sid = api.post("/v1/sandboxes", json={"memory_mb": 256}).json()["id"]
    try:
        cg = GVisorDriver(server.data_dir).cgroup(sid)
        threshold = (cg.memory_charged() or 0) + (64 << 20)
        fd = cg.memory_alert(threshold)
        if fd is None:
            assert cg.v2  # only cgroup v2 has no threshold notification
            return
        try:
            assert select.select([fd], [], [], 0)[0] == []  # nothing crossed yet
            api.post(f"/v1/sandboxes/{sid}/commands", json={
                "cmd": "python3 -c 'import time; x = bytearray(100 << 20); time.sleep(30)'",
                "background": True})
            assert select.select([fd], [], [], 30)[0] == [fd], "no notification"
            assert os.eventfd_read(fd) >= 1
        finally:
            os.close(fd)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
