"""A small WebSocket client (wsproto over a socket), sync and async twins, for terminals.

Only what the terminal socket needs: connect with the key, binary and text messages both
ways, close. A refusal before the handshake (the server's JSON error answer) becomes the
SDK's typed error, as for any other call.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto import events as ev
from wsproto.utilities import LocalProtocolError

from torpor.sdk._http import _tls
from torpor.sdk.config import CONNECT_TIMEOUT, ClientConfig
from torpor.sdk.errors import ServerUnavailableError, TorporError, error_from_payload

READ_SIZE = 65536


class Closed(Exception):
    """The socket closed; `code` is the close code (1006: dropped without one)."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code


class _Proto:
    """The wsproto state machine and the messages it has decoded so far."""

    def __init__(self, config: ClientConfig, path: str, params: Mapping[str, Any] | None,
                 sandbox_id: str | None, operation: str):
        u = urlsplit(config.url)
        self.tls = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.tls else 80)
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        self.target = (u.path.rstrip("/") + path) + (f"?{query}" if query else "")
        self.headers = [(k.lower().encode(), v.encode()) for k, v in config.headers().items()]
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.where = {"sandbox_id": sandbox_id, "operation": operation}
        self.url = config.url
        self.accepted = False
        self.reject: tuple[int, bytearray] | None = None
        self.closed: Closed | None = None
        self._text = ""
        self.messages: list[bytes | str] = []

    def hello(self) -> bytes:
        host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        return self.conn.send(ev.Request(host=host, target=self.target,
                                         extra_headers=self.headers))

    def feed(self, data: bytes) -> bytes:
        """Take received bytes (b"": the peer closed); return bytes to send back."""
        out = b""
        self.conn.receive_data(data or None)
        for e in self.conn.events():
            if isinstance(e, ev.AcceptConnection):
                self.accepted = True
            elif isinstance(e, ev.RejectConnection):
                self.reject = (e.status_code, bytearray())
                if not e.has_body:
                    self.closed = Closed(1006, "refused")
            elif isinstance(e, ev.RejectData):
                assert self.reject is not None
                self.reject[1].extend(e.data)
                if e.body_finished:
                    self.closed = Closed(1006, "refused")
            elif isinstance(e, ev.BytesMessage):
                if e.data:
                    self.messages.append(bytes(e.data))
            elif isinstance(e, ev.TextMessage):
                self._text += e.data
                if e.message_finished:
                    self.messages.append(self._text)
                    self._text = ""
            elif isinstance(e, ev.Ping):
                out += self.conn.send(e.response())
            elif isinstance(e, ev.CloseConnection):
                self.closed = Closed(e.code, e.reason or "")
                try:
                    out += self.conn.send(e.response())
                except LocalProtocolError:
                    pass
        if not data and self.closed is None:
            self.closed = Closed(1006, "connection dropped")
        return out

    def refused(self) -> TorporError:
        status, body = self.reject or (0, bytearray())
        try:
            payload = json.loads(body).get("error") or {}
        except (ValueError, AttributeError):
            payload = {}
        if not isinstance(payload, dict) or not payload:
            payload = {"message": f"the server refused the terminal socket (HTTP {status})"}
        return error_from_payload(payload, status=status, **self.where)

    def unavailable(self, e: BaseException) -> ServerUnavailableError:
        return ServerUnavailableError(f"cannot open a WebSocket to {self.url} "
                                      f"({e or type(e).__name__})", code="connect",
                                      **self.where)

    def message(self, data: bytes | str) -> bytes:
        try:
            return self.conn.send(ev.Message(data=data))
        except LocalProtocolError:
            raise Closed(self.closed.code if self.closed else 1006) from None

    def close(self, code: int = 1000) -> bytes:
        try:
            return self.conn.send(ev.CloseConnection(code=code))
        except LocalProtocolError:
            return b""


class SyncWebSocket:
    """Blocking; `recv()` is meant for one reader thread, `send()` for others."""

    def __init__(self, proto: _Proto, sock: socket.socket):
        self._p = proto
        self._sock = sock
        self._lock = threading.Lock()  # the state machine is shared by reader and writers

    @classmethod
    def connect(cls, config: ClientConfig, path: str, params: Mapping[str, Any] | None = None,
                *, sandbox_id: str | None = None, operation: str = "") -> SyncWebSocket:
        p = _Proto(config, path, params, sandbox_id, operation)
        try:
            sock = socket.create_connection((p.host, p.port), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if p.tls:
                sock = _tls().wrap_socket(sock, server_hostname=p.host)
            sock.sendall(p.hello())
            while not p.accepted and p.closed is None:
                sock.sendall(p.feed(sock.recv(READ_SIZE)))
        except (OSError, ssl.SSLError) as e:
            raise p.unavailable(e) from None
        if not p.accepted:
            sock.close()
            raise p.refused()
        sock.settimeout(None)
        return cls(p, sock)

    def recv(self) -> bytes | str:
        """The next message; Closed once the socket is closed."""
        p = self._p
        while not p.messages:
            if p.closed is not None:
                raise p.closed
            try:
                data = self._sock.recv(READ_SIZE)
            except OSError:
                data = b""
            with self._lock:
                reply = p.feed(data)
                if reply:
                    self._send_raw(reply)
        with self._lock:
            return p.messages.pop(0)

    def send(self, data: bytes | str) -> None:
        with self._lock:
            self._send_raw(self._p.message(data))

    def _send_raw(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise Closed(1006, str(e)) from None

    def close(self) -> None:
        try:
            with self._lock:
                self._sock.sendall(self._p.close())
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class AsyncWebSocket:
    def __init__(self, proto: _Proto, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self._p = proto
        self._r = reader
        self._w = writer

    @classmethod
    async def connect(cls, config: ClientConfig, path: str,
                      params: Mapping[str, Any] | None = None, *,
                      sandbox_id: str | None = None, operation: str = "") -> AsyncWebSocket:
        p = _Proto(config, path, params, sandbox_id, operation)
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(
                p.host, p.port, ssl=_tls() if p.tls else None), CONNECT_TIMEOUT)
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            w.write(p.hello())
            while not p.accepted and p.closed is None:
                w.write(p.feed(await r.read(READ_SIZE)))
        except (OSError, ssl.SSLError, TimeoutError) as e:
            raise p.unavailable(e) from None
        if not p.accepted:
            w.close()
            raise p.refused()
        return cls(p, r, w)

    async def recv(self) -> bytes | str:
        p = self._p
        while not p.messages:
            if p.closed is not None:
                raise p.closed
            try:
                data = await self._r.read(READ_SIZE)
            except OSError:
                data = b""
            reply = p.feed(data)
            if reply:
                await self._send_raw(reply)
        return p.messages.pop(0)

    async def send(self, data: bytes | str) -> None:
        await self._send_raw(self._p.message(data))

    async def _send_raw(self, data: bytes) -> None:
        try:
            self._w.write(data)
            await self._w.drain()
        except OSError as e:
            raise Closed(1006, str(e)) from None

    async def close(self) -> None:
        try:
            self._w.write(self._p.close())
            self._w.close()
            await self._w.wait_closed()
        except OSError:
            pass
