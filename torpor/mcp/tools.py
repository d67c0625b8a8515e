"""The MCP tools: each a few lines over one engine call, as the REST routes are (and with
the REST door's bodies and limits, from `torpor.api.schemas`, so a tool takes what the
route takes). What a tool returns becomes MCP content in `server.py`; an engine error
becomes a tool error there too."""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
from dataclasses import asdict
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp_types import ImageContent, TextContent
from pydantic import Field

from torpor.api.schemas import (
    MAX_COMMAND_TIMEOUT,
    CreateSandbox,
    EntryOut,
    EnvName,
    EnvValue,
    ProcessOut,
    RunCommand,
    SandboxOut,
    SnapshotOut,
)
from torpor.engine.code import CodeExecution, CodeOutput, gather
from torpor.engine.manager import Engine
from torpor.engine.types import Chunk, Exited, Failed, Output, Started, Truncated
from torpor.errors import Invalid, TooLarge, Unavailable
from torpor.mcp.content import CodeFailed, Collected, execution_content

SandboxId = Annotated[str, Field(min_length=1, max_length=32,
                                 description="The sandbox's id (sbx..., from create_sandbox "
                                             "or list_sandboxes).")]
Env = Annotated[dict[EnvName, EnvValue] | None, Field(
    description="Environment variables, name -> value.")]
Pid = Annotated[int, Field(ge=1, le=2**31 - 1, description="The command's pid (run_command "
                                                             "and list_commands give it).")]
FilePath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$",
                                description="A path inside the sandbox; relative paths are "
                                            "from /home/user.")]
FILE_MAX = 8 << 20  # bytes of a file one tool answer carries (REST streams any size)


def sandbox_out(info) -> dict:
    """A sandbox as the REST door's JSON (SandboxOut)."""
    return SandboxOut.model_validate(asdict(info)).model_dump(mode="json")


class SandboxTools:
    """The tools, bound to an engine. Each method's signature is its tool's JSON schema;
    its docstring is the description an LLM reads to pick it."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # --- sandboxes --------------------------------------------------------------------
    async def create_sandbox(
        self,
        template: Annotated[str, Field(min_length=1, max_length=64, description=(
            "Template name: base (Debian with Python), code-interpreter (Jupyter kernel for "
            "run_code), or one the operator built; a snapshot id (snap_...) works too."))
        ] = "base",
        env: Env = None,
        metadata: Annotated[dict[str, str] | None, Field(description=(
            "Labels to find it by later (list_sandboxes filters on them)."))] = None,
        cpu: Annotated[float | None, Field(description="CPU cores (default: the "
                                           "template's).")] = None,
        memory_mb: Annotated[int | None, Field(description="Memory in MiB (default: the "
                                               "template's).")] = None,
        disk_mb: Annotated[int | None, Field(description="Disk in MiB (default: the "
                                             "template's).")] = None,
        standby_after: Annotated[float | None, Field(description=(
            "Seconds idle before it sleeps (standby: frozen, resumes in ms on the next "
            "call). Default 15."))] = None,
        ttl: Annotated[float | None, Field(description=(
            "Seconds until it is deleted (or hibernated, per the server's default "
            "expire action); none by default: it lives until deleted."))] = None,
    ) -> dict:
        """Create a sandbox: an isolated Linux machine (gVisor) with its own files,
        processes and network policy. It lives until deleted, sleeping when idle and
        waking on the next call, so keep its id and reuse it. Returns its record (id,
        state, template, resources)."""
        given = {"template": template, "env": env, "metadata": metadata, "cpu": cpu,
                 "memory_mb": memory_mb, "disk_mb": disk_mb, "standby_after": standby_after,
                 "ttl": ttl}
        body = CreateSandbox.model_validate({k: v for k, v in given.items() if v is not None})
        return sandbox_out(await self.engine.create(**body.model_dump()))

    async def list_sandboxes(
        self,
        state: Annotated[Literal["creating", "running", "standby", "hibernated", "failed"]
                         | None, Field(description="Only sandboxes in this state.")] = None,
        metadata: Annotated[dict[str, str] | None, Field(
            description="Only sandboxes with these labels.")] = None,
    ) -> list[dict]:
        """List the sandboxes (all of them, whichever door made them), newest first."""
        return [sandbox_out(i) for i in self.engine.list(state=state, metadata=metadata or {})]

    async def get_sandbox(self, sandbox_id: SandboxId) -> dict:
        """One sandbox's record: state (running, standby, hibernated, failed), resources,
        timers, env, metadata, exposed ports."""
        return sandbox_out(self.engine.get(sandbox_id))

    async def delete_sandbox(self, sandbox_id: SandboxId) -> dict:
        """Delete a sandbox for good: its processes, files and memory. Cannot be undone."""
        await self.engine.delete(sandbox_id)
        return {"deleted": sandbox_id}

    async def standby_sandbox(self, sandbox_id: SandboxId) -> dict:
        """Freeze a sandbox now (it also sleeps by itself when idle). Processes and memory
        stay; any later call wakes it in milliseconds."""
        return sandbox_out(await self.engine.to_standby(sandbox_id))

    async def resume_sandbox(self, sandbox_id: SandboxId) -> dict:
        """Wake a sandbox in standby or hibernated (any other call wakes it too)."""
        return sandbox_out(await self.engine.resume(sandbox_id))

    async def snapshot_sandbox(
        self,
        sandbox_id: SandboxId,
        name: Annotated[str | None, Field(max_length=128,
                                          description="A label for people.")] = None,
        memory: Annotated[bool, Field(description=(
            "Keep running processes and memory too (false: files only)."))] = True,
    ) -> dict:
        """Snapshot a live sandbox (it runs on). create_sandbox(template=<snapshot id>)
        starts new sandboxes from it, as it was at this moment."""
        return SnapshotOut.model_validate(
            asdict(await self.engine.snapshot(sandbox_id, name, memory))).model_dump(mode="json")

    async def fork_sandbox(
        self,
        sandbox_id: SandboxId,
        count: Annotated[int, Field(ge=1, le=20, description="How many copies.")] = 1,
    ) -> list[dict]:
        """Copy a running sandbox (memory, processes and files) into `count` new sandboxes,
        each with its own id; the source runs on. Use it to try several things from one
        state."""
        return [sandbox_out(i) for i in await self.engine.fork(sandbox_id, count)]

    async def preview_url(
        self,
        sandbox_id: SandboxId,
        port: Annotated[int, Field(ge=1, le=65535, description=(
            "A port a server inside the sandbox listens on."))],
        expires_in: Annotated[float, Field(gt=0, description=(
            "Seconds the signed URL is valid."))] = 3600,
    ) -> dict:
        """A signed URL that reaches a port of the sandbox from a browser (a web app, a
        notebook) until it expires; nothing else needs to be exposed."""
        return self.engine.traffic.preview_url(sandbox_id, port, expires_in)

    # --- commands ---------------------------------------------------------------------
    async def run_command(
        self,
        sandbox_id: SandboxId,
        command: Annotated[str, Field(min_length=1, max_length=262144, description=(
            "A shell command line, run with /bin/sh -c."))],
        ctx: Context,
        cwd: Annotated[str | None, Field(description=(
            "Working directory (default /home/user)."))] = None,
        env: Env = None,
        timeout: Annotated[float, Field(gt=0, le=MAX_COMMAND_TIMEOUT, description=(
            "Seconds before the command is killed (foreground only)."))] = 60,
        background: Annotated[bool, Field(description=(
            "Start it and return its pid at once (servers, long jobs); read its output "
            "later with get_command_output."))] = False,
        user: Annotated[str | None, Field(description="Run as this user (default: user; "
                                          "root for package installs).")] = None,
    ) -> dict:
        """Run a shell command in a sandbox and return its exit code, stdout and stderr.
        Output streams as progress notifications while it runs. If this call is cut off,
        the command keeps running: get_command_output(pid) picks it up again."""
        body = RunCommand.model_validate({k: v for k, v in {
            "cmd": command, "cwd": cwd, "env": env or {}, "timeout": timeout,
            "background": background, "user": user}.items() if v is not None})
        args = {"env": body.env, "cwd": body.cwd, "user": body.user, "tag": "mcp"}
        if body.background:
            info = await self.engine.processes.start(sandbox_id, body.full_argv(), **args)
            return ProcessOut(**info).model_dump(mode="json")
        # `run`, not start + attach: one round trip, and a stream that closes (the client
        # left) lets the command run on in the sandbox, to be reattached by its pid
        events = await self.engine.processes.run(sandbox_id, body.full_argv(),
                                                 timeout=body.timeout, **args)
        out = Collected(ctx)
        pid = None
        try:
            async for ev in events:
                if isinstance(ev, Started):
                    pid = ev.pid
                    await out.started(sandbox_id, pid)
                elif isinstance(ev, Output):
                    await out.add(ev.stream, ev.data)
                elif isinstance(ev, Truncated):
                    out.lost += ev.lost
                elif isinstance(ev, Failed):
                    raise ev.error
                elif isinstance(ev, Exited):
                    return {"pid": ev.pid, "exit_code": ev.exit_code, "signal": ev.signal,
                            "timed_out": ev.timed_out, **out.body()}
        finally:
            await events.aclose()
        raise Unavailable(f"sandbox {sandbox_id}: the command's stream ended early (pid "
                          f"{pid})", sandbox_id=sandbox_id)

    async def get_command_output(
        self,
        sandbox_id: SandboxId,
        pid: Pid,
        ctx: Context,
        offset: Annotated[int | None, Field(ge=0, description=(
            "Byte offset to read from: the next_offset of the last call (default: all the "
            "output still kept)."))] = None,
        wait: Annotated[float, Field(ge=0, le=3600, description=(
            "Seconds to wait for more output and the exit (0: what there is now)."))] = 30,
    ) -> dict:
        """Read a command's output by pid: a background command, or a run_command whose
        call was cut off (it kept running). Waits up to `wait` seconds for it to exit,
        streaming output as progress; returns what came, whether it still runs, its exit
        code if not, and next_offset to continue from."""
        chunks = await self.engine.processes.attach(sandbox_id, pid, offset, follow=wait > 0)
        out = Collected(ctx)
        dec = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in out.text}
        done: Exited | None = None
        next_offset = offset
        try:
            async with _deadline(wait):
                async for ev in chunks:
                    if isinstance(ev, Chunk):
                        next_offset = ev.offset + len(ev.data)
                        if text := dec[ev.stream].decode(ev.data):
                            await out.add(ev.stream, text)
                    elif isinstance(ev, Failed):
                        raise ev.error
                    elif isinstance(ev, Exited):
                        done = ev
        except TimeoutError:
            pass  # it runs on: what came so far, and where to go on from
        finally:
            await chunks.aclose()
        for stream, d in dec.items():
            if tail := d.decode(b"", final=True):
                await out.add(stream, tail)
        if next_offset is None:  # no output read: where the next byte will go
            next_offset = (await self.engine.processes.info(sandbox_id, pid))["output_bytes"]
        body = {"pid": pid, "running": done is None, "next_offset": next_offset, **out.body()}
        if done is not None:
            body.update(exit_code=done.exit_code, signal=done.signal, timed_out=done.timed_out)
        return body

    async def list_commands(self, sandbox_id: SandboxId) -> list[dict]:
        """The sandbox's commands, running and exited: pid, argv, running, exit code."""
        return [ProcessOut(**p).model_dump(mode="json")
                for p in await self.engine.processes.list(sandbox_id)]

    async def kill_command(
        self,
        sandbox_id: SandboxId,
        pid: Pid,
        signal: Annotated[str, Field(min_length=1, max_length=16, description=(
            "SIGTERM asks it to stop; SIGKILL forces it; SIGINT is Ctrl-C."))] = "SIGTERM",
    ) -> dict:
        """Send a signal to a command (and its process group)."""
        return await self.engine.processes.signal(sandbox_id, pid, signal)

    # --- files ------------------------------------------------------------------------
    async def read_file(
        self,
        sandbox_id: SandboxId,
        path: FilePath,
        encoding: Annotated[Literal["utf-8", "base64"], Field(description=(
            "utf-8 for text; base64 for binary files."))] = "utf-8",
    ) -> str:
        """Read a file of the sandbox (up to 8 MiB per call; larger ones: the REST API
        streams them)."""
        size, contents = await self.engine.files.read(sandbox_id, path)
        data = bytearray()
        try:
            if size is not None and size > FILE_MAX:
                raise TooLarge(f"{path} has {size} bytes, over the {FILE_MAX} bytes a tool "
                               "answer carries; read it with GET /v1/sandboxes/{id}/files, "
                               "which streams", sandbox_id=sandbox_id)
            async for chunk in contents:
                data += chunk
                if len(data) > FILE_MAX:
                    raise TooLarge(f"{path} grew over {FILE_MAX} bytes while read",
                                   sandbox_id=sandbox_id)
        finally:
            await contents.aclose()
        if encoding == "base64":
            return base64.b64encode(bytes(data)).decode()
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise Invalid(f"{path} is not UTF-8 text; read it with encoding base64",
                          field="encoding") from None

    async def write_file(
        self,
        sandbox_id: SandboxId,
        path: FilePath,
        content: Annotated[str, Field(max_length=FILE_MAX * 4 // 3 + 4, description=(
            "The whole file: text, or base64 with encoding base64."))],
        encoding: Annotated[Literal["utf-8", "base64"], Field(description=(
            "How `content` is written: utf-8 text or base64 bytes."))] = "utf-8",
    ) -> dict:
        """Write a file in the sandbox, replacing it whole (parent directories are made).
        Returns its path and size."""
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise Invalid("content is not valid base64", field="content") from None
        else:
            data = content.encode()

        async def once():
            yield data

        return await self.engine.files.write(sandbox_id, path, "user", None, once())

    async def list_files(
        self,
        sandbox_id: SandboxId,
        path: FilePath = "/home/user",
        depth: Annotated[int, Field(ge=1, le=10, description="Levels down to go.")] = 1,
    ) -> list[dict]:
        """List a directory of the sandbox: name, path, type (file, dir, symlink), size,
        mode, owner, mtime."""
        return [EntryOut(**e).model_dump(mode="json")
                for e in await self.engine.files.list(sandbox_id, path, depth)]

    # --- code -------------------------------------------------------------------------
    async def run_code(
        self,
        sandbox_id: SandboxId,
        code: Annotated[str, Field(max_length=16 << 20, description=(
            "Python (or bash with language=bash) run in a Jupyter kernel; variables and "
            "imports stay for the next run_code in the same context."))],
        ctx: Context,
        context: Annotated[str | None, Field(max_length=64, description=(
            "A code context's id (default: the language's default context)."))] = None,
        language: Annotated[Literal["python", "bash"] | None, Field(description=(
            "python (default) or bash; not with context."))] = None,
        timeout: Annotated[float | None, Field(gt=0, le=86400, description=(
            "Seconds before the kernel is interrupted (its state stays)."))] = None,
    ) -> list[TextContent | ImageContent]:
        """Run code in the sandbox's code interpreter (template code-interpreter), like a
        notebook cell: returns printed output, the cell's results (charts as PNG images)
        and, if it raised, the error as a tool error with its traceback."""
        events = await self.engine.code.run(sandbox_id, code, context=context,
                                            language=language, timeout=timeout)
        ex = CodeExecution()
        n = 0
        try:
            async for ev in events:
                gather(ex, ev)
                if isinstance(ev, CodeOutput):
                    n += 1
                    await ctx.report_progress(n, None, ev.text)
        finally:
            await events.aclose()
        content = execution_content(ex)
        if ex.error is not None:
            raise CodeFailed(content, ex.error)
        return content


def _deadline(seconds: float):
    """A bound on a follow: none when it does not wait (it ends with what there is)."""
    return asyncio.timeout(seconds if seconds > 0 else None)


