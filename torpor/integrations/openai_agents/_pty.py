"""The Agents SDK's interactive processes (`exec_command` / `write_stdin` tools) on Torpor.

`tty=True` runs the command on a Torpor terminal (`sbx.pty`: a real PTY over a WebSocket,
so `write_stdin` can type into it, Ctrl-C included); `tty=False` runs it as a background
process (`sbx.commands.run(background=True)`), its output read as exact bytes. Either way
the SDK sees its own process ids (`allocate_pty_process_id`), output collected between
calls, and the exit code once the process ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from agents.sandbox.errors import PtySessionNotFoundError
from agents.sandbox.session.pty_output import collect_pty_output
from agents.sandbox.session.pty_types import (
    PTY_PROCESSES_MAX,
    PTY_PROCESSES_WARNING,
    PtyExecUpdate,
    allocate_pty_process_id,
    clamp_pty_yield_time_ms,
    process_id_to_prune_from_meta,
    resolve_pty_write_yield_time_ms,
)

from torpor.sdk import AsyncSandbox
from torpor.sdk.commands import AsyncCommandHandle
from torpor.sdk.errors import TorporError
from torpor.sdk.terminals import AsyncTerminal

logger = logging.getLogger(__name__)

COLS, ROWS = 80, 24
CLEANUP_S = 10.0


@dataclass
class PtyProcess:
    """One process the SDK started, and the output it wrote since the last collect."""

    tty: bool
    terminal: AsyncTerminal | None = None
    handle: AsyncCommandHandle | None = None
    chunks: deque[bytes] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    notify: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    task: asyncio.Task[None] | None = None

    async def append(self, data: bytes) -> None:
        async with self.lock:
            self.chunks.append(bytes(data))
        self.notify.set()

    @property
    def pid(self) -> int | None:
        if self.terminal is not None:
            return self.terminal.pid
        return self.handle.pid if self.handle is not None else None


class PtyProcesses:
    """The interactive processes of one session, by the SDK's process id."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._by_id: dict[int, PtyProcess] = {}

    async def start(self, sbx: AsyncSandbox, argv: list[str], *, tty: bool,
                    env: dict[str, str] | None, cwd: str | None, user: str | None,
                    timeout: float | None, yield_time_s: float | None,
                    max_output_tokens: int | None) -> PtyExecUpdate:
        """Start `argv`; errors starting it (TorporError) are the caller's to map."""
        proc = PtyProcess(tty=tty)
        try:
            if tty:
                proc.terminal = await sbx.pty.create(COLS, ROWS, on_data=proc.append,
                                                     cmd=argv, env=env, cwd=cwd, user=user)
            else:
                proc.handle = await sbx.commands.run(argv, background=True, env=env,
                                                     cwd=cwd, user=user)
            proc.task = asyncio.create_task(self._follow(proc, timeout))
        except BaseException:
            await self._end(proc)
            raise
        async with self._lock:
            process_id = allocate_pty_process_id(set(self._by_id))
            pruned = self._prune()
            self._by_id[process_id] = proc
            count = len(self._by_id)
        if pruned is not None:
            await self._end(pruned)
        if count >= PTY_PROCESSES_WARNING:
            logger.warning("PTY process count reached warning threshold: %s active", count)
        wait_ms = 10_000 if yield_time_s is None else int(yield_time_s * 1000)
        return await self._update(process_id, proc, clamp_pty_yield_time_ms(wait_ms),
                                  max_output_tokens)

    async def write(self, process_id: int, chars: str, *, yield_time_s: float | None,
                    max_output_tokens: int | None) -> PtyExecUpdate:
        async with self._lock:
            proc = self._by_id.get(process_id)
        if proc is None:
            raise PtySessionNotFoundError(session_id=process_id)
        if chars:
            if proc.terminal is None:
                raise RuntimeError("stdin is not available for this process: start it with "
                                   "tty=true to type into it")
            await proc.terminal.send_input(chars)
            await asyncio.sleep(0.1)  # let the program answer before collecting
        wait_ms = 250 if yield_time_s is None else int(yield_time_s * 1000)
        proc.last_used = time.monotonic()
        return await self._update(
            process_id, proc,
            resolve_pty_write_yield_time_ms(yield_time_ms=wait_ms, input_empty=chars == ""),
            max_output_tokens)

    async def terminate_all(self) -> None:
        async with self._lock:
            procs = list(self._by_id.values())
            self._by_id.clear()
        for proc in procs:
            await self._end(proc)

    # --- internals --------------------------------------------------------------------------

    async def _follow(self, proc: PtyProcess, timeout: float | None) -> None:
        """Read the process to its end (killing it past `timeout`), then mark it closed."""
        reader = asyncio.ensure_future(self._read(proc))
        try:
            if timeout is None:
                await reader
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(reader), timeout)
                except TimeoutError:
                    await self._kill(proc)
                    await reader
        except asyncio.CancelledError:
            reader.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the stream broke for good: say so, keep what came
            await proc.append(f"\n[torpor: lost the process's output: {e}]\n".encode())
        finally:
            async with proc.lock:  # after appends already under way
                pass
            proc.closed.set()
            proc.notify.set()

    async def _read(self, proc: PtyProcess) -> None:
        if proc.terminal is not None:
            proc.exit_code = await proc.terminal.wait()
            return
        assert proc.handle is not None
        async for chunk in proc.handle.chunks():
            await proc.append(chunk.data)
        if proc.handle.exit is not None:
            proc.exit_code = proc.handle.exit.exit_code

    async def _kill(self, proc: PtyProcess) -> None:
        try:
            if proc.terminal is not None:
                await proc.terminal.kill()
            elif proc.handle is not None:
                await proc.handle.kill()
        except TorporError:
            pass  # it ended meanwhile, or the sandbox is gone: nothing left to stop

    async def _end(self, proc: PtyProcess) -> None:
        """Stop a process the SDK no longer wants, and everything reading it."""
        if not proc.closed.is_set():
            await self._kill(proc)
        task, proc.task = proc.task, None
        if task is not None and task is not asyncio.current_task():
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), CLEANUP_S)
                except Exception:  # noqa: BLE001 - it failed or hangs: it is ended either way
                    task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if proc.terminal is not None:
            try:
                await proc.terminal.disconnect()
            except Exception:  # noqa: BLE001, S110 - best effort: the socket may be gone already
                pass

    def _prune(self) -> PtyProcess | None:
        if len(self._by_id) < PTY_PROCESSES_MAX:
            return None
        meta = [(pid, p.last_used, p.closed.is_set()) for pid, p in self._by_id.items()]
        victim = process_id_to_prune_from_meta(meta)
        return None if victim is None else self._by_id.pop(victim, None)

    async def _update(self, process_id: int, proc: PtyProcess, yield_time_ms: int,
                      max_output_tokens: int | None) -> PtyExecUpdate:
        output, original_tokens, closed = await collect_pty_output(
            output_chunks=proc.chunks, output_lock=proc.lock, output_notify=proc.notify,
            is_done=proc.closed.is_set, yield_time_ms=yield_time_ms,
            max_output_tokens=max_output_tokens)
        live: int | None = process_id
        exit_code = None
        if closed:
            exit_code = proc.exit_code
            async with self._lock:
                self._by_id.pop(process_id, None)
            await self._end(proc)
            live = None
        return PtyExecUpdate(process_id=live, output=output, exit_code=exit_code,
                             original_token_count=original_tokens)
