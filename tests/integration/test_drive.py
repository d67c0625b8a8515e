"""Drives: one read-write tree in many running sandboxes at once, attached and detached
while they run (/drives/<name>); a write in one is seen in the others within a second; a
sandbox sees only the drives attached to it. Real runsc, a real server."""

from __future__ import annotations

import secrets
import time

import pytest
from conftest import run

pytestmark = pytest.mark.integration


@pytest.fixture
def drive(api):
    name = "d" + secrets.token_hex(4)
    r = api.post("/v1/drives", json={"name": name, "size_mb": 32})
    assert r.status_code == 201, r.text
    yield name
    api.delete(f"/v1/drives/{name}")


@pytest.fixture
def pair(api):
    ids = [api.post("/v1/sandboxes", json={}).json()["id"] for _ in range(2)]
    yield ids
    for sid in ids:
        api.delete(f"/v1/sandboxes/{sid}")


def test_shared_between_running_sandboxes(api, drive, pair):
    a, b = pair
    assert run(api, a, "ls -A /drives")["stdout"] == ""
    for sid in pair:  # both run already
        r = api.post(f"/v1/sandboxes/{sid}/drives", json={"drive": drive, "path": "team"})
        assert r.status_code == 200 and r.json()["path"] == "/drives/team", r.text
    assert api.get(f"/v1/drives/{drive}").json()["users"] == [
        {"sandbox_id": a, "path": "/drives/team", "read_only": False},
        {"sandbox_id": b, "path": "/drives/team", "read_only": False}]
    # a reader in b waits for what a writes; seen within a second
    bg = api.post(f"/v1/sandboxes/{b}/commands", json={
        "cmd": "while [ \"$(cat /drives/team/msg2 2>/dev/null)\" != hi ]; do :; done; "
               "echo seen", "background": True}).json()["pid"]
    t0 = time.monotonic()
    assert run(api, a, "echo hi > /drives/team/msg2 && stat -c %u /drives/team/msg2")[
        "stdout"] == "1000\n"
    r = api.post(f"/v1/sandboxes/{b}/processes/{bg}/wait", params={"timeout": 5})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    assert time.monotonic() - t0 < 1.0 + 0.5  # (+ the wait call's own round trip)
    # the other way, and files made from the host too
    assert api.put(f"/v1/drives/{drive}/files/from-host.txt", content=b"host").status_code \
        == 200
    assert run(api, b, "echo fromb > /drives/team/b.txt; cat /drives/team/from-host.txt")[
        "stdout"] == "host"
    assert run(api, a, "cat /drives/team/b.txt")["stdout"] == "fromb\n"

    # detach: a loses it; b keeps it; delete refused while b uses it
    assert api.delete(f"/v1/sandboxes/{a}/drives/{drive}").status_code == 204
    out = run(api, a, "ls -A /drives; cat /drives/team/b.txt")
    assert "fromb" not in out["stdout"] and out["exit_code"] != 0
    assert run(api, b, "cat /drives/team/b.txt")["stdout"] == "fromb\n"
    r = api.delete(f"/v1/drives/{drive}")
    assert r.status_code == 409 and b in r.json()["error"]["message"]


def test_only_attached_drives_and_survives_hibernation(api, drive, pair):
    a, b = pair
    other = "o" + secrets.token_hex(4)
    assert api.post("/v1/drives", json={"name": other, "size_mb": 16}).status_code == 201
    try:
        assert api.post(f"/v1/sandboxes/{a}/drives", json={"drive": drive}).json()[
            "path"] == f"/drives/{drive}"
        assert api.post(f"/v1/sandboxes/{b}/drives", json={"drive": other}).status_code \
            == 200
        run(api, a, f"echo mine > /drives/{drive}/secret")
        # b sees its own drive only, by no path
        out = run(api, b, f"ls -A /drives; cat /drives/{drive}/secret; "
                          "find / -xdev -name secret 2>/dev/null")
        assert out["stdout"].split("\n")[0] == other and "mine" not in out["stdout"]
        # twice at once: 409
        r = api.post(f"/v1/sandboxes/{a}/drives", json={"drive": drive, "path": "again"})
        assert r.status_code == 409

        # hibernation unmounts everything; the restore mounts the drive again
        assert api.post(f"/v1/sandboxes/{a}/hibernate").json()["state"] == "hibernated"
        # written meanwhile by the host, seen after the resume
        api.put(f"/v1/drives/{drive}/files/while-asleep", content=b"zz")
        assert run(api, a, f"cat /drives/{drive}/secret /drives/{drive}/while-asleep")[
            "stdout"] == "mine\nzz"
        # attached while hibernated: there at the resume
        assert api.post(f"/v1/sandboxes/{a}/hibernate").json()["state"] == "hibernated"
        r = api.post(f"/v1/sandboxes/{a}/drives", json={"drive": other})
        assert r.status_code == 200, r.text
        assert run(api, a, "ls -A /drives")["stdout"].split() == sorted([drive, other])
        assert api.get(f"/v1/sandboxes/{a}/volumes").json() == [
            {"kind": "drive", "name": drive, "path": f"/drives/{drive}", "read_only": False},
            {"kind": "drive", "name": other, "path": f"/drives/{other}", "read_only": False}]
        for sid in pair:
            api.delete(f"/v1/sandboxes/{sid}")
    finally:
        api.delete(f"/v1/drives/{other}")
