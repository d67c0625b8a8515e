"""Unit tests of the SDK's client side: request building, error mapping, NDJSON streams
and streaming uploads, against httpx mock transports (no server, no sandbox)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys

import httpx
import pytest

from torpor.sdk import (
    AsyncSandbox,
    AuthError,
    CommandExitError,
    CommandHandle,
    CommandTimeoutError,
    ConflictError,
    InvalidRequestError,
    Keys,
    NotFoundError,
    PayloadTooLargeError,
    Sandbox,
    ServerUnavailableError,
    TorporError,
    TorporTimeoutError,
)
from torpor.sdk._streams import CHUNK
from torpor.sdk.config import DEFAULT_URL, resolve_api_key, resolve_url

URL = "http://torpor.test"
SID = "sbx_abc123def456"
NOW = "2026-01-02T03:04:05Z"
INFO = {"id": SID, "template": "base", "state": "running", "created_at": NOW,
        "updated_at": NOW, "cpu": 1.0, "memory_mb": 512, "disk_mb": 4096, "env": {},
        "metadata": {}, "reason": None}
PROC = {"pid": 42, "argv": ["sleep", "9"], "tag": None, "started_at": 1767323045.5,
        "running": True, "exit_code": None, "signal": None, "timed_out": False,
        "output_bytes": 0}


class Recorder:
    """A handler for httpx.MockTransport: answers with `respond(request)` and keeps the
    requests, their JSON bodies decoded."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, i: int = -1):
        return json.loads(self.requests[i].content)


def sandbox(respond) -> tuple[Sandbox, Recorder]:
    rec = Recorder(respond)
    return Sandbox(SID, url=URL, api_key="k1", transport=httpx.MockTransport(rec)), rec


def ndjson(*events) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def chunked(data: bytes, size: int = 7):
    """Pieces of `size` bytes, so NDJSON lines straddle chunks."""
    return [data[i:i + size] for i in range(0, len(data), size)]


def error(status: int, code: str, message: str = "it failed", **extra) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, **extra}})


# --- configuration -----------------------------------------------------------------------

def test_url_and_key_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TORPOR_URL", raising=False)
    monkeypatch.delenv("TORPOR_API_KEY", raising=False)
    monkeypatch.setenv("TORPOR_DATA", str(tmp_path))
    assert resolve_url() == DEFAULT_URL == "http://127.0.0.1:7070"
    assert resolve_api_key() is None  # no file yet
    (tmp_path / "api-key").write_text("from-file\n")
    assert resolve_api_key() == "from-file"
    monkeypatch.setenv("TORPOR_API_KEY", "from-env")
    monkeypatch.setenv("TORPOR_URL", "http://elsewhere:1/")
    assert resolve_api_key() == "from-env"
    assert resolve_url() == "http://elsewhere:1"
    assert resolve_api_key("explicit") == "explicit"
    assert resolve_url("http://x:2") == "http://x:2"


def test_key_is_sent_as_bearer_and_url_is_used():
    sbx, rec = sandbox(lambda r: httpx.Response(200, json=INFO))
    info = sbx.info()
    assert info.id == SID and info.state == "running"
    assert str(rec.last.url) == f"{URL}/v1/sandboxes/{SID}"
    assert rec.last.headers["authorization"] == "Bearer k1"


# --- sandboxes ---------------------------------------------------------------------------

def test_create_sends_only_given_fields():
    rec = Recorder(lambda r: httpx.Response(201, json=INFO))
    sbx = Sandbox.create(env={"A": "1"}, metadata={"team": "x"}, memory_mb=256, url=URL,
                         api_key="k", transport=httpx.MockTransport(rec))
    assert sbx.id == SID
    assert rec.last.method == "POST" and rec.last.url.path == "/v1/sandboxes"
    assert rec.body() == {"template": "base", "env": {"A": "1"}, "metadata": {"team": "x"},
                          "memory_mb": 256}


def test_list_filters_become_query_parameters():
    rec = Recorder(lambda r: httpx.Response(200, json=[INFO, {**INFO, "id": "sbx_2"}]))
    infos = Sandbox.list(state="running", metadata={"team": "x", "env": "ci"}, url=URL,
                         api_key="k", transport=httpx.MockTransport(rec))
    assert [i.id for i in infos] == [SID, "sbx_2"]
    assert dict(rec.last.url.params) == {"state": "running", "metadata.team": "x",
                                         "metadata.env": "ci"}


def test_context_manager_deletes_and_tolerates_already_deleted():
    seen = []

    def respond(r):
        seen.append((r.method, r.url.path))
        return error(404, "not_found", "no such sandbox")

    sbx, _ = sandbox(respond)
    with sbx:
        pass
    assert seen == [("DELETE", f"/v1/sandboxes/{SID}")]


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("status,code,cls", [
    (401, "unauthorized", AuthError), (404, "not_found", NotFoundError),
    (409, "conflict", ConflictError), (413, "too_large", PayloadTooLargeError),
    (422, "invalid", InvalidRequestError), (503, "unavailable", ServerUnavailableError),
    (504, "timeout", TorporTimeoutError), (500, "internal", TorporError),
])
def test_status_maps_to_typed_error(status, code, cls):
    sbx, _ = sandbox(lambda r: error(status, code, "what to do next"))
    with pytest.raises(cls) as ei:
        sbx.info()
    e = ei.value
    assert type(e) is cls
    assert (e.status, e.code, e.sandbox_id) == (status, code, SID)
    assert "what to do next" in str(e) and SID in str(e)


def test_invalid_names_the_field_and_not_found_lists_templates():
    sbx, _ = sandbox(lambda r: error(422, "invalid", "cpu: too big", field="cpu"))
    with pytest.raises(InvalidRequestError) as ei:
        sbx.commands.run("true")
    assert ei.value.field == "cpu"

    rec = Recorder(lambda r: error(404, "not_found", "no template gpu",
                                   templates=["base", "python"]))
    with pytest.raises(NotFoundError) as ei:
        Sandbox.create("gpu", url=URL, api_key="k", transport=httpx.MockTransport(rec))
    assert "base, python" in str(ei.value)


def test_non_contract_error_bodies_still_map():
    sbx, _ = sandbox(lambda r: httpx.Response(
        422, json={"detail": [{"loc": ["body", "memory_mb"], "msg": "not an int"}]}))
    with pytest.raises(InvalidRequestError) as ei:
        sbx.info()
    assert ei.value.field == "memory_mb"
    sbx, _ = sandbox(lambda r: httpx.Response(502, text="<html>bad gateway</html>"))
    with pytest.raises(TorporError, match="bad gateway"):
        sbx.info()


def test_connection_refused_says_how_to_start_the_server():
    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    sbx = Sandbox(SID, url=URL, api_key="k", transport=httpx.MockTransport(refuse))
    with pytest.raises(ServerUnavailableError) as ei:
        sbx.info()
    assert "torpor serve" in str(ei.value) and URL in str(ei.value)
    assert ei.value.status is None


# --- commands ----------------------------------------------------------------------------

RESULT = {"pid": 7, "exit_code": 0, "stdout": "hi\n", "stderr": "", "signal": None,
          "timed_out": False, "truncated": False}


def test_run_shell_string_and_argv_list():
    sbx, rec = sandbox(lambda r: httpx.Response(200, json=RESULT))
    res = sbx.commands.run("echo hi", env={"A": "b"}, cwd="/tmp", user="root", timeout=None)
    assert res.stdout == "hi\n" and res.exit_code == 0 and res.pid == 7 and res.ok
    body = rec.body()
    assert body["cmd"] == "echo hi" and body["argv"] is None
    assert body["timeout"] is None  # None means no limit, so it must be sent
    assert (body["env"], body["cwd"], body["user"]) == ({"A": "b"}, "/tmp", "root")
    assert body["stream"] is False and body["background"] is False
    assert rec.last.url.path == f"/v1/sandboxes/{SID}/commands"

    sbx.commands.run(["ls", "-l", "my dir"], stdin=b"data")
    body = rec.body()
    assert body["cmd"] is None and body["argv"] == ["ls", "-l", "my dir"]
    assert body["stdin"] == "data" and body["timeout"] == 60 and "user" not in body


def test_nonzero_exit_returns_result_unless_check():
    sbx, _ = sandbox(lambda r: httpx.Response(200, json={**RESULT, "exit_code": 3,
                                                         "stderr": "boom\n"}))
    assert sbx.commands.run("false").exit_code == 3
    with pytest.raises(CommandExitError) as ei:
        sbx.commands.run("false", check=True)
    assert ei.value.result.exit_code == 3 and ei.value.exit_code == 3
    assert "boom" in str(ei.value)


def test_timed_out_command_raises_with_partial_result():
    sbx, _ = sandbox(lambda r: httpx.Response(200, json={**RESULT, "exit_code": 137,
                                                         "timed_out": True}))
    with pytest.raises(CommandTimeoutError) as ei:
        sbx.commands.run("sleep 100", timeout=1)
    assert ei.value.result.stdout == "hi\n" and ei.value.sandbox_id == SID
    assert isinstance(ei.value, TorporTimeoutError)


def test_streaming_calls_back_in_order_across_split_chunks():
    events = ndjson({"type": "start", "pid": 9}, {"type": "stdout", "data": "line one\n"},
                    {"type": "stderr", "data": "warn\n"}, {"type": "stdout", "data": "two"},
                    {"type": "exit", "exit_code": 0, "signal": None, "timed_out": False})
    sbx, rec = sandbox(lambda r: httpx.Response(
        200, headers={"content-type": "application/x-ndjson"}, content=iter(chunked(events))))
    got = []
    res = sbx.commands.run("x", on_stdout=lambda d: got.append(("out", d)),
                           on_stderr=lambda d: got.append(("err", d)))
    assert got == [("out", "line one\n"), ("err", "warn\n"), ("out", "two")]
    assert (res.stdout, res.stderr, res.pid, res.exit_code) == ("line one\ntwo", "warn\n", 9, 0)
    assert rec.body()["stream"] is True
    assert rec.last.headers["accept"] == "application/x-ndjson"


def test_stream_error_event_and_early_end_raise():
    events = ndjson({"type": "start", "pid": 9},
                    {"type": "error", "status": 404, "error": {"code": "not_found",
                                                               "message": "no /bin/x"}})
    sbx, _ = sandbox(lambda r: httpx.Response(200, content=events))
    with pytest.raises(NotFoundError, match="no /bin/x"):
        sbx.commands.run("x", on_stdout=print)

    sbx, _ = sandbox(lambda r: httpx.Response(200, content=ndjson({"type": "start", "pid": 1})))
    with pytest.raises(TorporError) as ei:
        sbx.commands.run("x", on_stdout=print)
    assert ei.value.code == "stream_closed"


def test_stream_signal_exit_code_and_timeout():
    events = ndjson({"type": "start", "pid": 9},
                    {"type": "exit", "exit_code": None, "signal": "SIGKILL", "timed_out": True})
    sbx, _ = sandbox(lambda r: httpx.Response(200, content=events))
    with pytest.raises(CommandTimeoutError) as ei:
        sbx.commands.run("sleep 9", timeout=1, on_stdout=print)
    assert ei.value.result.exit_code == 137


def test_background_handle_wait_kill_stdin():
    out = ndjson({"type": "stdout", "data": "tick\n"},
                 {"type": "exit", "exit_code": 0, "signal": None, "timed_out": False})

    def respond(r):
        if r.url.path.endswith("/commands"):
            return httpx.Response(201, json=PROC)
        if r.url.path.endswith("/output"):
            return httpx.Response(200, content=iter(chunked(out)))
        if r.url.path.endswith("/signal"):
            return error(409, "conflict", "process 42 is not running")
        return httpx.Response(200, json={"pid": 42})

    sbx, rec = sandbox(respond)
    got = []
    h = sbx.commands.run("sleep 9", background=True, on_stdout=got.append)
    assert isinstance(h, CommandHandle) and h.pid == 42
    assert rec.body()["background"] is True

    h.send_stdin("abc")
    assert rec.last.url.path.endswith("/processes/42/stdin")
    assert rec.body() == {"data": "abc", "eof": False}

    res = h.wait()
    assert res.stdout == "tick\n" and res.exit_code == 0 and got == ["tick\n"]
    assert rec.last.url.params["follow"] == "true"

    assert h.kill() is False  # already exited: 409
    assert rec.body() == {"signal": "SIGKILL"}

    assert [e.type for e in h] == ["stdout", "exit"]
    assert h.output().stdout == "tick\n"
    assert rec.last.url.params["follow"] == "false"


# --- files -------------------------------------------------------------------------------

class LazyTransport(httpx.BaseTransport):
    """Reads the request body chunk by chunk as a server would (MockTransport reads it
    whole first), logging each chunk received."""

    def __init__(self, log: list):
        self.log = log
        self.request: httpx.Request | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.request = request
        size = 0
        for chunk in request.stream:
            self.log.append(("recv", len(chunk)))
            size += len(chunk)
        return httpx.Response(200, json={"path": "/home/user/big", "size": size})


def test_write_streams_a_generator_without_materializing_it():
    log: list = []

    def produce():
        for i in range(50):
            log.append(("made", i))
            yield b"x" * 65536

    transport = LazyTransport(log)
    sbx = Sandbox(SID, url=URL, api_key="k", transport=transport)
    info = sbx.files.write("big", produce(), mode=0o600)
    assert info.size == 50 * 65536
    # each chunk reached the "server" before the next one was produced
    assert log == [e for i in range(50) for e in (("made", i), ("recv", 65536))]
    req = transport.request
    assert req.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in req.headers
    assert dict(req.url.params) == {"path": "big", "mode": "0600"}


def test_write_reads_file_objects_in_chunks():
    class Source(io.RawIOBase):
        def __init__(self, total):
            self.left, self.reads = total, []

        def readable(self):
            return True

        def read(self, n=-1):
            self.reads.append(n)
            k = self.left if n is None or n < 0 else min(n, self.left)
            self.left -= k
            return b"y" * k

    src = Source(3 * CHUNK + 5)
    transport = LazyTransport([])
    sbx = Sandbox(SID, url=URL, api_key="k", transport=transport)
    progress = []
    assert sbx.files.write("f", src, on_progress=progress.append).size == 3 * CHUNK + 5
    assert all(n == CHUNK for n in src.reads)  # never read(-1): never the whole file
    assert sum(progress) == 3 * CHUNK + 5


def test_read_formats_and_download(tmp_path):
    data = "héllo\n".encode() * 1000
    sbx, rec = sandbox(lambda r: httpx.Response(
        200, headers={"content-length": str(len(data))}, content=iter(chunked(data, 999))))
    assert sbx.files.read("/etc/motd") == data.decode()
    assert dict(rec.last.url.params) == {"path": "/etc/motd"}
    assert sbx.files.read("x", "bytes", user="root") == data
    assert rec.last.url.params["user"] == "root"
    with sbx.files.read("x", "stream") as stream:
        assert stream.size == len(data)
        assert b"".join(stream) == data
    dest = tmp_path / "out.txt"
    assert sbx.files.download("x", dest) == len(data)
    assert dest.read_bytes() == data and not (tmp_path / "out.txt.part").exists()


def test_read_binary_as_text_says_to_use_bytes():
    sbx, _ = sandbox(lambda r: httpx.Response(200, content=b"\xff\xfe\x00"))
    with pytest.raises(TorporError, match="format='bytes'"):
        sbx.files.read("blob")


def test_upload_streams_local_file_with_its_mode(tmp_path):
    src = tmp_path / "run.sh"
    src.write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src, 0o755)
    transport = LazyTransport([])
    sbx = Sandbox(SID, url=URL, api_key="k", transport=transport)
    sbx.files.upload(src, "bin/run.sh")
    assert dict(transport.request.url.params) == {"path": "bin/run.sh", "mode": "0755"}


def test_small_file_operations_build_their_requests():
    entry = {"name": "a", "path": "/home/user/a", "type": "dir", "size": 0, "mode": 0o755,
             "uid": 1000, "gid": 1000, "owner": "user", "mtime": 1767323045.0}

    def respond(r):
        p = r.url.path
        if p.endswith("/list"):
            return httpx.Response(200, json=[entry])
        if p.endswith("/stat"):
            return httpx.Response(200, json=entry)
        if p.endswith("/exists"):
            return httpx.Response(200, json={"exists": True})
        if p.endswith("/mkdir"):
            return httpx.Response(200, json={"created": True, "path": "/home/user/a"})
        if p.endswith("/rename"):
            return httpx.Response(200, json={"path": "/home/user/b"})
        return httpx.Response(204)

    sbx, rec = sandbox(respond)
    assert sbx.files.list("a", depth=2)[0].is_dir
    assert dict(rec.last.url.params) == {"path": "a", "depth": "2"}
    assert sbx.files.stat("a").mode == 0o755
    assert sbx.files.exists("a") is True
    assert sbx.files.make_dir("a") is True and rec.body() == {"path": "a", "parents": True}
    assert sbx.files.rename("a", "b", overwrite=True) == "/home/user/b"
    assert rec.body() == {"src": "a", "dst": "b", "overwrite": True}
    sbx.files.remove("b", recursive=True)
    assert rec.last.method == "DELETE"
    assert dict(rec.last.url.params) == {"path": "b", "recursive": "true"}


# --- keys --------------------------------------------------------------------------------

def test_keys_client():
    key = {"id": "key_1", "name": "ci", "prefix": "tp_ab", "created_at": NOW, "key": "tp_secret"}
    rec = Recorder(lambda r: httpx.Response(201, json=key) if r.method == "POST"
                   else httpx.Response(204))
    with Keys(url=URL, api_key="admin", transport=httpx.MockTransport(rec)) as keys:
        assert keys.create("ci").key == "tp_secret"
        assert rec.body() == {"name": "ci"}
        keys.revoke("key_1")
        assert (rec.last.method, rec.last.url.path) == ("DELETE", "/v1/keys/key_1")


# --- async twin --------------------------------------------------------------------------

def test_async_create_run_stream_and_errors():
    events = ndjson({"type": "start", "pid": 3}, {"type": "stdout", "data": "a"},
                    {"type": "stdout", "data": "b"},
                    {"type": "exit", "exit_code": 2, "signal": None, "timed_out": False})

    async def agen(data):
        for piece in chunked(data):
            yield piece

    async def respond(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/v1/sandboxes":
            return httpx.Response(201, json=INFO)
        if r.url.path.endswith("/commands"):
            return httpx.Response(200, content=agen(events))
        if r.url.params.get("path") == "data":
            return httpx.Response(200, content=agen(b"0123456789"))
        return error(404, "not_found", "file not found")

    async def main():
        got = []

        async def on_stdout(d):
            got.append(d)

        async with await AsyncSandbox.create(url=URL, api_key="k",
                                             transport=httpx.MockTransport(respond)) as sbx:
            res = await sbx.commands.run(["x"], on_stdout=on_stdout)
            assert (res.stdout, res.exit_code, got) == ("ab", 2, ["a", "b"])
            with pytest.raises(CommandExitError):
                await sbx.commands.run(["x"], on_stdout=on_stdout, check=True)
            with pytest.raises(NotFoundError) as ei:
                await sbx.files.read("nope")
            assert ei.value.sandbox_id == SID
            async with await sbx.files.read("data", "stream") as stream:
                assert b"".join([c async for c in stream]) == b"0123456789"

    asyncio.run(main())


def test_async_write_streams_async_generator_lazily():
    log: list = []

    class AsyncLazy(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            size = 0
            async for chunk in request.stream:
                log.append(("recv", len(chunk)))
                size += len(chunk)
            return httpx.Response(200, json={"path": "p", "size": size})

    async def produce():
        for i in range(20):
            log.append(("made", i))
            yield b"z" * 1000

    async def main():
        sbx = AsyncSandbox(SID, url=URL, api_key="k", transport=AsyncLazy())
        info = await sbx.files.write("p", produce())
        await sbx.close()
        return info

    assert asyncio.run(main()).size == 20_000
    assert log == [e for i in range(20) for e in (("made", i), ("recv", 1000))]


# --- standby, hibernation, timers, holds, usage, events ----------------------------------

TIMERS = {"standby_after": 15.0, "hibernate_after": 600.0, "ttl": None, "idle_ttl": 3600.0,
          "expire_action": "hibernate", "last_active_at": "2026-01-02T03:05:00"}
USAGE = {"sandbox_id": SID, "state": "hibernated", "cpu_seconds": 1.25,
         "memory_gib_seconds": 3.5, "seconds_by_state": {"running": 20.0, "standby": 600.5,
                                                         "hibernated": 7200.0},
         "disk_bytes": 123456, "metadata": {"team": "x"}}
EVENTS = [
    {"at": NOW, "kind": "state", "from_state": "creating", "to_state": "running",
     "reason": "created", "detail": {}},
    {"at": NOW, "kind": "updated", "from_state": None, "to_state": None,
     "reason": "explicit", "detail": {"ttl": 60}},
    {"at": NOW, "kind": "state", "from_state": "standby", "to_state": "hibernated",
     "reason": "idle", "detail": {"duration_ms": 840, "seconds": 0.8, "image_bytes": 9000}},
]


def lifecycle(r: httpx.Request) -> httpx.Response:
    """A server for the standby calls: answers by method and path."""
    p = r.url.path
    if p.endswith("/standby"):
        return httpx.Response(200, json={**INFO, **TIMERS, "state": "standby"})
    if p.endswith("/hibernate"):
        return httpx.Response(200, json={**INFO, **TIMERS, "state": "hibernated"})
    if p.endswith("/resume"):
        return httpx.Response(200, json={**INFO, **TIMERS})
    if r.method == "PATCH":
        return httpx.Response(200, json={**INFO, **TIMERS, **json.loads(r.content)})
    if p.endswith("/keepalive"):
        return httpx.Response(201, json={"hold_id": "hold_0a1b2c",
                                         "seconds": json.loads(r.content)["seconds"]})
    if "/keepalive/" in p:
        return httpx.Response(204)
    if p == "/v1/usage":
        return httpx.Response(200, json={"sandboxes": [USAGE, {**USAGE, "sandbox_id": "sbx_2"}],
                                         "total": {"cpu_seconds": 2.5,
                                                   "memory_gib_seconds": 7.0,
                                                   "disk_bytes": 246912.0}})
    if p.endswith("/usage"):
        return httpx.Response(200, json=USAGE)
    if p.endswith("/events"):
        return httpx.Response(200, json=EVENTS)
    if p.endswith("/commands"):
        return httpx.Response(201, json=PROC)
    if p == "/v1/sandboxes":
        return httpx.Response(201, json={**INFO, **TIMERS})
    return error(404, "not_found", f"no route {r.method} {p}")


def test_create_sends_timers_and_zero_turns_one_off():
    rec = Recorder(lambda r: httpx.Response(201, json={**INFO, **TIMERS}))
    Sandbox.create(standby_after=60, hibernate_after=0, ttl=86400, idle_ttl=None,
                   expire_action="hibernate", url=URL, api_key="k",
                   transport=httpx.MockTransport(rec))
    assert rec.body() == {"template": "base", "standby_after": 60, "hibernate_after": 0,
                          "ttl": 86400, "expire_action": "hibernate"}


def test_sandbox_info_parses_timers_and_tolerates_an_older_server():
    sbx, _ = sandbox(lambda r: httpx.Response(200, json={**INFO, **TIMERS}))
    i = sbx.info()
    assert (i.standby_after, i.hibernate_after, i.ttl, i.idle_ttl, i.expire_action) == (
        15.0, 600.0, None, 3600.0, "hibernate")
    assert i.last_active_at.utcoffset().total_seconds() == 0 and i.last_active_at.minute == 5
    sbx, _ = sandbox(lambda r: httpx.Response(200, json=INFO))  # no standby fields at all
    i = sbx.info()
    assert i.standby_after is None and i.last_active_at is None and i.expire_action is None


def test_standby_hibernate_resume_post_and_return_info():
    sbx, rec = sandbox(lifecycle)
    assert sbx.standby().state == "standby"
    assert (rec.last.method, rec.last.url.path) == ("POST", f"/v1/sandboxes/{SID}/standby")
    assert rec.last.content == b""
    assert sbx.hibernate().state == "hibernated"
    assert (rec.last.method, rec.last.url.path) == ("POST", f"/v1/sandboxes/{SID}/hibernate")
    # a checkpoint may outlast the per-request timeout (120 s)
    assert rec.last.extensions["timeout"]["read"] > 600
    assert sbx.resume().state == "running"
    assert (rec.last.method, rec.last.url.path) == ("POST", f"/v1/sandboxes/{SID}/resume")


def test_standby_conflict_and_failed_hibernation_map_to_errors():
    sbx, _ = sandbox(lambda r: error(409, "conflict", "sandbox has 1 open streams"))
    with pytest.raises(ConflictError, match="open streams") as ei:
        sbx.standby()
    assert ei.value.operation == "put sandbox in standby"
    sbx, _ = sandbox(lambda r: error(503, "unavailable", "could not hibernate, stays running"))
    with pytest.raises(ServerUnavailableError, match="stays running"):
        sbx.hibernate()


def test_update_patches_only_what_is_given():
    sbx, rec = sandbox(lifecycle)
    info = sbx.update(ttl=0, expire_action="delete")
    assert (rec.last.method, rec.last.url.path) == ("PATCH", f"/v1/sandboxes/{SID}")
    assert rec.body() == {"ttl": 0, "expire_action": "delete"}  # 0 is sent: it turns ttl off
    assert info.ttl == 0 and info.expire_action == "delete"
    sbx.update(standby_after=30.5, hibernate_after=120, idle_ttl=900)
    assert rec.body() == {"standby_after": 30.5, "hibernate_after": 120, "idle_ttl": 900}
    n = len(rec.requests)
    with pytest.raises(ValueError, match="nothing to update"):
        sbx.update()
    assert len(rec.requests) == n  # nothing sent


def test_hold_and_release():
    sbx, rec = sandbox(lifecycle)
    assert sbx.hold() == "hold_0a1b2c"
    assert (rec.last.method, rec.last.url.path) == ("POST", f"/v1/sandboxes/{SID}/keepalive")
    assert rec.body() == {"seconds": 300}
    sbx.hold(90.5)
    assert rec.body() == {"seconds": 90.5}
    sbx.release("hold_0a1b2c")
    assert (rec.last.method, rec.last.url.path) == (
        "DELETE", f"/v1/sandboxes/{SID}/keepalive/hold_0a1b2c")


def test_keep_alive_holds_for_the_block_and_releases_after():
    sbx, rec = sandbox(lifecycle)
    with sbx.keep_alive(600) as hold_id:
        assert hold_id == "hold_0a1b2c"
        assert [(r.method, r.url.path.rsplit("/", 1)[-1]) for r in rec.requests] == [
            ("POST", "keepalive")]
        assert rec.body() == {"seconds": 600}
    assert (rec.last.method, rec.last.url.path.rsplit("/", 1)[-1]) == ("DELETE", "hold_0a1b2c")

    # the block's error wins over a failed release, and the release is still tried
    def release_fails(r):
        return error(503, "unavailable", "restarting") if r.method == "DELETE" else lifecycle(r)

    sbx, rec = sandbox(release_fails)
    with pytest.raises(KeyError), sbx.keep_alive():
        raise KeyError("in the block")
    assert rec.last.method == "DELETE"

    # a hold gone by the end (lapsed, or the sandbox was deleted) is no error ...
    sbx, _ = sandbox(lambda r: error(404, "not_found", "no hold") if r.method == "DELETE"
                     else lifecycle(r))
    with sbx.keep_alive(1):
        pass
    # ... but a release that fails otherwise is reported
    sbx, _ = sandbox(release_fails)
    with pytest.raises(ServerUnavailableError), sbx.keep_alive():
        pass


def test_usage_of_one_and_of_all():
    sbx, rec = sandbox(lifecycle)
    u = sbx.usage()
    assert (rec.last.method, rec.last.url.path) == ("GET", f"/v1/sandboxes/{SID}/usage")
    assert (u.sandbox_id, u.state, u.cpu_seconds, u.memory_gib_seconds, u.disk_bytes) == (
        SID, "hibernated", 1.25, 3.5, 123456)
    assert u.seconds_by_state == {"running": 20.0, "standby": 600.5, "hibernated": 7200.0}
    assert u.metadata == {"team": "x"}

    rec = Recorder(lifecycle)
    report = Sandbox.usage_all(state="hibernated", metadata={"team": "x"}, url=URL,
                               api_key="k", transport=httpx.MockTransport(rec))
    assert rec.last.url.path == "/v1/usage"
    assert dict(rec.last.url.params) == {"state": "hibernated", "metadata.team": "x"}
    assert [x.sandbox_id for x in report.sandboxes] == [SID, "sbx_2"]
    assert report.total.disk_bytes == 246912 and isinstance(report.total.disk_bytes, int)
    assert report.total.cpu_seconds == 2.5
    Sandbox.usage_all(url=URL, api_key="k", transport=httpx.MockTransport(rec))
    assert dict(rec.last.url.params) == {}


def test_events_parse_with_durations():
    sbx, rec = sandbox(lifecycle)
    evs = sbx.events()
    assert (rec.last.method, rec.last.url.path) == ("GET", f"/v1/sandboxes/{SID}/events")
    assert [e.kind for e in evs] == ["state", "updated", "state"]
    first, updated, hib = evs
    assert (first.from_state, first.to_state, first.reason) == ("creating", "running",
                                                                "created")
    assert first.duration_ms is None and first.at.utcoffset().total_seconds() == 0
    assert updated.from_state is None and updated.detail == {"ttl": 60}
    assert hib.duration_ms == 840 and hib.detail["image_bytes"] == 9000


def test_run_keep_alive_is_sent_only_when_asked():
    sbx, rec = sandbox(lifecycle)
    h = sbx.commands.run("sleep 9", background=True, keep_alive=True)
    assert h.pid == 42
    assert rec.body()["keep_alive"] is True and rec.body()["background"] is True
    sbx.commands.run("sleep 9", background=True)
    assert "keep_alive" not in rec.body()  # a server without standby refuses unknown fields


def test_async_standby_family():
    async def respond(r):
        return lifecycle(r)

    async def main():
        rec = Recorder(respond)
        transport = httpx.MockTransport(rec)
        sbx = await AsyncSandbox.create(standby_after=5, expire_action="delete", url=URL,
                                        api_key="k", transport=transport)
        assert rec.body() == {"template": "base", "standby_after": 5,
                              "expire_action": "delete"}
        assert (await sbx.standby()).state == "standby"
        assert (await sbx.hibernate()).state == "hibernated"
        assert (await sbx.resume()).state == "running"
        assert (await sbx.update(idle_ttl=0)).idle_ttl == 0
        assert rec.body() == {"idle_ttl": 0}
        assert await sbx.hold(10) == "hold_0a1b2c"
        await sbx.release("hold_0a1b2c")
        async with sbx.keep_alive(30) as hold_id:
            assert hold_id == "hold_0a1b2c" and rec.body() == {"seconds": 30}
        assert rec.last.method == "DELETE"
        assert (await sbx.usage()).cpu_seconds == 1.25
        assert (await sbx.events())[-1].duration_ms == 840
        report = await AsyncSandbox.usage_all(metadata={"a": "b"}, url=URL, api_key="k",
                                              transport=transport)
        assert len(report.sandboxes) == 2
        assert dict(rec.last.url.params) == {"metadata.a": "b"}
        h = await sbx.commands.run("sleep 9", background=True, keep_alive=True)
        assert h.pid == 42 and rec.body()["keep_alive"] is True
        await sbx.close()
        return [(r.method, r.url.path) for r in rec.requests]

    calls = asyncio.run(main())
    assert ("PATCH", f"/v1/sandboxes/{SID}") in calls
    assert ("POST", f"/v1/sandboxes/{SID}/hibernate") in calls


# --- packaging ---------------------------------------------------------------------------

def test_import_torpor_is_lazy():
    code = ("import sys, torpor; assert 'httpx' not in sys.modules; "
            "assert 'pydantic' not in sys.modules; "
            "from torpor import Sandbox, AsyncSandbox, NotFoundError; "
            "assert Sandbox.__module__ == 'torpor.sdk.sandbox'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- CLI (client side only) --------------------------------------------------------------

def test_cli_exec_streams_and_exits_with_the_command_code(monkeypatch):
    from typer.testing import CliRunner

    import torpor.sdk
    from torpor.cli.main import app

    events = ndjson({"type": "start", "pid": 5}, {"type": "stdout", "data": "out\n"},
                    {"type": "stderr", "data": "err\n"},
                    {"type": "exit", "exit_code": 3, "signal": None, "timed_out": False})
    rec = Recorder(lambda r: httpx.Response(200, content=events))

    class MockedSandbox(Sandbox):
        def __init__(self, sandbox_id, **kw):
            super().__init__(sandbox_id, transport=httpx.MockTransport(rec), **kw)

    monkeypatch.setattr(torpor.sdk, "Sandbox", MockedSandbox)
    res = CliRunner().invoke(app, ["exec", "--user", "root", SID, "--", "ls", "-la"])
    assert res.exit_code == 3
    assert res.stdout == "out\n" and res.stderr == "err\n"
    body = rec.body()
    assert body["argv"] == ["ls", "-la"] and body["user"] == "root" and body["stream"] is True


def test_cli_error_is_one_line_without_traceback():
    from typer.testing import CliRunner

    from torpor.cli.main import app

    # port 1 on loopback: nothing listens, the connection is refused at once
    res = CliRunner().invoke(app, ["--url", "http://127.0.0.1:1", "sandbox", "list"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "torpor serve" in lines[0]
    assert "Traceback" not in res.output


def test_cli_remote_path_parsing():
    from torpor.cli.files import parse_remote

    assert parse_remote(f"{SID}:/etc/hosts") == (SID, "/etc/hosts")
    assert parse_remote(f"{SID}:") == (SID, ".")
    assert parse_remote("./local:file") is None


def test_times_without_offset_are_utc():
    sbx, _ = sandbox(lambda r: httpx.Response(200, json={**INFO,
                                                         "created_at": "2026-01-02T03:04:05"}))
    created = sbx.info().created_at
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert created.hour == 3


def cli(monkeypatch, respond, *args):
    """Run `torpor ARGS` with every SDK call answered by `respond`; (result, Recorder)."""
    from typer.testing import CliRunner

    import torpor.sdk
    from torpor.cli.main import app

    rec = Recorder(respond)
    transport = httpx.MockTransport(rec)

    class MockedSandbox(Sandbox):
        def __init__(self, sandbox_id, **kw):
            kw.setdefault("transport", transport)
            super().__init__(sandbox_id, **kw)

        @classmethod
        def create(cls, *a, **kw):
            return super().create(*a, transport=transport, **kw)

        @staticmethod
        def usage_all(*a, **kw):
            return Sandbox.usage_all(*a, transport=transport, **kw)

    monkeypatch.setattr(torpor.sdk, "Sandbox", MockedSandbox)
    return CliRunner().invoke(app, list(args)), rec


def test_cli_timers_on_create_and_update(monkeypatch):
    res, rec = cli(monkeypatch, lifecycle, "sandbox", "create", "--standby-after", "90s",
                   "--hibernate-after", "1h30m", "--ttl", "1d", "--idle-ttl", "off",
                   "--expire-action", "hibernate")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == SID
    assert rec.body() == {"template": "base", "standby_after": 90.0,
                          "hibernate_after": 5400.0, "ttl": 86400.0, "idle_ttl": 0.0,
                          "expire_action": "hibernate"}

    res, rec = cli(monkeypatch, lifecycle, "sandbox", "update", SID, "--ttl", "2.5")
    assert res.exit_code == 0, res.output
    assert rec.last.method == "PATCH" and rec.body() == {"ttl": 2.5}
    assert "idle ttl" in res.stdout and "1h00m" in res.stdout  # idle_ttl 3600 shown

    res, rec = cli(monkeypatch, lifecycle, "sandbox", "update", SID)
    assert res.exit_code == 2 and "nothing to change" in res.stderr and not rec.requests
    res, rec = cli(monkeypatch, lifecycle, "sandbox", "update", SID, "--ttl", "5 weeks")
    assert res.exit_code == 2 and not rec.requests
    res, _ = cli(monkeypatch, lifecycle, "sandbox", "update", SID, "--expire-action", "keep")
    assert res.exit_code == 2


def test_cli_standby_hibernate_resume(monkeypatch):
    for verb, state in (("standby", "standby"), ("hibernate", "hibernated"),
                        ("resume", "running")):
        res, rec = cli(monkeypatch, lifecycle, "sandbox", verb, SID)
        assert res.exit_code == 0, res.output
        assert res.stdout.startswith(f"{SID} {state} (")
        assert (rec.last.method, rec.last.url.path) == ("POST", f"/v1/sandboxes/{SID}/{verb}")
    res, _ = cli(monkeypatch, lambda r: error(409, "conflict", "it has open streams"),
                 "sandbox", "standby", SID, "sbx_other")
    assert res.exit_code == 1 and res.stderr.count("open streams") == 2


def test_cli_events_table(monkeypatch):
    res, _ = cli(monkeypatch, lifecycle, "sandbox", "events", SID)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["TIME", "KIND", "FROM", "->", "TO", "REASON", "DURATION",
                                "DETAIL"]
    assert "creating -> running" in lines[1] and "created" in lines[1]
    assert "updated" in lines[2] and "ttl=60" in lines[2]
    assert "standby -> hibernated" in lines[3] and "0.84s" in lines[3]
    assert "image_bytes=8.8K" in lines[3]
    res, _ = cli(monkeypatch, lifecycle, "sandbox", "events", SID, "--json")
    assert json.loads(res.stdout)[2]["detail"]["duration_ms"] == 840


def test_cli_usage_one_and_all(monkeypatch):
    res, rec = cli(monkeypatch, lifecycle, "sandbox", "usage", SID)
    assert res.exit_code == 0, res.output
    assert rec.last.url.path == f"/v1/sandboxes/{SID}/usage"
    assert "1.25 s" in res.stdout and "time hibernated" in res.stdout and "2h00m" in res.stdout

    res, rec = cli(monkeypatch, lifecycle, "sandbox", "usage", "--metadata", "team=x")
    assert res.exit_code == 0, res.output
    assert dict(rec.last.url.params) == {"metadata.team": "x"}
    header, *rows = [line for line in res.stdout.splitlines() if line.strip()]
    assert header.split()[:8] == ["ID", "STATE", "CPU", "S", "MEM", "GIB-S", "DISK", "RUNNING"]
    assert "STANDBY" in header and "HIBERNATED" in header
    assert rows[-1].split()[:5] == ["total", "(2)", "2.50", "7.00", "241.1K"]
    assert "4h00m" in rows[-1]  # 2 x 7200 s hibernated

    res, _ = cli(monkeypatch, lifecycle, "sandbox", "usage", "--json")
    assert json.loads(res.stdout)["total"]["disk_bytes"] == 246912
    res, rec = cli(monkeypatch, lifecycle, "sandbox", "usage", SID, "--state", "running")
    assert res.exit_code == 2 and not rec.requests
