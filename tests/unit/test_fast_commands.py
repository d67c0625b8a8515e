"""FastCommands: POST /v1/sandboxes/{id}/commands answered before FastAPI's router.

In process, over a real Engine (its SQLite file, its key store) in a fresh data dir: which
requests it takes, and that what it does not take reaches the app with the body intact.
Commands that really run go through it in every other test against the server."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
from conftest import make_data_dir

from torpor.api.app import create_app
from torpor.api.commands import FastCommands
from torpor.config import Settings
from torpor.engine.manager import Engine

PATH = "/v1/sandboxes/sbxnosuchone/commands"


@pytest.fixture(scope="module")
def engine():
    d = make_data_dir()
    e = Engine(Settings(data_dir=d))
    try:
        yield e
    finally:
        e.driver.close()
        e.db.dispose()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def key(engine):
    return engine.keys.create("fast-path test")[1]


class Inner:
    """The app behind FastCommands: records what reaches it and the body it reads."""

    def __init__(self):
        self.calls: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.calls.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def call(app, method: str, path: str, headers: dict, chunks: list[bytes]):
    """One request through an ASGI app; returns (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 2),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    msgs = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        if msgs:
            return msgs.pop(0)
        await asyncio.sleep(3600)

    async def send(m):
        sent.append(m)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


def test_takes_a_valid_command_and_answers_like_the_route(engine, key):
    inner = Inner()
    fast = FastCommands(inner, engine)
    for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
        headers["Content-Type"] = "application/json; charset=utf-8"
        # the body in two pieces, as a client may send it
        raw = body(cmd="echo ok")
        status, out = call(fast, "POST", PATH, headers, [raw[:5], raw[5:]])
        assert inner.calls == []  # answered here, not by the app
        assert status == 404
        err = json.loads(out)["error"]
        assert err["code"] == "not_found" and "sbxnosuchone" in err["message"]


def test_passes_on_what_it_does_not_take_with_the_body_intact(engine, key):
    good = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    cases = [
        ("POST", PATH, {**good, "Authorization": "Bearer tpr_wrong"}, body(cmd="true")),
        ("POST", PATH, {"Content-Type": "application/json"}, body(cmd="true")),
        ("POST", PATH, good, b"{not json"),
        ("POST", PATH, good, body(cmd="true", argv=["true"])),  # fails validation
        ("POST", PATH, good, body(cmd="true", nosuchfield=1)),
        ("POST", PATH, {**good, "Content-Type": "text/plain"}, body(cmd="true")),
        ("GET", PATH, good, b""),
        ("POST", "/v1/sandboxes/sbxnosuchone/files", good, body(cmd="true")),
    ]
    for method, path, headers, raw in cases:
        inner = Inner()
        status, out = call(FastCommands(inner, engine), method, path, headers,
                           [raw[:3], raw[3:]])
        assert (status, out) == (299, b"inner"), (method, path, headers, raw)
        assert inner.calls == [(path, raw)]


def test_the_whole_app_answers_as_before(engine, key):
    """Through create_app's full stack: the fast path's answers and FastAPI's agree."""
    app = create_app(engine, own_engine=False)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            auth = {"Authorization": f"Bearer {key}"}
            out = {
                "unknown sandbox": await c.post(PATH, json={"cmd": "true"}, headers=auth),
                "stream, unknown sandbox": await c.post(
                    PATH, json={"cmd": "true", "stream": True}, headers=auth),
                "no key": await c.post(PATH, json={"cmd": "true"}),
                "both cmd and argv": await c.post(
                    PATH, json={"cmd": "true", "argv": ["true"]}, headers=auth),
                "bad timeout": await c.post(
                    PATH, json={"cmd": "true", "timeout": -1}, headers=auth),
                "background, unknown sandbox": await c.post(
                    PATH, json={"cmd": "true", "background": True}, headers=auth),
                "info, unknown sandbox": await c.get("/v1/sandboxes/sbxnosuchone",
                                                     headers=auth),
            }
        return {k: (r.status_code, r.json()["error"]) for k, r in out.items()}

    got = asyncio.run(go())
    for k in ("unknown sandbox", "stream, unknown sandbox", "background, unknown sandbox"):
        assert got[k] == got["info, unknown sandbox"], k  # the same 404 as any other route
    assert got["no key"][0] == 401 and got["no key"][1]["code"] == "unauthorized"
    for k, field in (("both cmd and argv", None), ("bad timeout", "timeout")):
        status, err = got[k]
        assert status == 422 and err["code"] == "invalid", k
        assert err["field"] == field, (k, err)
