"""Sandbox lifecycle through the REST API against real runsc sandboxes."""

from __future__ import annotations

from conftest import run

from torpor.runtime.gvisor import GVisorDriver


def test_create_run_delete_leaves_nothing(server, api):
    r = api.post("/v1/sandboxes", json={"metadata": {"team": "lifecycle"}, "env": {"A": "1"},
                                        "cpu": 0.5, "memory_mb": 300, "disk_mb": 256})
    assert r.status_code == 201, r.text
    sb = r.json()
    sid = sb["id"]
    assert sb["state"] == "running"
    assert (sb["cpu"], sb["memory_mb"], sb["disk_mb"]) == (0.5, 300, 256)
    out = run(api, sid, "echo $A; hostname")
    assert out["stdout"].split() == ["1", "sandbox"]
    listed = api.get("/v1/sandboxes", params={"metadata.team": "lifecycle"}).json()
    assert [s["id"] for s in listed] == [sid]
    assert api.get("/v1/sandboxes", params={"metadata.team": "other"}).json() == []
    assert api.get("/v1/sandboxes", params={"state": "running"}).status_code == 200

    # the limits are really applied to the sandbox's cgroup
    driver = GVisorDriver(server.data_dir)
    cg = driver.cgroup(sid)
    assert cg.exists()

    assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert api.get(f"/v1/sandboxes/{sid}").status_code == 404
    assert api.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "true"}).status_code == 404
    assert api.delete(f"/v1/sandboxes/{sid}").status_code == 404
    assert driver.leftovers(sid) == []


def test_each_sandbox_has_its_own_namespaces(api, sandbox):
    ps = run(api, sandbox, "ls /proc | grep -E '^[0-9]+$' | wc -l")
    # the agent, the shell, ls and grep: host processes are not visible
    assert int(ps["stdout"]) < 10
    assert run(api, sandbox, "cat /proc/1/cmdline | tr '\\0' ' '")["stdout"].find("agent") >= 0


def test_files_survive_their_processes(api, sandbox):
    run(api, sandbox, "echo kept > /home/user/note; sleep 0.1")
    assert run(api, sandbox, "cat /home/user/note")["stdout"] == "kept\n"


def test_usr_is_writable_in_the_sandbox_only(api, sandbox):
    out = run(api, sandbox, "echo mine > /usr/local/bin/tool && cat /usr/local/bin/tool",
              user="root")
    assert out["stdout"] == "mine\n"
    from pathlib import Path

    assert not Path("/usr/local/bin/tool").exists() or \
        Path("/usr/local/bin/tool").read_text() != "mine\n"


def test_events_record_state_changes(api, sandbox):
    events = api.get(f"/v1/sandboxes/{sandbox}/events").json()
    assert any(e["to_state"] == "running" for e in events)


def test_templates_listed(api):
    names = [t["name"] for t in api.get("/v1/templates").json()]
    assert "base" in names


def test_warm_pool_hands_out_configured_sandboxes(api):
    # default resources are served from the pool when it has one ready
    r = api.post("/v1/sandboxes", json={"env": {"FROM_POOL": "yes"}})
    sid = r.json()["id"]
    try:
        assert run(api, sid, "echo $FROM_POOL")["stdout"] == "yes\n"
        assert r.json()["env"] == {"FROM_POOL": "yes"}
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
