"""The MCP front door: Torpor's sandboxes as MCP tools (`tools.py`, over the engine), served
over streamable HTTP at `/mcp` on `torpor serve` (`server.py`). `torpor mcp`
(torpor/cli/mcp.py) relays a desktop client's stdio session to that endpoint, so the tools
exist once. See docs/integrations/mcp.md."""
