"""What the MCP tools give back, beyond JSON: a command's output as it arrives (reported as
MCP progress), and a code execution as MCP content (text, images, the error)."""

from __future__ import annotations

import json
import re
from typing import Any

from mcp.server.mcpserver import Context
from mcp_types import ImageContent, TextContent

from torpor.api.commands import RESULT_CAP
from torpor.engine.code import CodeError, CodeExecution

OUTPUT_MAX = RESULT_CAP  # characters of each stream a command's answer keeps, as REST's
COLOURS = re.compile(r"\x1b\[[0-9;]*m")


class Collected:
    """A command's output as it arrives, per stream, up to OUTPUT_MAX characters each;
    reported as MCP progress (the output text as each notification's message) when the
    caller asked for progress."""

    def __init__(self, ctx: Context | None):
        self.ctx = ctx
        self.text = {"stdout": [], "stderr": []}
        self.size = {"stdout": 0, "stderr": 0}
        self.truncated = False
        self.lost = 0
        self.events = 0

    async def add(self, stream: str, text: str) -> None:
        if self.size[stream] + len(text) > OUTPUT_MAX:
            self.truncated = True
        else:
            self.text[stream].append(text)
            self.size[stream] += len(text)
        self.events += 1
        if self.ctx is not None:
            await self.ctx.report_progress(self.events, None, text)

    async def started(self, sid: str, pid: int) -> None:
        """The first notification: the pid, to come back to the command by."""
        if self.ctx is not None:
            await self.ctx.report_progress(0, None, f"started pid {pid}; if this call is cut "
                                           f"off, get_command_output(sandbox_id={sid!r}, "
                                           f"pid={pid}) picks it up again")

    def body(self) -> dict:
        out = {"stdout": "".join(self.text["stdout"]), "stderr": "".join(self.text["stderr"])}
        if self.truncated:
            out["truncated"] = True
        if self.lost:
            out["lost_bytes"] = self.lost
        return out


class CodeFailed(Exception):
    """run_code's code raised: the content so far, answered as a tool error."""

    def __init__(self, content: list, error: CodeError):
        super().__init__(f"{error.name}: {error.value}")
        self.content = content
        self.error = error


def execution_content(ex: CodeExecution) -> list[TextContent | ImageContent]:
    """An execution as MCP content: stdout, stderr, then each result (a PNG as an image,
    its text forms as text), then the error."""
    blocks: list[TextContent | ImageContent] = []
    if ex.stdout:
        blocks.append(TextContent(type="text", text="".join(ex.stdout)))
    if ex.stderr:
        blocks.append(TextContent(type="text", text="[stderr]\n" + "".join(ex.stderr)))
    for r in ex.results:
        data: dict[str, Any] = r.data
        if data.get("png"):
            blocks.append(ImageContent(type="image", data=data["png"], mime_type="image/png"))
        if data.get("jpeg"):
            blocks.append(ImageContent(type="image", data=data["jpeg"], mime_type="image/jpeg"))
        text = data.get("markdown") or data.get("text")
        if data.get("json") is not None and not text:
            text = json.dumps(data["json"])
        if text:
            blocks.append(TextContent(type="text", text=text))
    if ex.truncated:
        blocks.append(TextContent(type="text", text="[output cut at the interpreter's "
                                  f"bound: {', '.join(ex.truncated)}]"))
    if ex.error is not None:
        # IPython colours its tracebacks with terminal escapes, noise to a model
        blocks.append(TextContent(type="text", text=f"{ex.error.name}: {ex.error.value}\n"
                                  f"{COLOURS.sub('', ex.error.traceback)}"))
    return blocks
