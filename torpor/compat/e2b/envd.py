"""envd, E2B's in-sandbox API, over Torpor's engine: `create_envd_app(engine)` is the ASGI
app `routing.E2BDoor` sends a sandbox's port 49983 to, with `scope["e2b_sandbox_id"]` set.

- `GET /health`: 204 while the sandbox is there, E2B's 502 once it is not;
- `GET|POST /files`: download and upload (`envd_files.py`), an access token or a signature;
- `POST /process.Process/<M>` and `/filesystem.Filesystem/<M>`: Connect RPCs with the JSON
  codec (`connect.py`), served by `envd_process.py` and `envd_fs.py`.

A secure sandbox (an `access_token` in the door state, written by the control plane) needs
`X-Access-Token` on everything but `/health` and `/files`, as envd's own middleware. A
stream of a sandbox that goes (killed, paused) is cut at the transport, with no end of
stream, as E2B's proxy does: the SDK then asks `/health`, gets 502 and says the sandbox was
killed. A client that goes away stops reading only: processes run on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import socket
import stat
import struct
import weakref

from torpor.compat.e2b import connect as rpc
from torpor.compat.e2b import sandboxes as sbx
from torpor.compat.e2b.envd_files import Files
from torpor.compat.e2b.envd_fs import Filesystem
from torpor.compat.e2b.envd_meta import Metadata
from torpor.compat.e2b.envd_process import Process
from torpor.errors import TorporError, Unavailable

log = logging.getLogger("torpor.e2b")

SETTLE = 3.0  # s a cut stream waits for the sandbox's record to say it went
UNAUTHORIZED = ("unauthorized access, please provide a valid access token or method "
                "signing if supported")


class SandboxGone(Exception):
    """The sandbox went under a stream: the stream is cut at the transport."""


class Call:
    """One RPC: the sandbox, the user it acts as (`Authorization: Basic user:`; None: the
    template's), the client's deadline and keepalive interval."""

    def __init__(self, scope, sid: str):
        self.scope = scope
        self.sid = sid
        self.user = basic_user(rpc.header(scope, b"authorization"))
        self.timeout = rpc.timeout_of(scope)
        ka = rpc.header(scope, b"keepalive-ping-interval")
        self.keepalive = float(ka) if ka and ka.strip().isdigit() and int(ka) > 0 else None

    @property
    def fs_user(self) -> str:
        return self.user or "user"


def reset_on_close(scope) -> None:
    """Make the close of this request's TCP connection a reset (SO_LINGER 0): ASGI has no
    word for it, so the connection's socket is found by its two addresses."""
    server, client = scope.get("server"), scope.get("client")
    if not server or not client or server[1] is None:
        return
    want = {(str(server[0]), int(server[1]), str(client[0]), int(client[1]))}
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.stat(f"/proc/self/fd/{name}").st_mode):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                        socket.AF_INET, socket.AF_INET6):
                    continue
                local, peer = sock.getsockname(), sock.getpeername()
                if (local[0], local[1], peer[0], peer[1]) in want:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    return
        except OSError:
            continue


def basic_user(value: str | None) -> str | None:
    if not value or not value.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(value[6:].strip(), validate=True).decode()
    except ValueError:
        return None
    name = raw.split(":", 1)[0]
    return name or None


async def send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class Envd:
    def __init__(self, engine):
        self.engine = engine
        self.process = Process(engine, SandboxGone)
        self.metadata = Metadata(engine)
        self.filesystem = Filesystem(engine, SandboxGone, self.metadata)
        self.files = Files(engine, self.metadata)
        p, f = self.process, self.filesystem
        self.unary = {
            "/process.Process/List": p.list, "/process.Process/SendInput": p.send_input,
            "/process.Process/SendSignal": p.send_signal,
            "/process.Process/CloseStdin": p.close_stdin, "/process.Process/Update": p.update,
            "/filesystem.Filesystem/Stat": f.stat, "/filesystem.Filesystem/MakeDir": f.make_dir,
            "/filesystem.Filesystem/Move": f.move, "/filesystem.Filesystem/ListDir": f.list_dir,
            "/filesystem.Filesystem/Remove": f.remove,
            "/filesystem.Filesystem/CreateWatcher": f.create_watcher,
            "/filesystem.Filesystem/GetWatcherEvents": f.get_watcher_events,
            "/filesystem.Filesystem/RemoveWatcher": f.remove_watcher,
        }
        # server streams: (handler, the keepalive message)
        self.streams = {
            "/process.Process/Start": (p.start, {"event": {"keepalive": {}}}),
            "/process.Process/Connect": (p.connect, {"event": {"keepalive": {}}}),
            "/filesystem.Filesystem/WatchDir": (f.watch_dir, {"keepalive": {}}),
        }
        self.client_streams = {"/process.Process/StreamInput": p.stream_input}
        self.cutters: dict[str, set[asyncio.Event]] = {}  # sid -> one per open stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 4404})
        sid = scope["e2b_sandbox_id"]
        path, method = scope["path"], scope["method"]
        if path == "/health":
            if sbx.view(self.engine, sid) is None:
                return await send_json(send, 502, json.loads(_not_found(sid)))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            return await send({"type": "http.response.body", "body": b""})
        try:
            token = self.engine.door_state(sid, sbx.DOOR).get("access_token")
        except TorporError:  # deleted since the routing looked
            return await send_json(send, 502, json.loads(_not_found(sid)))
        if path == "/files":
            return await self.files(scope, receive, send, sid, token)
        if token and not token_matches(rpc.header(scope, b"x-access-token"), token):
            return await send_json(send, 401, {"code": 401, "message": UNAUTHORIZED})
        call = Call(scope, sid)
        if path in self.unary or path in self.streams or path in self.client_streams:
            if method != "POST":
                return await send_json(send, 405, {"code": 405,
                                                   "message": f"{method} {path}: use POST"})
            if path in self.streams:
                return await self.server_stream(call, receive, send, *self.streams[path])
            if path in self.client_streams:
                return await self.client_stream(call, receive, send,
                                                self.client_streams[path])
            return await self.unary_call(call, receive, send, self.unary[path])
        return await send_json(send, 404, {"code": 404, "message": f"no route {path}"})

    async def unary_call(self, call: Call, receive, send, handler) -> None:
        try:
            rpc.check_codec(call.scope)
            if rpc.is_stream(call.scope):
                return await self.server_stream(call, receive, send, _once(handler), None)
            req = rpc.decode(await rpc.read_body(receive))
            coro = handler(call, req)
            res = await (asyncio.wait_for(coro, call.timeout) if call.timeout else coro)
        except TimeoutError:
            return await rpc.send_unary_error(
                send, rpc.ConnectError("deadline_exceeded", "the call's deadline passed"))
        except rpc.ConnectError as e:
            return await rpc.send_unary_error(send, e)
        except TorporError as e:
            return await rpc.send_unary_error(send, rpc.from_engine(e))
        await rpc.send_unary(send, res)

    async def server_stream(self, call: Call, receive, send, handler, keepalive) -> None:
        """Run `handler(call, req)` (an async generator of messages) and send each as an
        envelope, then the end of stream (with the error, if it failed). Keepalive
        messages go out while it is quiet; the client's deadline ends it with
        deadline_exceeded; a client that goes away ends it; SandboxGone cuts it."""
        error = None
        gen = None
        started = False
        try:
            rpc.check_codec(call.scope)
            reader = rpc.EnvelopeReader()
            msgs = reader.feed(await rpc.read_body(receive))
            if rpc.is_stream(call.scope):
                if len(msgs) != 1:
                    raise rpc.ConnectError("invalid_argument",
                                           f"a stream's request is one message, not {len(msgs)}")
                req = msgs[0]
            else:  # a server stream asked for as a unary call
                raise rpc.ConnectError("unimplemented", "use application/connect+json")
            await rpc.start_stream(send)
            started = True
            gen = handler(call, req)
            await self._pump(call, receive, send, gen, keepalive)
        except SandboxGone:
            return await self.cut(call)
        except _ClientGone:
            return
        except rpc.ConnectError as e:
            error = e
        except TorporError as e:
            if started and (isinstance(e, Unavailable) or sbx.view(self.engine, call.sid) is None):
                return await self.cut(call)
            error = rpc.from_engine(e)
        finally:
            if gen is not None:
                with contextlib.suppress(BaseException):
                    await gen.aclose()
        if not started:
            await rpc.start_stream(send)
        await send({"type": "http.response.body", "body": rpc.end_stream(error),
                    "more_body": False})

    async def cut_streams(self, sid: str, wait: float = 2.0) -> int:
        """Cut every stream of the sandbox (as E2B's pause does; its agent streams close,
        so it can hibernate) and wait, at most `wait` s, until they are: how many there
        were. Mark the sandbox paused first, so the cut ones reset at once."""
        cuts = list(self.cutters.get(sid, ()))
        for ev in cuts:
            ev.set()
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        while self.cutters.get(sid) and loop.time() < until:
            await asyncio.sleep(0.01)
        return len(cuts)

    async def cut(self, call: Call) -> None:
        """E2B's proxy drops the connection of a sandbox that went: no end of stream, the
        connection reset (the SDK takes a reset for a transport failure, asks /health, and
        says the sandbox was killed; a plain close would be a protocol error to it). The
        channel closes before the sandbox's record says why (deleted, paused...): wait a
        moment for it first, so that health check sees it. Returns with the response
        unfinished: the server closes the connection."""
        sid = call.sid
        loop = asyncio.get_running_loop()
        until = loop.time() + SETTLE
        while loop.time() < until:
            v = sbx.view(self.engine, sid)
            if v is None or v.state == "paused" or v.info.state != "running":
                break
            await asyncio.sleep(0.05)
        if sbx.view(self.engine, sid) is None:
            self.filesystem.drop(sid)
        log.info("sandbox %s went under a stream of %s: the connection is reset", sid,
                 call.scope.get("path"))
        reset_on_close(call.scope)

    async def _pump(self, call: Call, receive, send, gen, keepalive) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.timeout if call.timeout else None
        gone = asyncio.ensure_future(_disconnect(receive))
        cut = asyncio.Event()
        self.cutters.setdefault(call.sid, set()).add(cut)
        cutting = asyncio.ensure_future(cut.wait())
        nxt = None
        try:
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(anext(gen, _END))
                wait = call.keepalive if keepalive is not None else None
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise rpc.ConnectError("deadline_exceeded",
                                               "the stream's deadline passed")
                    wait = left if wait is None else min(wait, left)
                done, _ = await asyncio.wait({nxt, gone, cutting}, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    raise _ClientGone()
                if cutting in done:
                    raise SandboxGone()
                if nxt not in done:
                    if keepalive is not None and call.keepalive is not None:
                        await send({"type": "http.response.body",
                                    "body": rpc.envelope(keepalive), "more_body": True})
                    continue
                msg, nxt = nxt.result(), None
                if msg is _END:
                    return
                await send({"type": "http.response.body", "body": rpc.envelope(msg),
                            "more_body": True})
        finally:
            mine = self.cutters.get(call.sid)
            if mine is not None:
                mine.discard(cut)
                if not mine:
                    del self.cutters[call.sid]
            for t in (nxt, gone, cutting):
                if t is not None and not t.done():
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t

    async def client_stream(self, call: Call, receive, send, handler) -> None:
        """Requests as envelopes (`handler(call, messages)` reads them as they come), one
        answer, then the end of stream."""
        error = None
        res = None
        try:
            rpc.check_codec(call.scope)
            if not rpc.is_stream(call.scope):
                raise rpc.ConnectError("unimplemented", "use application/connect+json")
            res = await handler(call, _messages(receive))
        except rpc.ConnectError as e:
            error = e
        except TorporError as e:
            error = rpc.from_engine(e)
        await rpc.start_stream(send)
        body = (rpc.envelope(res) if res is not None and error is None else b"")
        await send({"type": "http.response.body", "body": body + rpc.end_stream(error),
                    "more_body": False})


class _ClientGone(Exception):
    pass


_END = object()


def _once(handler):
    async def gen(call, req):
        yield await handler(call, req)
    return gen


async def _disconnect(receive) -> None:
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            return


async def _messages(receive):
    reader = rpc.EnvelopeReader()
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            raise rpc.ConnectError("canceled", "the client went away")
        for msg in reader.feed(m.get("body", b"")):
            yield msg
        if not m.get("more_body"):
            if reader.leftover():
                raise rpc.ConnectError("invalid_argument", "the request ended mid-message")
            return


def _not_found(sid: str) -> bytes:
    from torpor.compat.e2b.routing import not_found_body

    return not_found_body(sid)


_APPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its Envd


def create_envd_app(engine) -> Envd:
    app = _APPS[engine] = Envd(engine)
    return app


async def cut_streams(engine, sid: str) -> int:
    """For the control plane's pause: cut the sandbox's envd streams (see
    `Envd.cut_streams`); 0 if envd never served this engine."""
    app = _APPS.get(engine)
    return await app.cut_streams(sid) if app is not None else 0
