"""The files API against real sandboxes."""

from __future__ import annotations

import hashlib
import os

from conftest import run


def test_write_read_roundtrip_binary(api, sandbox):
    data = os.urandom(3 << 20) + b"\0\xff"
    r = api.put(f"/v1/sandboxes/{sandbox}/files", params={"path": "dir/sub/blob.bin"},
                content=data)
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "/home/user/dir/sub/blob.bin", "size": len(data)}
    got = api.get(f"/v1/sandboxes/{sandbox}/files", params={"path": "dir/sub/blob.bin"})
    assert got.status_code == 200 and got.content == data
    out = run(api, sandbox, "sha256sum /home/user/dir/sub/blob.bin; stat -c %U blob.bin",
              cwd="/home/user/dir/sub")
    assert out["stdout"].split()[0] == hashlib.sha256(data).hexdigest()
    assert out["stdout"].split()[-1] == "user"


def test_list_stat_mkdir_rename_remove_exists(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}/files"
    assert api.post(base + "/mkdir", json={"path": "/tmp/a/b/c"}).json()["created"] is True
    api.put(base, params={"path": "/tmp/a/b/c/f.txt"}, content=b"hello")
    names = [e["path"] for e in api.get(base + "/list", params={"path": "/tmp/a",
                                                                 "depth": 3}).json()]
    assert names == ["/tmp/a/b", "/tmp/a/b/c", "/tmp/a/b/c/f.txt"]
    assert [e["name"] for e in api.get(base + "/list", params={"path": "/tmp/a"}).json()] == ["b"]
    st = api.get(base + "/stat", params={"path": "/tmp/a/b/c/f.txt"}).json()
    assert (st["type"], st["size"], st["owner"]) == ("file", 5, "user")
    r = api.post(base + "/rename", json={"src": "/tmp/a/b/c/f.txt", "dst": "/tmp/a/g.txt"})
    assert r.status_code == 200
    assert api.get(base + "/exists", params={"path": "/tmp/a/g.txt"}).json() == {"exists": True}
    assert api.get(base + "/exists", params={"path": "/tmp/a/b/c/f.txt"}).json() == {
        "exists": False}
    assert api.delete(base, params={"path": "/tmp/a/b"}).status_code == 409  # not empty
    assert api.delete(base, params={"path": "/tmp/a", "recursive": True}).status_code == 204
    assert api.get(base + "/stat", params={"path": "/tmp/a"}).status_code == 404


def test_file_errors(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}/files"
    assert api.get(base, params={"path": "/nope"}).status_code == 404
    assert api.get(base, params={"path": "/tmp"}).status_code == 409
    assert api.put(base, params={"path": "/tmp"}, content=b"x").status_code == 409
    assert api.put(base, params={"path": "/x", "mode": "9z"}, content=b"x").status_code == 422
    api.put(base, params={"path": "/tmp/exists"}, content=b"1")
    r = api.post(base + "/rename", json={"src": "/tmp/exists", "dst": "/tmp/exists"})
    assert r.status_code == 409


def test_disk_limit_is_enforced(api):
    sid = api.post("/v1/sandboxes", json={"disk_mb": 96}).json()["id"]
    try:
        out = run(api, sid, "dd if=/dev/zero of=/home/user/fill bs=1M count=200; echo rc=$?")
        assert "No space left" in out["stderr"]
        r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/more"},
                    content=b"x" * (8 << 20))
        assert r.status_code == 413
        # the sandbox is still fine once space is freed
        run(api, sid, "rm /home/user/fill")
        assert run(api, sid, "echo ok > /home/user/small && cat small",
                   cwd="/home/user")["stdout"] == "ok\n"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_large_streaming_upload_keeps_server_memory_flat(server, api, sandbox):
    size = 256 << 20
    chunk = os.urandom(1 << 20)
    h = hashlib.sha256()

    def gen():
        for _ in range(size // len(chunk)):
            h.update(chunk)
            yield chunk

    before = server.rss_bytes()
    r = api.put(f"/v1/sandboxes/{sandbox}/files", params={"path": "/tmp/big"}, content=gen())
    assert r.status_code == 200, r.text
    grown = server.rss_bytes() - before
    assert grown < 64 << 20, f"server RSS grew by {grown >> 20} MiB"
    assert run(api, sandbox, "sha256sum /tmp/big")["stdout"].split()[0] == h.hexdigest()
    got = hashlib.sha256()
    with api.stream("GET", f"/v1/sandboxes/{sandbox}/files", params={"path": "/tmp/big"}) as r:
        assert int(r.headers["content-length"]) == size
        for part in r.iter_bytes():
            got.update(part)
    assert got.hexdigest() == h.hexdigest()
