"""Snapshots are not a way into the host or another sandbox: the snapshot store (memory
images, disk copies, OCI specs under <data>/images) is never mounted into a sandbox, so
neither the sandbox a snapshot was taken of, nor another one, nor one started from the
snapshot can read it, by its host path, through /proc/1/root, or through /.torpor."""

from __future__ import annotations

import json
import secrets

from conftest import run


def spec_sources(server, sid: str) -> list[str]:
    config = json.loads((server.data_dir / "sandboxes" / sid / "config.json").read_text())
    return [config["root"]["path"]] + [m.get("source", "") for m in config["mounts"]]


def test_a_sandbox_cannot_reach_the_snapshot_store(server, api):
    token = "snap-secret-" + secrets.token_hex(8)
    owner = api.post("/v1/sandboxes", json={}).json()["id"]
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    made: list[str] = []
    snap = None
    try:
        # the token on the owner's disk and in a process's memory only
        run(api, owner, f"echo {token} > /home/user/held")
        r = api.post(f"/v1/sandboxes/{owner}/commands", json={
            "cmd": f"python3 -c \"t = '{token}'; import time; time.sleep(600)\"",
            "background": True})
        assert r.status_code == 201, r.text
        r = api.post(f"/v1/sandboxes/{owner}/snapshots", json={"memory": True})
        assert r.status_code == 201, r.text
        snap = r.json()
        key = snap["template"].removeprefix("sha256:")
        tpl_dir = server.data_dir / "images" / "templates" / key
        store = [p for p in tpl_dir.rglob("*") if p.is_file()]
        assert any(p.name == "checkpoint.img" for p in store), store
        # ... and a sandbox started from the snapshot: it has the files, not the store
        r = api.post("/v1/sandboxes", json={"snapshot": snap["id"]})
        assert r.status_code == 201, r.text
        copy = r.json()["id"]
        made.append(copy)
        assert run(api, copy, "cat /home/user/held")["stdout"] == f"{token}\n"

        host = str(server.data_dir)
        probes = " ; ".join([
            "cat /proc/mounts /proc/self/mountinfo",
            "ls -la / /.torpor /proc/1/root/ /proc/1/root/.torpor/",
            # every mount but /proc, /sys and the host's /usr (which the specs name)
            ("find / \\( -path /proc -o -path /sys -o -path /usr -o -path /.torpor/usr \\) "
             "-prune -o \\( -name 'checkpoint.img' -o -name 'snapshot.json' "
             "-o -name 'template.json' -o -name 'disk.img' \\) -print 2>/dev/null"),
            f"ls -la {host} {host}/images /proc/1/root{host}/images 2>&1 | head -5",
            f"cat {tpl_dir}/snapshot/config.json {tpl_dir}/template.json 2>&1 | head -3",
            f"cat /proc/1/root{tpl_dir}/snapshot/snapshot.json 2>&1 | head -3",
            f"cat /.torpor{tpl_dir}/snapshot/snapshot.json 2>&1 | head -3",
        ])
        for sid in (owner, other, copy):
            out = run(api, sid, probes, user="root", timeout=120)["stdout"]
            # nothing of the store: no listing of it, no file of it, not even its host path
            # in a mount
            assert key not in out.replace(str(tpl_dir), ""), (sid, out)
            assert "checkpoint.img" not in out, (sid, out)
            assert "No such file" in out, (sid, out)
            mounts = run(api, sid, "cat /proc/mounts")["stdout"]
            assert host not in mounts and "/images/" not in mounts, (sid, mounts)
        # the other sandbox finds the owner's token nowhere it can look
        out = run(api, other, f"find / -xdev -name 'held' 2>/dev/null; grep -rl {token} "
                              "/home /root /tmp /dev /drives 2>/dev/null; true",
                  user="root", timeout=120)["stdout"]
        assert token not in out and "/home/user/held" not in out, out

        # the OCI specs mount nothing of the store or of another sandbox: each sandbox's
        # sources are its own directory, the host's /usr and the agent's bundle
        for sid in (owner, other, copy):
            for src in spec_sources(server, sid):
                assert "/images/" not in src and str(tpl_dir) not in src, (sid, src)
                if src.startswith(f"{host}/sandboxes/"):
                    assert src.startswith(f"{host}/sandboxes/{sid}/"), (sid, src)
    finally:
        for sid in (owner, other, *made):
            api.delete(f"/v1/sandboxes/{sid}")
        if snap is not None:
            api.delete(f"/v1/snapshots/{snap['id']}", params={"force": "true"})
