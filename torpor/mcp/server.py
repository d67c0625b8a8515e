"""The MCP server over the engine (the official `mcp` library's MCPServer) and its
streamable-HTTP door at `/mcp` on `torpor serve`, with the REST door's API keys.

Arguments are checked against each tool's schema, strictly: an argument the tool does not
take is refused, naming it, rather than dropped (the library drops them). Engine errors
come back as tool errors (isError) with the engine's message and code; the connection
stays up."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import ValidationError

from torpor._version import __version__
from torpor.api.deps import scope_key
from torpor.api.schemas import PATTERN_WORDS
from torpor.engine.manager import Engine
from torpor.errors import Invalid, TorporError
from torpor.mcp.content import CodeFailed
from torpor.mcp.tools import SandboxTools

log = logging.getLogger("torpor.mcp")
PATH = "/mcp"
INSTRUCTIONS = (
    "Torpor sandboxes are isolated Linux machines that live until deleted: create one "
    "with create_sandbox, keep its id, and reuse it across tasks (it sleeps when idle and "
    "wakes on the next call, files, processes and memory intact). run_command runs shell "
    "commands; read_file/write_file/list_files handle files; run_code runs Python in a "
    "code-interpreter sandbox and returns charts as images; preview_url opens a port to "
    "a browser. Delete sandboxes you no longer need.")
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True)
# tool name -> its annotations (hints to clients; the server checks nothing by them)
TOOLS: dict[str, ToolAnnotations | None] = {
    "create_sandbox": None, "list_sandboxes": READ_ONLY, "get_sandbox": READ_ONLY,
    "delete_sandbox": DESTRUCTIVE, "run_command": None, "get_command_output": READ_ONLY,
    "list_commands": READ_ONLY, "kill_command": DESTRUCTIVE, "read_file": READ_ONLY,
    "write_file": None, "list_files": READ_ONLY, "run_code": None, "preview_url": None,
    "standby_sandbox": None, "resume_sandbox": None, "snapshot_sandbox": None,
    "fork_sandbox": None,
}


def error_result(e: TorporError) -> CallToolResult:
    """An engine error as a tool error: its message as text, the REST error body as
    structured content."""
    body = e.to_dict()
    return CallToolResult(content=[TextContent(type="text", text=f"{e.code}: {e.message}")],
                          structured_content={"error": body, "status": e.status}, is_error=True)


def _say(err: dict) -> str:
    """A pydantic error as `field: what is wrong`, in the REST door's words for patterns
    (it never quotes the input)."""
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "[key]")
    msg, ctx = err.get("msg", "invalid"), err.get("ctx") or {}
    if err.get("type") == "value_error":
        msg = str(ctx.get("error") or msg)
    elif err.get("type") == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_WORDS:
        msg = PATTERN_WORDS[ctx["pattern"]]
    return f"{loc}: {msg}" if loc else msg


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A tool whose engine errors, and the validation errors of the REST bodies it builds,
    come back as tool errors."""

    @functools.wraps(fn)
    async def tool(*args: Any, **kwargs: Any) -> Any:
        try:
            result = await fn(*args, **kwargs)
        except TorporError as e:
            return error_result(e)
        except ValidationError as e:
            errs = e.errors()
            field = ".".join(str(x) for x in errs[0].get("loc", ())) or None if errs else None
            return error_result(Invalid("; ".join(_say(x) for x in errs), field=field))
        except CodeFailed as e:
            return CallToolResult(content=e.content, is_error=True, structured_content={
                "error": {"name": e.error.name, "value": e.error.value,
                          "traceback": e.error.traceback}})
        if isinstance(result, dict) or (isinstance(result, list) and all(
                isinstance(x, dict) for x in result)):
            # one JSON text (the library would make a list's items separate blocks)
            return [TextContent(type="text", text=json.dumps(result, ensure_ascii=False))]
        return result

    return tool


class StrictTool(Tool):
    """A tool that refuses arguments it does not take, and names what fails its schema,
    before the library validates (which drops unknown arguments)."""

    async def run(self, arguments: dict[str, Any], context: Any,
                  convert_result: bool = False) -> Any:
        known = self.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            raise ToolError(f"invalid arguments: unknown argument {unknown[0]!r} "
                            f"({self.name} takes: {', '.join(known)})")
        try:
            self.fn_metadata.validate_arguments(arguments)
        except ValidationError as e:
            raise ToolError("invalid arguments: " + "; ".join(_say(x) for x in e.errors())
                            ) from None
        return await super().run(arguments, context, convert_result)


def build_server(engine: Engine) -> MCPServer:
    """The MCP server: every tool of SandboxTools, over `engine`."""
    impl = SandboxTools(engine)
    tools = []
    for name, hints in TOOLS.items():
        tool = StrictTool.from_function(_guarded(getattr(impl, name)), name=name,
                                        annotations=hints, structured_output=False)
        tool.parameters["additionalProperties"] = False
        tools.append(tool)
    return MCPServer("torpor", version=__version__, instructions=INSTRUCTIONS,
                     tools=tools, log_level="WARNING")


class McpDoor:
    """`/mcp`: MCP over streamable HTTP. Every HTTP request presents an API key (Bearer or
    X-API-Key) and is checked, so revoking a key ends a long-lived session at its next
    request, with the reason as a JSON-RPC error."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.server: MCPServer | None = None
        self._manager = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve sessions while inside (the app's lifespan): a server and its session
        manager per run, as the library's manager runs once. Made here, not before: the
        library's constructor sets up the root logger if nothing has (logging.basicConfig),
        and `torpor serve` has by its lifespan."""
        self.server = build_server(self.engine)
        self.server.streamable_http_app(
            streamable_http_path=PATH,
            # the Host/Origin allowlist guards unauthenticated local servers from DNS
            # rebinding; here every request carries an API key a browser page cannot
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            max_request_body_size=16 << 20)
        manager = self.server.session_manager
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def __call__(self, scope, receive, send) -> None:
        try:
            self.engine.keys.check(scope_key(scope))
        except TorporError as e:
            return await _jsonrpc_error(send, e.status, -32001, e.message, e.to_dict())
        if self._manager is None:
            return await _jsonrpc_error(send, 503, -32603, "the MCP server is not running "
                                        "(the server is starting or stopping)", None)
        await self._manager.handle_request(scope, receive, send)


class McpMount:
    """ASGI layer: `/mcp` goes to the MCP door, everything else on to the app."""

    def __init__(self, app, door: McpDoor):
        self.app = app
        self.door = door

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/") == PATH:
            return await self.door(scope, receive, send)
        return await self.app(scope, receive, send)


async def _jsonrpc_error(send, status: int, code: int, message: str, data) -> None:
    # a JSON-RPC error body (id null: the request was refused before it was read), which
    # MCP clients give their caller as the request's error, at the HTTP status
    body = json.dumps({"jsonrpc": "2.0", "id": None,
                       "error": {"code": code, "message": message, "data": data}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
