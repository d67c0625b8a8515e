"""The sandbox's disk as its processes see it: `df /` is disk_mb, a full disk answers ENOSPC
to every write, /tmp is memory bounded by half of memory_mb."""

from __future__ import annotations

import json

from conftest import run, wait_for

from torpor.runtime.gvisor import ROOT_OVERLAY, GVisorDriver, root_flags

# Fills the disk to the last byte (halving the write size down to one byte), then tries
# the writes that come after a full disk; prints what each one got.
FILL = """
import errno, json, os, subprocess

def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]

def fill():
    size = 1 << 20
    with open("/home/user/fill", "ab", buffering=0) as f:
        while size:
            try:
                f.write(bytes(size))
            except OSError as e:
                first = errno.errorcode[e.errno]
                size //= 2
    return first

def new_file(path):
    def write():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"hi\\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    return write

def append(path):
    def write():
        with open(path, "ab") as f:
            f.write(bytes(8192))
            f.flush()
            os.fsync(f.fileno())
    return write

out = {"first": fill()}
out["next"] = [outcome(new_file(f"/home/user/small{i}")) for i in range(3)]
out["append"] = outcome(append("/home/user/.profile"))
out["mkdir"] = outcome(lambda: os.mkdir("/home/user/newdir"))
out["coreutils"] = subprocess.run("/bin/echo hi > /home/user/viaecho", shell=True,
                                  capture_output=True, text=True).stderr
out["avail"] = os.statvfs("/").f_bavail
os.unlink("/home/user/fill")
out["after_rm"] = outcome(new_file("/home/user/after"))
print(json.dumps(out))
"""


def df(api, sid: str, path: str) -> tuple[int, int]:
    """(size, used) in KiB of the file system at `path`, as `df` inside the sandbox says."""
    line = run(api, sid, f"df -k {path}")["stdout"].splitlines()[1].split()
    return int(line[1]), int(line[2])


def test_df_shows_disk_mb_and_what_is_used(api):
    sid = api.post("/v1/sandboxes", json={"disk_mb": 128}).json()["id"]
    try:
        size, used = df(api, sid, "/")
        # ext4 keeps some of the image for itself; runsc's own root overlay showed 8.0E
        assert 0.85 * (128 << 10) < size <= 128 << 10
        assert run(api, sid, "head -c 20M /dev/zero > /home/user/data && sync")["exit_code"] == 0
        size2, used2 = df(api, sid, "/")
        assert size2 == size and 19 << 10 <= used2 - used <= 22 << 10
        assert df(api, sid, "/home/user") == (size2, used2)  # one disk under all of `/`
        # the same after a hibernation: the restored root is the same disk
        assert api.post(f"/v1/sandboxes/{sid}/hibernate").status_code == 200
        assert run(api, sid, "wc -c < /home/user/data")["stdout"].strip() == str(20 << 20)
        assert df(api, sid, "/") == (size2, used2)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_full_disk_answers_enospc_to_every_write_and_recovers(api):
    sid = api.post("/v1/sandboxes", json={"disk_mb": 96}).json()["id"]
    try:
        r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/fill.py"},
                    content=FILL.encode())
        assert r.status_code == 200, r.text
        out = run(api, sid, "python3 /tmp/fill.py", timeout=120)
        assert out["exit_code"] == 0, out["stderr"]
        got = json.loads(out["stdout"])
        assert got["first"] == "ENOSPC" and got["avail"] == 0
        assert got["next"] == ["ENOSPC"] * 3  # not EIO
        assert got["append"] == "ENOSPC" and got["mkdir"] == "ENOSPC"
        assert "No space left on device" in got["coreutils"]
        assert got["after_rm"] == "ok"
        # the files API says the same once the disk is full again
        run(api, sid, "head -c 200M /dev/zero > /home/user/fill2")
        r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/more"},
                    content=b"x" * (1 << 20))
        assert r.status_code == 413 and "no space" in r.text
        assert run(api, sid, "rm /home/user/fill2 && echo ok")["stdout"] == "ok\n"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_tmp_is_memory_bounded_by_half_of_memory_mb(server, api):
    sid = api.post("/v1/sandboxes", json={"memory_mb": 256, "disk_mb": 256}).json()["id"]
    try:
        assert df(api, sid, "/tmp") == (128 << 10, 0)
        disk_used = df(api, sid, "/")[1]
        cgroup = GVisorDriver(server.data_dir).cgroup(sid)
        before = cgroup.memory_bytes()
        out = run(api, sid, "head -c 100M /dev/zero > /tmp/in-memory; echo rc=$?")
        assert out["stdout"] == "rc=0\n"
        # it is the sandbox's memory (and not its disk)
        assert cgroup.memory_bytes() - before > 90 << 20
        assert abs(df(api, sid, "/")[1] - disk_used) < 1 << 10
        out = run(api, sid, "head -c 100M /dev/zero > /tmp/more")
        assert "No space left on device" in out["stderr"]
        assert df(api, sid, "/tmp")[1] == 128 << 10
        assert run(api, sid, "rm /tmp/in-memory /tmp/more && echo ok")["stdout"] == "ok\n"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_file_deleted_while_open_in_tmp_survives_hibernation(api):
    """/tmp is memory, which runsc checkpoints with files deleted while open; on the disk it
    cannot (tests/integration/test_standby.py: the hibernation is refused there)."""
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        code = ("import tempfile, time\n"
                "f = tempfile.TemporaryFile()\n"  # in /tmp, unlinked at once
                "f.write(b'kept in /tmp'); f.flush()\n"
                "while True:\n"
                "    f.seek(0)\n"
                "    open('/home/user/seen', 'w').write(f.read().decode())\n"
                "    time.sleep(0.05)\n")
        api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/hold.py"},
                content=code.encode())
        api.post(f"/v1/sandboxes/{sid}/commands",
                 json={"cmd": "python3 /home/user/hold.py", "background": True})
        wait_for(lambda: "/tmp/" in run(api, sid, "ls -l /proc/*/fd 2>/dev/null")["stdout"])
        r = api.post(f"/v1/sandboxes/{sid}/hibernate")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "hibernated"
        run(api, sid, "rm /home/user/seen")  # wakes it
        wait_for(lambda: run(api, sid, "cat /home/user/seen")["stdout"] == "kept in /tmp")
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_restore_builds_the_root_as_the_spec_records():
    # a sandbox started before the record had runsc's default root overlay: keep it
    assert root_flags({"annotations": {}}) == [] and root_flags({}) == []
    assert root_flags({"annotations": {ROOT_OVERLAY: "none"}}) == ["--overlay2=none"]
