"""Volumes: ext4 images that outlive sandboxes, mounted at a sandbox's start; one writer
or many readers; a real size limit; files in and out without a sandbox, with links in the
volume never followed on the host. Real runsc, a real server."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import pytest
from conftest import Server, make_data_dir, run, teardown_data_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vserver():
    srv = Server(make_data_dir(), pool_size=0).start()
    yield srv
    teardown_data_dir(srv)


@pytest.fixture
def c(vserver):
    with vserver.client() as client:
        yield client


def _name() -> str:
    return "v" + secrets.token_hex(4)


def _volume(c, size_mb: int = 32) -> str:
    name = _name()
    r = c.post("/v1/volumes", json={"name": name, "size_mb": size_mb})
    assert r.status_code == 201, r.text
    assert r.json()["size_mb"] == size_mb and r.json()["users"] == []
    return name


def _sandbox(c, volumes: dict, status: int = 201) -> str:
    r = c.post("/v1/sandboxes", json={"volumes": volumes})
    assert r.status_code == status, r.text
    return r.json()["id"] if status == 201 else r.json()


def test_data_outlives_every_sandbox_and_one_writer(c, vserver):
    vol = _volume(c)
    a = _sandbox(c, {"/data": vol})
    out = run(c, a, "echo hello > /data/f && mkdir /data/d && stat -c '%u %g' /data/f /data "
                    "&& df -m /data | tail -1")
    assert out["exit_code"] == 0, out
    lines = out["stdout"].splitlines()
    assert lines[:2] == ["1000 1000", "1000 1000"]  # written by `user`; its root is user's
    assert 25 <= int(lines[2].split()[1]) <= 32  # the file system is the volume's size

    # a second writer: 409 naming the holder; nothing is created for it
    before = {s["id"] for s in c.get("/v1/sandboxes").json()}
    err = _sandbox(c, {"/data": vol}, status=409)["error"]
    assert a in err["message"] and "one writer" in err["message"]
    # a reader too, while a writer holds it
    err = _sandbox(c, {"/data": {"volume": vol, "read_only": True}}, status=409)["error"]
    assert a in err["message"]
    assert {s["id"] for s in c.get("/v1/sandboxes").json()} == before

    # deleting the volume in use: 409 naming the user
    r = c.delete(f"/v1/volumes/{vol}")
    assert r.status_code == 409 and a in r.json()["error"]["message"]
    info = c.get(f"/v1/volumes/{vol}").json()
    assert info["users"] == [{"sandbox_id": a, "path": "/data", "read_only": False}]
    assert info["used_bytes"] > 0

    assert c.delete(f"/v1/sandboxes/{a}").status_code == 204
    # many readers now; the data is there; they cannot write
    r1 = _sandbox(c, {"/data": {"volume": vol, "read_only": True}})
    r2 = _sandbox(c, {"/mnt/v": {"volume": vol, "read_only": True}})
    assert run(c, r1, "cat /data/f")["stdout"] == "hello\n"
    assert run(c, r2, "cat /mnt/v/f")["stdout"] == "hello\n"
    w = run(c, r1, "echo x > /data/g")
    assert w["exit_code"] != 0 and "Read-only" in w["stderr"]
    err = _sandbox(c, {"/data": vol}, status=409)["error"]  # a writer while read
    assert r1 in err["message"] or r2 in err["message"]
    for sid in (r1, r2):
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
    b = _sandbox(c, {"/work": vol})
    assert run(c, b, "cat /work/f && ls /work")["stdout"] == "hello\nd\nf\n"
    assert c.delete(f"/v1/sandboxes/{b}").status_code == 204
    assert c.delete(f"/v1/volumes/{vol}").status_code == 204
    assert c.get(f"/v1/volumes/{vol}").status_code == 404
    assert not (vserver.data_dir / "volumes").exists() or not any(
        p.name.startswith("vol") and p.is_dir() and (p / "volume.img").exists()
        for p in (vserver.data_dir / "volumes").iterdir()
        if p.name == info["id"])


def test_size_limit_is_enospc_inside(c):
    vol = _volume(c, size_mb=16)
    sid = _sandbox(c, {"/data": vol})
    out = run(c, sid, "dd if=/dev/zero of=/data/big bs=1M count=40; echo rc=$?; "
                      "ls -l /data/big | awk '{print $5}'")
    assert "No space left" in out["stderr"], out
    assert int(out["stdout"].split("\n")[1]) < 16 << 20
    # the sandbox's own disk is not affected
    assert run(c, sid, "echo ok > /home/user/x && cat /home/user/x")["stdout"] == "ok\n"
    c.delete(f"/v1/sandboxes/{sid}")
    c.delete(f"/v1/volumes/{vol}")


def test_bad_input(c):
    r = c.post("/v1/volumes", json={"name": "huge" + secrets.token_hex(2),
                                    "size_mb": 1 << 20})
    assert r.status_code == 422 and "free disk" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["field"] == "size_mb"
    vol = _volume(c)
    r = c.post("/v1/volumes", json={"name": vol, "size_mb": 16})
    assert r.status_code == 409
    for bad in ({"/proc/x": vol}, {"/": vol}, {"/drives": vol}, {"/a/../b": vol},
                {"/data": "no-such-volume"}):
        r = c.post("/v1/sandboxes", json={"volumes": bad})
        assert r.status_code in (404, 422), (bad, r.text)
        assert r.json()["error"]["field"].startswith("volume"), r.text
    c.delete(f"/v1/volumes/{vol}")


def test_files_in_and_out_without_a_sandbox_and_no_escape(c, vserver, tmp_path):
    vol = _volume(c)
    data = os.urandom(300_000)
    r = c.put(f"/v1/volumes/{vol}/files/in/deep/blob.bin", content=data)
    assert r.status_code == 200 and r.json()["bytes"] == len(data), r.text
    assert c.get(f"/v1/volumes/{vol}/files/in/deep/blob.bin").content == data
    sid = _sandbox(c, {"/data": vol})
    out = run(c, sid, "stat -c '%u:%g %s' /data/in/deep/blob.bin /data/in; "
                      "echo from-inside > /data/out.txt; "
                      "ln -s /etc/passwd /data/passwd; ln -s / /data/root; "
                      "ln -s ../../../../../../etc /data/in/up; mkfifo /data/fifo")
    assert out["stdout"].splitlines()[0] == f"1000:1000 {len(data)}", out
    assert out["stdout"].splitlines()[1].startswith("1000:1000")
    assert c.get(f"/v1/volumes/{vol}/files/out.txt").content == b"from-inside\n"
    # links a sandbox made are not followed by the host, whatever they point at
    host_passwd = Path("/etc/passwd").read_bytes()
    for path in ("passwd", "root/etc/passwd", "in/up/passwd", "fifo", "in/../passwd"):
        r = c.get(f"/v1/volumes/{vol}/files/{path}")
        assert r.status_code in (404, 422), (path, r.status_code)
        assert r.content != host_passwd and b"root:x:0:0" not in r.content
    for path in ("passwd", "root/tmp/owned", "in/up/owned"):
        r = c.put(f"/v1/volumes/{vol}/files/{path}", content=b"owned")
        if path == "passwd":  # replaced: the link itself, inside the volume
            assert r.status_code == 200
            continue
        assert r.status_code == 422, (path, r.text)
    assert Path("/etc/passwd").read_bytes() == host_passwd
    assert not os.path.exists("/tmp/owned") and not os.path.exists("/etc/owned")
    assert run(c, sid, "cat /data/passwd")["stdout"] == "owned"
    listing = {e["name"]: e["type"] for e in c.get(f"/v1/volumes/{vol}/entries").json()}
    assert listing["root"] == "symlink" and listing["in"] == "dir"
    assert listing.get("fifo", "other") == "other"  # (if runsc made one on the volume)
    assert c.get(f"/v1/volumes/{vol}/entries", params={"path": "/root"}).status_code == 422
    c.delete(f"/v1/sandboxes/{sid}")
    c.delete(f"/v1/volumes/{vol}")


def test_survives_hibernation_and_restarts(c, vserver):
    vol = _volume(c)
    sid = _sandbox(c, {"/data": vol})
    # a process holding a file of the volume open across the checkpoint
    run(c, sid, "echo 1 > /data/n")
    c.post(f"/v1/sandboxes/{sid}/commands", json={
        "cmd": "exec 3>>/data/log; while true; do echo tick >&3; sleep 0.2; done",
        "background": True})
    r = c.post(f"/v1/sandboxes/{sid}/hibernate")
    assert r.status_code == 200 and r.json()["state"] == "hibernated", r.text
    assert run(c, sid, "cat /data/n")["stdout"] == "1\n"  # resumed by the request
    n1 = int(run(c, sid, "wc -l < /data/log")["stdout"])

    time.sleep(0.6)
    assert int(run(c, sid, "wc -l < /data/log")["stdout"]) > n1  # still writing to it

    vserver.stop(signal.SIGKILL)
    vserver.start()
    with vserver.client() as c2:
        assert run(c2, sid, "echo 2 >> /data/n && cat /data/n")["stdout"] == "1\n2\n"
        vserver.stop(signal.SIGTERM)  # graceful: hibernates it
        vserver.start()
    with vserver.client() as c3:
        assert c3.get(f"/v1/sandboxes/{sid}").json()["state"] == "hibernated"
        assert run(c3, sid, "cat /data/n")["stdout"] == "1\n2\n"
        # still the one writer after all that
        assert c3.post("/v1/sandboxes", json={"volumes": {"/d": vol}}).status_code == 409
        assert c3.delete(f"/v1/sandboxes/{sid}").status_code == 204
        assert c3.get(f"/v1/volumes/{vol}/files/n").content == b"1\n2\n"
        assert c3.delete(f"/v1/volumes/{vol}").status_code == 204


def test_sdk_and_cli(vserver, tmp_path):
    from conftest import cli

    from torpor import Sandbox, Volume
    from torpor.sdk import ConflictError

    kw = {"url": vserver.url, "api_key": vserver.key}
    name = _name()
    assert cli(vserver, "volume", "create", name, "--size-mb", "16").stdout.strip() == name
    local = tmp_path / "in.txt"
    local.write_text("from the cli\n")
    r = cli(vserver, "volume", "cp", str(local), f"{name}:/docs/in.txt")
    assert r.returncode == 0, r.stderr
    sbx = Sandbox.create(volumes={"/data": name}, **kw)
    try:
        assert sbx.commands.run("cat /data/docs/in.txt").stdout == "from the cli\n"
        sbx.commands.run("echo back > /data/out.txt")
        with pytest.raises(ConflictError, match=sbx.id):
            Sandbox.create(volumes={"/data": name}, **kw)
        assert [u.sandbox_id for u in Volume.get(name, **kw).users] == [sbx.id]
        r = cli(vserver, "volume", "rm", name)
        assert r.returncode != 0 and sbx.id in r.stderr
    finally:
        sbx.delete()
    r = cli(vserver, "volume", "cp", f"{name}:/out.txt", str(tmp_path / "out.txt"))
    assert r.returncode == 0 and (tmp_path / "out.txt").read_text() == "back\n", r.stderr
    assert Volume.download(name, "/docs/in.txt", **kw) == b"from the cli\n"
    ls = cli(vserver, "volume", "ls", f"{name}:/").stdout
    assert "docs" in ls and "out.txt" in ls
    created = cli(vserver, "sandbox", "create", "--volume", f"/v={name}:ro")
    assert created.returncode == 0, created.stderr
    sid = created.stdout.strip()
    assert f"{sid}:/v (ro)" in cli(vserver, "volume", "list").stdout
    cli(vserver, "sandbox", "rm", sid)
    assert cli(vserver, "volume", "rm", name).returncode == 0
    assert name not in [v.name for v in Volume.list(**kw)]
