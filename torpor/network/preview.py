"""Preview URLs: a reverse proxy from the host into ports inside sandboxes.

`PreviewGateway.handle` serves a dedicated listener routed by Host header
(`<port>-<sandbox-id>.<domain>` or a custom domain); `PreviewGateway.asgi` serves the API
route `/v1/sandboxes/{id}/ports/{port}/{path}`. Both reach the sandbox through the
server's `open_upstream(sandbox_id, port)`, speak HTTP/1.1 to it with h11, stream bodies
both ways, and relay WebSocket (any 101 upgrade) connections.

Each request on a keep-alive connection is routed and authorised on its own; Torpor
credentials (tokens, the API key) are removed before anything reaches the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11

from torpor.network import preview_asgi
from torpor.network.preview_tokens import (
    Credentials,
    PreviewError,
    Route,
    TokenSigner,
    authorise,
    connection_tokens,
    end_to_end,
    extract_credentials,
    forwarded_headers,
    header,
)

__all__ = ["PreviewError", "PreviewGateway", "Route", "TokenSigner"]

log = logging.getLogger("torpor.preview")

READ_SIZE = 256 * 1024  # one read per socket wake-up covers most responses
MAX_HEAD = 64 * 1024  # request/response heads (cookies can be large)
CONNECT_TIMEOUT = 60.0  # open_upstream may wake a hibernated sandbox first
IDLE_TIMEOUT = 120.0  # idle keep-alive client connections count as activity: bound them
WATCH_AFTER = 0.25  # seconds an upstream may stay silent before we watch for client hang-up

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

Upstream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _noop(_sandbox_id: str) -> None:
    return None


def _hostname(host: str) -> str:
    """Lowercased host name without port or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _UpstreamGone(Exception):
    """The sandbox side closed or broke the connection."""


class PreviewGateway:
    """Routes, authorises and proxies preview traffic; see the module docstring."""

    def __init__(self, *, domain: str, signer: TokenSigner,
                 lookup: Callable[[str], Awaitable[Route | None]],
                 check_api_key: Callable[[str], bool],
                 open_upstream: Callable[[str, int], Awaitable[Upstream]],
                 on_open: Callable[[str], None] = _noop,
                 on_close: Callable[[str], None] = _noop,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT):
        self.domain = domain.strip().lower().rstrip(".")
        self.signer = signer
        self._lookup = lookup
        self.check_api_key = check_api_key
        self._open_upstream = open_upstream
        self._on_open = on_open
        self._on_close = on_close
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._name_re = re.compile(
            r"([1-9][0-9]{0,4})-([a-z0-9]{6,32})\." + re.escape(self.domain))

    # --- routing and authorisation -------------------------------------------------------
    def parse_host(self, host: str) -> tuple[int, str] | None:
        """(port, sandbox_id) for `<port>-<id>.<domain>[:port]`, any case; else None."""
        m = self._name_re.fullmatch(_hostname(host))
        if m is None or int(m.group(1)) > 65535:
            return None
        return int(m.group(1)), m.group(2)

    async def resolve(self, host: bytes | str | None) -> Route:
        """The route for a Host header value; PreviewError(404) if there is none."""
        if not host:
            raise PreviewError(404, "no preview here: the request has no Host header")
        if isinstance(host, bytes):
            host = host.decode("latin-1")
        name = _hostname(host)
        parsed = self.parse_host(name)
        route = await self._lookup(name)
        if route is None:
            if parsed:
                raise PreviewError(404, f"no sandbox {parsed[1]}")
            raise PreviewError(404, f"no preview is served at {name}")
        if parsed and (route.port, route.sandbox_id) != parsed:
            # the name is authoritative; lookup only says whether it exists and is public
            route = Route(parsed[1], parsed[0], route.public)
        return route

    def authorise(self, route: Route, creds: Credentials,
                  now: float | None = None) -> tuple[tuple[int, str] | None, bytes | None]:
        """(denial as (status, text) or None, Set-Cookie value or None)."""
        return authorise(self.signer, route, creds, now)

    async def connect(self, sandbox_id: str, port: int) -> Upstream:
        """open_upstream with a deadline, every failure mapped to a PreviewError."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._open_upstream(sandbox_id, port)
        except PreviewError:
            raise
        except TimeoutError:
            raise PreviewError(504, f"sandbox {sandbox_id} did not answer on port {port} "
                                    "in time") from None
        except OSError:
            raise PreviewError(502, f"no process is listening on port {port} in sandbox "
                                    f"{sandbox_id}") from None
        except Exception:
            log.exception("open_upstream(%s, %s) failed", sandbox_id, port)
            raise PreviewError(502, f"could not reach port {port} of sandbox "
                                    f"{sandbox_id}") from None

    def opened(self, sandbox_id: str) -> None:
        try:
            self._on_open(sandbox_id)
        except Exception:
            log.exception("preview on_open callback failed")

    def closed(self, sandbox_id: str) -> None:
        try:
            self._on_close(sandbox_id)
        except Exception:
            log.exception("preview on_close callback failed")

    # --- entry points --------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio.start_server callback for the preview listener. Never raises (except
        cancellation); always closes the connection and balances on_open/on_close."""
        session = _Session(self, reader, writer)
        try:
            await session.run()
        except (OSError, h11.ProtocolError, _UpstreamGone, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("preview connection failed")
        finally:
            session.close()

    async def asgi(self, scope, receive, send, sandbox_id: str, port: int, path: str) -> None:
        """ASGI handler for `/v1/sandboxes/{id}/ports/{port}/{path}` (http and websocket
        scopes); the caller has authenticated the request. Never raises on upstream
        failure: answers 404/502/504 text (or closes the websocket) instead."""
        self.opened(sandbox_id)
        try:
            if scope["type"] == "websocket":
                await preview_asgi.proxy_websocket(self, scope, receive, send,
                                                   sandbox_id, port, path)
            else:
                await preview_asgi.proxy_http(self, scope, receive, send,
                                              sandbox_id, port, path)
        finally:
            self.closed(sandbox_id)


class _Up:
    """One upstream connection: h11 client state plus its streams."""

    __slots__ = ("conn", "port", "reader", "reused", "sid", "writer")

    def __init__(self, sid: str, port: int, reader, writer):
        self.sid, self.port, self.reader, self.writer = sid, port, reader, writer
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.reused = False

    async def next_event(self):
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = await self.reader.read(READ_SIZE)
            except OSError as e:
                raise _UpstreamGone(str(e)) from None
            conn.receive_data(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Session:
    """One client connection on the preview listener."""

    def __init__(self, gw: PreviewGateway, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.gw, self.reader, self.writer = gw, reader, writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.up: _Up | None = None
        self.sandbox: str | None = None  # the sandbox this connection counts as active
        peer = writer.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else "unknown"

    def close(self) -> None:
        self._drop_upstream()
        if self.sandbox is not None:
            self.gw.closed(self.sandbox)
            self.sandbox = None
        with contextlib.suppress(Exception):
            self.writer.close()

    def _drop_upstream(self) -> None:
        if self.up is not None:
            self.up.close()
            self.up = None

    def _use(self, sid: str) -> None:
        if self.sandbox != sid:
            if self.sandbox is not None:
                self.gw.closed(self.sandbox)
            self.sandbox = sid
            self.gw.opened(sid)

    async def _client_event(self, idle: bool = False):
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            if idle and conn.their_state is h11.IDLE:
                try:
                    async with asyncio.timeout(self.gw.idle_timeout):
                        data = await self.reader.read(READ_SIZE)
                except TimeoutError:
                    return h11.ConnectionClosed()
            else:
                data = await self.reader.read(READ_SIZE)
            conn.receive_data(data)

    def _request_complete(self) -> bool:
        """Consume body bytes already buffered; True if the whole request has arrived."""
        while self.conn.their_state is h11.SEND_BODY:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return False
        return True

    async def _respond(self, status: int, text: str, extra: tuple = (),
                       close: bool = False) -> bool:
        """Send a short text response; True if the connection may serve another request."""
        c = self.conn
        if c.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        body = (text + "\n").encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()), *extra]
        if close or not self._request_complete():
            headers.append((b"connection", b"close"))
        try:
            self.writer.write(c.send(h11.Response(status_code=status, headers=headers,
                                                  reason=_reason(status)))
                              + c.send(h11.Data(data=body)) + c.send(h11.EndOfMessage()))
            await self.writer.drain()
        except (OSError, h11.ProtocolError):
            return False
        return c.our_state is h11.DONE

    async def run(self) -> None:
        while True:
            try:
                req = await self._client_event(idle=True)
            except h11.RemoteProtocolError as e:
                await self._respond(e.error_status_hint, "bad request", close=True)
                return
            if type(req) is not h11.Request:
                return
            if not await self._serve(req):
                return
            c = self.conn
            if c.our_state is not h11.DONE or c.their_state is not h11.DONE:
                return
            c.start_next_cycle()

    async def _upstream(self, sid: str, port: int) -> _Up:
        up = self.up
        if up is not None:
            if (up.sid, up.port) == (sid, port) and not up.reader.at_eof() \
                    and not up.writer.is_closing():
                return up
            self._drop_upstream()
        reader, writer = await self.gw.connect(sid, port)
        self.up = _Up(sid, port, reader, writer)
        return self.up

    async def _serve(self, req: h11.Request) -> bool:
        """Route, authorise and proxy one request; True if the connection may go on."""
        if req.method == b"CONNECT" or not (req.target.startswith(b"/") or req.target == b"*"):
            return await self._respond(400, "the preview gateway is not a forward proxy")
        host = header(req.headers, b"host")
        try:
            route = await self.gw.resolve(host)
        except PreviewError as e:
            return await self._respond(e.status, e.message)
        except Exception:
            log.exception("preview lookup failed for %r", host)
            return await self._respond(503, "preview routing is unavailable", close=True)
        creds = extract_credentials(req.headers, req.target, self.gw.check_api_key)
        denial, cookie = self.gw.authorise(route, creds)
        if denial is not None:
            extra = ((b"www-authenticate", b'Bearer realm="torpor"'),) \
                if denial[0] == 401 else ()
            return await self._respond(*denial, extra=extra)
        sid, port = route.sandbox_id, route.port
        cookie_hdr = ((b"set-cookie", cookie),) if cookie else ()

        # body bytes that arrived with the head go out with it
        pending: list[bytes] = []
        body_done = False
        while True:
            ev = self.conn.next_event()
            if type(ev) is h11.Data:
                pending.append(ev.data)
            elif type(ev) is h11.EndOfMessage:
                body_done = True
                break
            else:
                break

        upgrade = header(req.headers, b"upgrade")
        if upgrade is not None and b"upgrade" not in connection_tokens(req.headers):
            upgrade = None
        headers = end_to_end(creds.headers)
        if upgrade is not None:
            headers += [(b"connection", b"Upgrade"), (b"upgrade", upgrade)]
        headers = forwarded_headers(headers, self.peer, host, b"http")
        up_req = h11.Request(method=req.method, target=creds.target, headers=headers)

        self._use(sid)
        for attempt in (0, 1):
            try:
                up = await self._upstream(sid, port)
            except PreviewError as e:
                return await self._respond(e.status, e.message, extra=cookie_hdr)
            try:
                data = up.conn.send(up_req)
                for chunk in pending:
                    data += up.conn.send(h11.Data(data=chunk))
                if body_done:
                    data += up.conn.send(h11.EndOfMessage())
                up.writer.write(data)
                first = await up.next_event() if body_done else None
                break
            except (OSError, h11.ProtocolError, _UpstreamGone):
                # a reused keep-alive connection the app closed while idle: retry once
                self._drop_upstream()
                if attempt or not up.reused or req.method not in _IDEMPOTENT:
                    return await self._respond(
                        502, f"port {port} of sandbox {sid} closed the connection", close=True)
        return await self._relay_response(up, first, body_done, upgrade is not None,
                                          cookie_hdr)

    async def _pump_body(self, up: _Up) -> None:
        """Client request body -> upstream, as it arrives."""
        try:
            while True:
                ev = await self._client_event()
                if type(ev) is h11.Data:
                    up.writer.write(up.conn.send(h11.Data(data=ev.data)))
                    await up.writer.drain()
                elif type(ev) is h11.EndOfMessage:
                    up.writer.write(up.conn.send(h11.EndOfMessage()))
                    return
                else:
                    raise _UpstreamGone("client went away mid-body")
        except BaseException:
            # the response side is waiting on the upstream: closing it wakes that up
            up.close()
            raise

    async def _watch_client(self, up: _Up) -> None:
        """While the upstream is slow, notice a client that hung up (and let go of the
        sandbox) instead of waiting for the app's next byte."""
        data = await self.reader.read(READ_SIZE)
        if data:
            self.conn.receive_data(data)  # pipelined request: h11 keeps it for later
        else:
            up.close()

    async def _relay_response(self, up: _Up, first, body_done: bool, upgrade: bool,
                              cookie_hdr: tuple) -> bool:
        c, uc, w = self.conn, up.conn, self.writer
        pump = watch = timer = None
        if not body_done:
            pump = asyncio.create_task(self._pump_body(up))
            pump.add_done_callback(_quiet)

        def start_watch() -> None:
            nonlocal watch
            watch = asyncio.create_task(self._watch_client(up))
            watch.add_done_callback(_quiet)

        async def stop_tasks() -> None:
            # awaited, not just cancelled: a reader left with a pending waiter refuses the
            # next read on this connection
            if timer is not None:
                timer.cancel()
            tasks = [t for t in (watch, pump) if t is not None and not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

        started = False
        ev = first
        try:
            while True:
                if ev is None:
                    ev = uc.next_event()
                if ev is h11.NEED_DATA:
                    if pump is None and timer is None:
                        # only slow responses pay for a watcher task
                        timer = asyncio.get_running_loop().call_later(WATCH_AFTER, start_watch)
                    try:
                        data = await up.reader.read(READ_SIZE)
                    except OSError as e:
                        raise _UpstreamGone(str(e)) from None
                    uc.receive_data(data)
                    ev = None
                    continue
                t = type(ev)
                if t is h11.Data:
                    w.write(c.send(ev))
                    await w.drain()
                elif t is h11.Response:
                    hdrs = end_to_end(ev.headers) + list(cookie_hdr)
                    w.write(c.send(h11.Response(status_code=ev.status_code, headers=hdrs,
                                                reason=ev.reason)))
                    started = True
                elif t is h11.EndOfMessage:
                    w.write(c.send(h11.EndOfMessage()))
                    break
                elif t is h11.InformationalResponse:
                    if ev.status_code == 101 and upgrade and body_done:
                        await stop_tasks()
                        hdrs = list(ev.headers) + list(cookie_hdr)
                        w.write(c.send(h11.InformationalResponse(
                            status_code=101, headers=hdrs, reason=ev.reason)))
                        self.up = None  # the tunnel owns it now
                        await self._tunnel(up)
                        return False
                    w.write(c.send(h11.InformationalResponse(
                        status_code=ev.status_code, headers=end_to_end(ev.headers),
                        reason=ev.reason)))
                else:
                    raise _UpstreamGone("upstream closed the connection")
                ev = None
        except (h11.ProtocolError, _UpstreamGone) as e:
            await stop_tasks()  # before _respond: the pump must not consume client events
            self._drop_upstream()
            if started:
                return False  # mid-response: the client must see the connection break
            log.debug("upstream %s:%s failed before responding: %s", up.sid, up.port, e)
            return await self._respond(
                502, f"port {up.port} of sandbox {up.sid} closed the connection",
                extra=cookie_hdr, close=True)
        finally:
            await stop_tasks()
        await w.drain()
        if pump is not None and (not pump.done() or pump.cancelled() or pump.exception()):
            self._drop_upstream()  # answered before the request body ended: cannot reuse
            return False
        if uc.our_state is h11.DONE and uc.their_state is h11.DONE:
            uc.start_next_cycle()
            up.reused = True
        else:
            self._drop_upstream()
        return True

    async def _tunnel(self, up: _Up) -> None:
        """After a 101: raw bytes both ways until either side closes."""
        c_rest, _ = self.conn.trailing_data
        u_rest, _ = up.conn.trailing_data
        try:
            if c_rest:
                up.writer.write(c_rest)
            if u_rest:
                self.writer.write(u_rest)
            tasks = [asyncio.create_task(_pipe(self.reader, up.writer)),
                     asyncio.create_task(_pipe(up.reader, self.writer))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            up.close()


def _quiet(task: asyncio.Task) -> None:
    """Retrieve a helper task's outcome so asyncio does not log it as unhandled."""
    if not task.cancelled():
        task.exception()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
