"""The SDK and the CLI against a real server and real sandboxes."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from conftest import cli

from torpor import AsyncSandbox, Sandbox
from torpor.sdk.errors import (
    AuthError,
    CommandExitError,
    CommandTimeoutError,
    InvalidRequestError,
    NotFoundError,
)


@pytest.fixture
def conn(server):
    return {"url": server.url, "api_key": server.key}


def test_sdk_quickstart(conn):
    with Sandbox.create(metadata={"who": "sdk"}, **conn) as sbx:
        assert sbx.info().state == "running"
        seen = []
        r = sbx.commands.run("echo one; echo two >&2", on_stdout=seen.append,
                             on_stderr=seen.append)
        assert (r.stdout, r.stderr, r.exit_code) == ("one\n", "two\n", 0)
        assert "".join(seen).count("\n") == 2
        assert sbx.commands.run(["sh", "-c", "exit 5"]).exit_code == 5
        with pytest.raises(CommandExitError):
            sbx.commands.run("exit 2", check=True)
        with pytest.raises(CommandTimeoutError):
            sbx.commands.run("sleep 10", timeout=0.5)
        h = sbx.commands.run("sleep 0.3; echo bg", background=True)
        assert h.wait(timeout=30).stdout == "bg\n"
        sbx.files.write("dir/a.txt", "hello")
        assert sbx.files.read("dir/a.txt") == "hello"
        assert sbx.files.exists("dir/a.txt")
        assert [e.name for e in sbx.files.list("dir")] == ["a.txt"]
        sbx.files.rename("dir/a.txt", "dir/b.txt")
        sbx.files.remove("dir", recursive=True)
        assert not sbx.files.exists("dir")
        with pytest.raises(NotFoundError):
            sbx.files.read("nope.txt")
        assert any(i.id == sbx.id for i in Sandbox.list(metadata={"who": "sdk"}, **conn))
        sid = sbx.id
    with pytest.raises(NotFoundError):
        Sandbox.connect(sid, **conn)


def test_sdk_errors(conn):
    with pytest.raises(AuthError):
        Sandbox.list(url=conn["url"], api_key="tpr_wrong")
    with pytest.raises(InvalidRequestError) as e:
        Sandbox.create(memory_mb=1, **conn)
    assert e.value.field == "memory_mb"
    with pytest.raises(NotFoundError):
        Sandbox.create(template="nope", **conn)


def test_async_sdk(conn):
    async def main():
        sbx = await AsyncSandbox.create(**conn)
        try:
            r = await sbx.commands.run("echo async")
            assert r.stdout == "async\n"
            await sbx.files.write("x.bin", b"\x00\x01")
            assert await sbx.files.read("x.bin", "bytes") == b"\x00\x01"
        finally:
            await sbx.delete()

    asyncio.run(main())




def test_cli_exec_files_and_exit_codes(server, tmp_path):
    p = cli(server, "sandbox", "create", "--metadata", "via=cli")
    assert p.returncode == 0, p.stderr
    sid = p.stdout.strip()
    try:
        p = cli(server, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
        assert (p.returncode, p.stdout, p.stderr) == (7, "out\n", "err\n")
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(3 << 20))
        assert cli(server, "files", "cp", str(src), f"{sid}:up.bin").returncode == 0
        dst = tmp_path / "out.bin"
        assert cli(server, "files", "cp", f"{sid}:up.bin", str(dst)).returncode == 0
        assert dst.read_bytes() == src.read_bytes()
        p = cli(server, "sandbox", "list", "--metadata", "via=cli")
        assert sid in p.stdout
        p = cli(server, "sandbox", "info", "sbx_doesnotexist")
        assert p.returncode == 1 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
        assert "base" in cli(server, "template", "list").stdout
    finally:
        assert cli(server, "sandbox", "rm", sid).returncode == 0


def test_sdk_standby_hibernate_resume_usage(conn, server):
    with Sandbox.create(standby_after=0, hibernate_after=0, **conn) as sbx:
        sbx.commands.run("echo kept > /tmp/k")
        assert sbx.standby().state == "standby"
        assert sbx.commands.run("cat /tmp/k").stdout == "kept\n"  # woken by the request
        assert sbx.hibernate().state == "hibernated"
        assert sbx.resume().state == "running"
        assert sbx.commands.run("cat /tmp/k").stdout == "kept\n"
        info = sbx.update(standby_after=1)
        assert info.standby_after == 1
        with sbx.keep_alive(seconds=30):
            time.sleep(2.5)
            assert sbx.info().state == "running"
        u = sbx.usage()
        assert u.cpu_seconds > 0 and u.seconds_by_state["hibernated"] > 0
        kinds = [(e.to_state, e.reason) for e in sbx.events() if e.kind == "state"]
        assert ("hibernated", "explicit") in kinds and ("running", "explicit") in kinds
        p = cli(server, "sandbox", "usage", sbx.id, "--json")
        assert p.returncode == 0 and sbx.id in p.stdout
