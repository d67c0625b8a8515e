"""The MCP door (issue 16): the `mcp` library's own client drives the server's `/mcp` over
streamable HTTP, and `torpor mcp` (stdio, relayed to `/mcp`) as a desktop client spawns it.
Real server, real sandboxes; one sandbox per test, made through MCP."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from contextlib import asynccontextmanager

import pytest
from conftest import CLI, ROOT, Server, make_data_dir, teardown_data_dir
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

pytestmark = pytest.mark.integration

TOOLS = {"create_sandbox", "list_sandboxes", "get_sandbox", "delete_sandbox", "run_command",
         "get_command_output", "list_commands", "kill_command", "read_file", "write_file",
         "list_files", "run_code", "preview_url", "standby_sandbox", "resume_sandbox",
         "snapshot_sandbox", "fork_sandbox"}


@asynccontextmanager
async def over_http(server: Server, key: str | None = None, header: str = "authorization"):
    value = f"Bearer {key or server.key}" if header == "authorization" else key or server.key
    http = create_mcp_http_client(headers={header: value})
    async with http, Client(streamable_http_client(server.url + "/mcp", http_client=http)) as c:
        yield c


def over_stdio(server: Server, **kw) -> Client:
    env = {"PATH": os.environ["PATH"], "TORPOR_URL": server.url,
           "TORPOR_API_KEY": server.key}
    return Client(StdioServerParameters(command=CLI[0], args=[*CLI[1:], "mcp"], env=env,
                                        cwd=str(ROOT)), **kw)


def text(result) -> str:
    return "".join(b.text for b in result.content if b.type == "text")


async def call(client: Client, name: str, args: dict, **kw):
    """A tool's answer, JSON-decoded; a tool error fails the test with its text."""
    result = await client.call_tool(name, args, **kw)
    assert not result.is_error, text(result)
    return json.loads(text(result))


async def the_basics(client: Client, api) -> None:
    """What both transports must do: list tools, create, run, write and read, delete."""
    listed = {t.name: t for t in (await client.list_tools()).tools}
    assert set(listed) == TOOLS
    run = listed["run_command"]
    assert run.description and "exit code" in run.description
    assert run.input_schema["additionalProperties"] is False
    assert run.input_schema["required"] == ["sandbox_id", "command"]
    assert run.input_schema["properties"]["timeout"]["description"]

    sbx = await call(client, "create_sandbox", {"metadata": {"via": "mcp"}})
    sid = sbx["id"]
    try:
        assert sbx["state"] == "running"
        # a normal sandbox: the REST door lists it, with its labels
        rest = api.get("/v1/sandboxes", params={"metadata.via": "mcp"}).json()
        assert sid in {s["id"] for s in rest}

        out = await call(client, "run_command", {
            "sandbox_id": sid, "command": "echo hi; echo oops >&2; exit 3"})
        assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, "hi\n", "oops\n")

        written = await call(client, "write_file", {"sandbox_id": sid, "path": "notes/a.txt",
                                                    "content": "héllo\n"})
        assert written["size"] == len("héllo\n".encode())
        read = await client.call_tool("read_file", {"sandbox_id": sid,
                                                    "path": "notes/a.txt"})
        assert not read.is_error and text(read) == "héllo\n"
        entries = await call(client, "list_files", {"sandbox_id": sid, "path": "notes"})
        assert [(e["name"], e["size"]) for e in entries] == [("a.txt", 7)]
        cat = await call(client, "run_command", {"sandbox_id": sid,
                                                 "command": "cat notes/a.txt"})
        assert cat["stdout"] == "héllo\n"
    finally:
        gone = await call(client, "delete_sandbox", {"sandbox_id": sid})
    assert gone == {"deleted": sid}
    assert api.get(f"/v1/sandboxes/{sid}").status_code == 404


def test_http_basics_progress_and_bad_input(server, api):
    async def main():
        async with over_http(server) as client:
            await the_basics(client, api)
            sid = (await call(client, "create_sandbox", {}))["id"]
            try:
                # output arrives as progress while the command runs, each line as it comes
                seen = []

                async def progress(value, total, message):
                    seen.append(message)

                out = await call(client, "run_command", {
                    "sandbox_id": sid,
                    "command": "for i in 1 2 3; do echo line$i; sleep 0.3; done"},
                    progress_callback=progress)
                assert out["stdout"] == "line1\nline2\nline3\n"
                assert seen[0].startswith("started pid ")
                assert "".join(seen[1:]) == out["stdout"] and len(seen) >= 4

                # an argument the tool does not take: refused, named, nothing run
                bad = await client.call_tool("run_command", {
                    "sandbox_id": sid, "command": "touch /tmp/ran", "shell": "bash"})
                assert bad.is_error and "unknown argument 'shell'" in text(bad)
                bad = await client.call_tool("run_command", {"sandbox_id": sid,
                                                             "command": "true",
                                                             "timeout": -1})
                assert bad.is_error and "timeout" in text(bad)
                bad = await client.call_tool("run_command", {"sandbox_id": sid,
                                                             "command": "true",
                                                             "env": {"A=B": "x"}})
                assert bad.is_error and "env.A=B: an environment variable name" in text(bad)
                check = await call(client, "run_command", {
                    "sandbox_id": sid, "command": "test -e /tmp/ran"})
                assert check["exit_code"] == 1

                # engine errors: tool errors with the server's message, the session lives on
                missing = await client.call_tool("get_sandbox", {"sandbox_id": "sbx_nope"})
                assert missing.is_error and text(missing).startswith("not_found: ")
                assert "sbx_nope" in text(missing)
                assert missing.structured_content["status"] == 404
                nofile = await client.call_tool("read_file", {"sandbox_id": sid,
                                                              "path": "/nope"})
                assert nofile.is_error and "not_found" in text(nofile)
                # a sandbox without the code interpreter says so
                nocode = await client.call_tool("run_code", {"sandbox_id": sid,
                                                             "code": "1+1"})
                assert nocode.is_error and text(nocode)
                binary = base64.b64encode(bytes(range(256))).decode()
                await call(client, "write_file", {"sandbox_id": sid, "path": "b.bin",
                                                  "content": binary, "encoding": "base64"})
                notutf8 = await client.call_tool("read_file", {"sandbox_id": sid,
                                                               "path": "b.bin"})
                assert notutf8.is_error and "base64" in text(notutf8)
                again = await client.call_tool("read_file", {
                    "sandbox_id": sid, "path": "b.bin", "encoding": "base64"})
                assert text(again) == binary

                # background, listed, signalled
                bg = await call(client, "run_command", {"sandbox_id": sid,
                                                        "command": "sleep 600",
                                                        "background": True})
                procs = await call(client, "list_commands", {"sandbox_id": sid})
                assert any(p["pid"] == bg["pid"] and p["running"] for p in procs)
                await call(client, "kill_command", {"sandbox_id": sid, "pid": bg["pid"],
                                                    "signal": "SIGKILL"})
                done = await call(client, "get_command_output", {
                    "sandbox_id": sid, "pid": bg["pid"], "wait": 10})
                assert done["running"] is False and done["signal"] == "SIGKILL"

                # standby and resume, and a preview URL
                assert (await call(client, "standby_sandbox",
                                   {"sandbox_id": sid}))["state"] == "standby"
                assert (await call(client, "resume_sandbox",
                                   {"sandbox_id": sid}))["state"] == "running"
                url = await call(client, "preview_url", {"sandbox_id": sid, "port": 8000})
                assert url["port"] == 8000 and "torpor_token=" in url["url"]
            finally:
                await call(client, "delete_sandbox", {"sandbox_id": sid})

    asyncio.run(main())


def test_stdio_through_torpor_mcp(server, api):
    async def main():
        async with over_stdio(server) as client:
            await the_basics(client, api)
        # most desktop clients still speak the 2025 protocol (an initialize handshake and
        # a session): the relay carries that too, progress included
        async with over_stdio(server, mode="legacy") as client:
            sid = (await call(client, "create_sandbox", {}))["id"]
            try:
                seen = []

                async def progress(value, total, message):
                    seen.append(message)

                out = await call(client, "run_command", {
                    "sandbox_id": sid, "command": "echo one; sleep 0.3; echo two"},
                    progress_callback=progress)
                assert out["stdout"] == "one\ntwo\n" and seen[1:] == ["one\n", "two\n"]
                missing = await client.call_tool("get_sandbox", {"sandbox_id": "sbx_nope"})
                assert missing.is_error and text(missing).startswith("not_found: ")
            finally:
                await call(client, "delete_sandbox", {"sandbox_id": sid})

    asyncio.run(main())


def test_stdio_session_outlives_a_server_restart():
    # a 2025 session lives in the server's memory: torpor mcp opens a new one, replays the
    # handshake and the unanswered request; the sandbox came back with its files
    srv = Server(make_data_dir(), pool_size=0).start()
    try:
        async def main():
            async with over_stdio(srv, mode="legacy") as client:
                sid = (await call(client, "create_sandbox", {}))["id"]
                await call(client, "write_file", {"sandbox_id": sid, "path": "kept",
                                                  "content": "still here\n"})
                srv.stop()  # SIGTERM: the sandbox is hibernated
                srv.start()
                out = await call(client, "run_command", {"sandbox_id": sid,
                                                         "command": "cat kept"})
                assert out["stdout"] == "still here\n"
                await call(client, "delete_sandbox", {"sandbox_id": sid})

        asyncio.run(main())
    finally:
        teardown_data_dir(srv)


def test_stdio_without_the_server_says_why():
    # no server at the URL: the relay answers the client's requests with an error saying
    # so (no crash, no hang)
    env = {"PATH": os.environ["PATH"], "TORPOR_URL": "http://127.0.0.1:9",
           "TORPOR_API_KEY": "k"}

    async def main():
        client = Client(StdioServerParameters(command=CLI[0], args=[*CLI[1:], "mcp"],
                                              env=env, cwd=str(ROOT)))
        async with asyncio.timeout(60):
            try:
                async with client:
                    await client.list_tools()
            except BaseException as e:  # noqa: BLE001 - the client wraps it in groups
                return leaves(e)
        return []

    errors = [str(e) for e in asyncio.run(main()) if isinstance(e, MCPError)]
    assert any("cannot reach http://127.0.0.1:9/mcp" in e and "torpor serve" in e
               for e in errors), errors


def leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in leaves(sub)]
    return [e]


def test_revoked_key_ends_a_long_lived_session(server, api):
    made = api.post("/v1/keys", json={"name": "mcp-revoke"}).json()

    async def main():
        # X-API-Key works as well as Bearer
        async with over_http(server, key=made["key"], header="x-api-key") as client:
            await call(client, "list_sandboxes", {})
            assert api.delete(f"/v1/keys/{made['id']}").status_code == 204
            with pytest.raises(MCPError) as e:
                await client.call_tool("list_sandboxes", {})
            assert "invalid or revoked API key" in str(e.value)
        refused = []
        try:  # a wrong key: refused at the first request, with the reason
            async with over_http(server, key="not-a-key") as client:
                await client.list_tools()
        except BaseException as e:  # noqa: BLE001 - the client wraps it in groups
            refused = [str(x) for x in leaves(e) if isinstance(x, MCPError)]
        assert any("invalid or revoked API key" in x for x in refused), refused

    asyncio.run(main())


def test_client_gone_mid_command_then_reattach(server, api):
    async def main():
        async with over_http(server) as client:
            sid = (await call(client, "create_sandbox", {}))["id"]
        try:
            started = asyncio.Event()
            pid = None

            async def progress(value, total, message):
                nonlocal pid
                if message.startswith("started pid "):
                    pid = int(message.split()[2].rstrip(";"))
                if message == "first\n":
                    started.set()

            async with over_http(server) as client:
                task = asyncio.create_task(client.call_tool("run_command", {
                    "sandbox_id": sid,
                    "command": "echo first; sleep 2; echo second; exit 7"},
                    progress_callback=progress))
                await asyncio.wait_for(started.wait(), 30)
                task.cancel()  # the client goes away mid-command
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert pid is not None
            async with over_http(server) as client:
                back = await call(client, "get_command_output", {
                    "sandbox_id": sid, "pid": pid, "wait": 30})
                assert back["running"] is False and back["exit_code"] == 7
                assert back["stdout"] == "first\nsecond\n"
                # the offset it gave goes on from there: nothing more
                rest = await call(client, "get_command_output", {
                    "sandbox_id": sid, "pid": pid, "offset": back["next_offset"],
                    "wait": 0})
                assert rest["stdout"] == "" and rest["next_offset"] == back["next_offset"]
        finally:
            api.delete(f"/v1/sandboxes/{sid}")

    asyncio.run(main())


@pytest.mark.slow
def test_run_code_gives_images_and_errors(ci_server):
    # conftest's ci_server: code-interpreter built once per run, for every kernel test
    async def main():
        async with over_http(ci_server) as client:
            sbx = await client.call_tool("create_sandbox", {"template": "code-interpreter"})
            assert not sbx.is_error, text(sbx)
            sid = json.loads(text(sbx))["id"]
            try:
                seen = []

                async def progress(value, total, message):
                    seen.append(message)

                result = await client.call_tool("run_code", {"sandbox_id": sid, "code": (
                    "import matplotlib.pyplot as plt\nprint('plotting')\n"
                    "plt.plot([1, 2, 3], [1, 4, 9])\nplt.show()\nx = 41\nx + 1")},
                    progress_callback=progress)
                assert not result.is_error, text(result)
                kinds = [b.type for b in result.content]
                assert "image" in kinds and result.content[0].text == "plotting\n"
                image = next(b for b in result.content if b.type == "image")
                assert image.mime_type == "image/png"
                assert base64.b64decode(image.data).startswith(b"\x89PNG\r\n\x1a\n")
                assert result.content[-1].text == "42"
                assert "plotting\n" in seen  # as it was printed
                # state stays between runs; an exception is a tool error with its name,
                # value and traceback
                err = await client.call_tool("run_code", {"sandbox_id": sid,
                                                          "code": "x / 0"})
                assert err.is_error
                assert err.structured_content["error"]["name"] == "ZeroDivisionError"
                assert "ZeroDivisionError" in text(err) and "x / 0" in text(err)
            finally:
                await call(client, "delete_sandbox", {"sandbox_id": sid})

    asyncio.run(main())


def test_cli_without_the_library_says_how_to_install(tmp_path):
    # the client install: `mcp` missing (a path entry that hides it) -> one line
    (tmp_path / "mcp").mkdir()
    (tmp_path / "mcp" / "__init__.py").write_text("raise ImportError('no mcp here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", "from torpor.cli.main import app; app()",
                        "mcp"], env=env, capture_output=True, text=True, timeout=60,
                       cwd=ROOT, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 1
    assert "pip install 'torpor[mcp]'" in r.stderr
