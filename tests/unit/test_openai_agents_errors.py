"""The OpenAI Agents provider's error mapping and request shaping against an httpx mock
transport (no server): what tests/integration/test_openai_agents.py cannot provoke on a
healthy server (503, a refused field, a user prefix, a failing hibernate)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from agents.sandbox.errors import (
    ConfigurationError,
    ExecTimeoutError,
    ExecTransportError,
    WorkspaceArchiveReadError,
    WorkspaceStartError,
)
from pydantic import ValidationError

from torpor.integrations.openai_agents import (
    TorporSandboxClient,
    TorporSandboxClientOptions,
)

pytestmark = pytest.mark.unit

URL = "http://torpor.test"
SID = "sbxmockmockmock1"
NOW = "2026-01-02T03:04:05Z"
INFO = {"id": SID, "template": "base", "state": "running", "created_at": NOW,
        "updated_at": NOW, "cpu": 1.0, "memory_mb": 512, "disk_mb": 4096, "env": {},
        "metadata": {}, "reason": None}


def error(status: int, code: str, message: str, **extra) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, **extra}})


def client_with(respond) -> tuple[TorporSandboxClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST" and request.url.path == "/v1/sandboxes":
            return httpx.Response(201, json=INFO)
        return respond(request)

    return (TorporSandboxClient(url=URL, api_key="k", transport=httpx.MockTransport(handler)),
            seen)


def test_exec_maps_server_answers_onto_the_sdk_errors():
    answers = iter([
        error(503, "unavailable", f"sandbox {SID}: the sandbox stopped during exec"),
        httpx.Response(200, json={"stdout": "partial", "stderr": "", "exit_code": 137,
                                  "signal": "SIGKILL", "timed_out": True}),
        httpx.Response(200, json={"stdout": "x", "stderr": "", "exit_code": 0}),
    ])
    client, seen = client_with(lambda request: next(answers))

    async def body():
        session = await client.create(options=TorporSandboxClientOptions())
        with pytest.raises(ExecTransportError) as err:
            await session.exec("true")
        assert err.value.retryable is True and err.value.context["http_status"] == 503
        with pytest.raises(ExecTimeoutError) as err:
            await session.exec("sleep 9", timeout=1)
        assert err.value.context["stdout"] == "partial"
        # the SDK's `sudo -u NAME --` prefix is Torpor's user=, not a sudo in the sandbox
        await session.exec("id", user="alice", shell=False)
        sent = json.loads(seen[-1].content)
        assert (sent["argv"], sent["user"]) == (["id"], "alice")
        await client.delete(session)

    asyncio.run(body())


def test_create_refused_is_a_configuration_error_naming_the_field():
    def respond(request):
        return error(422, "invalid", "memory_mb: must be at least 64", field="memory_mb")

    async def body():
        client = TorporSandboxClient(url=URL, api_key="k",
                                     transport=httpx.MockTransport(respond))
        with pytest.raises(ConfigurationError) as err:
            await client.create(options=TorporSandboxClientOptions(memory_mb=1))
        assert err.value.context["field"] == "memory_mb" and err.value.retryable is False

    asyncio.run(body())


def test_unreachable_server_on_resume_is_a_retryable_start_error():
    def respond(request):
        raise httpx.ConnectError("connection refused", request=request)

    async def body():
        client = TorporSandboxClient(url=URL, api_key="k",
                                     transport=httpx.MockTransport(respond))
        state = client.deserialize_session_state({
            "type": "torpor", "sandbox_id": SID, "manifest": {"root": "/home/user/w"},
            "snapshot": {"type": "noop", "id": "s"}})
        with pytest.raises(WorkspaceStartError) as err:
            await client.resume(state)
        assert err.value.retryable is True and SID in str(err.value)

    asyncio.run(body())


def test_read_of_a_directory_and_a_failing_hibernate(caplog):
    def respond(request):
        if request.url.path.endswith("/hibernate"):
            return error(409, "conflict", f"sandbox {SID}: streams are open")
        if request.method == "PUT":  # the SDK's path helper installed: accept
            return httpx.Response(200, json={"path": request.url.params["path"], "size": 1})
        if request.url.path.endswith("/commands"):  # ... and run: the path is fine
            return httpx.Response(200, json={"stdout": "/home/user/workspace/d\n",
                                             "stderr": "", "exit_code": 0})
        return error(409, "conflict", f"sandbox {SID}: /home/user/workspace/d is a "
                     "directory")

    client, _ = client_with(respond)

    async def body():
        session = await client.create(options=TorporSandboxClientOptions(
            on_exit="hibernate"))
        with pytest.raises(WorkspaceArchiveReadError) as err:
            await session.read("d")
        assert err.value.retryable is False and err.value.context["http_status"] == 409
        with caplog.at_level(logging.WARNING):
            await session.shutdown()  # logged, not raised: it sleeps by itself later
        assert "on_exit=hibernate failed" in caplog.text

    asyncio.run(body())


def test_options_as_json_and_a_misspelt_option():
    client, seen = client_with(lambda request: httpx.Response(404))

    async def body():
        session = await client.create(options={"template": "base", "cpu": 2})
        assert json.loads(seen[-1].content) == {"template": "base", "cpu": 2.0}
        assert session.state.cpu == 2.0
        with pytest.raises(ValidationError, match="memory_mib"):
            await client.create(options={"memory_mib": 512})
        with pytest.raises(TypeError, match="TorporSandboxClientOptions"):
            await client.create(options=object())

    asyncio.run(body())
