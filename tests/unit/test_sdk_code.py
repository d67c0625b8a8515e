"""The SDK's code interpreter (torpor/sdk/code.py) against a mock transport: the request it
sends, NDJSON lines into an Execution, callbacks (async ones awaited), errors."""

from __future__ import annotations

import asyncio
import json
from contextlib import closing

import httpx
import pytest

from torpor.sdk import AsyncSandbox, CodeContext, Sandbox
from torpor.sdk.errors import ConflictError, ServerUnavailableError

URL = "http://torpor.test"
SID = "sbxcode0123456"
LINES = [
    {"type": "stdout", "text": "a\n", "timestamp": "t"},
    {"type": "stderr", "text": "w\n", "timestamp": "t"},
    {"type": "result", "html": "<b>x</b>", "text": "x", "is_main_result": False},
    {"type": "result", "text": "3", "png": "iVBO", "extra": {"image/gif": "R0lG"},
     "is_main_result": True},
    {"type": "error", "name": "ValueError", "value": "bad", "traceback": "Traceback..."},
    {"type": "truncated", "stream": "stdout", "limit": 1048576},
    {"type": "keepalive"},  # unknown types are skipped
    {"type": "end", "execution_count": 7},
]


def body(lines) -> bytes:
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    return data


def handler(seen: list, lines=LINES, status: int = 200):
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/code/contexts") and request.method == "POST":
            return httpx.Response(201, json={"id": "c1", "language": "bash", "cwd": "/w"})
        if status != 200:
            return httpx.Response(status, json={"error": {"code": "conflict",
                                                          "message": "runs no code "
                                                          "interpreter"}})
        return httpx.Response(200, content=body(lines),
                              headers={"content-type": "application/x-ndjson"})
    return handle


def test_run_code_gathers_lines_and_calls_back():
    seen: list[httpx.Request] = []
    out, results, errors = [], [], []
    with closing(Sandbox(SID, url=URL, api_key="k",
                         transport=httpx.MockTransport(handler(seen)))) as s:
        ex = s.run_code("x", context=CodeContext("c1", "python", "/"), env={"A": "b"},
                        timeout=5, on_stdout=out.append, on_result=results.append,
                        on_error=errors.append)
    req = seen[0]
    assert req.url.path == f"/v1/sandboxes/{SID}/code"
    assert json.loads(req.content) == {"code": "x", "stream": True, "context": "c1",
                                       "env": {"A": "b"}, "timeout": 5}
    assert out == ["a\n"] and ex.logs.stderr == ["w\n"]
    assert [r.text for r in results] == ["x", "3"] and ex.text == "3"
    assert ex.results[1].formats() == ["text", "png", "image/gif"]
    assert errors == [ex.error] and ex.error.name == "ValueError"
    assert ex.truncated == ["stdout"] and ex.execution_count == 7


def test_a_cut_answer_is_an_unexpected_end_and_failures_raise():
    seen: list = []
    t = httpx.MockTransport(handler(seen, LINES[:2]))
    with closing(Sandbox(SID, url=URL, api_key="k", transport=t)) as s:
        ex = s.run_code("x")
    assert ex.error.name == "UnexpectedEndOfExecution"
    failed = [{"type": "failed", "status": 503,
               "error": {"code": "unavailable", "message": "the sandbox stopped"}}]
    with closing(Sandbox(SID, url=URL, api_key="k",
                         transport=httpx.MockTransport(handler(seen, failed)))) as s, \
            pytest.raises(ServerUnavailableError, match="the sandbox stopped"):
        s.run_code("x")
    with closing(Sandbox(SID, url=URL, api_key="k",
                         transport=httpx.MockTransport(handler(seen, status=409)))) as s, \
            pytest.raises(ConflictError, match="runs no code interpreter"):
        s.run_code("x")


def test_async_run_code_awaits_coroutine_callbacks_and_makes_contexts():
    seen: list[httpx.Request] = []
    got = []

    async def on_stdout(text: str) -> None:
        await asyncio.sleep(0)
        got.append(text)

    async def main():
        s = AsyncSandbox(SID, url=URL, api_key="k", transport=httpx.MockTransport(
            handler(seen)))
        try:
            ex = await s.run_code("x", language="python", on_stdout=on_stdout)
            ctx = await s.create_code_context("bash", cwd="/w")
        finally:
            await s.close()
        return ex, ctx

    ex, ctx = asyncio.run(main())
    assert got == ["a\n"] and ex.execution_count == 7
    assert ctx == CodeContext("c1", "bash", "/w")
    assert json.loads(seen[0].content)["language"] == "python"
    assert json.loads(seen[1].content) == {"language": "bash", "cwd": "/w"}
