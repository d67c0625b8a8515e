"""The E2B door's envd wire pieces without a server: Connect envelopes, error codes,
signatures against the e2b SDK's own, metadata headers, EntryInfo, process ends."""

from __future__ import annotations

import json
import struct
import time

import pytest
from e2b.sandbox.signature import get_signature

from torpor.compat.e2b import connect as rpc
from torpor.compat.e2b.envd import basic_user
from torpor.compat.e2b.envd_files import FilesError, _engine_status, check_access, signature
from torpor.compat.e2b.envd_fs import entry_info
from torpor.compat.e2b.envd_meta import MetadataError, from_headers
from torpor.compat.e2b.envd_process import end_event, home_relative
from torpor.errors import Conflict, Invalid, NotFound, TooLarge, Unavailable


def test_envelopes_across_any_chunking():
    body = rpc.envelope({"a": 1}) + rpc.envelope({"b": "x" * 300}) + rpc.end_stream()
    for size in (1, 3, 7, len(body)):
        reader = rpc.EnvelopeReader()
        got = []
        for i in range(0, len(body), size):
            got += reader.feed(body[i:i + size])
        assert got == [{"a": 1}, {"b": "x" * 300}] and not reader.leftover()
    end = rpc.end_stream(rpc.ConnectError("not_found", "no"))
    flags, n = struct.unpack_from(">BI", end)
    assert flags == rpc.END_STREAM and json.loads(end[5:5 + n]) == {
        "error": {"code": "not_found", "message": "no"}}
    with pytest.raises(rpc.ConnectError) as e:
        rpc.EnvelopeReader().feed(struct.pack(">BI", 1, 2) + b"{}")
    assert e.value.code == "unimplemented"  # compressed
    with pytest.raises(rpc.ConnectError) as e:
        rpc.EnvelopeReader().feed(struct.pack(">BI", 0, rpc.MAX_MESSAGE + 1))
    assert e.value.code == "resource_exhausted"
    with pytest.raises(rpc.ConnectError) as e:
        rpc.decode(b"[1]")
    assert e.value.code == "invalid_argument"


def test_engine_errors_as_envd_codes():
    def code(e):
        return rpc.from_engine(e).code
    assert code(NotFound("x", agent_code="not_found")) == "not_found"
    assert code(Conflict("x", agent_code="exists")) == "already_exists"
    assert code(Conflict("x", agent_code="not_directory")) == "invalid_argument"
    assert code(Conflict("x")) == "failed_precondition"
    assert code(Unavailable("x")) == "unavailable"
    assert rpc.STATUS["unauthenticated"] == 401 and rpc.STATUS["not_found"] == 404
    # /files answers in HTTP statuses, as envd: a full disk 507, an unknown user 401
    assert _engine_status(TooLarge("x", agent_code="no_space"))[0] == 507
    assert _engine_status(Invalid("x", agent_code="unknown_user"))[0] == 401
    assert _engine_status(Conflict("x", agent_code="is_directory"))[0] == 400
    assert _engine_status(NotFound("x", agent_code="not_found"))[0] == 404


def test_signatures_are_the_sdks():
    for path, op, user, exp in (("/a b.txt", "read", None, None),
                                ("x", "write", "root", int(time.time()) + 60)):
        sdk = get_signature(path, op, user, "tok", 60 if exp else None)
        assert signature(path, op, user or "", "tok", sdk["expiration"]) == sdk["signature"]

    ok = get_signature("f", "read", None, "tok", 60)
    q = {"signature": ok["signature"], "signature_expiration": str(ok["expiration"])}
    check_access({"headers": []}, q, "tok", "f", "read")
    check_access({"headers": []}, {}, None, "f", "read")  # not secure
    check_access({"headers": [(b"x-access-token", b"tok")]}, {}, "tok", "f", "write")
    for scope, query, msg in (
            ({"headers": []}, {}, "missing signature query parameter"),
            ({"headers": []}, {**q, "signature_expiration": "1"}, "invalid signature"),
            ({"headers": [(b"x-access-token", b"no")]}, q,
             "access token present in header but does not match")):
        with pytest.raises(FilesError) as e:
            check_access(scope, query, "tok", "f", "read")
        assert (e.value.status, e.value.message) == (401, msg)
    old = int(time.time()) - 1
    q = {"signature": signature("f", "read", "", "tok", old), "signature_expiration": str(old)}
    with pytest.raises(FilesError, match="signature is already expired"):
        check_access({"headers": []}, q, "tok", "f", "read")


def test_metadata_headers():
    scope = {"headers": [(b"x-metadata-Owner", b"ana"), (b"x-metadata-owner", b"bo"),
                         (b"content-type", b"x")]}
    assert from_headers(scope) == {"owner": "ana"}  # lowercased, the first one wins
    for k, v in ((b"x-metadata-k", "é".encode()), (b"x-metadata-" + b"k" * 247, b"v"),
                 (b"x-metadata-big", b"v" * 5000)):
        with pytest.raises(MetadataError):
            from_headers({"headers": [(k, v)]})


def test_entry_info_and_ends():
    e = {"name": "a", "path": "/home/user/a", "type": "dir", "size": 4096, "mode": 0o755,
         "owner": "user", "group": "user", "mtime": 0.5, "ino": 7, "ctime": 1.0}
    out = entry_info(e, table={"/home/user/a": {"ino": 7, "ctime": 1.0, "meta": {"k": "v"}}})
    assert out == {"name": "a", "type": "FILE_TYPE_DIRECTORY", "path": "/home/user/a",
                   "size": "4096", "mode": 0o755, "permissions": "drwxr-xr-x", "owner": "user",
                   "group": "user", "modifiedTime": "1970-01-01T00:00:00.500000Z",
                   "metadata": {"k": "v"}}
    # another file at that path (same inode, other ctime): not its metadata
    assert "metadata" not in entry_info(
        e, table={"/home/user/a": {"ino": 7, "ctime": 2.0, "meta": {"k": "v"}}})
    link = {**e, "type": "symlink", "mode": 0o777, "target": "b"}
    out = entry_info(link, ("/home/user/b", {"type": "file", "mode": 0o600}))
    assert (out["type"], out["mode"], out["permissions"], out["symlinkTarget"]) == (
        "FILE_TYPE_FILE", 0o600, "Lrwxrwxrwx", "/home/user/b")
    assert end_event(0, None) == {"exitCode": 0, "exited": True, "status": "exit status 0"}
    assert end_event(3, None)["error"] == "exit status 3"
    assert end_event(137, "SIGKILL") == {"exitCode": -1, "exited": False,
                                         "status": "signal: killed", "error": "signal: killed"}
    assert [home_relative(p) for p in ("~", "~/x", "x", "/x")] == [".", "x", "x", "/x"]
    assert basic_user("Basic " + __import__("base64").b64encode(b"root:").decode()) == "root"
    assert basic_user(None) is None and basic_user("Bearer x") is None


def test_an_older_agent_gets_the_upload_written_aside():
    """A sandbox restored from a boot snapshot made before `in_place` runs the agent of
    then, which refuses the argument after the first chunk left: the upload is sent again
    without it, whole, and that sandbox is remembered."""
    import asyncio

    from torpor.compat.e2b.envd_files import Files

    class OldFiles:
        def __init__(self):
            self.written: list[tuple[bool, bytes]] = []

        async def write(self, sid, path, user, mode, chunks, in_place=False):
            if in_place:
                await anext(chunks)  # the first chunk went before the agent's refusal
                raise Invalid("sandbox s: op_write() got an unexpected keyword argument "
                              "'in_place'", agent_code="bad_request")
            self.written.append((in_place, b"".join([c async for c in chunks])))
            return {"path": "/home/user/" + path, "size": 0}

    class Engine:
        files = OldFiles()

    async def body(parts):
        for p in parts:
            yield p

    async def main():
        f = Files(Engine(), None)
        r = await f._write_in_place("s", "a.txt", "user", body([b"one ", b"two"]))
        assert r["path"] == "/home/user/a.txt" and "s" in f.old_agents
        await f._write_in_place("s", "b.txt", "user", body([b"three"]))
        assert Engine.files.written == [(False, b"one two"), (False, b"three")]
    asyncio.run(main())
