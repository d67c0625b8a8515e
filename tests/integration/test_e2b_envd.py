"""The E2B door's envd (torpor/compat/e2b/envd*.py) driven by E2B's own SDK (e2b==2.45.1,
sync and async) through the session's real server, and by plain httpx where the wire
itself is the point (Connect error shapes, access tokens, signatures). One secure sandbox
(the SDK's default) serves the module; the killed-mid-stream test makes its own."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import struct
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest
from conftest import e2b_environment, e2b_key
from e2b import (
    AsyncSandbox,
    CommandExitException,
    ConnectionConfig,
    FilesystemEventType,
    FileType,
    Sandbox,
)
from e2b.exceptions import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize


@pytest.fixture(scope="module")
def e2b_env(server):
    with e2b_environment(server, e2b_key(server, "e2b-envd")):
        yield


@pytest.fixture(scope="module")
def sbx(api, e2b_env):
    s = Sandbox.create()
    yield s
    api.delete(f"/v1/sandboxes/{s.sandbox_id}")


@pytest.fixture(scope="module")
def envd(server, sbx):
    """httpx to the sandbox's envd as the SDK addresses it (headers, with its token)."""
    with httpx.Client(base_url=server.url, timeout=60, headers={
            "E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sbx._envd_access_token}) as c:
        yield c


def frames(body: bytes) -> list[tuple[int, dict]]:
    out, pos = [], 0
    while pos < len(body):
        flags, n = struct.unpack_from(">BI", body, pos)
        out.append((flags, json.loads(body[pos + 5:pos + 5 + n])))
        pos += 5 + n
    return out


def envelope(msg: dict) -> bytes:
    data = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(data)) + data


def test_commands_run_background_stdin_list_connect_kill(sbx):
    r = sbx.commands.run("echo out; echo err >&2; echo $FOO; pwd; whoami", envs={"FOO": "bar"})
    assert (r.stdout, r.stderr, r.exit_code) == ("out\nbar\n/home/user\nuser\n", "err\n", 0)
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    with pytest.raises(CommandExitException) as exc:
        sbx.commands.run("echo no >&2; exit 3")
    assert (exc.value.exit_code, exc.value.stderr) == (3, "no\n")
    seen = []
    sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=seen.append)
    assert "".join(seen) == "1\n2\n3\n"

    # stdin: sent in pieces, then closed
    cat = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(cat.pid, "hello ")
    sbx.commands.send_stdin(cat.pid, "world\n")
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "hello world\n"

    # a background process: listed with its config and tag, reached again, killed
    sleeper = sbx.commands.run("sleep 600", background=True, envs={"K": "v"}, cwd="/tmp")
    listed = {p.pid: p for p in sbx.commands.list()}
    assert sleeper.pid in listed and cat.pid not in listed
    p = listed[sleeper.pid]
    assert (p.cmd, p.args[-1], p.envs, p.cwd) == ("/bin/bash", "sleep 600", {"K": "v"}, "/tmp")
    again = sbx.commands.connect(sleeper.pid)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as exc:
        again.wait()
    assert exc.value.exit_code == -1 and "killed" in (exc.value.error or str(exc.value))
    assert sbx.commands.kill(sleeper.pid) is False  # gone: not_found, as envd
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999999)


def test_a_client_that_leaves_does_not_stop_the_process(server, envd, sbx):
    """Start streams as envd: start{pid}, data (base64), end, end of stream; a client that
    reads the start and goes away leaves the process running, and Connect streams what it
    prints from then on."""
    req = {"process": {"cmd": "/bin/bash", "args": ["-c", "read x; echo got $x; exit 7"]},
           "stdin": True}
    with envd.stream("POST", "/process.Process/Start", content=envelope(req), headers={
            "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}) as r:
        assert r.status_code == 200
        first = next(r.iter_bytes())
    pid = frames(first)[0][1]["event"]["start"]["pid"]
    assert pid in [p.pid for p in sbx.commands.list()]
    handle = sbx.commands.connect(pid)
    sbx.commands.send_stdin(pid, "it\n")
    with pytest.raises(CommandExitException) as exc:
        handle.wait()
    assert (exc.value.exit_code, exc.value.stdout) == (7, "got it\n")

    # the end of a finished stream, on the wire
    req = {"process": {"cmd": "/bin/echo", "args": ["hi"]}, "stdin": False}
    r = envd.post("/process.Process/Start", content=envelope(req), headers={
        "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"})
    msgs = frames(r.content)
    assert base64.b64decode(msgs[1][1]["event"]["data"]["stdout"]) == b"hi\n"
    assert msgs[-2][1]["event"]["end"] == {"exitCode": 0, "exited": True,
                                          "status": "exit status 0"}
    assert msgs[-1] == (2, {})


def test_stream_input(envd, sbx):
    """The newest SDK's client stream: start, then data in order, then the one answer."""
    cat = sbx.commands.run("cat", background=True, stdin=True)
    body = b"".join(envelope(m) for m in (
        {"start": {"process": {"pid": cat.pid}}},
        {"data": {"input": {"stdin": base64.b64encode(b"one ").decode()}}},
        {"keepalive": {}},
        {"data": {"input": {"stdin": base64.b64encode(b"two\n").decode()}}}))
    r = envd.post("/process.Process/StreamInput", content=body, headers={
        "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"})
    assert r.status_code == 200 and frames(r.content) == [(0, {}), (2, {})]
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "one two\n"
    r = envd.post("/process.Process/StreamInput",
                  content=envelope({"data": {"input": {"stdin": "eA=="}}}), headers={
                      "Content-Type": "application/connect+json"})
    assert frames(r.content)[-1][1]["error"]["code"] == "failed_precondition"


def test_connect_errors_and_keepalives(envd):
    h = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
    r = envd.post("/filesystem.Filesystem/Stat", json={"path": "/nope"}, headers=h)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = envd.post("/process.Process/SendSignal",
                  json={"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}, headers=h)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = envd.post("/filesystem.Filesystem/ListDir", json={"path": "/", "depth": -1}, headers=h)
    assert r.status_code == 400 and r.json()["message"] == "depth should be at least 1"
    r = envd.post("/filesystem.Filesystem/Stat", content=b"{}", headers={
        **h, "Content-Type": "application/proto"})
    assert r.status_code == 501 and r.json()["code"] == "unimplemented"
    # a stream's error travels in its end, under a 200
    sh = {**h, "Content-Type": "application/connect+json"}
    r = envd.post("/process.Process/Connect", content=envelope({"process": {"pid": 999999}}),
                  headers=sh)
    assert r.status_code == 200 and frames(r.content)[-1][1]["error"]["code"] == "not_found"
    # keepalives while the process is quiet (Keepalive-Ping-Interval: seconds)
    req = {"process": {"cmd": "/bin/sleep", "args": ["2.5"]}}
    r = envd.post("/process.Process/Start", content=envelope(req),
                  headers={**sh, "Keepalive-Ping-Interval": "1"})
    events = [m["event"] for f, m in frames(r.content) if f == 0]
    assert sum("keepalive" in e for e in events) >= 1 and "end" in events[-1]


def test_pty(sbx):
    term = sbx.pty.create(PtySize(cols=80, rows=24))
    sbx.pty.send_stdin(term.pid, b"stty size; echo mark-$((40+2)); exit\n")
    out = bytearray()
    assert term.wait(on_pty=out.extend).exit_code == 0
    assert b"24 80" in out and b"mark-42" in out

    term = sbx.pty.create(PtySize(cols=80, rows=24))
    sbx.pty.resize(term.pid, PtySize(cols=100, rows=30))
    sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
    out = bytearray()
    assert term.wait(on_pty=out.extend).exit_code == 0
    assert b"30 100" in out

    term = sbx.pty.create(PtySize(cols=80, rows=24))
    assert sbx.pty.kill(term.pid) is True
    with pytest.raises(CommandExitException):
        term.wait()


def test_files(sbx):
    info = sbx.files.write("docs/a.txt", "hello")  # parents made
    assert (info.path, info.name, info.type) == ("/home/user/docs/a.txt", "a.txt", FileType.FILE)
    assert sbx.files.read("docs/a.txt") == "hello"
    assert sbx.files.read("/home/user/docs/a.txt", format="bytes") == b"hello"
    e = sbx.files.get_info("docs/a.txt")
    assert (e.size, e.mode, e.permissions, e.owner, e.group) == (5, 0o644, "-rw-r--r--",
                                                                  "user", "user")
    assert e.modified_time.tzinfo is not None and e.symlink_target is None
    d = sbx.files.get_info("docs")
    assert (d.type, d.mode, d.permissions) == (FileType.DIR, 0o755, "drwxr-xr-x")
    assert sbx.files.make_dir("docs/sub/deeper") is True
    assert sbx.files.make_dir("docs/sub") is False
    sbx.files.write_files([{"path": "docs/sub/b.bin", "data": b"\x00\xff"},
                           {"path": "/home/user/docs/c.txt", "data": "c"}])
    names = [(x.name, x.path) for x in sbx.files.list("docs", depth=2)]
    assert names == [("a.txt", "/home/user/docs/a.txt"), ("c.txt", "/home/user/docs/c.txt"),
                     ("sub", "/home/user/docs/sub"), ("b.bin", "/home/user/docs/sub/b.bin"),
                     ("deeper", "/home/user/docs/sub/deeper")]
    moved = sbx.files.rename("docs/c.txt", "docs/sub/c2.txt")
    assert moved.path == "/home/user/docs/sub/c2.txt"
    assert not sbx.files.exists("docs/c.txt") and sbx.files.exists("docs/sub/c2.txt")
    sbx.commands.run("ln -s a.txt docs/link")
    link = sbx.files.get_info("docs/link")
    assert (link.type, link.symlink_target) == (FileType.FILE, "/home/user/docs/a.txt")
    # gzip both ways, and a streamed (octet-stream) upload
    sbx.files.write("docs/z.txt", "zipped " * 100, gzip=True)
    assert sbx.files.read("docs/z.txt", gzip=True) == "zipped " * 100
    with pytest.raises(FileNotFoundException):
        sbx.files.read("docs/missing")
    with pytest.raises(FileNotFoundException):
        sbx.files.rename("docs/missing", "docs/x")
    with pytest.raises(InvalidArgumentException):
        sbx.files.list("docs/a.txt")
    sbx.files.remove("docs")
    sbx.files.remove("docs")  # a missing path: fine, as envd's RemoveAll
    assert not sbx.files.exists("docs")

    # metadata: kept with the file through a rename, replaced by an upload, gone with it
    assert sbx.files.write("m.txt", "x", metadata={"Owner": "ana"}).metadata == {"owner": "ana"}
    sbx.files.rename("m.txt", "m2.txt")
    assert sbx.files.get_info("m2.txt").metadata == {"owner": "ana"}
    assert [e.metadata for e in sbx.files.list(".") if e.name == "m2.txt"] == [{"owner": "ana"}]
    sbx.commands.run("rm m2.txt && echo new > m2.txt")  # another file there (same inode?)
    assert sbx.files.get_info("m2.txt").metadata is None
    sbx.files.write("m2.txt", "y", metadata={"a": "1"})
    sbx.files.write("m2.txt", "z")
    assert sbx.files.get_info("m2.txt").metadata is None
    with pytest.raises(InvalidArgumentException):
        sbx.files.write("m2.txt", "x", metadata={"k": "\u00e9"})


def test_watch_sync_exactly_three_events_for_a_new_file(sbx):
    sbx.files.make_dir("w")
    handle = sbx.files.watch_dir("w")
    sbx.files.write("w/new.txt", "x")
    events = handle.get_new_events()
    assert [(e.name, e.type) for e in events] == [
        ("new.txt", FilesystemEventType.CREATE), ("new.txt", FilesystemEventType.CHMOD),
        ("new.txt", FilesystemEventType.WRITE)]
    sbx.files.write("w/new.txt", "y")
    assert ("new.txt", FilesystemEventType.WRITE) in [
        (e.name, e.type) for e in handle.get_new_events()]
    sbx.files.rename("w/new.txt", "w/old.txt")
    assert [(e.name, e.type) for e in handle.get_new_events()] == [
        ("new.txt", FilesystemEventType.RENAME), ("old.txt", FilesystemEventType.CREATE)]
    handle.stop()


def test_async_commands_files_and_watch(sbx, e2b_env):
    async def main():
        a = await AsyncSandbox.connect(sbx.sandbox_id)
        r = await a.commands.run("echo async")
        assert r.stdout == "async\n"
        await a.files.make_dir("aw/sub")
        seen: list = []
        got = asyncio.Event()

        def on_event(e):
            seen.append((e.name, e.type))
            if e.type == FilesystemEventType.WRITE:
                got.set()

        handle = await a.files.watch_dir("aw", on_event, recursive=True)
        await a.files.write("aw/sub/f.txt", "data")
        await asyncio.wait_for(got.wait(), 20)
        await handle.stop()
        assert seen[0] == ("sub/f.txt", FilesystemEventType.CREATE)
        assert ("sub/f.txt", FilesystemEventType.WRITE) in seen
        assert (await a.files.get_info("aw/sub/f.txt")).size == 4
    asyncio.run(main())


def test_secure_sandbox_token_and_signatures(server, envd, sbx):
    token = sbx._envd_access_token
    h = {"E2b-Sandbox-Id": sbx.sandbox_id}
    assert httpx.get(f"{server.url}/health", headers=h).status_code == 204
    r = httpx.post(f"{server.url}/filesystem.Filesystem/Stat", json={"path": "/"}, headers={
        **h, "Content-Type": "application/json", "X-Access-Token": "wrong"})
    assert r.status_code == 401 and r.json()["code"] == 401
    with pytest.raises(AuthenticationException):
        Sandbox(sandbox_id=sbx.sandbox_id, envd_version=sbx._envd_version,
                envd_access_token=None, sandbox_domain=None,
                connection_config=ConnectionConfig(extra_sandbox_headers=h)).files.list("/")
    r = httpx.get(f"{server.url}/files", params={"path": "/etc/hostname"}, headers=h)
    assert r.status_code == 401 and r.json()["message"] == "missing signature query parameter"

    sbx.files.write("signed.txt", "s3cret")
    # the SDK's signed URLs carry no sandbox id: they are fetched as they are
    with urllib.request.urlopen(sbx.download_url("signed.txt")) as resp:
        assert resp.read() == b"s3cret"
    with urllib.request.urlopen(sbx.download_url("signed.txt", use_signature_expiration=60)) as resp:
        assert resp.read() == b"s3cret"
    up = sbx.upload_url("up.txt")
    r = httpx.post(up, files={"file": ("up.txt", b"uploaded")})
    assert r.status_code == 200 and r.json()[0]["path"] == "/home/user/up.txt"
    assert sbx.files.read("up.txt") == "uploaded"

    exp = int(time.time()) - 5
    raw = f"signed.txt:read::{token}:{exp}"
    sig = "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
    r = httpx.get(f"{server.url}/files", headers=h, params={
        "path": "signed.txt", "signature": sig, "signature_expiration": exp})
    assert (r.status_code, r.json()) == (401, {"code": 401,
                                               "message": "signature is already expired"})
    r = httpx.get(f"{server.url}/files", headers=h, params={
        "path": "other.txt", "signature": sig, "signature_expiration": exp})
    assert (r.status_code, r.json()["message"]) == (401, "invalid signature")
    with pytest.raises(urllib.error.HTTPError) as exc:  # no id, no matching token: not envd
        urllib.request.urlopen(f"{server.url}/files?path=x&signature=v1_nothing")
    assert exc.value.code == 404


def test_files_wire(envd):
    r = envd.post("/files", params={"path": "wire/raw.txt"}, content=gzip.compress(b"raw"),
                  headers={"Content-Type": "application/octet-stream",
                           "Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json() == [
        {"name": "raw.txt", "type": "file", "path": "/home/user/wire/raw.txt"}]
    r = envd.get("/files", params={"path": "wire/raw.txt"}, headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.content == b"raw"
    r = envd.get("/files", params={"path": "wire"})
    assert r.status_code == 400
    r = envd.get("/files", params={"path": "wire/raw.txt", "username": "nobody-here"})
    assert r.status_code == 401


def test_killed_sandbox_cuts_the_stream(server, e2b_env):
    s = Sandbox.create()
    cmd = s.commands.run("sleep 600", background=True)
    s.kill()
    with pytest.raises(TimeoutException, match="sandbox was killed"):
        cmd.wait()
    assert httpx.get(f"{server.url}/health",
                     headers={"E2b-Sandbox-Id": s.sandbox_id}).status_code == 502
    assert not s.is_running()


def test_pause_cuts_streams_and_processes_survive(api, e2b_env):
    s = Sandbox.create()
    try:
        cmd = s.commands.run("sleep 600", background=True)
        pause = threading.Timer(0.5, s.pause)
        pause.start()
        with pytest.raises(TimeoutException, match="sandbox was killed"):
            cmd.wait()
        pause.join()
        again = Sandbox.connect(s.sandbox_id)
        assert cmd.pid in [p.pid for p in again.commands.list()]
    finally:
        api.delete(f"/v1/sandboxes/{s.sandbox_id}")
