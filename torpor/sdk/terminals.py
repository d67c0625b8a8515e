"""`sbx.pty`: terminals in a sandbox (a login shell by default, or any program) over a
WebSocket: keystrokes in, the screen's bytes out, resize, kill, wait, reattach.

    term = sbx.pty.create(cols=120, rows=40, on_data=lambda b: sys.stdout.buffer.write(b))
    term.send_input(b"ls\\n")
    term.resize(100, 30)
    term.disconnect()                       # the shell runs on in the sandbox
    term = sbx.pty.connect(term.pid, on_data=...)   # its recent screen, then live
    term.send_input(b"exit 3\\n"); term.wait()      # -> 3

`Pty` / `Terminal` (sync: output arrives on a reader thread) and `AsyncPty` /
`AsyncTerminal` (async: on a task) are twins over `_ws` and the same REST calls.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

from torpor.sdk import _api
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk._ws import AsyncWebSocket, Closed, SyncWebSocket
from torpor.sdk.errors import TorporTimeoutError, error_from_payload
from torpor.sdk.models import _Model

OnData = Callable[[bytes], Any]
KEEP = 1 << 20  # bytes of received output a Terminal keeps for `output`


class PtySize(_Model):
    cols: int
    rows: int


class TerminalInfo(_Model):
    pid: int
    argv: list[str]
    tag: str | None = None
    started_at: float
    running: bool
    exit_code: int | None = None
    signal: str | None = None
    output_bytes: int = 0
    output_start: int = 0
    pty: PtySize


# --- the REST calls, shared by the twins -----------------------------------------------------
def _base(sid: str, pid: int | None = None, tail: str = "") -> str:
    return _api._sbx(sid, "/pty" + (f"/{pid}" if pid is not None else "") + tail)


def _create(sid: str, cols: int, rows: int, cmd, env, cwd, user, tag) -> _api.Call:
    body: dict[str, Any] = {"cols": cols, "rows": rows}
    for k, v in (("cmd", cmd if cmd is None or isinstance(cmd, str) else list(cmd)),
                 ("env", dict(env) if env else None), ("cwd", cwd), ("user", user),
                 ("tag", tag)):
        if v is not None:
            body[k] = v
    return _api.Call("create a terminal", "POST", _base(sid), _api._model(TerminalInfo),
                     json=body, sandbox_id=sid)


def _info(sid: str, pid: int) -> _api.Call:
    return _api.Call(f"get terminal {pid}", "GET", _base(sid, pid),
                     _api._model(TerminalInfo), sandbox_id=sid)


def _list(sid: str) -> _api.Call:
    return _api.Call("list terminals", "GET", _base(sid), _api._models(TerminalInfo),
                     sandbox_id=sid)


def _resize(sid: str, pid: int, cols: int, rows: int) -> _api.Call:
    return _api.Call(f"resize terminal {pid}", "POST", _base(sid, pid, "/resize"),
                     _api._model(PtySize), json={"cols": cols, "rows": rows}, sandbox_id=sid)


def _kill(sid: str, pid: int, signal: str) -> _api.Call:
    return _api.Call(f"kill terminal {pid}", "POST", _base(sid, pid, "/kill"),
                     lambda r: r.json(), json={"signal": signal}, sandbox_id=sid)


def _wait(sid: str, pid: int, timeout: float) -> _api.Call:
    import httpx

    return _api.Call(f"wait for terminal {pid}", "POST", _base(sid, pid, "/wait"),
                     _api._model(TerminalInfo), params={"timeout": timeout},
                     timeout=httpx.Timeout(10.0, read=timeout + _api.COMMAND_GRACE),
                     sandbox_id=sid)


def _socket_params(offset: int | None, replay: int | None) -> dict:
    return {"offset": offset, "replay": replay}


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


class _Screen:
    """What a terminal's socket said: output (the last KEEP bytes), offsets, the exit."""

    def __init__(self, sid: str, pid: int, on_data: OnData | None):
        self.sid, self.pid, self.on_data = sid, pid, on_data
        self.buf = bytearray()
        self.offset = 0  # the output offset of the next byte to arrive
        self.exit: dict | None = None
        self.errors: list = []

    def take(self, msg: bytes | str) -> bytes | None:
        if isinstance(msg, str):
            obj = json.loads(msg)
            if obj.get("type") == "attached":
                self.offset = obj["offset"]
            elif obj.get("type") == "exit":
                self.exit = obj
            elif obj.get("type") == "error":
                self.errors.append(error_from_payload(obj.get("error") or {},
                                                      status=obj.get("status"),
                                                      sandbox_id=self.sid,
                                                      operation=f"terminal {self.pid}"))
            return None
        self.offset += len(msg)
        self.buf += msg
        if len(self.buf) > KEEP:
            del self.buf[:len(self.buf) - KEEP]
        return msg


# --- sync ----------------------------------------------------------------------------------
class Terminal:
    """A terminal in the sandbox, attached. `on_data` gets its output (bytes) on a reader
    thread; `output` keeps the last MiB received. `offset` is the output offset after the
    last byte received: `sbx.pty.connect(pid, offset=term.offset)` later misses nothing and
    repeats nothing."""

    def __init__(self, session: SyncSession, sandbox_id: str, pid: int, ws: SyncWebSocket,
                 on_data: OnData | None):
        self._s, self.sandbox_id, self.pid = session, sandbox_id, pid
        self._ws = ws
        self._screen = _Screen(sandbox_id, pid, on_data)
        self._first = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"torpor-pty-{pid}",
                                        daemon=True)
        self._thread.start()
        self._first.wait(10)  # the `attached` message: `offset` is known from here on

    def __repr__(self) -> str:
        return f"Terminal(sandbox_id={self.sandbox_id!r}, pid={self.pid})"

    def _read(self) -> None:
        try:
            while True:
                try:
                    msg = self._ws.recv()
                except Closed:
                    return
                data = self._screen.take(msg)
                self._first.set()
                if data and self._screen.on_data is not None:
                    self._screen.on_data(data)
        finally:
            self._first.set()
            self._done.set()

    @property
    def output(self) -> bytes:
        return bytes(self._screen.buf)

    @property
    def offset(self) -> int:
        return self._screen.offset

    @property
    def connected(self) -> bool:
        return not self._done.is_set()

    def send_input(self, data: bytes | str) -> None:
        """Keystrokes, as bytes (b"\\x03" is Ctrl-C) or text (sent as UTF-8)."""
        self._ws.send(_as_bytes(data))

    def resize(self, cols: int, rows: int) -> PtySize:
        """The program gets SIGWINCH; InvalidError for a size below 1x1."""
        return self._s.call(_resize(self.sandbox_id, self.pid, cols, rows))

    def kill(self, signal: str = "SIGKILL") -> None:
        self._s.call(_kill(self.sandbox_id, self.pid, signal))

    def info(self) -> TerminalInfo:
        return self._s.call(_info(self.sandbox_id, self.pid))

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code once it has exited (128 + n when signal n ended it), after all its
        output reached `on_data`. TorporTimeoutError after `timeout` seconds (it runs on)."""
        if self.connected:
            if not self._done.wait(timeout):
                raise TorporTimeoutError(f"terminal {self.pid} still runs after {timeout}s",
                                         sandbox_id=self.sandbox_id,
                                         operation=f"wait for terminal {self.pid}")
            if self._screen.exit is not None:
                return self._screen.exit["exit_code"]
        info = self._s.call(_wait(self.sandbox_id, self.pid, 60.0 if timeout is None
                                  else timeout))
        return info.exit_code

    def disconnect(self) -> None:
        """Close the socket; the terminal runs on (`sbx.pty.connect(pid)` reattaches)."""
        self._ws.close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()


class Pty:
    def __init__(self, session: SyncSession, sandbox_id: str):
        self._s, self.sandbox_id = session, sandbox_id

    def create(self, cols: int = 80, rows: int = 24, *, on_data: OnData | None = None,
               cmd: str | Sequence[str] | None = None, env: Mapping[str, str] | None = None,
               cwd: str | None = None, user: str | int | None = None,
               tag: str | None = None) -> Terminal:
        """Start `cmd` (a string runs through /bin/sh -c; None: the user's login shell) on
        a new terminal and attach to it."""
        info = self._s.call(_create(self.sandbox_id, cols, rows, cmd, env, cwd, user, tag))
        return self.connect(info.pid, on_data=on_data, offset=0)

    def connect(self, pid: int, *, on_data: OnData | None = None, offset: int | None = None,
                replay: int | None = None) -> Terminal:
        """Attach to a running terminal: its output from `offset` (None: the recent screen,
        its last `replay` bytes, 64 KiB by default), then live. InvalidError if `offset` is
        no longer kept (its `available` says what is)."""
        ws = SyncWebSocket.connect(self._s.config, _base(self.sandbox_id, pid, "/ws"),
                                   _socket_params(offset, replay),
                                   sandbox_id=self.sandbox_id, operation=f"attach to "
                                   f"terminal {pid}")
        return Terminal(self._s, self.sandbox_id, pid, ws, on_data)

    def list(self) -> list[TerminalInfo]:
        return self._s.call(_list(self.sandbox_id))

    def info(self, pid: int) -> TerminalInfo:
        return self._s.call(_info(self.sandbox_id, pid))

    def resize(self, pid: int, cols: int, rows: int) -> PtySize:
        return self._s.call(_resize(self.sandbox_id, pid, cols, rows))

    def kill(self, pid: int, signal: str = "SIGKILL") -> None:
        self._s.call(_kill(self.sandbox_id, pid, signal))


# --- async ---------------------------------------------------------------------------------
class AsyncTerminal:
    """The twin of Terminal: `on_data` (a function or a coroutine function) runs on a task."""

    def __init__(self, session: AsyncSession, sandbox_id: str, pid: int,
                 ws: AsyncWebSocket, on_data: OnData | None):
        self._s, self.sandbox_id, self.pid = session, sandbox_id, pid
        self._ws = ws
        self._screen = _Screen(sandbox_id, pid, on_data)
        self._first = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                try:
                    msg = await self._ws.recv()
                except Closed:
                    return
                data = self._screen.take(msg)
                self._first.set()
                if data and self._screen.on_data is not None:
                    r = self._screen.on_data(data)
                    if inspect.isawaitable(r):
                        await r
        finally:
            self._first.set()

    async def _started(self) -> AsyncTerminal:
        await asyncio.wait_for(self._first.wait(), 10)
        return self

    @property
    def output(self) -> bytes:
        return bytes(self._screen.buf)

    @property
    def offset(self) -> int:
        return self._screen.offset

    @property
    def connected(self) -> bool:
        return not self._task.done()

    async def send_input(self, data: bytes | str) -> None:
        await self._ws.send(_as_bytes(data))

    async def resize(self, cols: int, rows: int) -> PtySize:
        return await self._s.call(_resize(self.sandbox_id, self.pid, cols, rows))

    async def kill(self, signal: str = "SIGKILL") -> None:
        await self._s.call(_kill(self.sandbox_id, self.pid, signal))

    async def info(self) -> TerminalInfo:
        return await self._s.call(_info(self.sandbox_id, self.pid))

    async def wait(self, timeout: float | None = None) -> int:
        if self.connected:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                raise TorporTimeoutError(f"terminal {self.pid} still runs after {timeout}s",
                                         sandbox_id=self.sandbox_id,
                                         operation=f"wait for terminal {self.pid}") from None
            if self._screen.exit is not None:
                return self._screen.exit["exit_code"]
        info = await self._s.call(_wait(self.sandbox_id, self.pid,
                                        60.0 if timeout is None else timeout))
        return info.exit_code

    async def disconnect(self) -> None:
        await self._ws.close()
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - closing anyway
            pass


class AsyncPty:
    def __init__(self, session: AsyncSession, sandbox_id: str):
        self._s, self.sandbox_id = session, sandbox_id

    async def create(self, cols: int = 80, rows: int = 24, *,
                     on_data: OnData | None = None, cmd: str | Sequence[str] | None = None,
                     env: Mapping[str, str] | None = None, cwd: str | None = None,
                     user: str | int | None = None, tag: str | None = None) -> AsyncTerminal:
        info = await self._s.call(_create(self.sandbox_id, cols, rows, cmd, env, cwd, user,
                                          tag))
        return await self.connect(info.pid, on_data=on_data, offset=0)

    async def connect(self, pid: int, *, on_data: OnData | None = None,
                      offset: int | None = None, replay: int | None = None) -> AsyncTerminal:
        ws = await AsyncWebSocket.connect(self._s.config, _base(self.sandbox_id, pid, "/ws"),
                                          _socket_params(offset, replay),
                                          sandbox_id=self.sandbox_id,
                                          operation=f"attach to terminal {pid}")
        return await AsyncTerminal(self._s, self.sandbox_id, pid, ws, on_data)._started()

    async def list(self) -> list[TerminalInfo]:
        return await self._s.call(_list(self.sandbox_id))

    async def info(self, pid: int) -> TerminalInfo:
        return await self._s.call(_info(self.sandbox_id, pid))

    async def resize(self, pid: int, cols: int, rows: int) -> PtySize:
        return await self._s.call(_resize(self.sandbox_id, pid, cols, rows))

    async def kill(self, pid: int, signal: str = "SIGKILL") -> None:
        await self._s.call(_kill(self.sandbox_id, pid, signal))
