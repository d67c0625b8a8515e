"""`sbx.files.watch`: changes under a sandbox directory, as they happen.

`WatchHandle` (sync: a reader thread) and `AsyncWatchHandle` (an asyncio task) read the
server's NDJSON watch stream and hand each `FsEvent` to `on_event`, or queue it for
iteration when no callback is given. Both return once the watch is in place, so a change
made after `watch()` returned is reported.

What the stream outlives: the sandbox's standby (frozen, it changes nothing) and its
hibernation (the server watches anew once the sandbox runs again), without a gap the
caller sees. If the connection to the server breaks (the server restarted), the handle
watches again by itself for up to `reconnect_for` seconds, and reports an `overflow` event
first: changes made while it was away are not known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Self

from torpor.sdk import _api
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.errors import ServerUnavailableError, TorporError, error_from_payload
from torpor.sdk.models import _Model

RECONNECT_FOR = 60.0  # seconds a broken watch tries to come back before it gives up
RETRY_EVERY = 0.5


class FsEvent(_Model):
    """A change under the watched directory. `type`: create, write (contents; a burst of
    writes to one file may be one event), remove (deleted or moved out), rename (within the
    tree: `old_path` -> `path`), chmod (attributes: mode, owner, times), overflow (events
    were lost: rescan if you keep a picture), gone (the watched directory itself went: the
    last event). `path` is relative to the watched directory ("" is the directory)."""

    type: str
    path: str = ""
    dir: bool = False
    old_path: str | None = None


def _parse(line: str) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        return json.loads(line)
    except ValueError as e:
        raise TorporError(f"the server sent a line that is not a watch event: {line[:200]!r}",
                          code="bad_stream") from e


def _error(obj: dict, sid: str, path: str) -> TorporError:
    return error_from_payload(obj.get("error") or {"message": "the watch failed"},
                              status=obj.get("status"), sandbox_id=sid,
                              operation=f"watch {path}")


_END = object()


class WatchHandle:
    """A running watch: `stop()` ends it (also as a context manager); without `on_event`,
    iterate it for the events. `error` holds what ended it, if anything did but `stop`."""

    def __init__(self, session: SyncSession, sid: str, path: str, recursive: bool,
                 user: str | None, on_event: Callable[[FsEvent], Any] | None,
                 reconnect_for: float = RECONNECT_FOR):
        self._s, self.sandbox_id, self.path = session, sid, path
        self._call = _api.watch_dir(sid, path, recursive, user)
        self._on_event = on_event
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._resp = None
        self.reconnect_for = reconnect_for
        self.error: BaseException | None = None
        resp, lines = self._open()  # raises: no such directory, sandbox, ...
        self._thread = threading.Thread(target=self._run, args=(resp, lines), daemon=True,
                                        name=f"torpor-watch-{sid}")
        self._thread.start()

    def _open(self):
        resp = self._s.open(self._call)
        lines = self._s.iter_lines(resp, self._call)
        for line in lines:
            obj = _parse(line)
            if obj is None:
                continue
            if obj.get("type") == "watching":
                self._resp = resp
                return resp, lines
            if obj.get("type") == "error":
                raise _error(obj, self.sandbox_id, self.path)
        raise ServerUnavailableError("the watch stream ended before the watch started",
                                     sandbox_id=self.sandbox_id, operation=self._call.operation)

    def _emit(self, ev: FsEvent) -> None:
        if self._on_event is not None:
            self._on_event(ev)
        else:
            self._queue.put(ev)

    def _run(self, resp, lines) -> None:
        try:
            while not self._stopped.is_set():
                try:
                    for line in lines:
                        obj = _parse(line)
                        if obj is None or obj.get("type") == "watching":
                            continue
                        if obj.get("type") == "error":
                            raise _error(obj, self.sandbox_id, self.path)
                        ev = FsEvent.model_validate(obj)
                        self._emit(ev)
                        if ev.type == "gone":
                            return
                except ServerUnavailableError:
                    if self._stopped.is_set():
                        return
                if self._stopped.is_set():
                    return
                # the connection broke (the server restarted?): watch again
                _resp, lines = self._reopen()
                self._emit(FsEvent(type="overflow"))
        except BaseException as e:  # noqa: BLE001 - kept for the caller, the thread ends
            if not self._stopped.is_set():
                self.error = e
        finally:
            self._queue.put(_END)

    def _reopen(self):
        deadline = time.monotonic() + self.reconnect_for
        while True:
            try:
                return self._open()
            except ServerUnavailableError:
                if self._stopped.is_set() or time.monotonic() > deadline:
                    raise
                time.sleep(RETRY_EVERY)

    def stop(self) -> None:
        """End the watch (the server's stream and the reader thread)."""
        self._stopped.set()
        resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.close()
        if self._thread is not threading.current_thread():
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[FsEvent]:
        """The events (when no on_event was given), until the watch ends."""
        while True:
            ev = self._queue.get()
            if ev is _END:
                self._queue.put(_END)
                if self.error is not None:
                    raise self.error
                return
            yield ev

    def get(self, timeout: float | None = None) -> FsEvent | None:
        """The next event, or None after `timeout` seconds (or when the watch ended)."""
        try:
            ev = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if ev is _END:
            self._queue.put(_END)
            return None
        return ev


class AsyncWatchHandle:
    """The async twin of WatchHandle: `await stop()`, `async for ev in handle`; `on_event`
    may be a plain or an async function."""

    def __init__(self, session: AsyncSession, sid: str, path: str, recursive: bool,
                 user: str | None, on_event: Callable[[FsEvent], Any] | None,
                 reconnect_for: float = RECONNECT_FOR):
        self._s, self.sandbox_id, self.path = session, sid, path
        self._call = _api.watch_dir(sid, path, recursive, user)
        self._on_event = on_event
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._stopped = False
        self.reconnect_for = reconnect_for
        self.error: BaseException | None = None

    async def _start(self) -> AsyncWatchHandle:
        resp, lines = await self._open()
        self._task = asyncio.create_task(self._run(resp, lines))
        return self

    async def _open(self):
        resp = await self._s.open(self._call)
        lines = self._s.iter_lines(resp, self._call)
        async for line in lines:
            obj = _parse(line)
            if obj is None:
                continue
            if obj.get("type") == "watching":
                return resp, lines
            if obj.get("type") == "error":
                raise _error(obj, self.sandbox_id, self.path)
        raise ServerUnavailableError("the watch stream ended before the watch started",
                                     sandbox_id=self.sandbox_id, operation=self._call.operation)

    async def _emit(self, ev: FsEvent) -> None:
        if self._on_event is None:
            self._queue.put_nowait(ev)
            return
        r = self._on_event(ev)
        if asyncio.iscoroutine(r):
            await r

    async def _run(self, resp, lines) -> None:
        try:
            while True:
                try:
                    async for line in lines:
                        obj = _parse(line)
                        if obj is None or obj.get("type") == "watching":
                            continue
                        if obj.get("type") == "error":
                            raise _error(obj, self.sandbox_id, self.path)
                        ev = FsEvent.model_validate(obj)
                        await self._emit(ev)
                        if ev.type == "gone":
                            return
                except ServerUnavailableError:
                    pass
                await lines.aclose()
                deadline = time.monotonic() + self.reconnect_for
                while True:
                    try:
                        _resp, lines = await self._open()
                        break
                    except ServerUnavailableError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(RETRY_EVERY)
                await self._emit(FsEvent(type="overflow"))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - kept for the caller
            self.error = e
        finally:
            with contextlib.suppress(Exception):
                await lines.aclose()
            self._queue.put_nowait(_END)

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def __aiter__(self) -> AsyncIterator[FsEvent]:
        while True:
            ev = await self._queue.get()
            if ev is _END:
                self._queue.put_nowait(_END)
                if self.error is not None:
                    raise self.error
                return
            yield ev
