"""The OpenAI Agents SDK's sandbox provider (torpor.integrations.openai_agents) on real
sandboxes: the SDK's own session operations and tools, no model call (the SDK's
ScriptedModel plays the model where a Runner is driven).

Two sandboxes for the session test, two more for the Runner test (its last run makes one
anew from the SDK's workspace snapshot)."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import pytest
from agents import RunConfig, Runner, set_tracing_disabled
from agents.sandbox import (
    Group,
    LocalSnapshotSpec,
    Manifest,
    SandboxAgent,
    SandboxRunConfig,
    User,
)
from agents.sandbox.capabilities import Shell
from agents.sandbox.entries import File
from agents.sandbox.errors import (
    ConfigurationError,
    ExecTimeoutError,
    ExecTransportError,
    InvalidManifestPathError,
    PtySessionNotFoundError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
    WorkspaceRootNotFoundError,
    WorkspaceStartError,
)
from agents.testing import ScriptedModel, assistant_message, function_call

from torpor.integrations.openai_agents import (
    TorporSandboxClient,
    TorporSandboxClientOptions,
    TorporSandboxSessionState,
    torpor_sandbox,
)

pytestmark = pytest.mark.integration


SUITE = "openai-agents"


@pytest.fixture(autouse=True)
def _no_tracing_and_no_leftovers(api):
    """No trace export (traffic stays on loopback; left off after, which sends nothing);
    every sandbox a test made (they carry its metadata, the SDK's remakes too) is deleted
    after it, also when it failed."""
    set_tracing_disabled(True)
    try:
        yield
    finally:
        listed = api.get("/v1/sandboxes", params={"metadata.suite": SUITE})
        for sbx in listed.json() if listed.status_code == 200 else []:
            api.delete(f"/v1/sandboxes/{sbx['id']}")


def state_of(api, sid: str) -> str:
    r = api.get(f"/v1/sandboxes/{sid}")
    return r.json()["state"] if r.status_code == 200 else str(r.status_code)


def test_session_operations_survive_hibernation_and_resume(server, api):
    """Create, exec, files, terminals, a port; serialize -> hibernate -> resume from the
    JSON in a new client: the same sandbox, its file and its server process; a session
    from a Torpor snapshot of it; delete, and then the SDK's errors."""
    opts = TorporSandboxClientOptions(template="base", env={"GREETING": "hello"},
                                      metadata={"suite": SUITE},
                                      exposed_ports=(8000,))

    async def first_life() -> tuple[str, str, str]:
        client = TorporSandboxClient(url=server.url, api_key=server.key)
        session = await client.create(options=opts)
        sid = session.state.sandbox_id
        info = await torpor_sandbox(session).info()  # the Torpor SDK's handle
        assert (info.id, info.template, info.metadata) == (sid, "base", {"suite": SUITE})
        async with session:  # start: the workspace root; leaving: on_exit="keep"
            r = await session.exec("echo $GREETING; pwd; echo oops >&2; exit 3")
            assert (r.exit_code, r.stdout, r.stderr) == (
                3, b"hello\n/home/user/workspace\n", b"oops\n")
            blob = bytes(range(256)) * 4
            await session.write("data/blob.bin", io.BytesIO(blob))
            assert (await session.read("data/blob.bin")).read() == blob
            assert await session.read_bounded("data/blob.bin", max_bytes=10) == blob[:10]
            assert [e.path for e in await session.ls("data")] == [
                "/home/user/workspace/data/blob.bin"]
            with pytest.raises(WorkspaceReadNotFoundError):
                await session.read("data/missing.txt")
            with pytest.raises(InvalidManifestPathError):  # the SDK's workspace confinement
                await session.read("../../../etc/shadow")
            with pytest.raises(ExecTimeoutError):
                await session.exec("sleep 30", timeout=0.5)
            assert (await session.exec("whoami", user="root")).stdout == b"root\n"
            # the SDK's path helper, removed behind its back, is put back on the next use
            await session.exec("rm -rf /tmp/openai-agents")
            assert (await session.read("data/blob.bin")).read() == blob
            await session.mkdir("data/sub/deeper", parents=True)
            with pytest.raises(WorkspaceArchiveWriteError):  # exists, without parents
                await session.mkdir("data/sub")

            # a terminal: type into it, its exit code comes back
            up = await session.pty_exec_start(
                "read line; echo got:$line; exit 7", tty=True, yield_time_s=0.5)
            assert up.process_id is not None and up.exit_code is None
            up = await session.pty_write_stdin(session_id=up.process_id, chars="abc\n",
                                               yield_time_s=5)
            assert up.exit_code == 7 and b"got:abc" in up.output and up.process_id is None
            with pytest.raises(PtySessionNotFoundError):
                await session.pty_write_stdin(session_id=1, chars="x")
            up = await session.pty_exec_start("printf 'a\\nb\\n'; exit 2", yield_time_s=5)
            assert (up.output, up.exit_code) == (b"a\nb\n", 2)
            up = await session.pty_exec_start("sleep 60", timeout=0.5, yield_time_s=10)
            assert up.exit_code == 137  # killed at its timeout (SIGKILL: 128 + 9)
            up = await session.pty_exec_start("sleep 60", tty=True, yield_time_s=0.3)
            assert up.process_id is not None
            await session.pty_terminate_all()  # what closing the session does
            procs = await torpor_sandbox(session).commands.list()
            assert not [p for p in procs if p.running and "sleep" in " ".join(p.argv)]

            # a server that outlives this process: what the resumed session must find
            r = await session.exec("cd data && (nohup python3 -m http.server 8000 "
                                   ">/dev/null 2>&1 & echo $!)")
            pid = r.stdout.decode().strip()
            assert pid.isdigit()
            state = json.dumps(client.serialize_session_state(session.state))
        return sid, pid, state

    sid, pid, state = asyncio.run(first_life())
    assert state_of(api, sid) in ("running", "standby")  # kept: on_exit="keep"
    assert server.key not in state  # the serialized state holds no key
    r = api.post(f"/v1/sandboxes/{sid}/hibernate")
    assert r.status_code == 200, r.text
    assert state_of(api, sid) == "hibernated"

    async def second_life() -> None:
        client = TorporSandboxClient(url=server.url, api_key=server.key)
        restored = client.deserialize_session_state(json.loads(state))
        assert isinstance(restored, TorporSandboxSessionState)
        session = await client.resume(restored)
        async with session:
            assert session.state.sandbox_id == sid
            assert await session.running()
            blob = (await session.read("data/blob.bin")).read()
            assert blob == bytes(range(256)) * 4
            r = await session.exec(f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
            assert "http.server" in r.stdout.decode()
            end = await session.resolve_exposed_port(8000)
            async with httpx.AsyncClient(timeout=30) as web:
                got = await web.get(f"http://{end.host}:{end.port}/blob.bin?{end.query}")
            assert got.status_code == 200 and got.content == blob

            # a Torpor snapshot with memory: a new session's sandbox starts as a copy,
            # the server process running in it
            snap = await torpor_sandbox(session).snapshot()
            snapshots.append(snap.id)
            copy = await client.create(options=TorporSandboxClientOptions(
                from_snapshot=snap.id, metadata={"suite": SUITE}, on_exit="delete"))
            async with copy:
                assert copy.state.sandbox_id != sid
                r = await copy.exec(f"cat /proc/{pid}/cmdline | tr '\\0' ' '")
                assert "http.server" in r.stdout.decode()
                assert (await copy.read("data/blob.bin")).read() == blob
                await copy.exec("rm -rf /home/user/workspace", user="root")
                with pytest.raises(WorkspaceRootNotFoundError):  # gone from under it
                    await copy.exec("true")
            assert state_of(api, copy.state.sandbox_id) == "404"  # on_exit="delete"

            await client.delete_sandbox(session)
            assert state_of(api, sid) == "404"
            with pytest.raises(ExecTransportError) as err:
                await session.exec("true")
            assert err.value.context["reason"] == "sandbox_not_found"
            assert err.value.retryable is False
        with pytest.raises(WorkspaceStartError) as err:
            await client.resume(client.deserialize_session_state(json.loads(state)))
        assert err.value.context["reason"] == "sandbox_not_found"
        assert sid in str(err.value)
        unknown = client.deserialize_session_state(
            {**json.loads(state), "sandbox_id": "sbxnosuchsandbox"})
        with pytest.raises(WorkspaceStartError, match="sbxnosuchsandbox"):
            await client.resume(unknown)
        with pytest.raises(ConfigurationError) as err:
            await client.create(options=TorporSandboxClientOptions(template="no-such"))
        assert "no-such" in str(err.value)

    snapshots: list[str] = []
    try:
        asyncio.run(second_life())
    finally:
        for snap_id in snapshots:
            api.delete(f"/v1/snapshots/{snap_id}", params={"force": "true"})


def test_runner_runs_tools_in_the_sandbox_and_resumes_it(server, api, tmp_path):
    """A SandboxAgent under Runner with a scripted model: its exec_command tool runs in a
    Torpor sandbox, hibernated when the run ends (on_exit); a second run resumes the same
    sandbox from the first run's state; a third, after the sandbox was deleted, gets a new
    one holding the workspace snapshot the second run left."""

    def agent(*steps) -> SandboxAgent:
        return SandboxAgent(name="worker", instructions="work", capabilities=[Shell()],
                            model=ScriptedModel([*steps, [assistant_message("done")]]))

    def call(cmd: str, n: int):
        return [function_call("exec_command", {"cmd": cmd, "yield_time_ms": 10000},
                              call_id=f"call-{n}")]

    client = TorporSandboxClient(url=server.url, api_key=server.key)

    async def run(ag: SandboxAgent, **sandbox) -> tuple[str, dict]:
        cfg = RunConfig(sandbox=SandboxRunConfig(
            client=client, snapshot=LocalSnapshotSpec(base_path=tmp_path), **sandbox))
        result = await Runner.run(ag, "go", run_config=cfg)
        assert result.final_output == "done"
        outputs = [str(i.output) for i in result.new_items if hasattr(i, "output")]
        return "\n".join(outputs), result.to_state().to_json()["sandbox"]["session_state"]

    # the manifest's account and group need root to make: the SDK's admin commands get it
    alice = User(name="alice")
    manifest = Manifest(users=[alice], groups=[Group(name="team", users=[alice])],
                        entries={"hello.txt": File(content=b"from the manifest\n")})
    out, payload = asyncio.run(run(
        agent(call("echo made-by-the-agent > note.txt && cat note.txt hello.txt && whoami "
                   "&& id alice", 1)),
        manifest=manifest,
        options=TorporSandboxClientOptions(metadata={"suite": SUITE}, on_exit="hibernate")))
    assert "made-by-the-agent" in out and "from the manifest" in out
    assert "\nuser\n" in out and "(team)" in out and "exited with code 0" in out
    sid = payload["sandbox_id"]
    assert state_of(api, sid) == "hibernated"  # on_exit: checkpointed when the run ended

    out, payload = asyncio.run(run(agent(call("cat note.txt; echo $$", 2)),
                                   session_state=client.deserialize_session_state(payload)))
    assert "made-by-the-agent" in out
    assert payload["sandbox_id"] == sid  # the same sandbox, kept between runs

    assert api.delete(f"/v1/sandboxes/{sid}").status_code in (200, 204)
    out, payload = asyncio.run(run(agent(call("cat note.txt", 3)),
                                   session_state=client.deserialize_session_state(payload)))
    new = payload["sandbox_id"]
    try:
        assert new != sid and "made-by-the-agent" in out  # rebuilt from the snapshot
    finally:
        api.delete(f"/v1/sandboxes/{new}")
