"""Streams that survive (issue 14 item 4): a background process's output, past the agent's
in-memory log, is kept on the sandbox's own disk (bounded, oldest dropped); a reader comes
back from any offset still kept, after its client went away, after standby, after a
hibernation and across a server SIGKILL, and gets every byte once, in order (checked with
a checksum over a counted stream); an offset no longer kept is refused naming the range."""

from __future__ import annotations

import hashlib
import signal
import threading

import pytest
from conftest import Server, make_data_dir, run, teardown_data_dir, wait_for

from torpor import Sandbox
from torpor.sdk.errors import ConflictError

SPILL_MB = 8
LINES = 250_000  # per phase, 9 bytes each: 4 phases are 9 MB, past the 4 MiB in memory
PHASE = LINES * 9
COUNTER = f"""
import os, sys, time
n = 0
for phase in range(4):
    while not os.path.exists(f"/tmp/go{{phase}}"):
        time.sleep(0.02)
    for _ in range({LINES}):
        sys.stdout.write("%08d\\n" % n)
        n += 1
    sys.stdout.flush()
"""


def _expected(upto: int) -> bytes:
    return b"".join(b"%08d\n" % i for i in range(upto // 9))


@pytest.fixture(scope="module")
def srv():
    s = Server(make_data_dir(), pool_size=0,
               env={"TORPOR_OUTPUT_SPILL_MB": str(SPILL_MB)}).start()
    yield s
    teardown_data_dir(s)


def _read(handle, until: int, got: bytearray) -> None:
    for c in handle.chunks():
        assert c.offset == len(got)  # none twice, none missed
        got += c.data
        if handle.offset >= until:
            return


def test_output_survives_disconnects_parking_and_a_server_sigkill(srv):
    conn = {"url": srv.url, "api_key": srv.key}
    sbx = Sandbox.create(**conn)
    sid = sbx.id
    got = bytearray()
    try:
        sbx.files.write("/tmp/counter.py", COUNTER)
        proc = sbx.commands.run("python3 /tmp/counter.py", background=True)
        listed = next(p for p in sbx.commands.list() if p.pid == proc.pid)
        assert listed.argv[-1] == "python3 /tmp/counter.py" and listed.running
        assert listed.started_at is not None and listed.output_bytes == 0

        # 1. a reader that goes away, and comes back from its offset
        sbx.commands.run("touch /tmp/go0", check=True)
        h = sbx.commands.connect(proc.pid, from_offset=0)
        _read(h, PHASE // 2, got)
        h = sbx.commands.connect(proc.pid, from_offset=h.offset)
        _read(h, PHASE, got)

        # 2. standby in between
        sbx.commands.run("touch /tmp/go1", check=True)
        wait_for(lambda: sbx.commands.connect(proc.pid).info().output_bytes == 2 * PHASE)
        assert sbx.standby().state == "standby"
        h = sbx.commands.connect(proc.pid, from_offset=h.offset)  # wakes it
        _read(h, 2 * PHASE, got)

        # 3. hibernation in between: output kept in memory and on disk comes back
        sbx.commands.run("touch /tmp/go2", check=True)
        wait_for(lambda: sbx.commands.connect(proc.pid).info().output_bytes == 3 * PHASE)
        assert sbx.hibernate().state == "hibernated"
        h = sbx.commands.connect(proc.pid, from_offset=h.offset)  # restores it
        _read(h, 3 * PHASE // 2 + PHASE, got)  # some of phase 2 only
        assert len(got) < 3 * PHASE

        # 4. the server killed while this reader follows: it comes back by itself
        sbx.commands.run("touch /tmp/go3", check=True)
        h = sbx.commands.connect(proc.pid, from_offset=h.offset)
        restarted = threading.Event()

        def restart():
            srv.stop(signal.SIGKILL)
            srv.start()
            restarted.set()

        killer = None
        for c in h.chunks():
            assert c.offset == len(got)
            got += c.data
            if killer is None:
                killer = threading.Thread(target=restart)
                killer.start()
                killer.join()  # the server is gone and back; this reader's socket broke
        assert restarted.is_set() and h.exit is not None and h.exit.exit_code == 0
        assert len(got) == 4 * PHASE
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(
            _expected(4 * PHASE)).hexdigest()
    finally:
        with srv.client() as c:
            c.delete(f"/v1/sandboxes/{sid}")


def test_spill_is_on_the_sandbox_disk_bounded_and_old_offsets_are_refused(srv):
    conn = {"url": srv.url, "api_key": srv.key}
    with Sandbox.create(**conn) as sbx, srv.client() as api:
        first = sbx.commands.run("head -c 6000000 /dev/zero | tr '\\0' a", background=True)
        assert first.wait(60).exit_code == 0
        spill = "/.torpor-run/output"
        r = run(api, sbx.id, f"stat -f -c %T {spill}; stat -c %a:%U {spill}; du -sk {spill}",
                user="root")
        fstype, perm, du = r["stdout"].split("\n")[:3]
        assert fstype != "tmpfs" and perm == "700:root", r
        assert 1500 <= int(du.split()[0]) <= SPILL_MB * 1024 + 512, r
        denied = run(api, sbx.id, f"ls {spill}", user="user")
        assert denied["exit_code"] != 0 and "denied" in denied["stderr"]
        # all of the first one's 6 MB is still kept: 4 MiB in memory, the rest on disk
        h = sbx.commands.connect(first.pid, from_offset=0)
        assert sum(len(c.data) for c in h.chunks()) == 6_000_000

        # a second process's 14 MB pushes the first one's oldest bytes out of the bound
        second = sbx.commands.run("head -c 14000000 /dev/zero", background=True)
        assert second.wait(60).exit_code == 0
        du = run(api, sbx.id, f"du -sk {spill}", user="root")["stdout"].split()[0]
        assert int(du) <= SPILL_MB * 1024 + 512
        info = sbx.commands.connect(first.pid).info()
        assert info.output_start > 0 and info.output_bytes == 6_000_000
        with pytest.raises(ConflictError, match=rf"bytes {info.output_start}\.\.6000000"):
            sbx.commands.connect(first.pid, from_offset=0)
        r = api.get(f"/v1/sandboxes/{sbx.id}/processes/{first.pid}/output",
                    params={"offset": 0, "encoding": "base64"})
        assert r.status_code == 409
        err = r.json()["error"]
        assert err["output_start"] == info.output_start and err["output_end"] == 6_000_000
        assert f"bytes {info.output_start}..6000000 are" in err["message"]
        h = sbx.commands.connect(first.pid, from_offset=info.output_start)
        assert sum(len(c.data) for c in h.chunks()) == 6_000_000 - info.output_start
