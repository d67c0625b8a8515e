"""Volumes and drives are not a way into another sandbox's storage or the host: a sandbox
sees only what is mounted or attached to it, and what it puts in its /drives (a link where
a drive will be attached) does not make the host mount anything elsewhere."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from conftest import run


def test_a_sandbox_cannot_reach_another_volume(server, api):
    vol = "sec" + secrets.token_hex(4)
    token = "vol-secret-" + secrets.token_hex(6)
    assert api.post("/v1/volumes", json={"name": vol, "size_mb": 16}).status_code == 201
    owner = api.post("/v1/sandboxes", json={"volumes": {"/data": vol}}).json()["id"]
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        run(api, owner, f"echo {token} > /data/{token}")
        out = run(api, other, f"find / -xdev -name '{token}*' 2>/dev/null; "
                              f"grep -rl {token} /drives /tmp /home /root /dev 2>/dev/null; "
                              "cat /proc/mounts; ls -la /drives", user="root", timeout=120)
        assert token not in out["stdout"]
        assert vol not in out["stdout"] and "/volumes/" not in out["stdout"]
        # the owner's own view names no host path either
        mounts = run(api, owner, "cat /proc/mounts")["stdout"]
        assert str(server.data_dir) not in mounts
    finally:
        for sid in (owner, other):
            api.delete(f"/v1/sandboxes/{sid}")
        api.delete(f"/v1/volumes/{vol}")


def test_a_link_in_drives_does_not_redirect_an_attach(server, api):
    drive = "sec" + secrets.token_hex(4)
    assert api.post("/v1/drives", json={"name": drive, "size_mb": 16}).status_code == 201
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    before = Path("/proc/self/mounts").read_text()
    try:
        # root inside the sandbox plants links where the drive will be attached
        out = run(api, sid, f"ln -s /etc /drives/{drive} && ln -s / /drives/other && "
                            f"ls -la /drives", user="root")
        assert out["exit_code"] == 0, out
        r = api.post(f"/v1/sandboxes/{sid}/drives", json={"drive": drive})
        assert r.status_code == 200, r.text
        # the drive is at /drives/<name> inside; nothing was mounted over the host's /etc
        assert run(api, sid, f"touch /drives/{drive}/mine && ls /drives/{drive}")[
            "stdout"] == "mine\n"
        after = Path("/proc/self/mounts").read_text()
        new = set(after.splitlines()) - set(before.splitlines())
        # (other tests' servers mount under their own data dirs in /tmp meanwhile)
        points = [line.split()[1] for line in new]
        assert all(p.startswith("/tmp/tpt-") for p in points), points
        assert f"{server.data_dir}/sandboxes/{sid}/drives/{drive}" in points
        assert not os.path.exists("/etc/mine")
        assert api.delete(f"/v1/sandboxes/{sid}/drives/{drive}").status_code == 204
        # a file the sandbox made in /drives stays in its tiny tmpfs (not the host's disk)
        out = run(api, sid, "dd if=/dev/zero of=/drives/fill bs=1M count=8 2>&1; "
                            "ls -l /drives/fill | awk '{print $5}'", user="root")
        assert int(out["stdout"].split("\n")[-2]) <= 256 << 10, out
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        api.delete(f"/v1/drives/{drive}")
