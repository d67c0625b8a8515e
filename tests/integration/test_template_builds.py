"""Template builds on the engine, with real runsc: steps run in sandboxes, layers are cached,
a boot snapshot starts a sandbox with its start command already running."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time

import pytest

from torpor.engine.manager import Engine
from torpor.engine.types import Exited, Output
from torpor.errors import Conflict, Invalid, NotFound


def context_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def build(engine: Engine, name: str, steps: list[dict], context: bytes | None = None,
                tag: str = "latest") -> tuple[list[dict], dict]:
    events = [ev async for ev in await engine.builds.build(name, tag, steps, context, {})]
    return events, events[-1]


async def run(engine: Engine, sid: str, cmd: str) -> tuple[int | None, str]:
    out, code = [], None
    async for ev in await engine.processes.run(sid, ["sh", "-c", cmd], user="root"):
        if isinstance(ev, Output):
            out.append(ev.data)
        elif isinstance(ev, Exited):
            code = ev.exit_code
    return code, "".join(out)


STEPS = [
    {"type": "env", "env": {"GREETING": "hello"}},
    {"type": "run", "cmd": "echo built-by-$(id -un) > /home/user/built.txt"},
    {"type": "copy", "src": "app", "dst": "/home/user/app"},
    {"type": "run", "cmd": "echo second > /home/user/second.txt; rm -f /etc/issue",
     "user": "root"},
]
CONTEXT = context_of({"app/main.py": b"print('hi from app')\n", "app/data.txt": b"42\n"})


def test_a_build_runs_its_steps_in_sandboxes_and_a_sandbox_starts_from_it(engine_run):
    async def body(engine: Engine) -> None:
        events, last = await build(engine, "demo", STEPS, CONTEXT)
        assert last["type"] == "done", last
        tpl = last["template"]
        assert tpl["digest"].startswith("sha256:") and len(tpl["layers"]) == 3
        assert [e["cached"] for e in events if e["type"] == "step"] == [False] * 4
        # no build sandbox is left
        assert engine.list() == []
        sid = (await engine.create(template="demo")).id
        row = engine.records.get(sid)
        assert row.template == "demo" and row.template_digest == tpl["digest"]
        assert await run(engine, sid, "cat /home/user/built.txt") == (0, "built-by-user\n")
        assert await run(engine, sid, "cat /home/user/second.txt") == (0, "second\n")
        assert await run(engine, sid, "python3 /home/user/app/main.py") == (0, "hi from app\n")
        assert await run(engine, sid, "stat -c %U /home/user/app/data.txt") == (0, "user\n")
        # a file the last layer removed stays removed (an overlayfs whiteout in a layer)
        assert (await run(engine, sid, "test -e /etc/issue"))[0] == 1
        assert await run(engine, sid, "echo $GREETING") == (0, "hello\n")

        # nothing changed: every step cached, quickly; the name points at the same digest
        t0 = time.monotonic()
        events, last = await build(engine, "demo", STEPS, CONTEXT)
        assert time.monotonic() - t0 < 10  # (the bench measures it; here: no step ran)
        assert [e["cached"] for e in events if e["type"] == "step" and
                e["step"]["type"] in ("run", "copy")] == [True, True, True]
        assert last["template"]["digest"] == tpl["digest"]

        # the last step changed: only it runs; the running sandbox keeps its digest
        changed = [*STEPS[:-1], {"type": "run", "cmd": "echo third > /home/user/third.txt"}]
        events, last = await build(engine, "demo", changed, CONTEXT)
        ran = [e["step"]["type"] for e in events if e["type"] == "step" and not e["cached"]
               and e["step"]["type"] in ("run", "copy")]
        assert ran == ["run"] and last["template"]["digest"] != tpl["digest"]
        assert engine.records.get(sid).template_digest == tpl["digest"]
        assert await run(engine, sid, "cat /home/user/second.txt") == (0, "second\n")

    engine_run(body)


def test_a_failing_step_fails_the_build_and_leaves_the_name_as_it_was(engine_run):
    async def body(engine: Engine) -> None:
        _, first = await build(engine, "keep", [{"type": "run", "cmd": "echo v1 > /home/user/v"}])
        assert first["type"] == "done"
        events, last = await build(engine, "keep", [
            {"type": "run", "cmd": "echo v2 > /home/user/v"},
            {"type": "run", "cmd": "echo going wrong; exit 3"}])
        assert last["type"] == "error" and last["status"] == 422
        assert last["error"]["code"] == "build_failed" and last["error"]["exit_code"] == 3
        assert "going wrong" in last["error"]["message"]
        assert any(e["type"] == "log" and "going wrong" in e["data"] for e in events)
        assert engine.template("keep").digest == first["template"]["digest"]
        assert engine.list() == []  # its sandboxes are gone

    engine_run(body)


def test_bad_builds_are_refused_before_they_start(engine_run):
    async def body(engine: Engine) -> None:
        with pytest.raises(Invalid, match="DNS label"):
            await engine.builds.build("Not_A_Label", "latest", [], None, {})
        with pytest.raises(NotFound, match="nosuch"):
            await engine.builds.build("x", "latest",
                                      [{"type": "from_template", "template": "nosuch"}],
                                      None, {})
        with pytest.raises(Invalid, match="apt_install"):
            await engine.builds.build("x", "latest",
                                      [{"type": "apt_install", "packages": ["git"]}], None, {})
        with pytest.raises(Invalid, match="last step"):
            await engine.builds.build("x", "latest", [
                {"type": "start_cmd", "cmd": "sleep 1"}, {"type": "run", "cmd": "true"}],
                None, {})
        _, last = await build(engine, "x", [{"type": "copy", "src": "../etc/passwd",
                                                  "dst": "/tmp/x"}], CONTEXT)
        assert last["type"] == "error" and "outside the build context" in \
            last["error"]["message"]
        # two builds of one name at once: the second is refused
        first = await engine.builds.build("twice", "latest",
                                          [{"type": "run", "cmd": "sleep 1"}], None, {})
        with pytest.raises(Conflict, match="being built"):
            await engine.builds.build("twice", "latest", [], None, {})
        assert [e async for e in first][-1]["type"] == "done"

    engine_run(body)


def test_a_boot_snapshot_starts_sandboxes_with_the_start_command_running(engine_run):
    async def body(engine: Engine) -> None:
        server = ("python3 -c \"import http.server,os; os.chdir('/home/user');"
                  "open('/tmp/pid','w').write(str(os.getpid()));"
                  "http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler,"
                  "port=8000, bind='127.0.0.1')\"")
        steps = [{"type": "run", "cmd": "echo served > /home/user/index.html"},
                 {"type": "start_cmd", "cmd": server, "ready": {"port": 8000}}]
        events, last = await build(engine, "web", steps)
        assert last["type"] == "done", last
        assert last["template"]["snapshot"] is True
        assert any(e["type"] == "snapshot" for e in events)
        a = (await engine.create(template="web")).id
        b = (await engine.create(template="web")).id
        for sid in (a, b):
            # the server answers at once: it was running when the snapshot was taken
            code, out = await run(engine, sid, "python3 -c \"import urllib.request;print("
                                  "urllib.request.urlopen('http://127.0.0.1:8000/index.html')"
                                  ".read().decode().strip())\"")
            assert (code, out) == (0, "served\n")
            procs = await engine.processes.list(sid)
            assert any(p["tag"] == "start_cmd" and p["running"] for p in procs)
        # each has its own disk
        await run(engine, a, "echo only-a > /home/user/mine")
        assert (await run(engine, b, "test -e /home/user/mine"))[0] == 1
        events = engine.events(a)
        assert any(e.kind == "state" and e.to_state == "running"
                   and e.detail.get("boot_snapshot") for e in events)
        # rebuilt unchanged: cached, snapshot included
        events, last = await build(engine, "web", steps)
        assert all(e["cached"] for e in events if e["type"] == "step")

        # a ready check that never passes: a timeout naming the command's output
        _, last = await build(engine, "never", [
            {"type": "start_cmd", "cmd": "echo starting; sleep 600", "ready": {"port": 9},
             "timeout": 2}])
        assert last["type"] == "error" and last["error"]["code"] == "timeout"
        assert "starting" in last["error"]["message"]

    engine_run(body)


def test_deleting_a_template_in_use_is_refused_unless_forced(engine_run):
    async def body(engine: Engine) -> None:
        _, last = await build(engine, "used", [{"type": "run", "cmd": "echo u > /home/user/u"}])
        digest = last["template"]["digest"]
        sid = (await engine.create(template="used")).id
        with pytest.raises(Conflict, match=f"sandbox {sid}"):
            engine.delete_template("used")
        engine.delete_template("used", force=True)
        with pytest.raises(NotFound):
            engine.template("used")
        # the sandbox keeps working: what its template held stays while it exists
        assert await run(engine, sid, "cat /home/user/u") == (0, "u\n")
        assert engine.templates.by_digest(digest) is not None
        await engine.delete(sid)
        engine._template_gc()
        assert engine.templates.by_digest(digest) is None
        with pytest.raises(Conflict, match="built in"):
            engine.delete_template("base")

    engine_run(body)


def test_the_warm_pool_keeps_restored_sandboxes_of_a_snapshot_template(engine_run):
    async def body(engine: Engine) -> None:
        def pooled(digest: str) -> list[str]:
            return [r.id for r in engine.records.in_states(["running"], pooled=True)
                    if r.template_digest == digest]

        async def until(cond, what: str) -> None:
            for _ in range(400):
                if cond():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"timed out waiting for {what}")

        _, last = await build(engine, "pooled", [
            {"type": "start_cmd", "cmd": "sleep 100000", "ready": None}])
        digest = last["template"]["digest"]
        await until(lambda: pooled(digest), "a pool sandbox of the template")
        sid = (await engine.create(template="pooled")).id
        assert any(e.kind == "handed_out" for e in engine.events(sid))
        procs = await engine.processes.list(sid)
        assert any(p["tag"] == "start_cmd" and p["running"] for p in procs)
        await engine.delete(sid)
        # deleted: its pool sandboxes go, then what it held on disk
        engine.delete_template("pooled")
        await until(lambda: not pooled(digest), "the pool to drop it")
        await until(lambda: engine.templates.by_digest(digest) is None, "its files to go")

    engine_run(body, pool_size=1)
