"""A minimal event loop: the part of asyncio the agent needs, without asyncio's start cost.

Inside gVisor on the ptrace platform every page fault and every syscall is expensive, and
`import asyncio` alone adds ~190 ms to the agent's start (it pulls in ssl, socket,
concurrent.futures, threading, ...). This module is small and imports only what the
interpreter has loaded anyway or builds in (heapq, select, _signal).

What it offers, with asyncio's meaning where the names overlap:

- `Loop`: readers and writers on file descriptors (poll(2), level-triggered), `call_soon`,
  `call_later` (cancellable handles), signal handlers (through `signal.set_wakeup_fd`, so a
  signal wakes the poll and its handler runs in the loop, never between two bytecodes of
  whatever was running), and "idle" hooks that run just before the loop blocks (the agent
  flushes its output there, so the frames of one wakeup leave in one write).
- `Future`, awaitable from native `async def` coroutines; `Task`, which drives a coroutine
  and whose `cancel()` raises `CancelledError` into it at the `await` it is blocked on.
- `Event`, `Queue` (unbounded), `sleep`.

Two deliberate differences from asyncio, both for latency:
- the loop runs the callbacks that become ready while it runs ready callbacks in the same
  iteration (up to a bound, so I/O is never starved), instead of polling once between each
  round: a wakeup that passes through several futures costs no extra `poll`;
- `create_task(coro, eager=True)` runs the coroutine's first step at once, so a request
  that can answer without waiting never goes through the ready queue at all.

Single-threaded: nothing here may be called from another thread or a signal handler.
"""

from __future__ import annotations

import heapq
import math
import os
import select
import sys
import time

try:
    import _signal as _sig  # the C half of `signal`: `signal` itself imports enum
except ImportError:  # pragma: no cover - an interpreter without it
    import signal as _sig

# Callbacks run per iteration at most, before the loop polls for I/O again (with timeout 0).
MAX_CALLBACKS_PER_ITERATION = 1000
# The longest one poll(2) waits; a timer further off (a command's 30-day timeout) is reached
# by polling again. Past 2**31 - 1 ms the call raised OverflowError and the agent died.
MAX_POLL_SECONDS = 3600.0
MAX_DELAY_SECONDS = 100 * 365 * 86400.0  # what call_later makes of an infinite delay

_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR
_INVALID = select.POLLNVAL  # reported whatever was asked: both callbacks get to see it

_loop: Loop | None = None


def get_loop() -> Loop:
    """The running loop (there is one per process)."""
    if _loop is None:
        raise RuntimeError("no miniloop is running")
    return _loop


class CancelledError(BaseException):
    """The task was cancelled; like asyncio's, not an Exception so broad handlers let it pass."""


class InvalidStateError(Exception):
    pass


# --- callbacks -----------------------------------------------------------------------------
class Handle:
    __slots__ = ("_args", "_cancelled", "_cb")

    def __init__(self, cb, args):
        self._cb = cb
        self._args = args
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._cb = self._args = None  # drop references early: timers may sit in the heap long

    def cancelled(self) -> bool:
        return self._cancelled

    def _run(self) -> None:
        if not self._cancelled:
            try:
                self._cb(*self._args)
            except Exception:  # noqa: BLE001 - one failed callback must not stop the loop
                _report_callback_error(self._cb)


class TimerHandle(Handle):
    __slots__ = ("when",)

    def __init__(self, when: float, cb, args):
        super().__init__(cb, args)
        self.when = when

    def __lt__(self, other: TimerHandle) -> bool:
        return self.when < other.when


# --- futures and tasks ---------------------------------------------------------------------
_PENDING, _DONE, _CANCELLED = 0, 1, 2


class Future:
    __slots__ = ("_callbacks", "_exc", "_loop", "_result", "_state")

    def __init__(self, loop: Loop | None = None):
        self._loop = loop or get_loop()
        self._state = _PENDING
        self._result = None
        self._exc: BaseException | None = None
        self._callbacks: list = []

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self):
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._state == _PENDING:
            raise InvalidStateError("result is not ready")
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self):
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._state == _PENDING:
            raise InvalidStateError("exception is not set")
        return self._exc

    def set_result(self, result) -> None:
        if self._state != _PENDING:
            raise InvalidStateError("future is already done")
        self._result = result
        self._state = _DONE
        self._schedule_callbacks()

    def set_exception(self, exc: BaseException) -> None:
        if self._state != _PENDING:
            raise InvalidStateError("future is already done")
        if isinstance(exc, type):
            exc = exc()
        self._exc = exc
        self._state = _DONE
        self._schedule_callbacks()

    def cancel(self) -> bool:
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._schedule_callbacks()
        return True

    def add_done_callback(self, cb) -> None:
        """cb(future), called from the loop (never synchronously) once the future is done."""
        if self._state != _PENDING:
            self._loop.call_soon(cb, self)
        else:
            self._callbacks.append(cb)

    def remove_done_callback(self, cb) -> None:
        self._callbacks = [c for c in self._callbacks if c != cb]

    def _schedule_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            self._loop.call_soon(cb, self)

    def __await__(self):
        if self._state == _PENDING:
            yield self  # the task driving us waits until we are done
        return self.result()

    __iter__ = __await__


class Task(Future):
    """Drives a coroutine. The coroutine may await Futures (and so Tasks) only."""

    __slots__ = ("_coro", "_must_cancel", "_waiting_on", "name")

    def __init__(self, coro, loop: Loop | None = None, name: str | None = None):
        super().__init__(loop)
        self._coro = coro
        self._waiting_on: Future | None = None
        self._must_cancel = False
        self.name = name

    def cancel(self) -> bool:
        if self.done():
            return False
        # cancel what we wait on: our wakeup then raises CancelledError at that await
        if self._waiting_on is not None and self._waiting_on.cancel():
            return True
        if not self._must_cancel:
            self._must_cancel = True
            if self._waiting_on is None:
                self._loop.call_soon(self._step)
        return True

    def _wakeup(self, fut: Future) -> None:
        if fut is self._waiting_on:
            self._waiting_on = None
            self._step()

    def _step(self, exc: BaseException | None = None) -> None:
        if self.done():
            return
        coro = self._coro
        try:
            if self._must_cancel:
                self._must_cancel = False
                exc = CancelledError()
            yielded = coro.send(None) if exc is None else coro.throw(exc)
        except StopIteration as e:
            super().set_result(e.value)
        except CancelledError:
            super().cancel()
        except BaseException as e:
            super().set_exception(e)
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt, SystemExit: stop the loop as well
        else:
            if not isinstance(yielded, Future):
                err = RuntimeError(f"task awaited {yielded!r}, not a miniloop Future")
                self._loop.call_soon(self._step, err)
                return
            self._waiting_on = yielded
            yielded.add_done_callback(self._wakeup)
            if self._must_cancel and yielded.cancel():
                self._must_cancel = False


# --- synchronisation -----------------------------------------------------------------------
class Event:
    __slots__ = ("_flag", "_waiters")

    def __init__(self):
        self._flag = False
        self._waiters: list[Future] = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(True)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        fut = Future()
        self._waiters.append(fut)
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass


class Queue:
    """Unbounded FIFO; `get()` waits for an item."""

    __slots__ = ("_getters", "_head", "_items")

    def __init__(self):
        self._items: list = []
        self._head = 0  # index of the next item: popping from the front of a list is O(n)
        self._getters: list[Future] = []

    def qsize(self) -> int:
        return len(self._items) - self._head

    def empty(self) -> bool:
        return self.qsize() == 0

    def put_nowait(self, item) -> None:
        self._items.append(item)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._getters:
            fut = self._getters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return

    def get_nowait(self):
        if self._head >= len(self._items):
            raise IndexError("queue is empty")
        item = self._items[self._head]
        self._items[self._head] = None
        self._head += 1
        if self._head > 64 and self._head * 2 > len(self._items):
            del self._items[:self._head]
            self._head = 0
        return item

    async def get(self):
        while self.empty():
            fut = Future()
            self._getters.append(fut)
            try:
                await fut
            except CancelledError:
                try:
                    self._getters.remove(fut)
                except ValueError:
                    pass
                if not self.empty():
                    self._wake_one()  # we may have been woken for an item: pass the turn on
                raise
        return self.get_nowait()


async def sleep(delay: float, result=None):
    loop = get_loop()
    fut = Future(loop)
    h = loop.call_later(delay, _set_if_pending, fut, result)
    try:
        return await fut
    finally:
        h.cancel()


def _set_if_pending(fut: Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


# --- the loop ------------------------------------------------------------------------------
class Loop:
    def __init__(self):
        # poll(2), not epoll: it registers its waiters anew on every call. Under this runsc
        # an epoll registration outlives neither a restore (the restored stdin, a new host
        # pipe, is never reported readable) nor a checkpoint (netstack refuses to save a
        # socket that still has epoll waiters, and the save panics).
        self._ep = select.poll()
        self._readers: dict[int, Handle] = {}
        self._writers: dict[int, Handle] = {}
        self._masks: dict[int, int] = {}  # fd -> events registered with the poll set
        self._ready: list[Handle] = []
        self._timers: list[TimerHandle] = []
        self._idle: list = []
        self._signals: dict[int, Handle] = {}
        self._wake_r = self._wake_w = -1
        self._stopping = False
        # fds (re)registered while a batch of poll events is being dispatched: the batch's
        # events for their number may belong to a file closed and replaced meanwhile
        self._dispatching = False
        self._fresh: set[int] = set()

    # --- time and callbacks ---------------------------------------------------------------
    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, cb, *args) -> Handle:
        h = Handle(cb, args)
        self._ready.append(h)
        return h

    def call_later(self, delay: float, cb, *args) -> TimerHandle:
        if not delay < math.inf:  # inf or nan: never (a nan in the heap breaks its order)
            delay = MAX_DELAY_SECONDS
        h = TimerHandle(time.monotonic() + max(delay, 0.0), cb, args)
        heapq.heappush(self._timers, h)
        return h

    def create_future(self) -> Future:
        return Future(self)

    def create_task(self, coro, eager: bool = False, name: str | None = None) -> Task:
        """Wrap a coroutine in a Task. `eager`: run its first step now, in the caller's stack
        (the caller must not hold state the coroutine could see half-changed)."""
        task = Task(coro, self, name)
        if eager:
            task._step()
        else:
            self.call_soon(task._step)
        return task

    def add_idle_hook(self, cb) -> None:
        """cb() runs once per iteration, after the ready callbacks, before the loop blocks."""
        self._idle.append(cb)

    # --- file descriptors -----------------------------------------------------------------
    def add_reader(self, fd: int, cb, *args) -> None:
        self._readers[fd] = Handle(cb, args)
        if self._dispatching:
            self._fresh.add(fd)
        self._update(fd)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def add_writer(self, fd: int, cb, *args) -> None:
        self._writers[fd] = Handle(cb, args)
        if self._dispatching:
            self._fresh.add(fd)
        self._update(fd)

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def forget_fd(self, fd: int) -> None:
        """Drop every callback on fd: right before closing it."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        if self._masks.pop(fd, None) is not None:
            self._ep.unregister(fd)

    def _update(self, fd: int) -> None:
        mask = (_READ if fd in self._readers else 0) | (_WRITE if fd in self._writers else 0)
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            del self._masks[fd]
            self._ep.unregister(fd)  # the poll set is ours, in memory: no system call
            return
        self._masks[fd] = mask
        self._ep.register(fd, mask)  # registering again replaces the mask

    # --- signals --------------------------------------------------------------------------
    def add_signal_handler(self, sig: int, cb, *args) -> None:
        """Run cb(*args) in the loop after `sig` arrives (signals of one kind may coalesce)."""
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            _sig.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            self.add_reader(self._wake_r, self._on_signals)
        self._signals[sig] = Handle(cb, args)
        # the C-level handler writes the signal number to the wakeup fd; the Python-level
        # one has nothing left to do
        _sig.signal(sig, _noop_handler)

    def handled_signals(self) -> tuple[int, ...]:
        return tuple(self._signals)

    def remove_signal_handler(self, sig: int) -> bool:
        if self._signals.pop(sig, None) is None:
            return False
        _sig.signal(sig, _sig.SIG_DFL)
        return True

    def _on_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in set(data):
            h = self._signals.get(signum)
            if h is not None:
                h._run()

    # --- running --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    def run_until_complete(self, fut: Future):
        fut.add_done_callback(lambda _f: self.stop())
        self._stopping = False
        while not self._stopping:
            self._run_once()
        return fut.result()

    def run(self, coro):
        """Run coro as the main task until it finishes; return its result."""
        global _loop
        prev, _loop = _loop, self
        try:
            return self.run_until_complete(self.create_task(coro))
        finally:
            _loop = prev

    def _run_once(self) -> None:
        ready = self._ready
        n = 0
        while ready and n < MAX_CALLBACKS_PER_ITERATION:
            batch, self._ready = ready, []
            for h in batch:
                h._run()
            n += len(batch)
            ready = self._ready
        for hook in self._idle:
            hook()
        if self._ready or self._stopping:
            timeout = 0.0
        elif self._timers:
            while self._timers and self._timers[0]._cancelled:
                heapq.heappop(self._timers)
            timeout = max(0.0, self._timers[0].when - time.monotonic()) if self._timers else -1
        else:
            timeout = -1
        # poll(2) takes a C int of ms: past MAX_POLL_SECONDS, wake up and look again
        timeout = min(timeout, MAX_POLL_SECONDS)
        try:
            events = self._ep.poll(None if timeout < 0 else math.ceil(timeout * 1000))
        except InterruptedError:
            events = ()
        if events:
            self._dispatching = True
            fresh = self._fresh
            try:
                for fd, ev in events:
                    # Look the callbacks up now: an earlier callback of this batch may have
                    # removed them. Skip an fd registered anew during this batch: readiness is
                    # level-triggered, so if the new file is ready the next poll says so, and
                    # a stale event must never reach a callback that reads without O_NONBLOCK.
                    if fresh and fd in fresh:
                        continue
                    if ev & (_READ | _INVALID):
                        h = self._readers.get(fd)
                        if h is not None:
                            h._run()
                    if ev & (_WRITE | _INVALID):
                        h = self._writers.get(fd)
                        if h is not None:
                            h._run()
            finally:
                self._dispatching = False
                fresh.clear()
        if self._timers:
            now = time.monotonic()
            timers = self._timers
            while timers and timers[0].when <= now:
                h = heapq.heappop(timers)
                if not h._cancelled:
                    self._ready.append(h)


def _noop_handler(signum, frame) -> None:
    pass


def _report_callback_error(cb) -> None:
    """What asyncio's default exception handler does: tell stderr (the agent's log), go on."""
    import traceback  # only now: it is not small

    sys.stderr.write(f"miniloop: exception in callback {cb!r}\n{traceback.format_exc()}")
    sys.stderr.flush()


def run(coro):
    return Loop().run(coro)
