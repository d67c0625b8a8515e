"""Stream handling shared by the sync and async clients: NDJSON output events, gathering
them into a result, and turning upload data into byte chunks without holding it whole."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from torpor.sdk.errors import CommandExitError, CommandTimeoutError, TorporError, error_from_payload
from torpor.sdk.models import CommandResult, OutputEvent, ProcessOutput

CHUNK = 1 << 20  # bytes per upload/download chunk: big enough for speed, small for memory
OUTPUT_CAP = 16 << 20  # characters kept per stream in a result, as the server does

Callback = Callable[[str], Any]


def parse_event(line: str) -> OutputEvent | None:
    """One NDJSON line -> event; blank lines (keep-alives) -> None."""
    line = line.strip()
    if not line:
        return None
    try:
        return OutputEvent.model_validate(json.loads(line))
    except ValueError as e:
        raise TorporError(f"the server sent a line that is not an output event: {line[:200]!r}",
                          code="bad_stream") from e


class OutputCollector:
    """Gathers a command's events into its result and says which callback each feeds.

    `feed` returns `(callback, text)` for the caller to invoke (the async client awaits
    coroutine callbacks), or None."""

    def __init__(self, on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                 *, pid: int | None = None, sandbox_id: str | None = None,
                 operation: str | None = None):
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self.parts: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.sizes = {"stdout": 0, "stderr": 0}
        self.pid = pid
        self.truncated = False
        self.exit: OutputEvent | None = None
        self.sandbox_id = sandbox_id
        self.operation = operation

    def feed(self, ev: OutputEvent) -> tuple[Callback, str] | None:
        if ev.type in self.parts:
            text = ev.data or ""
            if self.sizes[ev.type] + len(text) > OUTPUT_CAP:
                self.truncated = True
            else:
                self.parts[ev.type].append(text)
                self.sizes[ev.type] += len(text)
            cb = self.callbacks[ev.type]
            return (cb, text) if cb is not None and text else None
        if ev.type == "start":
            self.pid = ev.pid if ev.pid is not None else self.pid
        elif ev.type == "exit":
            self.exit = ev
            self.pid = ev.pid if ev.pid is not None else self.pid
        elif ev.type == "truncated":
            self.truncated = True
        elif ev.type == "error":
            raise error_from_payload(ev.error or {"message": "the command failed"},
                                     status=ev.status, sandbox_id=self.sandbox_id,
                                     operation=self.operation)
        return None  # unknown event types from a newer server are skipped

    @property
    def done(self) -> bool:
        return self.exit is not None

    def snapshot(self) -> ProcessOutput:
        e = self.exit
        return ProcessOutput(pid=self.pid, stdout="".join(self.parts["stdout"]),
                             stderr="".join(self.parts["stderr"]),
                             exit_code=e.exit_code if e else None,
                             signal=e.signal if e else None,
                             timed_out=bool(e and e.timed_out), truncated=self.truncated)

    def result(self) -> CommandResult:
        if self.exit is None:
            raise TorporError("the output stream ended before the process exited; the "
                              "server may have restarted, check commands.list()",
                              code="stream_closed", sandbox_id=self.sandbox_id,
                              operation=self.operation)
        return CommandResult.model_validate(self.snapshot().model_dump())


def finish(result: CommandResult, *, check: bool, timeout: float | None,
           sandbox_id: str | None, operation: str | None) -> CommandResult:
    """Raise CommandTimeoutError for a timed-out command, CommandExitError for a non-zero
    exit under `check`; otherwise hand the result back."""
    if result.timed_out:
        after = f" after {timeout:g}s" if timeout is not None else ""
        raise CommandTimeoutError(f"command timed out{after} and was killed; pass a larger "
                                  "timeout= (None for no limit) or run it with "
                                  "background=True", result=result, sandbox_id=sandbox_id,
                                  operation=operation)
    if check and result.exit_code != 0:
        raise CommandExitError(result, sandbox_id=sandbox_id, operation=operation)
    return result


# --- upload bodies -----------------------------------------------------------------------

def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode()
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(f"upload chunks must be bytes or str, not {type(chunk).__name__}")


def _counted(chunks: Iterator[bytes], on_progress: Callable[[int], Any] | None
             ) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk:
            yield chunk
            if on_progress is not None:
                on_progress(len(chunk))


def sync_body(data: Any, on_progress: Callable[[int], Any] | None = None
              ) -> bytes | Iterator[bytes]:
    """Upload body for the sync client: bytes as they are, anything else as a lazy
    iterator of chunks (a file object is read CHUNK bytes at a time)."""
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        body = _as_bytes(data)
        if on_progress is not None:
            on_progress(len(body))
        return body
    if hasattr(data, "read"):
        chunks: Iterator[bytes] = _until_empty(data)
    elif isinstance(data, Iterable):
        chunks = (_as_bytes(c) for c in data)
    else:
        raise TypeError("data must be str, bytes, a file object or an iterator of bytes, "
                        f"not {type(data).__name__}")
    return _counted(chunks, on_progress)


def _until_empty(f: Any) -> Iterator[bytes]:
    while True:  # a text file ends with "", a binary one with b""
        chunk = f.read(CHUNK)
        if not chunk:
            return
        yield _as_bytes(chunk)


async def async_body(data: Any, on_progress: Callable[[int], Any] | None = None
                     ) -> AsyncIterator[bytes]:
    """Upload body for the async client; also takes async iterators and async file objects
    (whose `read` is a coroutine). Plain file objects are read in a worker thread, so a
    slow disk does not stall the event loop."""
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        source: Any = iter([data])
    elif hasattr(data, "read"):
        source = _async_reads(data)
    elif isinstance(data, (AsyncIterable, Iterable)):
        source = data
    else:
        raise TypeError("data must be str, bytes, a file object or an iterator of bytes, "
                        f"not {type(data).__name__}")
    if not isinstance(source, AsyncIterable):
        source = _aiter_sync(source)
    async for chunk in source:
        if chunk:
            b = _as_bytes(chunk)
            yield b
            if on_progress is not None:
                on_progress(len(b))


async def _aiter_sync(it: Iterable[Any]) -> AsyncIterator[Any]:
    for item in it:
        yield item


async def _async_reads(f: Any) -> AsyncIterator[Any]:
    import inspect

    import anyio.to_thread

    coro = inspect.iscoroutinefunction(f.read)
    while True:
        chunk = await f.read(CHUNK) if coro else await anyio.to_thread.run_sync(f.read, CHUNK)
        if not chunk:
            return
        yield chunk
