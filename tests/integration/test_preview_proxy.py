"""Preview URL gateway: Host routing, authorisation, credential stripping, streaming,
WebSocket, the API-path ASGI handler. Real sockets on loopback only; no sandboxes:
`open_upstream` connects to apps this file serves with uvicorn."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import h11
import httpx
import pytest
import uvicorn
from conftest import wait_for as poll_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route as SRoute
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from torpor.network.preview import PreviewError, PreviewGateway, Route, TokenSigner

pytestmark = pytest.mark.timeout(30)

API_KEY = "tk_live_secret_key_123"
KEY = bytes(range(32))
A, B = "sbx1234", "sbx5678"
T = 10.0  # seconds any single network wait may take


def free_socket() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def free_port() -> int:
    with free_socket() as s:
        return s.getsockname()[1]


# --- the apps "inside the sandboxes" ------------------------------------------------------
def make_app(name: str, state: dict) -> Starlette:
    async def echo(request: Request):
        body = await request.body()
        return JSONResponse({
            "app": name, "method": request.method,
            "raw_path": request.scope["raw_path"].decode(),
            "query": request.scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]],
            "body": body.decode(),
        })

    async def stream(request: Request):
        release = state.setdefault(request.query_params["id"], asyncio.Event())

        async def gen():
            yield b"first\n"
            await asyncio.wait_for(release.wait(), T)
            yield b"second\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    async def upload(request: Request):
        got_first: threading.Event = state["got_first"]
        chunks = 0
        size = 0
        async for chunk in request.stream():
            if chunk:
                chunks += 1
                size += len(chunk)
                got_first.set()
        return JSONResponse({"chunks": chunks, "size": size})

    async def ws_echo(websocket: WebSocket):
        await websocket.accept()
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    if msg["text"] == "headers":
                        await websocket.send_text(json.dumps(
                            {k.decode(): v.decode() for k, v in websocket.scope["headers"]}
                            | {"_query": websocket.scope["query_string"].decode()}))
                    else:
                        await websocket.send_text(f"{name}:{msg['text']}")
                else:
                    await websocket.send_bytes(msg["bytes"][::-1])
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[
        SRoute("/stream", stream), SRoute("/upload", upload, methods=["POST"]),
        WebSocketRoute("/ws", ws_echo),
        SRoute("/{path:path}", echo, methods=["GET", "POST", "PUT", "HEAD"]),
    ])


async def broken_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a promise of 100 bytes with 5, then hangs up."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
    await writer.drain()
    writer.close()


async def oneshot_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one request as keep-alive, then closes, as an app's idle timeout would."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    writer.close()


class Env:
    """Everything the tests talk to, served from one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.state: dict = {"got_first": threading.Event()}
        self.events: list[tuple[str, str]] = []
        self.upstream_calls: list[tuple[str, int]] = []
        self.servers: list = []
        self.conns: set[asyncio.Task] = set()  # live listener connections, ended at close
        self.refused_port = free_port()  # nothing listens here
        self.signer = TokenSigner(KEY)
        self.call(self._start(), 30)

    def call(self, coro, timeout: float = T):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _uvicorn(self, app) -> int:
        sock = free_socket()
        config = uvicorn.Config(app, lifespan="off", log_level="warning", http="h11", interface="asgi3",
                                ws="wsproto")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        self.servers.append((server, task))
        return sock.getsockname()[1]

    async def _start(self) -> None:
        port_a = await self._uvicorn(make_app("A", self.state))
        port_b = await self._uvicorn(make_app("B", self.state))
        broken = await asyncio.start_server(broken_server, "127.0.0.1", 0)
        oneshot = await asyncio.start_server(oneshot_server, "127.0.0.1", 0)
        self.broken, self.oneshot = broken, oneshot
        self.ports = {
            (A, 8000): port_a, (A, 3000): port_a, (A, 9000): self.refused_port,
            (A, 7000): broken.sockets[0].getsockname()[1], (B, 8000): port_b,
            (A, 7001): oneshot.sockets[0].getsockname()[1], ("sbxslow1", 8000): 0,
        }
        self.public = {(A, 3000)}
        self.custom = {"app.example.com": Route(B, 8000, False),
                       "open.example.com": Route(A, 3000, True)}
        self.gw = PreviewGateway(
            domain="localhost", signer=self.signer, lookup=self.lookup,
            check_api_key=lambda k: k == API_KEY, open_upstream=self.open_upstream,
            on_open=lambda sid: self.events.append(("open", sid)),
            on_close=lambda sid: self.events.append(("close", sid)), connect_timeout=0.5)
        self.listener = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.listener.sockets[0].getsockname()[1]
        self.api_port = await self._uvicorn(self.api_app)

    async def handle(self, reader, writer) -> None:
        task = asyncio.current_task()
        self.conns.add(task)
        try:
            await self.gw.handle(reader, writer)
        finally:
            self.conns.discard(task)

    async def lookup(self, host: str) -> Route | None:
        if host in self.custom:
            return self.custom[host]
        m = re.fullmatch(r"(\d+)-([a-z0-9]+)\.localhost", host)
        if m and (m[2], int(m[1])) in self.ports:
            key = (m[2], int(m[1]))
            return Route(m[2], key[1], key in self.public)
        return None

    async def open_upstream(self, sid: str, port: int):
        self.upstream_calls.append((sid, port))
        if (sid, port) not in self.ports:
            raise PreviewError(404, f"no sandbox {sid}")
        if sid == "sbxslow1":
            await asyncio.sleep(5)  # a wake that takes too long
        return await asyncio.open_connection("127.0.0.1", self.ports[(sid, port)])

    async def api_app(self, scope, receive, send) -> None:
        # stands in for the FastAPI route /v1/sandboxes/{id}/ports/{port}/{path}
        m = re.fullmatch(r"/v1/sandboxes/([a-z0-9]+)/ports/(\d+)(?:/(.*))?", scope["path"])
        await self.gw.asgi(scope, receive, send, m[1], int(m[2]), m[3] or "")

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def token(self, sid: str = A, port: int = 8000, ttl: int = 600) -> str:
        return self.signer.sign(sid, port, int(time.time()) + ttl)

    def close(self) -> None:
        async def stop():
            self.listener.close()
            self.broken.close()
            self.oneshot.close()
            for task in list(self.conns):
                task.cancel()
            await asyncio.gather(*self.conns, return_exceptions=True)
            for server, _ in self.servers:
                server.should_exit = True
            await asyncio.gather(*(t for _, t in self.servers), return_exceptions=True)
        self.call(stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=T) as c:
        yield c


def host(port: int = 8000, sid: str = A) -> str:
    return f"{port}-{sid}.localhost:7071"


def headers_of(resp: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in resp.json()["headers"]:
        out.setdefault(k, []).append(v)
    return out


# --- raw HTTP/1.1 on one connection --------------------------------------------------------
class RawClient:
    """One TCP connection; requests and responses parsed with h11."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=T)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, target: str, headers: list[tuple[str, str]]):
        self.sock.sendall(self.conn.send(h11.Request(method="GET", target=target,
                                                     headers=headers))
                          + self.conn.send(h11.EndOfMessage()))
        resp, body = None, b""
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise AssertionError(ev)
        self.conn.start_next_cycle()
        return resp.status_code, dict(resp.headers), body

    def close(self) -> None:
        self.sock.close()


# --- WebSocket client by hand (wsproto over a socket) -------------------------------------
class WSRefused(Exception):
    pass


class WSClient:
    def __init__(self, port: int, host_: str, target: str,
                 headers: list[tuple[str, str]] = ()):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=T)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(ws.Request(host=host_, target=target,
                                                  extra_headers=list(headers))))
        self.pending: list = []
        ev = self._next()
        if not isinstance(ev, ws.AcceptConnection):
            self.sock.close()
            raise WSRefused(f"websocket refused: {ev}")

    def _next(self):
        while not self.pending:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    def ask(self, msg: str | bytes) -> str | bytes:
        ev = ws.TextMessage(data=msg) if isinstance(msg, str) else ws.BytesMessage(data=msg)
        self.sock.sendall(self.ws.send(ev))
        ev = self._next()
        assert isinstance(ev, ws.Message), ev
        return ev.data

    def close(self) -> None:
        self.sock.sendall(self.ws.send(ws.CloseConnection(code=1000)))
        ev = self._next()
        assert isinstance(ev, ws.CloseConnection), ev
        self.sock.close()


def wait_for(pred, timeout: float = T) -> None:
    poll_until(pred, timeout, every=0.01)


# --- unit: tokens and host parsing --------------------------------------------------------
def test_token_sign_verify():
    s = TokenSigner(KEY)
    now = 1_700_000_000
    tok = s.sign(A, 8000, now + 60)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", tok)
    assert s.verify(tok, A, 8000, now=now)
    assert not s.verify(tok, B, 8000, now=now)
    assert not s.verify(tok, A, 8001, now=now)
    assert not s.verify(tok, A, 8000, now=now + 61)
    assert not TokenSigner(bytes(32)).verify(tok, A, 8000, now=now)
    for bad in ("", "x", "v1.abc.def", tok + "x", tok.replace("v1.", "v2."), "v1..", "é"):
        assert not s.verify(bad, A, 8000, now=now)
    tampered = tok.split(".")
    tampered[1] = str(now + 10_000)
    assert not s.verify(".".join(tampered), A, 8000, now=now)
    assert s.check(tok, A, 8000, now=now + 61) == "preview token has expired"
    assert "not valid for port 8000 of sandbox sbx5678" in s.check(tok, B, 8000, now=now)


def test_parse_host(env: Env):
    p = env.gw.parse_host
    assert p("8000-abc123.localhost:7071") == (8000, "abc123")
    assert p("8000-ABC123.LocalHost") == (8000, "abc123")
    assert p("8000-abc123.localhost.") == (8000, "abc123")
    for bad in ("localhost", "abc123.localhost", "8000-abc.localhost", "0-abc123.localhost",
                "70000-abc123.localhost", "8000-abc123.example.com", "8000-abc_123.localhost",
                "x8000-abc123.localhost", "8000-abc123.localhost.evil.com"):
        assert p(bad) is None, bad
    gw = PreviewGateway(domain="preview.example.com", signer=env.signer, lookup=env.lookup,
                        check_api_key=bool, open_upstream=env.open_upstream)
    assert gw.parse_host("3000-abc123.preview.example.com") == (3000, "abc123")
    assert gw.parse_host("3000-abc123.previewXexample.com") is None


# --- routing and authorisation -------------------------------------------------------------
def test_host_routing_and_custom_domain(env: Env, client: httpx.Client):
    r = client.get(env.url("/hello?x=1"), headers={"Host": host(), "X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["app"] == "A"
    assert r.json()["raw_path"] == "/hello" and r.json()["query"] == "x=1"
    h = headers_of(r)
    assert h["host"] == [host()]  # the original Host reaches the app
    assert h["x-forwarded-host"] == [host()] and h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    r = client.get(env.url("/"), headers={"Host": host(sid=B), "X-API-Key": API_KEY})
    assert r.json()["app"] == "B"
    r = client.get(env.url("/c"), headers={"Host": "APP.example.com:7071",
                                           "Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.json()["app"] == "B"
    r = client.get(env.url("/"), headers={"Host": "open.example.com"})  # public custom
    assert r.status_code == 200 and r.json()["app"] == "A"


def test_unknown_host_404(env: Env, client: httpx.Client):
    for h in ("localhost:7071", "nothing.example.com", "8000-zzzzzz9.localhost", "127.0.0.1"):
        r = client.get(env.url("/"), headers={"Host": h, "X-API-Key": API_KEY})
        assert r.status_code == 404, h
        assert r.headers["content-type"].startswith("text/plain") and len(r.text) < 200
    # the name parses but the sandbox is gone by the time we connect
    r = client.get(env.url("/"), headers={"Host": host(8000, "sbxgone1"),
                                          "X-API-Key": API_KEY})
    assert r.status_code == 404


def test_401_without_credential(env: Env, client: httpx.Client):
    r = client.get(env.url("/"), headers={"Host": host()})
    assert r.status_code == 401 and "private" in r.text
    r = client.get(env.url("/"), headers={"Host": host(), "X-API-Key": "wrong"})
    assert r.status_code == 401
    r = client.get(env.url("/"), headers={"Host": host(), "Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_403_wrong_or_expired_token(env: Env, client: httpx.Client):
    cases = {
        "other sandbox": env.token(sid=B),
        "other port": env.token(port=3000),
        "expired": env.signer.sign(A, 8000, int(time.time()) - 5),
        "garbage": "not-a-token",
    }
    for why, tok in cases.items():
        r = client.get(env.url(f"/?torpor_token={tok}"), headers={"Host": host()})
        assert r.status_code == 403, why
        assert "set-cookie" not in r.headers
        r = client.get(env.url("/"), headers={"Host": host(), "X-Torpor-Token": tok})
        assert r.status_code == 403, why
        r = client.get(env.url("/"), headers={"Host": host(), "Cookie": f"torpor_token={tok}"})
        assert r.status_code == 403, why
    r = client.get(env.url(f"/?torpor_token={cases['expired']}"), headers={"Host": host()})
    assert "expired" in r.text
    r = client.get(env.url(f"/?torpor_token={cases['other sandbox']}"),
                   headers={"Host": host()})
    assert "not valid for port 8000 of sandbox sbx1234" in r.text


def test_query_token_sets_cookie_then_cookie_works(env: Env, client: httpx.Client):
    tok = env.token(ttl=300)
    r = client.get(env.url(f"/page?a=1&torpor_token={tok}&b=2"), headers={"Host": host()})
    assert r.status_code == 200
    body = r.json()
    assert body["raw_path"] == "/page" and body["query"] == "a=1&b=2"  # token stripped
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"torpor_token={tok}; Path=/; HttpOnly; SameSite=Lax; Max-Age=")
    assert 290 <= int(cookie.rsplit("=", 1)[1]) <= 300
    # a browser's follow-up request: only the cookie, next to the app's own cookies
    r = client.get(env.url("/asset.js"),
                   headers={"Host": host(), "Cookie": f"theme=dark; torpor_token={tok}; sid=7"})
    assert r.status_code == 200 and "set-cookie" not in r.headers
    assert headers_of(r)["cookie"] == ["theme=dark; sid=7"]
    # the only parameter / the only cookie: nothing left behind
    r = client.get(env.url(f"/x?torpor_token={tok}"),
                   headers={"Host": host(), "Cookie": f"torpor_token={tok}"})
    assert r.json()["query"] == "" and r.json()["raw_path"] == "/x"
    assert "cookie" not in headers_of(r)
    r = client.get(env.url("/"), headers={"Host": host(), "X-Torpor-Token": tok})
    assert r.status_code == 200 and "x-torpor-token" not in headers_of(r)


def test_api_key_not_forwarded(env: Env, client: httpx.Client):
    for hdrs in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        r = client.get(env.url("/"), headers={"Host": host(), **hdrs})
        assert r.status_code == 200
        h = headers_of(r)
        assert "authorization" not in h and "x-api-key" not in h
        assert API_KEY not in r.text
    # an Authorization header that is the app's own (not the API key) passes through
    r = client.get(env.url("/"), headers={"Host": host(3000), "Authorization": "Basic dTpw"})
    assert headers_of(r)["authorization"] == ["Basic dTpw"]
    # on a public port too, the API key never reaches the sandbox
    r = client.get(env.url("/"), headers={"Host": host(3000), "X-API-Key": API_KEY})
    assert "x-api-key" not in headers_of(r)


def test_public_route_needs_nothing(env: Env, client: httpx.Client):
    r = client.get(env.url("/pub"), headers={"Host": host(3000)})
    assert r.status_code == 200 and r.json()["app"] == "A"
    # a stray token is still removed
    r = client.get(env.url(f"/pub?torpor_token={env.token(port=3000)}"),
                   headers={"Host": host(3000)})
    assert r.json()["query"] == ""


def test_keep_alive_host_switch_is_authorised_separately(env: Env):
    c = RawClient(env.port)
    try:
        tok = env.token(A)
        status, _, body = c.request(f"/one?torpor_token={tok}", [("Host", host())])
        assert status == 200 and json.loads(body)["app"] == "A"
        # same connection, another sandbox, with nothing or with A's credentials
        status, _, _ = c.request("/two", [("Host", host(sid=B))])
        assert status == 401
        status, _, body = c.request("/two", [("Host", host(sid=B)),
                                             ("Cookie", f"torpor_token={tok}")])
        assert status == 403
        status, _, _ = c.request(f"/two?torpor_token={tok}", [("Host", host(sid=B))])
        assert status == 403
        # its own credential works, and back to A with A's cookie
        status, _, body = c.request("/two", [("Host", host(sid=B)),
                                             ("X-Torpor-Token", env.token(B))])
        assert status == 200 and json.loads(body)["app"] == "B"
        status, _, body = c.request("/three", [("Host", host()),
                                               ("Cookie", f"torpor_token={tok}")])
        assert status == 200 and json.loads(body)["app"] == "A"
    finally:
        c.close()


def test_upstream_connection_reused_while_route_stays(env: Env):
    c = RawClient(env.port)
    try:
        before = len(env.upstream_calls)
        for i in range(3):
            status, _, _ = c.request(f"/r{i}", [("Host", host()), ("X-API-Key", API_KEY)])
            assert status == 200
        assert env.upstream_calls[before:] == [(A, 8000)]
        c.request("/b", [("Host", host(sid=B)), ("X-API-Key", API_KEY)])
        c.request("/a", [("Host", host()), ("X-API-Key", API_KEY)])
        assert env.upstream_calls[before:] == [(A, 8000), (B, 8000), (A, 8000)]
    finally:
        c.close()


def test_on_open_on_close(env: Env):
    # earlier tests' connections may still be closing: start from a quiet state
    wait_for(lambda: env.events.count(("open", A)) + env.events.count(("open", B))
             == len(env.events) / 2)
    env.events.clear()
    c = RawClient(env.port)
    c.request("/", [("Host", host()), ("X-API-Key", API_KEY)])
    c.request("/", [("Host", host(3000))])  # same sandbox: still one open
    assert env.events == [("open", A)]
    c.request("/", [("Host", host(sid=B)), ("X-API-Key", API_KEY)])
    assert env.events == [("open", A), ("close", A), ("open", B)]
    c.close()
    wait_for(lambda: len(env.events) == 4)
    assert env.events[3] == ("close", B)


# --- bodies and streaming --------------------------------------------------------------------
def test_post_body_streams(env: Env, client: httpx.Client):
    got_first: threading.Event = env.state["got_first"]
    got_first.clear()
    seen_before_second = []

    def body():
        yield b"a" * 1000
        # the upstream must see the first part before we produce the second
        seen_before_second.append(got_first.wait(T))
        yield b"b" * 5000

    r = client.post(env.url("/upload"), content=body(),
                    headers={"Host": host(), "X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["size"] == 6000
    assert seen_before_second == [True]
    # a fixed-length body too, through the echo
    r = client.post(env.url("/e"), content=b"x" * 200_000,
                    headers={"Host": host(), "X-API-Key": API_KEY})
    assert r.json()["method"] == "POST" and len(r.json()["body"]) == 200_000


def test_streaming_response_arrives_incrementally(env: Env, client: httpx.Client):
    sid = "s1"
    with client.stream("GET", env.url(f"/stream?id={sid}"),
                       headers={"Host": host(), "X-API-Key": API_KEY}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = r.iter_raw()
        assert next(chunks) == b"first\n"  # while the upstream is still blocked
        env.loop.call_soon_threadsafe(env.state.setdefault(sid, asyncio.Event()).set)
        assert b"".join(chunks) == b"second\n"


def test_client_hangup_mid_stream_releases_sandbox(env: Env):
    # a stalled stream must not keep the sandbox "in use" after the browser left
    wait_for(lambda: env.events.count(("open", A)) + env.events.count(("open", B))
             == len(env.events) / 2)
    env.events.clear()
    c = RawClient(env.port)
    c.sock.sendall(c.conn.send(h11.Request(method="GET", target="/stream?id=hangup",
                                           headers=[("Host", host()), ("X-API-Key", API_KEY)]))
                   + c.conn.send(h11.EndOfMessage()))
    got = b""
    for _ in range(10):  # the head and the first chunk may arrive apart
        got += c.sock.recv(65536)
        if b"first" in got:
            break
    assert b"first" in got
    c.close()
    wait_for(lambda: ("close", A) in env.events, timeout=5)
    assert env.events == [("open", A), ("close", A)]
    env.loop.call_soon_threadsafe(env.state.setdefault("hangup", asyncio.Event()).set)


def test_head_request(env: Env, client: httpx.Client):
    r = client.head(env.url("/h"), headers={"Host": host(), "X-API-Key": API_KEY})
    assert r.status_code == 200 and r.content == b""


# --- WebSocket -------------------------------------------------------------------------------
def test_websocket_via_listener(env: Env):
    tok = env.token()
    c = WSClient(env.port, host(), f"/ws?torpor_token={tok}")
    assert c.ask("hi") == "A:hi"
    assert c.ask(b"\x01\x02\x03") == b"\x03\x02\x01"
    seen = json.loads(c.ask("headers"))
    assert seen["_query"] == "" and "authorization" not in seen
    c.close()
    c = WSClient(env.port, host(sid=B), "/ws", [("Authorization", f"Bearer {API_KEY}")])
    assert c.ask("yo") == "B:yo"
    assert "authorization" not in json.loads(c.ask("headers"))
    c.close()
    with pytest.raises(WSRefused):
        WSClient(env.port, host(sid=B), "/ws")  # no credential


# --- errors ----------------------------------------------------------------------------------
def test_502_when_nothing_listens(env: Env, client: httpx.Client):
    r = client.get(env.url("/"), headers={"Host": host(9000), "X-API-Key": API_KEY})
    assert r.status_code == 502
    assert r.text.strip() == "no process is listening on port 9000 in sandbox sbx1234"


def test_upstream_dies_mid_response(env: Env, client: httpx.Client):
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(env.url("/"), headers={"Host": host(7000), "X-API-Key": API_KEY})
    # the listener is fine afterwards
    r = client.get(env.url("/"), headers={"Host": host(3000)})
    assert r.status_code == 200


def test_504_when_upstream_does_not_open_in_time(env: Env, client: httpx.Client):
    r = client.get(env.url("/"), headers={"Host": host(8000, "sbxslow1"), "X-API-Key": API_KEY})
    assert r.status_code == 504 and "in time" in r.text


def test_upstream_closing_idle_connection_is_reopened(env: Env):
    c = RawClient(env.port)
    try:
        for _ in range(3):
            assert c.request("/", [("Host", host(7001)), ("X-API-Key", API_KEY)])[0] == 200
    finally:
        c.close()


def test_bad_requests(env: Env):
    with socket.create_connection(("127.0.0.1", env.port), timeout=T) as s:
        s.sendall(b"GET http://8000-sbx1234.localhost/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", env.port), timeout=T) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 400") and b"Traceback" not in data


# --- the API-path ASGI handler -----------------------------------------------------------------
def test_asgi_http(env: Env, client: httpx.Client):
    base = f"http://127.0.0.1:{env.api_port}/v1/sandboxes"
    r = client.get(f"{base}/{A}/ports/8000/some/path?q=1&torpor_token=zzz",
                   headers={"Authorization": f"Bearer {API_KEY}", "Cookie": "k=v"})
    assert r.status_code == 200
    body = r.json()
    assert body["app"] == "A" and body["raw_path"] == "/some/path" and body["query"] == "q=1"
    h = headers_of(r)
    assert "authorization" not in h and h["cookie"] == ["k=v"]
    assert h["x-forwarded-prefix"] == [f"/v1/sandboxes/{A}/ports/8000"]
    r = client.get(f"{base}/{A}/ports/8000/a%20b/c%2Fd", headers={"X-API-Key": API_KEY})
    assert r.json()["raw_path"] == "/a%20b/c%2Fd"  # the client's encoding survives
    r = client.get(f"{base}/{A}/ports/8000", headers={"X-API-Key": API_KEY})
    assert r.json()["raw_path"] == "/"
    r = client.post(f"{base}/{B}/ports/8000/p", content=b"y" * 100_000)
    assert r.json()["app"] == "B" and len(r.json()["body"]) == 100_000
    r = client.get(f"{base}/{A}/ports/9000/")
    assert r.status_code == 502 and "no process is listening on port 9000" in r.text
    r = client.get(f"{base}/nosuchsbx/ports/8000/")
    assert r.status_code == 404
    sid = "s2"
    with client.stream("GET", f"{base}/{A}/ports/8000/stream?id={sid}") as r:
        chunks = r.iter_raw()
        assert next(chunks) == b"first\n"
        env.loop.call_soon_threadsafe(env.state.setdefault(sid, asyncio.Event()).set)
        assert b"".join(chunks) == b"second\n"


def test_asgi_websocket(env: Env):
    c = WSClient(env.api_port, f"127.0.0.1:{env.api_port}",
                 f"/v1/sandboxes/{B}/ports/8000/ws?x=1",
                 [("Authorization", f"Bearer {API_KEY}")])
    assert c.ask("through api") == "B:through api"
    assert c.ask(b"ab") == b"ba"
    seen = json.loads(c.ask("headers"))
    assert seen["_query"] == "x=1" and "authorization" not in seen
    c.close()
    with pytest.raises(WSRefused):
        WSClient(env.api_port, "x", f"/v1/sandboxes/{A}/ports/9000/ws")
