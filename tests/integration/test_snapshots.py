"""Snapshots of live sandboxes, with real runsc: memory (a counter in a Python process) is
the same in the source after a snapshot, in a sandbox created from it (also after it
hibernated and resumed), in each fork (which then diverge), after a restore in place; a
fork's copies of the source's egress connections are reset, the source's work on;
filesystem-only snapshots; refusals; 404 and 409; a snapshot surviving a server restart
(REST)."""

from __future__ import annotations

import asyncio
import functools
import shutil
import socket
import threading

import pytest
from conftest import make_data_dir

from torpor.engine.manager import Engine
from torpor.engine.types import Exited, Output
from torpor.errors import Conflict, Invalid, NotFound, Unavailable

# a process that counts in memory only; SIGUSR1 makes it write the count to /tmp/count
COUNTER = """
import os, signal, time
n = 0
def dump(*_):
    with open('/tmp/count.tmp', 'w') as f:
        f.write(str(n))
    os.replace('/tmp/count.tmp', '/tmp/count')
signal.signal(signal.SIGUSR1, dump)
while True:
    n += 1
    time.sleep(0.01)
"""


async def sh(engine: Engine, sid: str, cmd: str) -> tuple[int | None, str]:
    out, code = [], None
    async for ev in await engine.processes.run(sid, ["sh", "-c", cmd], user="root",
                                               timeout=30):
        if isinstance(ev, Output):
            out.append(ev.data)
        elif isinstance(ev, Exited):
            code = ev.exit_code
    return code, "".join(out)


async def count(engine: Engine, sid: str) -> int:
    """The counter's value now, read from its memory (it writes it on SIGUSR1)."""
    code, out = await sh(engine, sid, "rm -f /tmp/count; pkill -USR1 -f 'counte[r].py'; "
                                      "for i in $(seq 100); do [ -e /tmp/count ] && break; "
                                      "sleep 0.02; done; cat /tmp/count")
    assert code == 0, out
    return int(out)


async def start_counter(engine: Engine, sid: str) -> None:
    await sh(engine, sid, f"cat > /root/counter.py <<'EOF'\n{COUNTER}\nEOF")
    await engine.processes.start(sid, ["python3", "/root/counter.py"], user="root")
    for _ in range(100):
        code, _ = await sh(engine, sid, "pgrep -f 'counte[r].py'")
        if code == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the counter did not start")


# the operator allows loopback (the test's upstream) and names it up.test
LOOPBACK = {"egress_allow_cidr": ["127.0.0.0/8"], "egress_resolve": ["up.test=127.0.0.1"]}


@pytest.fixture
def engine_run(engine_run):
    """(run, data_dir): conftest's engine_run under LOOPBACK."""
    return functools.partial(engine_run, **LOOPBACK), engine_run.data_dir


def test_memory_snapshot_create_fork_restore(engine_run):
    go, _ = engine_run

    async def body(engine: Engine):
        src = (await engine.create(standby_after=0, hibernate_after=0)).id
        await start_counter(engine, src)
        await sh(engine, src, "echo before > /root/file")
        snap = await engine.snapshot(src, name="before", memory=True)
        assert snap.id.startswith("snap_") and snap.memory and snap.sandbox_id == src
        assert snap.bytes > 0 and snap.name == "before"
        # the source runs on: same process, still counting
        at_snap = await count(engine, src)
        await asyncio.sleep(0.3)
        assert await count(engine, src) > at_snap
        await sh(engine, src, "echo after > /root/file")
        assert [s.id for s in engine.list_snapshots(sandbox_id=src)] == [snap.id]

        # a sandbox created from it: its own id, the counter's memory as at the snapshot
        new = (await engine.create(snapshot=snap.id)).id
        assert new != src
        c_new = await count(engine, new)
        assert 0 < c_new <= at_snap + 5, (c_new, at_snap)
        assert (await sh(engine, new, "cat /root/file"))[1] == "before\n"
        assert engine.get(new).template == snap.id
        # it hibernates and resumes with its memory, as any sandbox
        c_hib = await count(engine, new)
        assert (await engine.hibernate(new)).state == "hibernated"
        assert (await engine.resume(new)).state == "running"
        c_res = await count(engine, new)
        assert c_hib <= c_res <= c_hib + 200, (c_hib, c_res)
        assert (await sh(engine, new, "cat /root/file"))[1] == "before\n"
        # the snapshot is in use: 409, then forced
        with pytest.raises(Conflict):
            engine.delete_snapshot(snap.id)

        # three forks of the source: each has the counter as it was, then each counts on
        forks = await engine.fork(src, count=3)
        assert len({f.id for f in forks} | {src}) == 4
        at_fork = await count(engine, src)
        for f in forks:
            assert f.metadata.get("torpor.fork_of") == src
            c = await count(engine, f.id)
            assert at_snap < c <= at_fork + 200, (c, at_fork)
            assert (await sh(engine, f.id, "cat /root/file"))[1] == "after\n"
        # they diverge: a file written in one is in no other
        await sh(engine, forks[0].id, "echo mine > /root/fork0")
        for f in forks[1:] + [engine.get(src)]:
            assert (await sh(engine, f.id, "cat /root/fork0"))[0] != 0

        # restore in place: the source rolls back (same id; counter and files as then)
        await asyncio.sleep(0.5)
        before_restore = await count(engine, src)
        info = await engine.restore(src, snap.id)
        assert info.id == src and info.state == "running"
        c_back = await count(engine, src)
        assert c_back < before_restore, (c_back, before_restore)
        assert (await sh(engine, src, "cat /root/file"))[1] == "before\n"

        # snapshots outlive their source
        for f in forks:
            await engine.delete(f.id)
        await engine.delete(new)
        await engine.delete(src)
        assert engine.get_snapshot(snap.id).sandbox_id == src
        engine.delete_snapshot(snap.id)
        with pytest.raises(NotFound):
            engine.get_snapshot(snap.id)

    go(body)


# a process holding one CONNECT tunnel through the sandbox's egress proxy (the agent's
# 127.0.0.1:3128) to the test's upstream; for each /tmp/goN it sends "ping N" on it and
# writes what came back (or what went wrong) to /tmp/resN
TUNNEL = """
import os, socket, sys, time
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(b"CONNECT up.test:%d HTTP/1.1\\r\\nHost: up.test:%d\\r\\n\\r\\n" % (port, port))
head = b""
while b"\\r\\n\\r\\n" not in head:
    chunk = s.recv(4096)
    if not chunk:
        raise SystemExit("the proxy closed: %r" % head)
    head += chunk
if b" 200 " not in head.split(b"\\r\\n")[0]:
    raise SystemExit("refused: %r" % head)
s.settimeout(10)
n = 0
while True:
    n += 1
    while not os.path.exists("/tmp/go%d" % n):
        time.sleep(0.02)
    try:
        s.sendall(b"ping %d\\n" % n)
        data = s.recv(100)
        res = "ok " + data.decode().strip() if data else "closed"
    except OSError as e:
        res = "error " + type(e).__name__
    with open("/tmp/res.tmp", "w") as f:
        f.write(res)
    os.replace("/tmp/res.tmp", "/tmp/res%d" % n)
"""


class LineEcho:
    """A loopback TCP server answering each line with itself; it keeps what each
    connection sent."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[list[str]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            lines: list[str] = []
            self.conns.append(lines)
            threading.Thread(target=self._serve, args=(c, lines), daemon=True).start()

    def _serve(self, c: socket.socket, lines: list[str]) -> None:
        with c, c.makefile("rb") as f:
            for line in f:
                lines.append(line.decode().strip())
                c.sendall(line)

    def close(self) -> None:
        self.sock.close()


async def tunnel_result(engine: Engine, sid: str, n: int) -> str:
    code, out = await sh(engine, sid, f"touch /tmp/go{n}; for i in $(seq 750); do "
                                      f"[ -e /tmp/res{n} ] && break; sleep 0.02; done; "
                                      f"cat /tmp/res{n}")
    assert code == 0, out
    return out


def test_fork_resets_egress_connections(engine_run):
    go, _ = engine_run
    up = LineEcho()

    async def body(engine: Engine):
        src = (await engine.create(standby_after=0, hibernate_after=0)).id
        await sh(engine, src, f"cat > /root/tunnel.py <<'EOF'\n{TUNNEL}\nEOF")
        await engine.processes.start(src, ["python3", "/root/tunnel.py", str(up.port)],
                                     user="root")
        assert await tunnel_result(engine, src, 1) == "ok ping 1"
        [fork] = await engine.fork(src, count=1)
        # the fork's copy of the connection is reset: nothing it sends reaches the upstream
        res = await tunnel_result(engine, fork.id, 2)
        assert res == "closed" or (res.startswith("error ") and "Timeout" not in res), res
        # the source's connection works on, and is the only one the upstream ever saw
        assert await tunnel_result(engine, src, 2) == "ok ping 2"
        assert up.conns == [["ping 1", "ping 2"]], up.conns

    try:
        go(body)
    finally:
        up.close()


def test_snapshot_of_a_sandbox_near_its_memory_limit(engine_run):
    """The image passes through a tmpfs, charged to the sandbox for a moment: its hard
    limit is raised meanwhile (else the host kills the sentry: 200 MiB in use plus a
    200 MiB image is past 1.25 * 256 + 96 MiB) and the watchdog does not count it (else it
    kills the largest process); afterwards the limit is as it was and nothing is left."""
    go, data_dir = engine_run
    from torpor.runtime.snapshot import stage_dir

    async def body(engine: Engine):
        sid = (await engine.create(memory_mb=256, standby_after=0, hibernate_after=0)).id
        await engine.processes.start(sid, ["python3", "-c", (
            "import time; b = b'\\x01' * (200 << 20); open('/tmp/held', 'w').close(); "
            "time.sleep(600)")], user="root")
        for _ in range(200):
            if (await sh(engine, sid, "test -e /tmp/held"))[0] == 0:
                break
            await asyncio.sleep(0.05)
        cg = engine.driver.cgroup(sid)
        limit = cg.memory_limit()
        snap = await engine.snapshot(sid)
        assert snap.bytes > 200 << 20
        await asyncio.sleep(0.5)  # the watchdog's next passes
        assert (await sh(engine, sid, "pgrep -f 'slee[p].600'"))[0] == 0
        kinds = [e.kind for e in engine.events(sid)]
        assert "oom_kill" not in kinds and engine.get(sid).state == "running", kinds
        assert cg.memory_limit() == limit
        assert not list(stage_dir(data_dir).glob("*"))
        # the copy holds the 200 MiB too
        new = (await engine.create(snapshot=snap.id)).id
        assert (await sh(engine, new, "pgrep -f 'slee[p].600'"))[0] == 0

    go(body)


def test_filesystem_snapshot_and_refusals(engine_run):
    go, _ = engine_run

    async def body(engine: Engine):
        src = (await engine.create(standby_after=0, hibernate_after=0)).id
        await start_counter(engine, src)
        await sh(engine, src, "mkdir -p /home/user/w && echo kept > /home/user/w/f && "
                              "rm -f /etc/issue")
        snap = await engine.snapshot(src, memory=False)
        assert not snap.memory
        # the source runs on
        await count(engine, src)
        # files, no processes: a fresh boot over the captured layer
        new = (await engine.create(template=snap.id)).id
        assert (await sh(engine, new, "cat /home/user/w/f"))[1] == "kept\n"
        assert (await sh(engine, new, "test -e /etc/issue"))[0] != 0  # the whiteout kept
        assert (await sh(engine, new, "pgrep -f 'counte[r].py'"))[0] != 0
        # another memory size is fine without memory; with memory it is refused
        mem = await engine.snapshot(src)
        with pytest.raises(Invalid):
            await engine.create(snapshot=mem.id, memory_mb=256)

        # a deleted-but-open file on disk blocks a memory snapshot, as a hibernation
        await engine.processes.start(src, ["python3", "-c",
                                           ("import os,time\nf=open('/root/gone','w')\n"
                                            "os.unlink('/root/gone')\ntime.sleep(600)")],
                                     user="root")
        await asyncio.sleep(0.5)
        with pytest.raises(Conflict) as e:
            await engine.snapshot(src)
        assert "deleted while open" in e.value.message
        # (without memory it is not a problem)
        await engine.snapshot(src, memory=False)

        # a hibernated sandbox is resumed for its snapshot; a failed one is refused
        await sh(engine, src, "pkill -f 'roo[t].gone'; true")
        await engine.hibernate(new)
        s2 = await engine.snapshot(new, memory=False)
        assert engine.get(new).state == "running" and s2.sandbox_id == new

        # 404s
        with pytest.raises(NotFound):
            await engine.snapshot("sbxnope")
        with pytest.raises(NotFound):
            await engine.create(snapshot="snap_nope")
        with pytest.raises(NotFound):
            await engine.restore(src, "snap_nope")
        with pytest.raises(NotFound):
            engine.delete_snapshot("snap_nope")
        with pytest.raises(Invalid):
            await engine.fork(src, count=0)

        # a snapshot whose template files are gone: a clear refusal
        tpl = engine.templates.by_digest(mem.template)
        shutil.rmtree(tpl.snapshot_dir / "image")
        with pytest.raises(Conflict) as e:
            await engine.restore(src, mem.id)
        assert "gone" in e.value.message
        assert engine.get(src).state == "running"

    go(body)


def test_snapshot_disk_full_leaves_source_running(engine_run, monkeypatch):
    go, _ = engine_run

    async def body(engine: Engine):
        src = (await engine.create(standby_after=0, hibernate_after=0)).id
        await start_counter(engine, src)
        import torpor.runtime.snapshot as rs
        # the host's disk as if full: the snapshot is refused before anything is paused
        monkeypatch.setattr(rs, "HEADROOM", 1 << 60)
        with pytest.raises(Unavailable) as e:
            await engine.snapshot(src)
        assert "not enough disk" in e.value.message
        assert engine.list_snapshots() == []
        assert not list(engine.templates.images.glob(".snap-*"))
        c = await count(engine, src)
        await asyncio.sleep(0.2)
        assert await count(engine, src) > c

    go(body)


# --- the front doors: REST, SDK, CLI; a restart ------------------------------------------

@pytest.fixture
def own_server():
    from conftest import Server, teardown_data_dir
    srv = Server(make_data_dir(), pool_size=0).start()
    yield srv
    teardown_data_dir(srv)


def test_rest_sdk_cli_and_restart(own_server):
    import signal

    from conftest import cli, run

    from torpor import ConflictError, NotFoundError, Sandbox, Snapshot
    srv = own_server
    conn = {"url": srv.url, "api_key": srv.key}
    with srv.client() as api:
        sbx = Sandbox.create(standby_after=0, hibernate_after=0, **conn)
        sbx.commands.run("echo one > /home/user/f")
        snap = sbx.snapshot(name="one")
        assert snap.memory and snap.name == "one" and snap.sandbox_id == sbx.id
        assert [s.id for s in Snapshot.list(sandbox_id=sbx.id, **conn)] == [snap.id]
        r = api.get(f"/v1/sandboxes/{sbx.id}/snapshots")
        assert r.status_code == 200 and [s["id"] for s in r.json()] == [snap.id]
        assert api.get("/v1/usage").json()["total"]["snapshot_bytes"] >= snap.bytes > 0
        # 404s and a bad body
        assert api.get("/v1/snapshots/snap_nope").status_code == 404
        assert api.post("/v1/sandboxes/sbxnope/snapshots", json={}).status_code == 404
        assert api.post(f"/v1/sandboxes/{sbx.id}/fork", json={"count": 0}).status_code == 422
        assert api.post("/v1/sandboxes", json={"snapshot": "snap_nope"}).status_code == 404
        # a create from it, through REST; then the snapshot is in use: 409
        r = api.post("/v1/sandboxes", json={"snapshot": snap.id})
        assert r.status_code == 201, r.text
        copy = r.json()["id"]
        assert run(api, copy, "cat /home/user/f")["stdout"] == "one\n"
        with pytest.raises(ConflictError):
            Snapshot.delete(snap.id, **conn)
        # the CLI: fork, restore, list
        p = cli(srv, "sandbox", "fork", sbx.id, "--count", "2", "--json")
        assert p.returncode == 0, p.stderr
        import json as _json
        forks = [i["id"] for i in _json.loads(p.stdout)]
        assert len(forks) == 2
        sbx.commands.run("echo two > /home/user/f")
        p = cli(srv, "sandbox", "restore", sbx.id, snap.id)
        assert p.returncode == 0, p.stderr
        assert sbx.commands.run("cat /home/user/f").stdout == "one\n"
        p = cli(srv, "snapshot", "list", "--json")
        assert p.returncode == 0 and snap.id in p.stdout
        for f in forks:
            api.delete(f"/v1/sandboxes/{f}")
        api.delete(f"/v1/sandboxes/{copy}")

    # a kill of the server: the snapshot stays, and a sandbox starts from it
    srv.stop(signal.SIGKILL)
    srv.start()
    assert Snapshot.get(snap.id, **conn).bytes == snap.bytes
    again = Sandbox.create(snapshot=snap.id, **conn)
    assert again.commands.run("cat /home/user/f").stdout == "one\n"
    # a graceful restart too
    srv.stop(signal.SIGTERM)
    srv.start()
    assert [s.id for s in Snapshot.list(**conn)] == [snap.id]
    sbx.delete()
    again.delete()
    Snapshot.delete(snap.id, **conn)
    with pytest.raises(NotFoundError):
        Snapshot.get(snap.id, **conn)
    p = cli(srv, "snapshot", "rm", "snap_nope")
    assert p.returncode != 0
