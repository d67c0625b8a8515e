"""envd's `/files`: a file's bytes down (`GET`, gzip when asked) and up (`POST`, multipart
or octet-stream, gzip-encoded or not), over the engine's files.

A secure sandbox takes `X-Access-Token`, or a signature made with its token:
`v1_` + base64 (no padding) of sha256(`{path}:{read|write}:{username or ''}:{token}`, then
`:{expiration}` if it has one), as envd checks it. Paths resolve from the user's home;
uploads create parent directories and write the file in place (a watcher sees what a
program writing it would make). File metadata (`X-Metadata-*`) is kept by the door
(`envd_meta.py`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import zlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

from starlette.requests import Request

from torpor.compat.e2b import connect as rpc
from torpor.compat.e2b.envd_meta import Metadata, MetadataError, from_headers
from torpor.errors import TorporError

CHUNK = 256 * 1024
REPLAY_MAX = 16 * 1024 * 1024  # bytes of an upload kept to send again to an older agent
MAX_KNOWN = 10_000  # sandboxes whose agent's kind is remembered


class FilesError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def signature(path: str, operation: str, username: str, token: str,
              expiration: int | None) -> str:
    raw = f"{path}:{operation}:{username}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def _query(scope) -> dict[str, str]:
    q = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return {k: v[0] for k, v in q.items()}


def check_access(scope, q: dict, token: str | None, path: str, operation: str) -> None:
    """envd's rule: no token, nothing to check; a token in the header must match; else
    a valid, unexpired signature."""
    if not token:
        return
    given = rpc.header(scope, b"x-access-token")
    if given:
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise FilesError(401, "access token present in header but does not match")
        return
    sig = q.get("signature")
    if sig is None:
        raise FilesError(401, "missing signature query parameter")
    exp = q.get("signature_expiration")
    if exp is not None:
        try:
            exp = int(exp)
        except ValueError:
            raise FilesError(400, "signature_expiration must be a unix time in seconds") from None
    want = signature(path, operation, q.get("username", ""), token, exp)
    if not hmac.compare_digest(want.encode(), sig.encode()):
        raise FilesError(401, "invalid signature")
    if exp is not None and exp < time.time():
        raise FilesError(401, "signature is already expired")


def sandbox_of_signature(engine, scope) -> str | None:
    """The secure sandbox a signed `/files` URL without a sandbox id is for: the one whose
    access token reproduces its signature (E2B's signed URLs name the sandbox in their
    host, which `E2B_SANDBOX_URL` replaces). None if none does."""
    from torpor.compat.e2b import sandboxes as sbx

    q = _query(scope)
    sig, path = q.get("signature"), q.get("path", "")
    if not sig:
        return None
    op = "read" if scope["method"] in ("GET", "HEAD") else "write"
    exp = q.get("signature_expiration")
    try:
        exp = int(exp) if exp is not None else None
    except ValueError:
        return None
    for info in engine.list():
        token = engine.door_state(info.id, sbx.DOOR).get("access_token")
        if token and hmac.compare_digest(
                signature(path, op, q.get("username", ""), token, exp).encode(), sig.encode()):
            return info.id
    return None


def _engine_status(e: TorporError) -> tuple[int, str]:
    code = e.extra.get("agent_code", "")
    if code == "unknown_user":
        return 401, e.message
    if code == "no_space":
        return 507, "not enough disk space available: " + e.message
    if e.code == "not_found":
        return 404, e.message
    if e.code in ("invalid", "conflict"):
        return 400, e.message
    if e.code in ("unavailable", "timeout"):
        return 502, e.message
    return (e.status if e.status >= 400 else 500), e.message


class Files:
    def __init__(self, engine, meta: Metadata):
        self.engine = engine
        self.meta = meta
        # sandboxes whose agent writes only aside (older than in_place), and those known
        # to write in place (an agent never goes back to an older one)
        self.old_agents: set[str] = set()
        self.new_agents: set[str] = set()

    async def __call__(self, scope, receive, send, sid: str, token: str | None) -> None:
        from torpor.compat.e2b.envd import send_json

        q = _query(scope)
        try:
            if scope["method"] == "GET":
                check_access(scope, q, token, q.get("path", ""), "read")
                return await self.download(scope, send, sid, q)
            if scope["method"] == "POST":
                check_access(scope, q, token, q.get("path", ""), "write")
                return await self.upload(scope, receive, send, sid, q)
            raise FilesError(405, f"{scope['method']} /files: use GET or POST")
        except FilesError as e:
            return await send_json(send, e.status, {"code": e.status, "message": e.message})
        except TorporError as e:
            status, message = _engine_status(e)
            return await send_json(send, status, {"code": status, "message": message})

    async def download(self, scope, send, sid: str, q: dict) -> None:
        path = q.get("path")
        if not path:
            raise FilesError(400, "path is required")
        user = q.get("username") or "user"
        _size, body = await self.engine.files.read(sid, path, user)
        accept = (rpc.header(scope, b"accept-encoding") or "").lower()
        gz = "gzip" in [a.split(";")[0].strip() for a in accept.split(",")]
        headers = [(b"content-type", b"application/octet-stream"), (b"vary", b"Accept-Encoding")]
        if gz:
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        comp = zlib.compressobj(6, zlib.DEFLATED, 31) if gz else None
        try:
            async for chunk in body:
                data = comp.compress(chunk) if comp else chunk
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            await body.aclose()
        await send({"type": "http.response.body", "body": comp.flush() if comp else b""})

    async def upload(self, scope, receive, send, sid: str, q: dict) -> None:
        from torpor.compat.e2b.envd import send_json

        try:
            meta = from_headers(scope)
        except MetadataError as e:
            raise FilesError(400, str(e)) from None
        user = q.get("username") or "user"
        ctype = (rpc.header(scope, b"content-type") or "").split(";")[0].strip().lower()
        enc = (rpc.header(scope, b"content-encoding") or "identity").strip().lower()
        if enc not in ("identity", "gzip"):
            raise FilesError(400, f"content encoding {enc!r}: identity or gzip")
        written = []
        if ctype == "multipart/form-data":
            if enc != "identity":
                raise FilesError(400, "a multipart upload cannot be gzip-encoded")
            # the form is spooled on the host before it is written: no bigger than the disk
            limit = self.engine.get(sid).disk_mb * 1024 * 1024
            form = await Request(scope, _bounded(receive, limit)).form(max_files=10_000)
            try:
                parts = [v for k, v in form.multi_items() if k == "file" and not isinstance(v, str)]
                if not parts:
                    raise FilesError(400, "the form has no file field")
                for part in parts:
                    path = q.get("path") if len(parts) == 1 and q.get("path") else part.filename
                    if not path:
                        raise FilesError(400, "a file part without a path (its filename)")
                    written.append(await self._write(sid, path, user, _part_chunks(part),
                                                     meta))
            finally:
                await form.close()
        else:
            path = q.get("path")
            if not path:
                raise FilesError(400, "path query parameter is required for raw body upload")
            written.append(await self._write(sid, path, user, _body(receive, enc == "gzip"),
                                             meta))
        await send_json(send, 200, written)

    async def _write(self, sid: str, path: str, user: str, chunks, meta: dict) -> dict:
        r = await self._write_in_place(sid, path, user, chunks)
        full = r["path"]
        out = {"name": full.rsplit("/", 1)[-1], "type": "file", "path": full}
        if meta:
            entry = await self.engine.files.stat(sid, full, user)
            try:
                self.meta.set(sid, entry, meta)
            except MetadataError as e:
                raise FilesError(507, str(e)) from None
            out["metadata"] = meta
        else:
            self.meta.set(sid, {"path": full}, {})  # an upload without metadata clears it
        return out


    async def _write_in_place(self, sid: str, path: str, user: str, chunks) -> dict:
        """Write in place; a sandbox whose agent predates that (restored from a boot
        snapshot or a hibernation made before it) refuses the argument before reading a
        byte: then write as it can (aside, renamed into place), with what it was sent."""
        if sid in self.old_agents:
            return await self.engine.files.write(sid, path, user, None, chunks)
        if sid in self.new_agents:
            return await self.engine.files.write(sid, path, user, None, chunks, in_place=True)
        sent: list[bytes] = []
        size = 0

        async def kept():
            nonlocal size
            async for chunk in chunks:
                if size <= REPLAY_MAX:
                    sent.append(chunk)
                size += len(chunk)
                yield chunk
        if len(self.new_agents) > MAX_KNOWN:
            self.new_agents.clear()
        gen = kept()
        try:
            r = await self.engine.files.write(sid, path, user, None, gen, in_place=True)
            self.new_agents.add(sid)
            return r
        except TorporError as e:
            if not (e.extra.get("agent_code") == "bad_request" and "in_place" in e.message):
                raise
            if size > REPLAY_MAX:
                raise FilesError(500, f"sandbox {sid} runs an agent older than this server "
                                 "(from a boot snapshot or hibernation made before it): "
                                 "recreate it, or upload again") from None
            if len(self.old_agents) > MAX_KNOWN:
                self.old_agents.clear()
            self.old_agents.add(sid)

        async def again():
            for chunk in sent:
                yield chunk
            async for chunk in gen:
                yield chunk
        return await self.engine.files.write(sid, path, user, None, again())


def _bounded(receive, limit: int):
    """receive, refusing a body past `limit` bytes with 507, as a full disk would."""
    seen = 0

    async def bounded():
        nonlocal seen
        m = await receive()
        seen += len(m.get("body", b""))
        if seen > limit:
            raise FilesError(507, f"not enough disk space available: the upload is over the "
                             f"sandbox's disk of {limit // (1024 * 1024)} MiB")
        return m
    return bounded


async def _part_chunks(part) -> AsyncIterator[bytes]:
    while True:
        data = await part.read(CHUNK)
        if not data:
            return
        yield data


async def _body(receive, gz: bool) -> AsyncIterator[bytes]:
    dec = zlib.decompressobj(47) if gz else None  # 47: gzip or zlib header, detected
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            raise FilesError(400, "the client went away mid-upload")
        data = m.get("body", b"")
        if dec is not None and data:
            try:
                data = dec.decompress(data)
            except zlib.error as e:
                raise FilesError(400, f"the body is not valid gzip: {e}") from None
        if data:
            yield data
        if not m.get("more_body"):
            if dec is not None and not dec.eof:
                raise FilesError(400, "the gzip body ended early")
            return
