"""The API-path preview route, `/v1/sandboxes/{id}/ports/{port}/{path}`, as ASGI.

HTTP: method, path+query, headers and a streaming body go to the sandbox port over h11;
the response streams back. WebSocket: a wsproto client connection to the sandbox port,
bridged message by message to the ASGI websocket. The API has authenticated the caller;
the API key is still removed so it never reaches the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING
from urllib.parse import quote

import h11
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from torpor.network.preview_tokens import (
    PreviewError,
    end_to_end,
    extract_credentials,
    forwarded_headers,
    header,
)

if TYPE_CHECKING:
    from torpor.network.preview import PreviewGateway

log = logging.getLogger("torpor.preview")

READ_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024
MAX_MESSAGE = 64 * 1024 * 1024  # a websocket message is buffered whole for ASGI
# handshake headers wsproto writes itself, and framing headers that do not apply
_WS_OWN = frozenset({
    b"host", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept", b"content-length",
    b"transfer-encoding", b"expect",
})
_RESERVED_CLOSE = {1005, 1006, 1015}  # codes an endpoint may not send


def _target(scope, sandbox_id: str, port: int, path: str) -> bytes:
    """Path+query for the app, percent-encoding as the client sent it where possible."""
    marker = f"/sandboxes/{sandbox_id}/ports/{port}/".encode()
    raw = scope.get("raw_path") or b""
    i = raw.find(marker)
    if i >= 0:
        target = b"/" + raw[i + len(marker):]
    else:  # the router gave us a decoded path: encode it again
        target = ("/" + quote(path.lstrip("/"), safe="/:@!$&'()*+,;=~")).encode()
    qs = scope.get("query_string") or b""
    return target + b"?" + qs if qs else target


def _prefix(scope, sandbox_id: str, port: int) -> bytes:
    return (scope.get("root_path", "") + f"/v1/sandboxes/{sandbox_id}/ports/{port}").encode()


def _prepare(gw: PreviewGateway, scope, sandbox_id: str, port: int, path: str):
    """(target, headers) to send upstream: credentials removed, X-Forwarded-* added."""
    target = _target(scope, sandbox_id, port, path)
    raw = [(bytes(n).lower(), bytes(v)) for n, v in scope.get("headers", [])]
    creds = extract_credentials(raw, target, gw.check_api_key)
    client = scope.get("client")
    peer = client[0] if client else "unknown"
    proto = b"https" if scope.get("scheme") in ("https", "wss") else b"http"
    host = header(raw, b"host")
    headers = forwarded_headers(end_to_end(creds.headers), peer, host, proto,
                                ((b"x-forwarded-prefix", _prefix(scope, sandbox_id, port)),))
    if host is None:
        headers.insert(0, (b"host", f"localhost:{port}".encode()))
    return creds.target, headers


async def _plain(send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


async def proxy_http(gw: PreviewGateway, scope, receive, send, sandbox_id: str, port: int,
                     path: str) -> None:
    target, headers = _prepare(gw, scope, sandbox_id, port, path)
    headers = [(n, v) for n, v in headers if n != b"expect"]  # the ASGI server did 100s
    first = await receive()
    if first["type"] != "http.request":
        return  # client already gone
    body, more = first.get("body", b""), first.get("more_body", False)
    if (body or more) and header(headers, b"content-length") is None \
            and header(headers, b"transfer-encoding") is None:
        headers.append((b"transfer-encoding", b"chunked"))  # e.g. HTTP/2 without a length
    try:
        reader, writer = await gw.connect(sandbox_id, port)
    except PreviewError as e:
        return await _plain(send, e.status, e.message)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    try:
        data = conn.send(h11.Request(method=scope["method"].encode(), target=target,
                                     headers=headers))
        if body:
            data += conn.send(h11.Data(data=body))
        if not more:
            data += conn.send(h11.EndOfMessage())
        writer.write(data)
    except h11.LocalProtocolError as e:
        _close(writer)
        return await _plain(send, 400, f"cannot forward this request: {e}")

    async def pump() -> None:
        # the rest of the body, then wait for the client to go away (streams must end then)
        nonlocal more
        try:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    break
                if more and msg["type"] == "http.request":
                    chunk = msg.get("body", b"")
                    more = msg.get("more_body", False)
                    out = conn.send(h11.Data(data=chunk)) if chunk else b""
                    if not more:
                        out += conn.send(h11.EndOfMessage())
                    writer.write(out)
                    await writer.drain()
        except (OSError, RuntimeError, h11.ProtocolError):
            pass  # either side gone: closing the upstream below ends the exchange
        _close(writer)  # wakes the response side if it is still reading

    pump_task = asyncio.create_task(pump())
    started = False
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                try:
                    conn.receive_data(await reader.read(READ_SIZE))
                except OSError:
                    conn.receive_data(b"")
                continue
            t = type(ev)
            if t is h11.Data:
                await send({"type": "http.response.body", "body": bytes(ev.data),
                            "more_body": True})
            elif t is h11.Response:
                hdrs = [(n, v) for n, v in end_to_end(ev.headers) if n != b"transfer-encoding"]
                await send({"type": "http.response.start", "status": ev.status_code,
                            "headers": hdrs})
                started = True
            elif t is h11.EndOfMessage:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            elif t is h11.InformationalResponse:
                continue  # ASGI has no way to send 1xx
            else:
                raise h11.RemoteProtocolError("upstream closed the connection")
    except h11.ProtocolError:
        if not started:
            await _plain(send, 502, f"port {port} of sandbox {sandbox_id} closed the connection")
        # else: returning with the response unfinished makes the server drop the connection
    finally:
        pump_task.cancel()
        await asyncio.gather(pump_task, return_exceptions=True)
        _close(writer)


async def proxy_websocket(gw: PreviewGateway, scope, receive, send, sandbox_id: str,
                          port: int, path: str) -> None:
    msg = await receive()
    if msg["type"] != "websocket.connect":
        return
    target, headers = _prepare(gw, scope, sandbox_id, port, path)
    host = header(headers, b"host") or f"localhost:{port}".encode()
    extra = [(n, v) for n, v in headers if n not in _WS_OWN]
    can_respond = "websocket.http.response" in scope.get("extensions", {})

    async def refuse(status: int, text: str) -> None:
        if can_respond:
            body = (text + "\n").encode()
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008})

    try:
        reader, writer = await gw.connect(sandbox_id, port)
    except PreviewError as e:
        return await refuse(e.status, e.message)
    wsc = WSConnection(ConnectionType.CLIENT)
    opened = False
    try:
        writer.write(wsc.send(ws.Request(
            host=host.decode("latin-1"), target=target.decode("latin-1"),
            subprotocols=list(scope.get("subprotocols") or []), extra_headers=extra)))
        accepted = None
        while accepted is None:
            data = await reader.read(READ_SIZE)
            wsc.receive_data(data or None)
            for ev in wsc.events():
                if isinstance(ev, ws.AcceptConnection):
                    accepted = ev
                    break
                if isinstance(ev, (ws.RejectConnection, ws.CloseConnection)):
                    status = getattr(ev, "status_code", 502)
                    return await refuse(status if status >= 400 else 502,
                                        f"port {port} of sandbox {sandbox_id} refused the "
                                        f"websocket ({status})")
        await send({"type": "websocket.accept", "subprotocol": accepted.subprotocol})
        opened = True
        await _bridge(wsc, reader, writer, receive, send)
    except Exception as e:  # noqa: BLE001 - a broken websocket is routine, not a traceback
        log.debug("preview websocket %s:%s ended: %r", sandbox_id, port, e)
        if not opened:
            with contextlib.suppress(Exception):
                await refuse(502, f"port {port} of sandbox {sandbox_id} closed the connection")
    finally:
        _close(writer)


async def _bridge(wsc: WSConnection, reader, writer, receive, send) -> None:
    """Messages both ways until either side closes; the other side then sees a close."""

    async def from_client() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.receive":
                if msg.get("text") is not None:
                    writer.write(wsc.send(ws.TextMessage(data=msg["text"])))
                else:
                    writer.write(wsc.send(ws.BytesMessage(data=msg.get("bytes") or b"")))
                await writer.drain()
            elif msg["type"] == "websocket.disconnect":
                code = msg.get("code", 1000)
                with contextlib.suppress(Exception):
                    writer.write(wsc.send(ws.CloseConnection(
                        code=1000 if code in _RESERVED_CLOSE else code)))
                    await writer.drain()
                return

    async def from_upstream() -> None:
        parts: list = []
        size = 0
        while True:
            data = await reader.read(READ_SIZE)
            wsc.receive_data(data or None)
            for ev in wsc.events():
                if isinstance(ev, ws.Message):
                    parts.append(ev.data)
                    size += len(ev.data)
                    if size > MAX_MESSAGE:
                        raise ValueError("websocket message too large")
                    if not ev.message_finished:
                        continue
                    if isinstance(ev, ws.TextMessage):
                        await send({"type": "websocket.send", "text": "".join(parts)})
                    else:
                        await send({"type": "websocket.send", "bytes": b"".join(parts)})
                    parts, size = [], 0
                elif isinstance(ev, ws.Ping):
                    writer.write(wsc.send(ev.response()))
                elif isinstance(ev, ws.CloseConnection):
                    with contextlib.suppress(Exception):
                        writer.write(wsc.send(ev.response()))
                    code = ev.code
                    await send({"type": "websocket.close",
                                "code": 1011 if code == 1006 else
                                1000 if code in _RESERVED_CLOSE else code,
                                "reason": ev.reason or ""})
                    return

    tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_upstream())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if tasks[0] in done:
        return
    # the upstream side ended without a close handshake we relayed: close the client
    if tasks[1].exception() is not None:
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1011})
