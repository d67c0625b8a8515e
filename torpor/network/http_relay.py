"""HTTP/1.1 relay of the egress proxy: one client connection, many requests, h11 on both sides.

Used for plain proxy requests (`GET http://host/path`, each request checked and routed on
its own) and for intercepted HTTPS tunnels (every request goes to the CONNECT destination,
whatever its Host header says). On the way up, placeholders of the credentials that apply to
the destination are swapped for the real values in header values (and bodies for
`inject_body`); on the way down, real values are turned back into placeholders, so a real
value never reaches the sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11

from torpor.network.policy import Decision, host_matches
from torpor.network.streams import READ_SIZE, ConnectError, Stream, TLSStream, connect_pinned

if TYPE_CHECKING:
    from torpor.network.proxy import Credential, EgressProxy, SandboxNet

log = logging.getLogger("torpor.egress")

MAX_INJECT_BODY = 8 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
    b"proxy-authenticate", b"te", b"trailer", b"upgrade", b"expect"})
# framing and routing headers a `Connection:` token list must not make us drop
_KEEP = frozenset({b"content-length", b"transfer-encoding", b"host"})
NOT_A_PROXY_REQUEST = "this is the Torpor egress proxy; set HTTP_PROXY"
TOO_BIG = "request body over 8 MiB: too big to carry an injected secret"


class ClientGone(Exception):
    """The client closed or broke its connection."""


class UpstreamGone(Exception):
    """The upstream closed or broke its connection while we were writing to it."""


def applicable(credentials: list[Credential], host: str, port: int) -> list[Credential]:
    """Credentials whose allowed_hosts match host:port (and that have something to swap)."""
    return [c for c in credentials
            if c.placeholder and c.value and host_matches(c.allowed_hosts, host, port)]


def clean_headers(headers) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, including those named by Connection."""
    named = set()
    for name, value in headers:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    named -= _KEEP
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def swap_headers(headers: list[tuple[bytes, bytes]], creds: list[Credential]
                 ) -> tuple[list[tuple[bytes, bytes]], set[str]]:
    """Placeholders -> real values in header values (and inside Basic auth); names used."""
    used: set[str] = set()
    out = []
    for name, value in headers:
        if name == b"authorization" and value[:6].lower() == b"basic ":
            value = _swap_basic(value, creds, used)
        for c in creds:
            ph = c.placeholder.encode()
            if ph in value:
                value = value.replace(ph, c.value.encode())
                used.add(c.name)
        out.append((name, value))
    return out, used


def _swap_basic(value: bytes, creds: list[Credential], used: set[str]) -> bytes:
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return value
    swapped = decoded
    for c in creds:
        ph = c.placeholder.encode()
        if ph in swapped:
            swapped = swapped.replace(ph, c.value.encode())
            used.add(c.name)
    return value if swapped == decoded else value[:6] + base64.b64encode(swapped)


class Redactor:
    """Streams bytes while turning real secret values back into placeholders, holding back
    just enough bytes to catch a value split across chunks."""

    def __init__(self, credentials: list[Credential]):
        pairs = {c.value.encode(): c.placeholder.encode() for c in credentials if c.value}
        self.pairs = sorted(pairs.items(), key=lambda p: -len(p[0]))
        self.keep = max((len(v) for v in pairs), default=1) - 1
        self.pending = b""

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [(n, self.replace(v)) for n, v in headers]

    def replace(self, data: bytes) -> bytes:
        for real, ph in self.pairs:
            if real in data:
                data = data.replace(real, ph)
        return data

    def feed(self, data: bytes) -> bytes:
        buf = self.replace(self.pending + data)
        cut = len(buf) - self.keep
        if cut <= 0:
            self.pending = buf
            return b""
        self.pending = buf[cut:]
        return buf[:cut]

    def flush(self) -> bytes:
        out, self.pending = self.pending, b""
        return out


def _header(headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _identity(headers) -> bool:
    enc = _header(headers, b"content-encoding")
    return enc is None or enc.strip().lower() in (b"", b"identity")


@dataclass
class Upstream:
    """One upstream HTTP connection with its own h11 client state."""

    host: str
    port: int
    address: str
    stream: Stream | TLSStream
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(
        h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES))


@dataclass
class Tunnel:
    """An intercepted CONNECT: every request goes to this host:port over TLS."""

    host: str
    port: int
    decision: Decision
    upstream: Upstream | None


class HttpRelay:
    """Serves HTTP requests arriving on `client` until either side closes. `tunnel` None:
    plain proxy requests; else the intercepted HTTPS destination. `on_connect(request)` is
    awaited for a CONNECT request (plain mode only) and takes over the connection."""

    def __init__(self, proxy: EgressProxy, ctx: SandboxNet, client: Stream | TLSStream,
                 cconn: h11.Connection, tunnel: Tunnel | None = None, on_connect=None):
        self.proxy, self.ctx, self.client, self.cconn = proxy, ctx, client, cconn
        self.tunnel, self.on_connect = tunnel, on_connect
        self.upstream: Upstream | None = tunnel.upstream if tunnel else None
        self.protocol = "https" if tunnel else "http"
        self.rec: dict = {}

    # ------------------------------------------------------------ plumbing

    async def client_event(self):
        """The next h11 event from the client, reading as needed."""
        while True:
            event = self.cconn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.client.read(READ_SIZE)
            self.cconn.receive_data(data)

    async def _upstream_event(self, up: Upstream):
        while True:
            event = up.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await up.stream.read(READ_SIZE)
            up.conn.receive_data(data)

    async def _to_client(self, event) -> None:
        await self._send(self.cconn.send(event), self.client, "bytes_down", ClientGone)

    async def _to_upstream(self, up: Upstream, event) -> None:
        await self._send(up.conn.send(event), up.stream, "bytes_up", UpstreamGone)

    async def _send(self, data: bytes | None, stream, counter: str, gone: type) -> None:
        if data:
            self.rec[counter] = self.rec.get(counter, 0) + len(data)
            stream.write(data)
            try:
                await stream.drain()
            except (ConnectionError, OSError) as e:
                raise gone from e
            self.proxy.activity(self.ctx)

    async def send_error(self, status: int, message: str, rule: str | None = None) -> None:
        """Answer the client with a text/plain error and close (when a response can still
        be sent); records the status for the audit."""
        self.rec["status"] = status
        # upstream and h11 messages may quote header bytes: never let a real secret through
        body = Redactor(self.ctx.credentials).replace(
            f"torpor egress: {message}\n".encode("utf-8", "replace"))
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        if rule:
            headers.append((b"x-torpor-egress-rule", _header_safe(rule)))
        with contextlib.suppress(h11.LocalProtocolError, ClientGone):
            await self._to_client(h11.Response(status_code=status, headers=headers,
                                               reason=HTTPStatus(status).phrase.encode()))
            await self._to_client(h11.Data(data=body))
            await self._to_client(h11.EndOfMessage())

    async def _close_upstream(self) -> None:
        if self.upstream is not None:
            await self.upstream.stream.close()
            self.upstream = None
            if self.tunnel:
                self.tunnel.upstream = None

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Never raises for network or protocol trouble; closes upstreams at the end."""
        try:
            while True:
                try:
                    event = await self.client_event()
                except h11.RemoteProtocolError as e:
                    self.rec = self._new_record(None)
                    self.rec["rule"] = f"bad request: {e}"[:300]
                    await self.send_error(400, f"bad request: {e}")
                    self.proxy.emit(self.rec)
                    return
                if not isinstance(event, h11.Request):
                    return
                if event.method == b"CONNECT" and self.tunnel is None and self.on_connect:
                    await self._close_upstream()
                    await self.on_connect(event)
                    return
                keep = await self._exchange(event)
                if not keep or self.cconn.our_state is not h11.DONE \
                        or self.cconn.their_state is not h11.DONE:
                    return
                self.cconn.start_next_cycle()
        except ClientGone:
            return
        finally:
            await self._close_upstream()

    def _new_record(self, req: h11.Request | None) -> dict:
        return {"sandbox_id": self.ctx.sandbox_id, "protocol": self.protocol,
                "host": self.tunnel.host if self.tunnel else "", "port":
                self.tunnel.port if self.tunnel else 0, "address": None,
                "method": req.method.decode("ascii", "replace") if req else None,
                "path": None, "status": None, "allowed": False, "rule": "",
                "bytes_up": 0, "bytes_down": 0, "secrets": [], "duration_ms": 0.0}

    def _target(self, req: h11.Request) -> tuple[str, int, str, bytes]:
        """(host, port, path, Host header value) for a request; _BadTarget if unusable."""
        raw = req.target.decode("ascii", "replace")
        if self.tunnel:
            host, port = self.tunnel.host, self.tunnel.port
            authority = host if port == 443 else f"{host}:{port}"
            if ":" in host:
                authority = f"[{host}]" if port == 443 else f"[{host}]:{port}"
            if raw.startswith("/") or raw == "*":
                return host, port, raw, authority.encode()
            parts = urlsplit(raw)
            if parts.scheme.lower() == "https" and parts.hostname == host \
                    and (parts.port or 443) == port:
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                return host, port, path, authority.encode()
            raise _BadTarget(400, f"request target {raw[:200]} is not on {authority}")
        if raw.startswith("/") or raw == "*":
            raise _BadTarget(400, NOT_A_PROXY_REQUEST)
        parts = urlsplit(raw)
        scheme = parts.scheme.lower()
        if scheme == "https":
            raise _BadTarget(400, "https:// URLs must use CONNECT (set HTTPS_PROXY)")
        if scheme != "http" or not parts.hostname:
            raise _BadTarget(400, f"unsupported request target {raw[:200]}")
        if "@" in parts.netloc:
            raise _BadTarget(400, "user:password@ in proxy URLs is not supported")
        try:
            port = parts.port or 80
        except ValueError:
            raise _BadTarget(400, f"invalid port in {raw[:200]}") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return parts.hostname, port, path, parts.netloc.encode()

    # ------------------------------------------------------------ one request

    async def _exchange(self, req: h11.Request) -> bool:
        t0 = time.monotonic()
        self.rec = rec = self._new_record(req)
        try:
            return await self._exchange_inner(req, rec)
        finally:
            rec["duration_ms"] = round((time.monotonic() - t0) * 1000, 3)
            self.proxy.emit(rec)

    async def _exchange_inner(self, req: h11.Request, rec: dict) -> bool:
        if _header(req.headers, b"content-length") is not None \
                and _header(req.headers, b"transfer-encoding") is not None:
            await self.send_error(400, "bad request: both Content-Length and Transfer-Encoding")
            return False
        try:
            host, port, path, authority = self._target(req)
        except _BadTarget as e:
            rec["rule"] = e.message
            await self.send_error(e.status, e.message)
            return False
        rec.update(host=host, port=port, path=path[:2048])
        decision = await self._check(host, port)
        rec["rule"] = decision.rule
        if not decision.allowed:
            what = f"{req.method.decode()} {host}:{port}"
            await self.send_error(decision.status, f"{what} denied ({decision.rule})"
                              if decision.status == 403 else f"{what}: {decision.rule}",
                              decision.rule if decision.status == 403 else None)
            return False
        rec["allowed"] = True
        creds = applicable(self.ctx.credentials, host, port)
        headers = [(n, v) for n, v in clean_headers(req.headers) if n != b"host"]
        headers.insert(0, (b"host", authority))
        headers, used = swap_headers(headers, creds)
        if self.cconn.they_are_waiting_for_100_continue:
            await self._to_client(h11.InformationalResponse(status_code=100, headers=[]))
        body = None
        if any(c.inject_body for c in creds) and _identity(req.headers) and (
                _header(req.headers, b"content-length") not in (None, b"0")
                or _header(req.headers, b"transfer-encoding") is not None):
            body = await self._read_body(req)
            if body is None:
                return False
            for c in creds:
                if c.inject_body and c.placeholder.encode() in body:
                    body = body.replace(c.placeholder.encode(), c.value.encode())
                    used.add(c.name)
            headers = [(n, v) for n, v in headers
                       if n not in (b"content-length", b"transfer-encoding")]
            headers.append((b"content-length", str(len(body)).encode()))
        if used:
            # an uncompressed answer lets the redactor see an echoed secret
            headers = [(n, v) for n, v in headers if n != b"accept-encoding"]
        rec["secrets"] = sorted(used)
        up = await self._get_upstream(host, port, decision)
        if up is None:
            return False
        rec["address"] = up.address
        return await self._forward(req, path, headers, body, up)

    async def _check(self, host: str, port: int) -> Decision:
        if self.tunnel:
            return self.tunnel.decision
        up = self.upstream
        if up and (up.host, up.port) == (host, port):
            pinned = [ipaddress.ip_address(up.address)]
            return await self.proxy.decide(self.ctx, host, port, pinned=pinned)
        return await self.proxy.decide(self.ctx, host, port)

    async def _read_body(self, req: h11.Request) -> bytes | None:
        """The whole request body (for injection), or None after answering 413/400."""
        chunks, size = [], 0
        declared = _header(req.headers, b"content-length")
        if declared is not None and int(declared) > MAX_INJECT_BODY:
            await self.send_error(413, TOO_BIG)
            return None
        while True:
            try:
                event = await self.client_event()
            except h11.RemoteProtocolError as e:
                await self.send_error(400, f"bad request: {e}")
                return None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_INJECT_BODY:
                    await self.send_error(413, TOO_BIG)
                    return None
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise ClientGone

    async def _get_upstream(self, host: str, port: int, decision: Decision) -> Upstream | None:
        up = self.upstream
        if up and (up.host, up.port) == (host, port) and up.conn.our_state is h11.IDLE:
            return up
        await self._close_upstream()
        tls = self.proxy.upstream_tls if self.tunnel else None
        try:
            stream, address = await connect_pinned(
                decision.addresses, port, self.proxy.operator.connect_timeout, tls,
                host if tls else None)
        except ConnectError as e:
            await self.send_error(504 if e.kind == "timeout" else 502,
                              f"{host}:{port}: {e.message}")
            return None
        self.upstream = Upstream(host, port, address, stream)
        if self.tunnel:
            self.tunnel.upstream = self.upstream
        return self.upstream

    async def _forward(self, req: h11.Request, path: str, headers, body: bytes | None,
                       up: Upstream) -> bool:
        """Send the request (streaming its body) and stream the response back."""
        try:
            await self._to_upstream(up, h11.Request(method=req.method, target=path,
                                                    headers=headers))
        except h11.LocalProtocolError:
            await self._close_upstream()
            await self.send_error(502, "cannot forward request: a header value is invalid "
                                  "(after credential injection?)")
            return False
        except UpstreamGone:
            await self._close_upstream()
            await self.send_error(502, f"{up.host}:{up.port}: upstream closed the connection")
            return False
        upload = asyncio.create_task(self._upload(up, body))
        try:
            ok = await self._download(req, up, upload)
        finally:
            if not upload.done():
                upload.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upload
        if not ok:
            await self._close_upstream()
            return False
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
        else:
            await self._close_upstream()
        return True

    async def _upload(self, up: Upstream, body: bytes | None) -> None:
        """Request body client -> upstream. Raises only for client trouble (ClientGone,
        h11.RemoteProtocolError); an upstream that stops reading may still answer."""
        with contextlib.suppress(UpstreamGone):
            await self._upload_inner(up, body)

    async def _upload_inner(self, up: Upstream, body: bytes | None) -> None:
        if body is not None:
            if body:
                await self._to_upstream(up, h11.Data(data=body))
            await self._to_upstream(up, h11.EndOfMessage())
            return
        while True:
            event = await self.client_event()
            if isinstance(event, h11.Data):
                await self._to_upstream(up, h11.Data(data=bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await self._to_upstream(up, h11.EndOfMessage())
                return
            else:
                raise ClientGone

    async def _download(self, req: h11.Request, up: Upstream, upload: asyncio.Task) -> bool:
        """Stream the response to the client. False: the client connection is finished."""
        started = False
        header_redactor = Redactor(self.ctx.credentials)
        redactor = Redactor([])
        try:
            while True:
                event = await self._next_upstream(up, upload)
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        raise h11.RemoteProtocolError("protocol upgrades are not supported")
                    if event.status_code != 100:  # we answered 100-continue ourselves
                        await self._to_client(h11.InformationalResponse(
                            status_code=event.status_code,
                            headers=header_redactor.headers(clean_headers(event.headers))))
                elif isinstance(event, h11.Response):
                    headers = clean_headers(event.headers)
                    if header_redactor and _identity(headers) and req.method != b"HEAD" \
                            and event.status_code not in (204, 304):
                        # the body may shrink or grow: let h11 pick chunked framing
                        redactor = Redactor(self.ctx.credentials)
                        headers = [(n, v) for n, v in headers if n != b"content-length"]
                    headers = header_redactor.headers(headers)
                    self.rec["status"] = event.status_code
                    await self._to_client(h11.Response(
                        status_code=event.status_code, reason=event.reason, headers=headers))
                    started = True
                elif isinstance(event, h11.Data):
                    out = redactor.feed(bytes(event.data)) if redactor else bytes(event.data)
                    if out:
                        await self._to_client(h11.Data(data=out))
                elif isinstance(event, h11.EndOfMessage):
                    tail = redactor.flush() if redactor else b""
                    if tail:
                        await self._to_client(h11.Data(data=tail))
                    await self._to_client(h11.EndOfMessage())
                    return True
                else:
                    raise h11.RemoteProtocolError("upstream closed the connection")
        except h11.RemoteProtocolError as e:
            if not started:
                await self.send_error(502, f"{up.host}:{up.port}: bad upstream response: {e}")
            return False
        except (ConnectionError, OSError, ssl.SSLError):
            if not started:
                await self.send_error(502, f"{up.host}:{up.port}: upstream connection failed")
            return False
        except h11.LocalProtocolError:
            log.debug("egress %s: relay stopped: cannot send to client", self.ctx.sandbox_id)
            return False

    async def _next_upstream(self, up: Upstream, upload: asyncio.Task):
        """The next upstream event; if the upload fails first, the exchange is over."""
        getter = asyncio.ensure_future(self._upstream_event(up))
        while True:
            if upload.done() and upload.exception() is not None:
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                exc = upload.exception()
                if isinstance(exc, h11.RemoteProtocolError):
                    await self.send_error(400, f"bad request: {exc}")
                raise ClientGone from exc
            waiting = {getter} if upload.done() else {getter, upload}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()


class _BadTarget(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _header_safe(text: str) -> bytes:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:500].encode("ascii")
