"""The server can die at any moment: no record is lost, sandboxes keep running under their
holders and the next server adopts them; what cannot be adopted is marked failed."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import Server, make_data_dir, run, teardown_data_dir, wait_for


@pytest.fixture
def own_server():
    srv = Server(make_data_dir(), pool_size=0).start()
    yield srv
    teardown_data_dir(srv)


def test_sigkill_then_restart_adopts_running_sandboxes(own_server):
    srv = own_server
    with srv.client() as c:
        sid = c.post("/v1/sandboxes", json={"metadata": {"k": "v"}}).json()["id"]
        doomed = c.post("/v1/sandboxes", json={}).json()["id"]
        run(c, sid, "echo 42 > /home/user/state")
        pid = c.post(f"/v1/sandboxes/{sid}/commands",
                     json={"cmd": "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; "
                                  "sleep 0.1; done", "background": True}).json()["pid"]
    srv.stop(signal.SIGKILL)

    # while the server is down, one sandbox loses its holder: it cannot be adopted
    status = json.loads((srv.data_dir / "sandboxes" / doomed / "status.json").read_text())
    os.kill(status["holder_pid"], signal.SIGKILL)

    srv.start()
    with srv.client() as c:
        info = c.get(f"/v1/sandboxes/{sid}").json()
        assert info["state"] == "running" and info["metadata"] == {"k": "v"}
        procs = c.get(f"/v1/sandboxes/{sid}/processes").json()
        assert any(p["pid"] == pid and p["running"] for p in procs)
        first = int(run(c, sid, "cat /tmp/count")["stdout"])
        assert run(c, sid, "cat /home/user/state")["stdout"] == "42\n"
        import time

        time.sleep(0.5)
        assert int(run(c, sid, "cat /tmp/count")["stdout"]) > first

        bad = c.get(f"/v1/sandboxes/{doomed}").json()
        assert bad["state"] == "failed" and "holder" in bad["reason"]
        r = c.post(f"/v1/sandboxes/{doomed}/commands", json={"cmd": "true"})
        assert r.status_code == 503 and "failed" in r.json()["error"]["message"]
        # a failed sandbox can still be deleted, and then nothing of it remains
        assert c.delete(f"/v1/sandboxes/{doomed}").status_code == 204


def test_sigterm_then_restart(own_server):
    srv = own_server
    with srv.client() as c:
        sid = c.post("/v1/sandboxes", json={}).json()["id"]
        run(c, sid, "echo before > /tmp/x")
    srv.stop(signal.SIGTERM)
    # uvicorn exits by re-raising the signal once its shutdown (the hibernation) is done
    assert srv.proc.returncode in (0, -signal.SIGTERM)
    srv.start()
    with srv.client() as c:
        # a graceful stop hibernated it; the first request brings it back
        assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "hibernated"
        assert run(c, sid, "cat /tmp/x")["stdout"] == "before\n"
        reasons = [e["reason"] for e in c.get(f"/v1/sandboxes/{sid}/events").json()]
        assert "shutdown" in reasons and "request" in reasons


def test_sandbox_that_dies_is_marked_failed_not_lost(own_server):
    srv = own_server
    with srv.client() as c:
        sid = c.post("/v1/sandboxes", json={}).json()["id"]
        # kill the sandbox's sentry from the host, as a crash would
        os.system(f"runsc --root {srv.data_dir}/runsc kill {sid} KILL >/dev/null 2>&1")
        import time

        for _ in range(100):
            info = c.get(f"/v1/sandboxes/{sid}").json()
            if info["state"] == "failed":
                break
            time.sleep(0.1)
        assert info["state"] == "failed" and info["reason"]


def _left_behind(data_dir) -> tuple[list[str], list[str]]:
    """Processes whose command line or working directory names the data dir (runsc's
    sandbox and gofer, holders), and mounts below it."""
    root = str(data_dir)
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if root in cmd or cwd.startswith(root):
            procs.append(f"{pid}: {cmd[:120]}")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if root in line.split()[4]]
    return procs, mounts


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_graceful_stop_leaves_no_pool_sandbox_behind(sig):
    """Regression: SIGTERM, or Ctrl-C on `make serve`, left the warm pool running (2 runsc
    sandboxes, 2 gofers, 2 holders and their mounts per data dir)."""
    srv = Server(make_data_dir(), pool_size=2)
    try:
        srv.start()
        wait_for(lambda: len(_pool_ids(srv)) == 2, timeout=60)
        assert _left_behind(srv.data_dir)[0], "the pool's processes are visible while it runs"
        srv.stop(sig)
        assert srv.proc.returncode in (0, -sig)
        wait_for(lambda: _left_behind(srv.data_dir) == ([], []), timeout=10)
        # the next start boots a fresh pool and hands it out as before
        srv.start()
        with srv.client() as c:
            sid = c.post("/v1/sandboxes", json={}).json()["id"]
            assert run(c, sid, "echo ok")["stdout"] == "ok\n"
    finally:
        teardown_data_dir(srv)


def _pool_ids(srv) -> list[str]:
    """Pool sandboxes that run: the directories of sandboxes whose holder says running."""
    out = []
    for d in (srv.data_dir / "sandboxes").glob("*"):
        try:
            status = json.loads((d / "status.json").read_text())
        except (OSError, ValueError):
            continue
        if status.get("state") == "running":
            out.append(d.name)
    return out


def test_start_up_output_is_what_an_operator_needs(own_server):
    # Alembic's INFO lines (a dozen per start: plugins set up, migration checks) are gone;
    # what the operator needs stays
    log = own_server.log.read_text()
    assert "alembic" not in log
    assert "Torpor listening on" in log and "admin API key" in log


def test_purge_stops_a_sandbox_in_standby():
    """Regression: `runsc delete --force` waits forever for a frozen sandbox, so purge (the
    operator's last resort, and every test's teardown) hung on a server killed with a
    sandbox in standby."""
    import subprocess
    import sys

    srv = Server(make_data_dir(), pool_size=0)
    try:
        srv.start()
        with srv.client() as c:
            sid = c.post("/v1/sandboxes", json={}).json()["id"]
            assert c.post(f"/v1/sandboxes/{sid}/standby").json()["state"] == "standby"
        srv.stop(signal.SIGKILL)
        # in a child process, so a hang fails this test instead of the suite's teardown
        code = ("import sys; from torpor.runtime.gvisor import purge; "
                "print(purge(sys.argv[1]))")
        p = subprocess.run([sys.executable, "-c", code, str(srv.data_dir)], timeout=60,
                           capture_output=True, text=True, check=True)
        assert f"thawed {sid}" in p.stdout
        assert _left_behind(srv.data_dir) == ([], [])
    finally:
        teardown_data_dir(srv)
