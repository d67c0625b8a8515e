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
    import httpx2

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # no read timeout: a tool call may run (and stream progress) as long as it needs
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=None),
                              transport=_reachable(url))
    async with http:
        await Relay(url, http).run()


# what the server, or the library's transport, says of a 2025 session it no longer has
LOST = ("Session not found", "Session terminated")


class Link:
    """One session with the server: its write end, once usable."""

    def __init__(self) -> None:
        import anyio

        self.ready = anyio.Event()
        self.to_server: Any = None


class Relay:
    """The client's stdio to the server's `/mcp`. A 2025 session lives in the server's
    memory: when the server lost it (a restart), the relay opens a new one, replays the
    client's handshake, and sends again the requests not answered yet, so the desktop
    client does not notice (the 2026 protocol has no session to lose)."""

    def __init__(self, url: str, http: Any):
        self.url = url
        self.http = http
        self.stamper = Stamper()
        self.pending: dict = {}  # id -> the client's request, sent and not answered yet
        self.handshake: list = []  # the client's initialize, then its initialized
        self.link = Link()
        self.replays = 0

    async def run(self) -> None:
        import anyio
        from mcp.server.stdio import stdio_server

        async with (stdio_server() as (from_client, to_client),
                    anyio.create_task_group() as tg):
            self.to_client = to_client
            tg.start_soon(self.up, from_client, tg.cancel_scope)
            while await self.session():
                log.warning("the server no longer has this session (it restarted?): "
                            "opening a new one")

    async def send(self, to_server: Any, message: Any) -> None:
        from mcp.shared.message import ClientMessageMetadata, SessionMessage

        extra = self.stamper.outbound(message)
        meta = ClientMessageMetadata(headers=extra) if extra else None
        await to_server.send(SessionMessage(message, metadata=meta))

    async def up(self, from_client: Any, scope: Any) -> None:
        import anyio
        from mcp_types import JSONRPCNotification, JSONRPCRequest

        async for item in from_client:
            if isinstance(item, Exception):  # a line that is not JSON-RPC
                log.warning("ignored a message from the client: %s", item)
                continue
            msg = item.message
            link = self.link
            await link.ready.wait()
            if isinstance(msg, JSONRPCRequest):
                self.pending[msg.id] = msg
                if msg.method == "initialize":
                    self.handshake = [msg]
            elif (isinstance(msg, JSONRPCNotification)
                  and msg.method == "notifications/initialized"):
                self.handshake.append(msg)
            try:
                await self.send(link.to_server, msg)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # that session just went: a request is sent again on the next
        scope.cancel()  # the client closed stdin: done

    async def session(self) -> bool:
        """Relay over one server session; True when the server lost it and there is a
        handshake to replay on a new one."""
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared.message import SessionMessage
        from mcp_types import JSONRPCError, JSONRPCResponse

        link = self.link
        async with streamable_http_client(self.url, http_client=self.http) as (
                from_server, to_server):
            link.to_server = to_server
            if self.replays:
                await self.replay(from_server, to_server)
            link.ready.set()
            async for item in from_server:
                if isinstance(item, Exception):
                    log.warning("%s: %s", self.url, item)
                    continue
                msg = item.message
                if (isinstance(msg, JSONRPCError) and msg.error.message in LOST
                        and msg.id in self.pending and self.handshake):
                    self.link = Link()
                    self.replays += 1
                    return True
                if isinstance(msg, JSONRPCResponse | JSONRPCError):
                    self.pending.pop(msg.id, None)
                self.stamper.inbound(msg)
                await self.to_client.send(SessionMessage(msg))
        return False

    async def replay(self, from_server: Any, to_server: Any) -> None:
        """The client's handshake on a new session (its answer kept from the client, which
        had one), then the requests still waiting for an answer."""
        from mcp_types import JSONRPCError, JSONRPCResponse

        init, *rest = self.handshake
        again = init.model_copy(update={"id": f"torpor-mcp-replay-{self.replays}"})
        await self.send(to_server, again)
        async for item in from_server:
            msg = getattr(item, "message", None)
            if isinstance(msg, JSONRPCResponse | JSONRPCError) and msg.id == again.id:
                self.stamper.inbound(msg)
                break
        for msg in [*rest, *self.pending.values()]:
            await self.send(to_server, msg)
