"""The op vocabulary (`Op` in torpor/agent/protocol.py), the typed host client (torpor/channel/client.py)
and the engine's process and file surface over it (torpor/engine/processes.py, files.py).

The real agent runs as a host subprocess, as root (see test_agent_protocol.py), its stdio
wrapped as asyncio streams into a real `Channel`, as the holder's socket would be (the
holder relays whole frames unchanged). Commands run as `root`: the host has no `user`.
Nothing here asserts on durations.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from torpor.agent import protocol as P
from torpor.channel import AgentError, Channel
from torpor.channel.client import AgentClient
from torpor.engine.files import Files
from torpor.engine.processes import Processes
from torpor.engine.types import Exited, Failed, Output, Started
from torpor.errors import Invalid, NotFound, Timeout, Unavailable

AGENT_DIR = Path(__file__).resolve().parents[2] / "torpor" / "agent"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SID = "sbxclienttest"
HANG_GUARD = 60.0  # seconds after which a test fails instead of hanging

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the agent runs as root")


# --- the vocabulary -----------------------------------------------------------------------
def test_the_agent_answers_exactly_the_host_ops(monkeypatch):
    monkeypatch.syspath_prepend(str(AGENT_DIR))
    import agent  # as the agent imports its modules: by their bare names

    assert set(agent.HANDLERS) == P.HOST_OPS
    assert not P.HOST_OPS & P.AGENT_OPS


TERMINAL_OPS = ("pty_create", "pty_attach", "pty_resize")


def test_the_wire_words_stay_what_old_agents_speak():
    # hibernated sandboxes restore with the agent they were checkpointed with
    assert P.HOST_OPS == {
        "ping", "configure", "exec", "proc_list", "proc_info", "proc_follow", "proc_stdin",
        "proc_signal", "proc_wait", "oom_kill", "pids_kill", "hibernate_check", "resumed",
        "fs_stat", "fs_exists", "fs_list", "fs_mkdir", "fs_write", "fs_read", "fs_rename",
        "fs_remove", "connect", *TERMINAL_OPS, "watch"}
    assert P.AGENT_OPS == {"egress", "dns"}


# --- the agent, behind a real Channel -----------------------------------------------------
@asynccontextmanager
async def running_agent():
    env_dir = tempfile.mkdtemp(prefix="torpor-agent-env-")  # its env file's, not /run's
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-s", "-B", str(AGENT_DIR / "agent.py"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd="/",
        env=dict(os.environ, TORPOR_ENV_DIR=env_dir))
    chan = Channel(proc.stdout, proc.stdin)
    try:
        await chan.wait_ready(HANG_GUARD)
        yield AgentClient(chan), proc
    finally:
        await chan.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(env_dir, ignore_errors=True)


def run(body):
    """Run `async body(client, proc)` against a fresh agent."""
    async def main():
        async with running_agent() as (client, proc):
            return await asyncio.wait_for(body(client, proc), HANG_GUARD)

    return asyncio.run(main())


async def collect(stream) -> list[tuple]:
    out = []
    async for ev in stream:
        out.append(("msg", ev.msg) if ev.kind == "msg" else (ev.kind, ev.data))
    return out


@root_only
def test_client_ping_and_configure():
    async def body(client, proc):
        assert (await client.ping())["pid"] == client.channel.hello["pid"]
        assert (await client.configure({"A": "1"}))["env"] == {"A": "1"}
        assert (await client.configure())["env"] == {"A": "1"}  # None keeps it

    run(body)


@root_only
def test_client_resumed_with_and_without_a_warm_up():
    async def body(client, proc):
        assert await client.resumed() == {}  # the old wire: no arguments
        # with warm_up the agent spawns `true` once its answer has left; it serves on
        assert await client.resumed(warm_up=True) == {}
        assert (await client.configure({"B": "2"}))["env"] == {"B": "2"}
        st = client.exec(["sh", "-c", "echo after $B"], user="root")
        assert ("stdout", b"after 2\n") in await collect(st)
        assert (await st.finish())["exit_code"] == 0

    run(body)


@root_only
def test_client_exec_streams_events_and_stdin():
    async def body(client, proc):
        st = client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], user="root")
        got = await collect(st)
        assert got[0][0] == "msg" and got[0][1]["event"] == "start"
        assert ("stdout", b"out\n") in got and ("stderr", b"err\n") in got
        info = await st.finish()
        assert (info["exit_code"], info["running"], info["pid"]) == (3, False,
                                                                      got[0][1]["pid"])

        st = client.exec(["cat"], user="root", stdin=True)
        await st.send(b"fed")
        await st.send_eof()
        assert ("stdout", b"fed") in await collect(st)
        assert (await st.finish())["exit_code"] == 0

    run(body)


@root_only
def test_client_processes_background_wait_and_errors():
    async def body(client, proc):
        with pytest.raises(AgentError) as e:
            await client.proc_info(999999)
        assert e.value.code == "no_such_process"

        info = await client.exec_background(["cat"], user="root", tag="t")
        pid = info["pid"]
        assert info["running"] and info["tag"] == "t"
        assert pid in [p["pid"] for p in await client.proc_list()]
        assert await client.proc_stdin(pid, "hello", eof=True) == {"pid": pid}
        done = await client.proc_wait(pid, timeout=HANG_GUARD)
        assert (done["running"], done["exit_code"]) == (False, 0)
        assert ("stdout", b"hello") in await collect(client.proc_follow(pid, 0, False))

        sleeper = (await client.exec_background(["sleep", "60"], user="root"))["pid"]
        with pytest.raises(TimeoutError):
            await client.proc_wait(sleeper, timeout=0.05)
        assert client.channel.streams == {}  # the timed-out wait was abandoned
        await client.proc_signal(sleeper, "SIGKILL")
        assert (await client.proc_wait(sleeper))["signal"] == "SIGKILL"

    run(body)


@root_only
def test_client_files_write_read_stat(tmp_path):
    path = str(tmp_path / "sub" / "f.bin")
    data = os.urandom(300_000) + b"end"

    async def body(client, proc):
        st = client.fs_write(path, "root", 0o600)
        await st.send(data)
        await st.send_eof()
        assert await st.finish() == {"path": path, "size": len(data)}

        st = client.fs_read(path, "root")
        got = await collect(st)
        assert got[0] == ("msg", {"event": "size", "size": len(data)})
        assert b"".join(d for kind, d in got[1:] if kind == "stdout") == data
        assert (await st.finish())["size"] == len(data)

        entry = await client.fs_stat(path, "root")
        assert (entry["type"], entry["size"], entry["mode"]) == ("file", len(data), 0o600)
        assert await client.fs_exists(path, "root") == {"exists": True}
        await client.fs_rename(path, path + ".2", user="root")
        assert [e["name"] for e in await client.fs_list(str(tmp_path / "sub"), 1, "root")] \
            == ["f.bin.2"]
        await client.fs_remove(str(tmp_path / "sub"), recursive=True, user="root")
        assert await client.fs_exists(path + ".2", "root") == {"exists": False}
        with pytest.raises(AgentError) as e:
            await client.fs_stat(path, "root")
        assert e.value.code == "not_found"

    run(body)


# --- the engine's surface over the client -------------------------------------------------
def engine_parts(client, held=None):
    async def client_of(sid):
        assert sid == SID
        return client

    hold = (lambda sid, pid: held.append((sid, pid))) if held is not None else None
    return Processes(client_of, hold), Files(client_of)


async def events_of(it) -> list:
    return [ev async for ev in it]


@root_only
def test_processes_run_gives_typed_decoded_events():
    async def body(client, proc):
        processes, _ = engine_parts(client)
        # an e-acute cut between two writes, and a byte that is not UTF-8
        evs = await events_of(await processes.run(
            SID, ["sh", "-c", r"printf '\303'; sleep 0.1; printf '\251\n'; printf '\377' >&2"],
            user="root"))
        assert isinstance(evs[0], Started) and isinstance(evs[-1], Exited)
        assert evs[-1].exit_code == 0 and evs[-1].pid == evs[0].pid
        text = {s: "".join(e.data for e in evs if isinstance(e, Output) and e.stream == s)
                for s in ("stdout", "stderr")}
        assert text == {"stdout": "\u00e9\n", "stderr": "\ufffd"}

        evs = await events_of(await processes.run(SID, ["cat"], user="root", stdin="in"))
        assert Output("stdout", "in") in evs

        evs = await events_of(await processes.run(SID, ["sleep", "60"], user="root",
                                                  timeout=0.2))
        assert evs[-1].timed_out and evs[-1].signal == "SIGKILL"

        evs = await events_of(await processes.run(SID, ["true"], user="root", cwd="/nonexistent"))
        assert len(evs) == 1 and isinstance(evs[0], Failed)
        assert isinstance(evs[0].error, Invalid) and SID in evs[0].error.message

        # a consumer that leaves early: the stream is abandoned, the command runs on
        it = await processes.run(SID, ["sh", "-c", "echo x; sleep 60"], user="root")
        first = await anext(it)
        await it.aclose()
        assert client.channel.streams == {}
        assert (await processes.info(SID, first.pid))["running"]

    run(body)


@root_only
def test_processes_background_follow_wait_and_errors():
    async def body(client, proc):
        held = []
        processes, _ = engine_parts(client, held)
        info = await processes.start(SID, ["cat"], user="root", stdin="abc",
                                     keep_alive=True)
        pid = info["pid"]
        assert held == [(SID, pid)]
        assert (await processes.wait(SID, pid, HANG_GUARD))["exit_code"] == 0
        evs = await events_of(await processes.follow(SID, pid, 0, follow=False))
        assert Output("stdout", "abc") in evs and isinstance(evs[-1], Exited)
        assert pid in [p["pid"] for p in await processes.list(SID)]

        with pytest.raises(NotFound):
            await processes.follow(SID, 999999)  # before any event
        with pytest.raises(NotFound):
            await processes.wait(SID, 999999, 0)

        sleeper = (await processes.start(SID, ["sleep", "60"], user="root"))["pid"]
        with pytest.raises(Timeout) as e:
            await processes.wait(SID, sleeper, 0.05)
        assert e.value.status == 504 and e.value.extra["pid"] == sleeper
        await processes.signal(SID, sleeper, "SIGTERM")
        assert (await processes.wait(SID, sleeper, HANG_GUARD))["signal"] == "SIGTERM"
        with pytest.raises(Invalid):
            await processes.signal(SID, pid, "SIGNOPE")

        proc.kill()  # the sandbox stops
        await client.channel.closed.wait()
        with pytest.raises(Unavailable) as e:
            await processes.list(SID)
        assert e.value.message == f"sandbox {SID}: the sandbox stopped during proc_list"

    run(body)


@root_only
def test_files_read_write_and_manage(tmp_path):
    data = os.urandom(200_000)

    async def chunks():
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    async def body(client, proc):
        _, files = engine_parts(client)
        path = str(tmp_path / "d" / "f")
        assert await files.write(SID, path, "root", 0o640, chunks()) == {"path": path,
                                                                        "size": len(data)}
        size, contents = await files.read(SID, path, "root")
        assert size == len(data)
        assert b"".join([c async for c in contents]) == data
        assert client.channel.streams == {}

        with pytest.raises(NotFound):
            await files.read(SID, path + ".missing", "root")  # before any byte
        with pytest.raises(Invalid):
            await files.write(SID, "", "root", None, chunks())

        assert (await files.stat(SID, path, "root"))["mode"] == 0o640
        assert (await files.mkdir(SID, str(tmp_path / "e"), user="root"))["created"]
        await files.rename(SID, path, str(tmp_path / "e" / "g"), user="root")
        assert (await files.exists(SID, path, "root")) == {"exists": False}
        names = [e["path"] for e in await files.list(SID, str(tmp_path), 2, "root")]
        assert names == [str(tmp_path / x) for x in ("d", "e", "e/g")]
        await files.remove(SID, str(tmp_path / "e"), recursive=True, user="root")
        assert [e["name"] for e in await files.list(SID, str(tmp_path), 1, "root")] == ["d"]

    run(body)
