"""The host side of sandbox egress: every TCP connection and DNS query a sandbox makes ends
here, is checked against its policy (see `torpor.network.policy`), and is relayed or refused.

`EgressProxy.handle` speaks SOCKS5 (first byte 0x05) or HTTP proxy (h11) on one stream:
- SOCKS5 CONNECT and HTTP CONNECT without an applicable credential: a byte relay to a
  pinned, checked address.
- HTTP CONNECT to a host where a credential applies: TLS is terminated with a leaf from the
  installation CA and requests are relayed by `HttpRelay`, which swaps placeholders for
  real secrets going up and redacts real secrets coming down.
- Absolute-form plain HTTP requests: relayed by `HttpRelay`, each request checked.

Every connection (byte relays) or request (HTTP) produces one audit record; so does every
DNS query. Secret values never appear in audit records, logs or error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import h11

from torpor.network.ca import CertAuthority
from torpor.network.http_relay import (
    MAX_HEADER_BYTES,
    HttpRelay,
    Tunnel,
    Upstream,
    applicable,
)
from torpor.network.policy import (
    Decision,
    EgressPolicy,
    IPAddress,
    OperatorNet,
    PolicyError,
    decide,
    name_stage,
    normalize_host,
)
from torpor.network.streams import (
    READ_SIZE,
    ConnectError,
    Stream,
    TLSStream,
    connect_pinned,
)

log = logging.getLogger("torpor.egress")

HANDSHAKE_TIMEOUT = 10.0
DNS_TTL = 30
# addresses handed out in DNS answers, remembered so that a client that resolved a name and
# then connects to the bare IP (SOCKS without remote DNS) is judged by the name it asked for
DNS_MEMORY_SECONDS = 600
DNS_MEMORY_PER_SANDBOX = 4096
DNS_MEMORY_SANDBOXES = 1024

SOCKS_OK, SOCKS_FAIL, SOCKS_DENIED, SOCKS_NET_UNREACHABLE = 0, 1, 2, 3
SOCKS_HOST_UNREACHABLE, SOCKS_REFUSED, SOCKS_TTL, SOCKS_BAD_COMMAND, SOCKS_BAD_ATYP = 4, 5, 6, 7, 8


@dataclass
class Credential:
    """A secret the sandbox sees only as `placeholder`; swapped for `value` in requests to
    `allowed_hosts` (policy entry grammar)."""

    name: str
    placeholder: str
    value: str
    allowed_hosts: list[str]
    inject_body: bool = False

    def __repr__(self) -> str:  # never show the value
        return f"Credential(name={self.name!r}, allowed_hosts={self.allowed_hosts!r})"


@dataclass
class SandboxNet:
    """What the proxy needs to know about one sandbox."""

    sandbox_id: str
    policy: EgressPolicy
    credentials: list[Credential] = field(default_factory=list)
    on_activity: Callable[[], None] = lambda: None


class EgressProxy:
    """One per server. `audit(record)` gets one dict per connection, request or DNS query
    (keys: sandbox_id, protocol, host, port, address, method, path, status, allowed, rule,
    bytes_up, bytes_down, secrets, duration_ms). For "socks" records status is the SOCKS
    reply code (0 = succeeded); for "dns" records status is the DNS rcode."""

    def __init__(self, operator: OperatorNet, ca: CertAuthority,
                 audit: Callable[[dict], None]):
        self.operator, self.ca, self._audit = operator, ca, audit
        self.upstream_tls = ssl.create_default_context()
        for path in operator.upstream_ca:
            self.upstream_tls.load_verify_locations(cafile=path)
        self.upstream_tls.set_alpn_protocols(["http/1.1"])
        self._dns_memory: OrderedDict[str, OrderedDict[str, tuple[str, float]]] = OrderedDict()

    # ------------------------------------------------------------ shared helpers

    def emit(self, record: dict) -> None:
        try:
            self._audit(record)
        except Exception:
            log.exception("egress audit callback failed")

    def activity(self, ctx: SandboxNet) -> None:
        try:
            ctx.on_activity()
        except Exception:
            log.exception("egress on_activity callback failed")

    async def decide(self, ctx: SandboxNet, host: str, port: int | None,
                     pinned: list | None = None) -> Decision:
        """The policy decision, plus: a bare IP this proxy handed out in a DNS answer for an
        allowed name is judged by that name (pinned to that IP)."""
        decision = await decide(ctx.policy, self.operator, host, port, pinned)
        if decision.allowed or decision.status != 403 or pinned is not None:
            return decision
        name = self._remembered(ctx.sandbox_id, host)
        if name is None:
            return decision
        via = await decide(ctx.policy, self.operator, name, port,
                           [ipaddress.ip_address(normalize_host(host))])
        if via.allowed:
            via.rule = f"{via.rule} (DNS answer for {name})"
            return via
        return decision

    def _remember(self, sandbox_id: str, name: str, addresses: list[IPAddress]) -> None:
        memory = self._dns_memory.setdefault(sandbox_id, OrderedDict())
        self._dns_memory.move_to_end(sandbox_id)
        while len(self._dns_memory) > DNS_MEMORY_SANDBOXES:
            self._dns_memory.popitem(last=False)
        expiry = time.monotonic() + DNS_MEMORY_SECONDS
        for ip in addresses:
            memory[str(ip)] = (name, expiry)
            memory.move_to_end(str(ip))
        while len(memory) > DNS_MEMORY_PER_SANDBOX:
            memory.popitem(last=False)

    def _remembered(self, sandbox_id: str, host: str) -> str | None:
        try:
            ip = normalize_host(host)
        except PolicyError:
            return None
        hit = self._dns_memory.get(sandbox_id, {}).get(str(ip))
        if hit and hit[1] > time.monotonic():
            return hit[0]
        return None

    def forget(self, sandbox_id: str) -> None:
        """Drop what the proxy remembers about a sandbox (call when it is deleted)."""
        self._dns_memory.pop(sandbox_id, None)

    def _record(self, ctx: SandboxNet, protocol: str, host: str, port: int, **kw) -> dict:
        rec = {"sandbox_id": ctx.sandbox_id, "protocol": protocol, "host": host[:255],
               "port": port, "address": None, "method": None, "path": None, "status": None,
               "allowed": False, "rule": "", "bytes_up": 0, "bytes_down": 0, "secrets": [],
               "duration_ms": 0.0}
        rec.update(kw)
        return rec

    # ------------------------------------------------------------ entry point

    async def handle(self, ctx: SandboxNet, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """Serve one sandbox connection to the end. Never raises; closes writer."""
        client = Stream(reader, writer)
        try:
            first = await client.read(1)
            if first == b"\x05":
                await self._socks(ctx, client)
            elif first:
                await self._http(ctx, client, first)
        except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError,
                ssl.SSLError):
            log.debug("egress %s: connection ended early", ctx.sandbox_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("egress %s: unexpected proxy error", ctx.sandbox_id)
        finally:
            await client.close()

    # ------------------------------------------------------------ HTTP proxy

    async def _http(self, ctx: SandboxNet, client: Stream, first: bytes) -> None:
        cconn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        cconn.receive_data(first)
        relay: HttpRelay

        async def on_connect(request: h11.Request) -> None:
            await self._connect(ctx, client, relay, request)

        relay = HttpRelay(self, ctx, client, cconn, on_connect=on_connect)
        await relay.run()

    async def _connect(self, ctx: SandboxNet, client: Stream, relay: HttpRelay,
                       request: h11.Request) -> None:
        t0 = time.monotonic()
        target = request.target.decode("ascii", "replace")
        rec = self._record(ctx, "connect", target, 0, method="CONNECT")
        relay.rec = rec

        def finish(status: int | None, **kw) -> None:
            rec.update(status=status, duration_ms=round((time.monotonic() - t0) * 1000, 3),
                       **kw)
            self.emit(rec)

        try:
            end = await relay.client_event()
        except h11.RemoteProtocolError:
            end = None
        if not isinstance(end, h11.EndOfMessage):
            rec["rule"] = "CONNECT with a body"
            await relay.send_error(400, "CONNECT must not carry a body")
            return finish(400)
        host, port = _split_authority(target)
        if host is None:
            rec["rule"] = "invalid CONNECT target"
            await relay.send_error(400, f"CONNECT wants host:port, got {target[:200]}")
            return finish(400)
        rec.update(host=host, port=port)
        decision = await self.decide(ctx, host, port)
        rec["rule"] = decision.rule
        if not decision.allowed:
            if decision.status == 403:
                await relay.send_error(403, f"CONNECT {host}:{port} denied ({decision.rule})",
                                   decision.rule)
            else:
                await relay.send_error(decision.status, f"CONNECT {host}:{port}: {decision.rule}")
            return finish(decision.status)
        rec["allowed"] = True
        try:
            upstream, address = await connect_pinned(
                decision.addresses, port, self.operator.connect_timeout)
        except ConnectError as e:
            status = 504 if e.kind == "timeout" else 502
            await relay.send_error(status, f"CONNECT {host}:{port}: {e.message}")
            return finish(status)
        rec["address"] = address
        client.write(relay.cconn.send(h11.Response(
            status_code=200, reason=b"Connection established", headers=[])))
        await client.drain()
        to_up, to_client = relay.cconn.trailing_data[0], b""
        if applicable(ctx.credentials, host, port):
            # intercept only TLS: the client speaks first and sends a handshake record
            if not to_up:
                to_up, to_client = await _first_bytes(client, upstream)
            if to_up[:1] == b"\x16" and not to_client:
                try:
                    return await self._intercept(ctx, client, host, port, decision,
                                                 upstream, address, to_up)
                finally:
                    await upstream.close()
        try:
            upstream.write(to_up)
            client.write(to_client)
            up, down = await relay_bytes(client, upstream, lambda: self.activity(ctx))
        finally:
            await upstream.close()
        return finish(200, bytes_up=up + len(to_up), bytes_down=down + len(to_client))

    async def _intercept(self, ctx: SandboxNet, client: Stream, host: str, port: int,
                         decision: Decision, upstream: Stream, address: str,
                         hello: bytes) -> None:
        """TLS to the client with a leaf from our CA, TLS to the upstream (verified), and
        the HTTP relay in between. Audits per request, or once if the handshake fails."""
        name = str(normalize_host(host))
        try:
            tls = TLSStream(client, self.ca.server_context(name), server_side=True,
                            initial=hello)
            await tls.handshake(HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            self.emit(self._record(ctx, "https", host, port, address=address, allowed=True,
                                   method="CONNECT", rule=f"{decision.rule}; client TLS "
                                   f"handshake failed ({reason}): does the sandbox trust "
                                   "the Torpor egress CA?"))
            return
        up: Upstream | None = None
        upstream_tls = TLSStream(upstream, self.upstream_tls, server_side=False,
                                 server_hostname=name)
        try:
            await upstream_tls.handshake(self.operator.connect_timeout)
            up = Upstream(name, port, address, upstream_tls)
        except (ssl.SSLError, OSError, TimeoutError):
            pass  # the relay reconnects per request and tells the client why it failed
        relay = HttpRelay(self, ctx, tls, h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES),
            tunnel=Tunnel(name, port, decision, up))
        await relay.run()
        await tls.close()

    # ------------------------------------------------------------ SOCKS5

    async def _socks(self, ctx: SandboxNet, client: Stream) -> None:
        t0 = time.monotonic()
        reader = client.reader

        async def read(n: int) -> bytes:
            return await asyncio.wait_for(reader.readexactly(n), HANDSHAKE_TIMEOUT)

        def refused(why: str, code: int | None = None) -> None:
            # no destination yet, but the attempt is on record all the same
            self.emit(self._record(ctx, "socks", "?", 0, rule=why, status=code,
                                   duration_ms=round((time.monotonic() - t0) * 1000, 3)))

        methods = await read((await read(1))[0])
        if 0 not in methods:
            client.write(b"\x05\xff")  # no acceptable method: only "no authentication"
            await client.drain()
            return refused("SOCKS5 without authentication only", 0xFF)
        client.write(b"\x05\x00")
        ver, cmd, _rsv, atyp = await read(4)
        if ver != 5:
            return refused(f"bad SOCKS version {ver}")
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await read(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await read(16)))
        elif atyp == 3:
            host = (await read((await read(1))[0])).decode("utf-8", "replace")
        else:
            await _socks_reply(client, SOCKS_BAD_ATYP)
            return refused(f"bad SOCKS address type {atyp}", SOCKS_BAD_ATYP)
        port = struct.unpack("!H", await read(2))[0]
        rec = self._record(ctx, "socks", host, port, method="CONNECT")

        def finish(code: int, **kw) -> None:
            rec.update(status=code, duration_ms=round((time.monotonic() - t0) * 1000, 3),
                       **kw)
            self.emit(rec)

        if cmd != 1:
            rec["rule"] = "only SOCKS CONNECT is supported"
            await _socks_reply(client, SOCKS_BAD_COMMAND)
            return finish(SOCKS_BAD_COMMAND)
        decision = await self.decide(ctx, host, port)
        rec["rule"] = decision.rule
        if not decision.allowed:
            # cannot resolve: "host unreachable"; refused by policy or invalid: "not allowed"
            code = SOCKS_HOST_UNREACHABLE if decision.status == 502 else SOCKS_DENIED
            await _socks_reply(client, code)
            return finish(code)
        rec["allowed"] = True
        try:
            upstream, address = await connect_pinned(
                decision.addresses, port, self.operator.connect_timeout)
        except ConnectError as e:
            code = {"refused": SOCKS_REFUSED, "timeout": SOCKS_TTL}.get(
                e.kind, SOCKS_NET_UNREACHABLE)
            rec["rule"] = f"{decision.rule}; {e.message}"
            await _socks_reply(client, code)
            return finish(code)
        rec["address"] = address
        try:
            await _socks_reply(client, SOCKS_OK)
            up, down = await relay_bytes(client, upstream, lambda: self.activity(ctx))
        finally:
            await upstream.close()
        finish(SOCKS_OK, bytes_up=up, bytes_down=down)

    # ------------------------------------------------------------ DNS

    async def answer_dns(self, ctx: SandboxNet, query: bytes) -> bytes:
        """A wire-format answer to a wire-format query, or b"" to drop garbage. A/AAAA for
        allowed names carry only allowed addresses (TTL 30); denied names get NXDOMAIN."""
        t0 = time.monotonic()
        try:
            msg = dns.message.from_wire(query)
        except (dns.exception.DNSException, ValueError, IndexError, struct.error):
            return b""
        if msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.QUERY \
                or len(msg.question) != 1:
            return b""
        q = msg.question[0]
        resp = dns.message.make_response(msg)
        resp.flags |= dns.flags.RA
        name = q.name.to_text(omit_final_dot=True)
        qtype = dns.rdatatype.to_text(q.rdtype)
        rec = self._record(ctx, "dns", name, 53, method=qtype)
        if q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            decision = await self.decide(ctx, name, None)
        else:  # other types: only say whether the name may be used at all
            try:
                verdict = name_stage(ctx.policy, normalize_host(name), None)
                decision = Decision(verdict.allowed is not False, verdict.rule)
            except PolicyError as e:
                decision = Decision(False, f"invalid host: {e.message}")
        rec.update(allowed=decision.allowed, rule=decision.rule)
        if not decision.allowed:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        elif q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            version = 4 if q.rdtype == dns.rdatatype.A else 6
            addrs = [str(a) for a in decision.addresses if a.version == version]
            if addrs:
                resp.answer.append(dns.rrset.from_text_list(
                    q.name, DNS_TTL, dns.rdataclass.IN, q.rdtype, addrs))
                rec["address"] = addrs[0]
            self._remember(ctx.sandbox_id, str(normalize_host(name)), decision.addresses)
        rec.update(status=resp.rcode(),
                   duration_ms=round((time.monotonic() - t0) * 1000, 3))
        self.emit(rec)
        return resp.to_wire()


def _split_authority(target: str) -> tuple[str | None, int]:
    """"host:port" or "[v6]:port" -> (host, port); (None, 0) if malformed."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None, 0
    if host.startswith("[") != host.endswith("]"):
        return None, 0
    return host.strip("[]"), int(port)


async def _first_bytes(client: Stream, upstream: Stream) -> tuple[bytes, bytes]:
    """Wait until either side sends: (client's bytes, upstream's bytes), one possibly b""."""
    tasks = [asyncio.create_task(client.read(READ_SIZE)),
             asyncio.create_task(upstream.read(READ_SIZE))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
    return tuple(t.result() if t.done() and not t.cancelled() else b"" for t in tasks)


async def _socks_reply(client: Stream, code: int) -> None:
    client.write(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
    await client.drain()


async def relay_bytes(a: Stream, b: Stream, on_activity: Callable[[], None]
                      ) -> tuple[int, int]:
    """Copy both ways until both directions ended (half-closes are passed on) or either
    side failed. Returns (bytes a->b, bytes b->a)."""
    counts = [0, 0]

    async def pump(src: Stream, dst: Stream, i: int) -> None:
        while True:
            data = await src.read(READ_SIZE)
            if not data:
                dst.write_eof()
                return
            dst.write(data)
            counts[i] += len(data)
            on_activity()
            await dst.drain()

    tasks = {asyncio.create_task(pump(a, b, 0)), asyncio.create_task(pump(b, a, 1))}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    return counts[0], counts[1]

