"""The code interpreter from the SDK: `sbx.run_code(...)` and code contexts.

Sandboxes of the `code-interpreter` template run a kernel server (E2B's protocol); the
server's REST door reaches it (`POST /v1/sandboxes/{id}/code`). The models follow E2B's code
interpreter SDK: `Execution(results, logs, error, execution_count)`, `Result` with one field
per MIME form, `ExecutionError(name, value, traceback)`. Sync and async share the request
building and the line handling here.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from torpor.sdk._api import NDJSON, Call, _sbx, long_timeout
from torpor.sdk.errors import TorporError, error_from_payload

FORMATS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json",
           "javascript")


@dataclass
class Result:
    """One displayed value, in every MIME form the kernel gave: `png`/`jpeg` (and `pdf`)
    are base64, `json` a parsed object, the others text. `is_main_result`: the cell's value
    (not a `display()` or a figure)."""
    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    extra: dict[str, Any] | None = None
    chart: Any = None
    data: Any = None
    is_main_result: bool = False

    def formats(self) -> list[str]:
        """The forms it has, by name: ["text", "html"], ["text", "png"], ..."""
        return [f for f in FORMATS if getattr(self, f) is not None] + list(self.extra or {})

    def __str__(self) -> str:
        return self.text or ""

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Result:
        known = {f: obj.get(f) for f in (*FORMATS, "extra", "chart", "data")}
        return cls(**known, is_main_result=bool(obj.get("is_main_result")))


@dataclass
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    """An error the code raised (or the interpreter's: `TimeoutError` past the timeout,
    `KernelDied` when the kernel exited; restart its context then)."""
    name: str
    value: str
    traceback: str = ""


@dataclass
class Execution:
    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    truncated: list[str] = field(default_factory=list)  # streams cut at the bound

    @property
    def text(self) -> str | None:
        """The main result's text (the cell's value), if there is one."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None


@dataclass(frozen=True)
class CodeContext:
    """A context: its own kernel (python) or shell (bash), with its state and cwd."""
    id: str
    language: str
    cwd: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> CodeContext:
        return cls(obj["id"], obj["language"], obj["cwd"])


ContextRef = CodeContext | str


def _cid(ctx: ContextRef) -> str:
    return ctx.id if isinstance(ctx, CodeContext) else str(ctx)


# --- calls ---------------------------------------------------------------------------------

def run_call(sid: str, code: str, context: ContextRef | None, language: str | None,
             env: Mapping[str, str] | None, timeout: float | None) -> Call[Any]:
    body: dict[str, Any] = {"code": code, "stream": True}
    if context is not None:
        body["context"] = _cid(context)
    if language is not None:
        body["language"] = language
    if env:
        body["env"] = dict(env)
    if timeout is not None:
        body["timeout"] = timeout
    return Call(f"run code {code[:60]!r}", "POST", _sbx(sid, "/code"), lambda r: None,
                json=body, headers={"Accept": NDJSON}, timeout=long_timeout(timeout),
                sandbox_id=sid)


def create_context_call(sid: str, language: str, cwd: str | None) -> Call[CodeContext]:
    return Call(f"create a {language} code context", "POST", _sbx(sid, "/code/contexts"),
                lambda r: CodeContext.of(r.json()), json={"language": language, "cwd": cwd},
                sandbox_id=sid)


def list_contexts_call(sid: str) -> Call[list[CodeContext]]:
    return Call("list code contexts", "GET", _sbx(sid, "/code/contexts"),
                lambda r: [CodeContext.of(x) for x in r.json()], sandbox_id=sid)


def restart_context_call(sid: str, ctx: ContextRef) -> Call[CodeContext]:
    cid = _cid(ctx)
    return Call(f"restart code context {cid}", "POST",
                _sbx(sid, f"/code/contexts/{cid}/restart"),
                lambda r: CodeContext.of(r.json()), timeout=httpx.Timeout(30, read=180),
                sandbox_id=sid)


def delete_context_call(sid: str, ctx: ContextRef) -> Call[None]:
    cid = _cid(ctx)
    return Call(f"delete code context {cid}", "DELETE", _sbx(sid, f"/code/contexts/{cid}"),
                lambda r: None, sandbox_id=sid)


# --- lines ---------------------------------------------------------------------------------

Callback = Callable[[Any], Any]


class Collector:
    """Gathers NDJSON lines into an Execution; `feed` returns (callback, value) to call."""

    def __init__(self, sid: str, on_stdout: Callback | None, on_stderr: Callback | None,
                 on_result: Callback | None, on_error: Callback | None):
        self.sid = sid
        self.ex = Execution()
        self.cb = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result,
                   "error": on_error}
        self.ended = False

    def feed(self, line: str) -> tuple[Callback, Any] | None:
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise TorporError(f"the server sent a line that is not JSON: {line[:200]!r}",
                              code="bad_stream") from e
        kind = obj.get("type")
        value: Any = None
        if kind in ("stdout", "stderr"):
            value = obj.get("text", "")
            getattr(self.ex.logs, kind).append(value)
        elif kind == "result":
            value = Result.of(obj)
            self.ex.results.append(value)
        elif kind == "error":
            value = ExecutionError(obj.get("name", ""), obj.get("value", ""),
                                   obj.get("traceback", ""))
            self.ex.error = value
        elif kind == "truncated":
            self.ex.truncated.append(obj.get("stream", ""))
        elif kind == "end":
            self.ex.execution_count = obj.get("execution_count")
            self.ended = True
        elif kind == "failed":
            raise error_from_payload(obj.get("error") or {}, status=obj.get("status"),
                                     sandbox_id=self.sid, operation="run code")
        cb = self.cb.get(kind)
        return (cb, value) if cb is not None else None

    def result(self) -> Execution:
        if not self.ended and self.ex.error is None:
            self.ex.error = ExecutionError("UnexpectedEndOfExecution",
                                           "the answer ended before the execution did")
        return self.ex


def run_sync(session, sid: str, code: str, context, language, env, timeout,
             callbacks: tuple) -> Execution:
    call = run_call(sid, code, context, language, env, timeout)
    col = Collector(sid, *callbacks)
    resp = session.open(call)
    lines = session.iter_lines(resp, call)
    try:
        for line in lines:
            hit = col.feed(line)
            if hit:
                hit[0](hit[1])
    finally:
        lines.close()
    return col.result()


async def run_async(session, sid: str, code: str, context, language, env, timeout,
                    callbacks: tuple) -> Execution:
    call = run_call(sid, code, context, language, env, timeout)
    col = Collector(sid, *callbacks)
    resp = await session.open(call)
    lines = session.iter_lines(resp, call)
    try:
        async for line in lines:
            hit = col.feed(line)
            if hit:
                out = hit[0](hit[1])
                if inspect.isawaitable(out):
                    await out
    finally:
        await lines.aclose()
    return col.result()
