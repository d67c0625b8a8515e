"""envd's `process.Process` over the engine's processes and terminals.

A process started here is a Torpor background process (or a terminal, with `pty`), so it
runs on whether or not its stream is read, as on E2B; Start and Connect stream its output
as `data` events (base64) from the byte they began at, then `end`. What E2B lists of a
process beyond what the agent keeps (its environment, its working directory) is kept here,
per sandbox, for the processes started through this door (a server restart forgets it:
such a process lists with its argv alone).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator

from torpor.compat.e2b.connect import ConnectError, from_engine
from torpor.engine.types import Chunk, Exited, Failed
from torpor.errors import Conflict, NotFound, Timeout, TorporError, Unavailable

# Go's names of signals in a process state ("signal: killed"), as envd reports them
GO_SIGNALS = {"SIGKILL": "killed", "SIGTERM": "terminated", "SIGINT": "interrupt",
              "SIGHUP": "hangup", "SIGQUIT": "quit", "SIGABRT": "aborted",
              "SIGSEGV": "segmentation fault", "SIGPIPE": "broken pipe",
              "SIGUSR1": "user defined signal 1", "SIGUSR2": "user defined signal 2",
              "SIGALRM": "alarm clock", "SIGBUS": "bus error", "SIGFPE": "floating point exception"}
SIGNALS = {"SIGNAL_SIGKILL": "SIGKILL", "SIGNAL_SIGTERM": "SIGTERM", 9: "SIGKILL",
           15: "SIGTERM"}
KILL_WAIT = 2.0  # seconds SendSignal(SIGKILL) waits for the process to be gone
MAX_CONFIGS = 4096  # process configs kept per sandbox
MAX_SANDBOXES = 256  # past this many sandboxes with configs, those of gone ones are dropped


def end_event(exit_code: int | None, signal: str | None) -> dict:
    """envd's end: Go's process state (`exit status 3`, `signal: killed`), which is also
    the error of a process that did not exit 0."""
    if signal:
        status = f"signal: {GO_SIGNALS.get(signal, signal.lower())}"
        return {"exitCode": -1, "exited": False, "status": status, "error": status}
    end = {"exitCode": exit_code or 0, "exited": True, "status": f"exit status {exit_code}"}
    if exit_code:
        end["error"] = end["status"]
    return end


def home_relative(path: str) -> str:
    """`~` and `~/x` as paths relative to the home (which is where relative paths start)."""
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:] or "."
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value, field: str) -> bytes:
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"{field} must be base64 bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConnectError("invalid_argument", f"{field} is not valid base64") from None


def _str(value, field: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"{field} must be a string")
    return value


class Process:
    def __init__(self, engine, gone_exc: type[Exception]):
        self.engine = engine
        self.Gone = gone_exc
        self.configs: dict[str, dict[int, dict]] = {}  # sid -> pid -> ProcessConfig
        self.live: dict[tuple[str, int], object] = {}  # a terminal's Attached, while streamed

    # --- helpers --------------------------------------------------------------------------
    async def pid_of(self, call, selector) -> int:
        """The pid a ProcessSelector names: a pid, or the running process with that tag."""
        if not isinstance(selector, dict):
            raise ConnectError("invalid_argument", "process: a selector {pid} or {tag}")
        if selector.get("pid") is not None:
            pid = selector["pid"]
            if isinstance(pid, str) and pid.isdigit():
                pid = int(pid)
            if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
                raise ConnectError("invalid_argument", "process.pid must be a positive integer")
            return pid
        tag = selector.get("tag")
        if isinstance(tag, str):
            for p in await self.engine.processes.list(call.sid):
                if p.get("tag") == tag and p.get("running"):
                    return p["pid"]
            raise ConnectError("not_found", f"process with tag {tag} not found")
        raise ConnectError("invalid_argument", "process: a selector {pid} or {tag}")

    async def running(self, call, pid: int) -> dict:
        try:
            info = await self.engine.processes.info(call.sid, pid)
        except TorporError as e:
            if e.code == "not_found":
                raise ConnectError("not_found", f"process with pid {pid} not found") from None
            raise
        if not info.get("running"):
            raise ConnectError("not_found", f"process with pid {pid} not found")
        return info

    async def absolute(self, call, cwd: str) -> str:
        """A relative working directory (or ~) resolved from the user's home, as envd does;
        one that does not exist is left for the start to refuse."""
        try:
            return (await self.engine.files.stat(call.sid, home_relative(cwd),
                                                 call.fs_user))["path"]
        except TorporError:
            return cwd

    def remember(self, sid: str, pid: int, config: dict) -> None:
        if sid not in self.configs and len(self.configs) >= MAX_SANDBOXES:
            from torpor.compat.e2b import sandboxes as sbx

            for other in [s for s in self.configs if sbx.view(self.engine, s) is None]:
                del self.configs[other]  # sandboxes that went
        kept = self.configs.setdefault(sid, {})
        if len(kept) >= MAX_CONFIGS:
            kept.pop(next(iter(kept)))
        kept[pid] = config

    def gone(self, sid: str) -> bool:
        from torpor.compat.e2b import sandboxes as sbx

        v = sbx.view(self.engine, sid)
        if v is None:
            self.configs.pop(sid, None)
        return v is None or v.state == "paused"

    # --- streams --------------------------------------------------------------------------
    async def start(self, call, req: dict) -> AsyncIterator[dict]:
        proc = req.get("process")
        if not isinstance(proc, dict):
            raise ConnectError("invalid_argument", "process: the ProcessConfig is required")
        cmd = _str(proc.get("cmd"), "process.cmd")
        if not cmd:
            raise ConnectError("invalid_argument", "process.cmd must not be empty")
        args = proc.get("args") or []
        envs = proc.get("envs") or {}
        cwd = _str(proc.get("cwd"), "process.cwd", optional=True) or None
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConnectError("invalid_argument", "process.args must be a list of strings")
        if not isinstance(envs, dict) or not all(isinstance(v, str) for v in envs.values()):
            raise ConnectError("invalid_argument", "process.envs must map names to strings")
        tag = _str(req.get("tag"), "tag", optional=True)
        stdin = req.get("stdin")
        argv = [cmd, *args]
        pty = req.get("pty")
        sid = call.sid
        if cwd is not None and not cwd.startswith("/"):
            cwd = await self.absolute(call, cwd)
        att = None
        if pty is not None:
            size = (pty or {}).get("size") or {}
            info = await self.engine.terminals.create(
                sid, size.get("cols", 80), size.get("rows", 24), cmd=argv, env=envs, cwd=cwd,
                user=call.user, tag=tag)
            pid = info["pid"]
            att = await self.engine.terminals.attach(sid, pid, offset=0)
        else:
            # stdin false (the newest SDK's default): closed at once, as /dev/null
            info = await self.engine.processes.start(
                sid, argv, env=envs, cwd=cwd, user=call.user, tag=tag,
                stdin=None if stdin is None or stdin else "")
            pid = info["pid"]
        config = {"cmd": cmd, "args": args, "envs": envs}
        if cwd is not None:
            config["cwd"] = cwd
        self.remember(sid, pid, config)
        yield {"event": {"start": {"pid": pid}}}
        if att is not None:
            async for m in self._terminal(call, pid, att):
                yield m
        else:
            async for m in self._output(call, pid, 0, started=info):
                yield m

    async def connect(self, call, req: dict) -> AsyncIterator[dict]:
        pid = await self.pid_of(call, req.get("process"))
        info = await self.running(call, pid)
        yield {"event": {"start": {"pid": pid}}}
        # as envd: the output from now on
        if "pty" in info:
            att = await self.engine.terminals.attach(call.sid, pid, offset=info["output_bytes"])
            async for m in self._terminal(call, pid, att):
                yield m
        else:
            async for m in self._output(call, pid, info["output_bytes"]):
                yield m

    async def _output(self, call, pid: int, offset: int,
                      started: dict | None = None) -> AsyncIterator[dict]:
        while True:
            it = await self.engine.processes.attach(call.sid, pid, offset=offset,
                                                    started=started)
            started = None  # known only for the first attach
            retry = None
            async for ev in it:
                if isinstance(ev, Chunk):
                    offset = ev.offset + len(ev.data)
                    yield {"event": {"data": {ev.stream: b64(ev.data)}}}
                elif isinstance(ev, Exited):
                    yield {"event": {"end": end_event(ev.exit_code, ev.signal)}}
                    return
                elif isinstance(ev, Failed):
                    if isinstance(ev.error, Conflict) and "output_start" in ev.error.extra:
                        retry = ev.error.extra["output_start"]  # this reader lagged
                        break
                    if isinstance(ev.error, Unavailable) or self.gone(call.sid):
                        raise self.Gone()
                    raise from_engine(ev.error)
            if retry is None:  # the stream ended without the process's end: it went
                raise self.Gone()
            offset = retry

    async def _terminal(self, call, pid: int, att) -> AsyncIterator[dict]:
        key = (call.sid, pid)
        self.live[key] = att
        try:
            async for data in att.output():
                yield {"event": {"data": {"pty": b64(data)}}}
        except Unavailable:
            raise self.Gone() from None
        finally:
            if self.live.get(key) is att:
                del self.live[key]
            att.close()
        if att.info is None:
            raise self.Gone()
        yield {"event": {"end": end_event(att.info.get("exit_code"), att.info.get("signal"))}}

    # --- unary ----------------------------------------------------------------------------
    async def list(self, call, req: dict) -> dict:
        kept = self.configs.get(call.sid, {})
        out = []
        for p in await self.engine.processes.list(call.sid):
            if not p.get("running"):
                continue
            argv = p.get("argv") or [""]
            item = {"config": kept.get(p["pid"]) or {"cmd": argv[0], "args": argv[1:],
                                                      "envs": {}},
                    "pid": p["pid"]}
            if p.get("tag") is not None:
                item["tag"] = p["tag"]
            out.append(item)
        return {"processes": out}

    async def _input(self, call, pid: int, given) -> None:
        if not isinstance(given, dict):
            raise ConnectError("invalid_argument", "input: {stdin} or {pty}")
        if given.get("pty") is not None:
            data = unb64(given["pty"], "input.pty")
            att = self.live.get((call.sid, pid))
            if att is not None:
                await att.send(data)
                return
            await self.running(call, pid)
            att = await self.engine.terminals.attach(call.sid, pid, replay=0)
            try:
                await att.send(data)
            finally:
                att.close()
            return
        if given.get("stdin") is not None:
            data = unb64(given["stdin"], "input.stdin")
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise ConnectError("invalid_argument",
                                   "stdin must be UTF-8 text here (Torpor's process stdin "
                                   "takes text); send binary input through a pty") from None
            await self.running(call, pid)
            await self.engine.processes.stdin(call.sid, pid, text)
            return
        raise ConnectError("invalid_argument", "input: {stdin} or {pty}")

    async def send_input(self, call, req: dict) -> dict:
        pid = await self.pid_of(call, req.get("process"))
        await self._input(call, pid, req.get("input"))
        return {}

    async def stream_input(self, call, messages) -> dict:
        pid = None
        async for msg in messages:
            if "start" in msg:
                pid = await self.pid_of(call, (msg["start"] or {}).get("process"))
                await self.running(call, pid)
            elif "data" in msg:
                if pid is None:
                    raise ConnectError("failed_precondition",
                                       "the stream's first message must be start")
                await self._input(call, pid, (msg["data"] or {}).get("input"))
        return {}

    async def send_signal(self, call, req: dict) -> dict:
        pid = await self.pid_of(call, req.get("process"))
        sig = SIGNALS.get(req.get("signal"))
        if sig is None:
            raise ConnectError("invalid_argument",
                               f"signal {req.get('signal')!r}: SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        await self.running(call, pid)
        await self.engine.processes.signal(call.sid, pid, sig)
        if sig == "SIGKILL":
            # gone when the call returns, as envd's own child is (reaped at once), not a
            # zombie the agent has yet to reap: `kill -0 PID` right after fails, as on E2B
            with contextlib.suppress(Timeout, NotFound):
                await self.engine.processes.wait(call.sid, pid, KILL_WAIT)
        return {}

    async def close_stdin(self, call, req: dict) -> dict:
        pid = await self.pid_of(call, req.get("process"))
        info = await self.running(call, pid)
        if "pty" in info:
            raise ConnectError("failed_precondition",
                               "a pty has no stdin to close: send Ctrl+D (0x04) instead")
        await self.engine.processes.stdin(call.sid, pid, "", eof=True)
        return {}

    async def update(self, call, req: dict) -> dict:
        pid = await self.pid_of(call, req.get("process"))
        pty = req.get("pty")
        if not isinstance(pty, dict):
            return {}
        size = pty.get("size") or {}
        await self.running(call, pid)
        await self.engine.terminals.resize(call.sid, pid, size.get("cols"), size.get("rows"))
        return {}
