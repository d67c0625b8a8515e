"""`torpor mcp`: MCP over stdio for desktop clients, relayed to the server's `/mcp`.

The tools live on the server (torpor/mcp); this end only moves messages, with the `mcp`
library's own transports: its stdio server transport on one side, its streamable-HTTP
client transport on the other. It needs the library (`pip install 'torpor[mcp]'`), which
the rest of the CLI does not, so it is imported when the command runs."""

from __future__ import annotations

import logging
import sys
from typing import Any

from torpor.cli._common import CONNECTION, fail

log = logging.getLogger("torpor.cli.mcp")
INSTALL = ("`torpor mcp` needs the MCP library, which this install lacks: "
           "pip install 'torpor[mcp]'")


def mcp_command() -> None:
    """Serve MCP on stdin/stdout for a desktop client (Claude Desktop, IDEs, agent
    runtimes), relaying each message to the server's `/mcp` endpoint with your URL and API
    key (--url/--api-key, TORPOR_URL/TORPOR_API_KEY). Configure it in the client as the
    command `torpor mcp`; see docs/integrations/mcp.md."""
    try:
        import anyio
        import mcp  # noqa: F401
    except ImportError:
        fail(INSTALL)
    from torpor.sdk.config import resolve_api_key, resolve_url

    url = resolve_url(CONNECTION["url"]) + "/mcp"
    key = resolve_api_key(CONNECTION["api_key"])
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="torpor mcp: %(message)s")
    try:
        anyio.run(relay, url, key)
    except KeyboardInterrupt:
        pass


class Stamper:
    """The per-message HTTP headers a client session would set, read off the messages
    themselves: at the 2026 protocol the version, method and name headers mirror the
    request's `_meta` and params (the server checks they agree); after an `initialize`
    handshake, the version it agreed."""

    def __init__(self) -> None:
        self.init_ids: set = set()
        self.version: str | None = None

    def outbound(self, message: Any) -> dict[str, str] | None:
        from mcp.shared.inbound import (
            MCP_METHOD_HEADER,
            MCP_NAME_HEADER,
            MCP_PROTOCOL_VERSION_HEADER,
            NAME_BEARING_METHODS,
            encode_header_value,
        )
        from mcp_types import PROTOCOL_VERSION_META_KEY, JSONRPCRequest

        if not isinstance(message, JSONRPCRequest):
            return {MCP_PROTOCOL_VERSION_HEADER: self.version} if self.version else None
        if message.method == "initialize":
            self.init_ids.add(message.id)
            self.version = None
            return None
        params = message.params or {}
        meta = params.get("_meta") if isinstance(params, dict) else None
        version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
        if not isinstance(version, str):
            return {MCP_PROTOCOL_VERSION_HEADER: self.version} if self.version else None
        headers = {MCP_PROTOCOL_VERSION_HEADER: version, MCP_METHOD_HEADER: message.method}
        name_key = NAME_BEARING_METHODS.get(message.method)
        if name_key is not None and isinstance(params.get(name_key), str):
            headers[MCP_NAME_HEADER] = encode_header_value(params[name_key])
        return headers

    def inbound(self, message: Any) -> None:
        from mcp_types import JSONRPCResponse

        if isinstance(message, JSONRPCResponse) and message.id in self.init_ids:
            self.init_ids.discard(message.id)
            version = (message.result or {}).get("protocolVersion")
            self.version = version if isinstance(version, str) else None


def _reachable(url: str):
    """An HTTP transport that answers a request it could not send (no server there, a
    reset connection) with a JSON-RPC error saying so, which the MCP client transport
    hands to the desktop client as that request's error: the relay stays up, and the
    next request tries again."""
    import httpx2

    class Reachable(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request):
            try:
                return await self.inner.handle_async_request(request)
            except httpx2.TransportError as e:
                message = (f"torpor mcp: cannot reach {url} ({e or type(e).__name__}); is "
                           "`torpor serve` running there? (set TORPOR_URL or --url)")
                body = {"jsonrpc": "2.0", "id": None,
                        "error": {"code": -32000, "message": message}}
                return httpx2.Response(502, json=body, request=request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    return Reachable()


async def relay(url: str, key: str | None) -> None:
    """Move messages between stdio and `url` until stdin closes."""
    import anyio
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server.stdio import stdio_server
    from mcp.shared.message import ClientMessageMetadata, SessionMessage

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # no read timeout: a tool call may run (and stream progress) as long as it needs
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=None),
                              transport=_reachable(url))
    stamper = Stamper()
    async with (http, stdio_server() as (from_client, to_client),
                streamable_http_client(url, http_client=http) as (from_server, to_server),
                anyio.create_task_group() as tg):

        async def up() -> None:
            async for item in from_client:
                if isinstance(item, Exception):  # a line that is not JSON-RPC
                    log.warning("ignored a message from the client: %s", item)
                    continue
                extra = stamper.outbound(item.message)
                meta = ClientMessageMetadata(headers=extra) if extra else None
                await to_server.send(SessionMessage(item.message, metadata=meta))
            tg.cancel_scope.cancel()  # the client closed stdin: done

        async def down() -> None:
            async for item in from_server:
                if isinstance(item, Exception):
                    log.warning("%s: %s", url, item)
                    continue
                stamper.inbound(item.message)
                await to_client.send(SessionMessage(item.message))

        tg.start_soon(up)
        tg.start_soon(down)
