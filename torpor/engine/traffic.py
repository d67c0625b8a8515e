"""The engine's side of sandbox traffic: egress policy and proxy, credential grants,
preview URLs, audit.

Sandboxes have no network interface. Their egress arrives as streams the agent opens on
its channel (see `torpor/agent/netops.py`); this module hands each one to the egress proxy
(`torpor/network/proxy.py`) with the sandbox's policy and credentials, and records what the
proxy decided. Ingress (preview URLs) goes the other way: the preview gateway
(`torpor/network/preview.py`) asks `open_port` for a connection to a port inside a sandbox.

The proxy and the gateway see plain sockets (`torpor/runtime/tunnel.py`), never frames, so
a later netns + netstack driver can give them kernel sockets instead without changing
either, nor the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from torpor.channel import Stream
from torpor.config import Settings
from torpor.engine.keys import KeyStore
from torpor.engine.records import Records
from torpor.engine.secrets import SecretStore, load_or_create_key, new_placeholder
from torpor.engine.states import State
from torpor.errors import Conflict, Invalid, NotFound, TorporError, Unavailable
from torpor.network.ca import CertAuthority
from torpor.network.policy import EgressPolicy, OperatorNet, PolicyError, narrow
from torpor.network.preview import PreviewError, PreviewGateway, Route, TokenSigner
from torpor.network.proxy import Credential, EgressProxy, SandboxNet
from torpor.runtime.tunnel import socket_for
from torpor.store.models import DomainRow, SandboxRow, now
from torpor.templates import TemplateStore

log = logging.getLogger("torpor.network")

PROXY_URL = "http://127.0.0.1:3128"
SOCKS_URL = "socks5h://127.0.0.1:1080"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CA_FILE = "/etc/ssl/certs/torpor-ca.pem"
# what every sandbox's processes get: the proxy, and trust in the installation's CA
SANDBOX_ENV = {
    "HTTP_PROXY": PROXY_URL, "HTTPS_PROXY": PROXY_URL, "http_proxy": PROXY_URL,
    "https_proxy": PROXY_URL, "ALL_PROXY": SOCKS_URL, "all_proxy": SOCKS_URL,
    "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
    "SSL_CERT_FILE": CA_BUNDLE, "REQUESTS_CA_BUNDLE": CA_BUNDLE, "CURL_CA_BUNDLE": CA_BUNDLE,
    "PIP_CERT": CA_BUNDLE, "NODE_EXTRA_CA_CERTS": CA_FILE,
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}$")
AUDIT_FLUSH = 0.5  # seconds between writes of the egress log
PRUNE_EVERY = 3600.0  # seconds between removals of egress records past their retention
TOUCH_EVERY = 1.0  # egress and preview bytes count as activity, at most this often


class Traffic:
    def __init__(self, settings: Settings, records: Records, templates: TemplateStore,
                 secrets: SecretStore, keys: KeyStore, touch: Callable[[str], None],
                 connect: Callable[[str, int], Awaitable[Stream]]):
        self.settings = s = settings
        self.records = records
        self.templates = templates
        self.secrets = secrets
        self.keys = keys
        self.touch = touch  # activity on a sandbox
        self.connect = connect  # (sid, port): a stream to a port in the sandbox, woken
        try:
            self.default_policy = EgressPolicy.parse({"egress": s.default_egress})
            self.build_default = EgressPolicy.parse(
                {"egress": s.build_egress or s.default_egress, "allow": s.build_egress_allow,
                 "deny": s.build_egress_deny})
            self.operator = OperatorNet(
                allow_cidrs=OperatorNet.parse_cidrs(s.egress_allow_cidr),
                resolve=OperatorNet.parse_resolve(s.egress_resolve),
                upstream_ca=[str(p) for p in s.egress_upstream_ca],
                protected_ports={s.port, s.preview_port})
        except (PolicyError, ValueError) as e:
            raise Invalid(f"network settings: {e}") from None
        for ca in self.operator.upstream_ca:
            if not os.path.isfile(ca):
                raise Invalid(f"--egress-upstream-ca {ca}: no such file")
        self.ca = CertAuthority(s.data_dir / "network")
        self.proxy = EgressProxy(self.operator, self.ca, self._audit)
        self.signer = TokenSigner(load_or_create_key(
            s.data_dir / "network" / "preview.key", "preview signing key",
            "restore it from a backup, or delete it (signed preview URLs then stop working)"))
        self.gateway = PreviewGateway(
            domain=s.preview_domain, signer=self.signer, lookup=self._lookup,
            check_api_key=self._check_key, open_upstream=self.open_port,
            on_open=self._touch, on_close=self._touch)
        self._audit_buf: list[dict] = []
        self._egress: dict[str, set[asyncio.Task]] = {}  # open egress connections
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._flusher: asyncio.Task | None = None
        self.trust_in_templates()

    # --- start and stop -----------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if s.preview_port:
            try:
                self._server = await asyncio.start_server(
                    self._preview_client, s.host, s.preview_port, limit=1 << 20)
            except OSError as e:
                raise Unavailable(f"the preview listener cannot listen on {s.host}:"
                                  f"{s.preview_port}: {e.strerror}; choose another port: "
                                  "`make serve PREVIEW_PORT=N`, `torpor serve --preview-port "
                                  "N` or TORPOR_PREVIEW_PORT=N (0 turns previews off)"
                                  ) from None
        self._flusher = asyncio.create_task(self._flush_loop())

    async def _preview_client(self, reader, writer) -> None:
        # tracked, so a stop ends open connections too (Server.close() leaves them)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self.gateway.handle(reader, writer)
        finally:
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._flusher is not None:
            self._flusher.cancel()
        for t in list(self._tasks):
            t.cancel()
        self.flush_audit()

    def trust_in_templates(self) -> None:
        """Put the installation's CA into every template's system store (the sandbox's
        /etc/ssl/certs), written only when it differs."""
        bundle = self.ca.bundle()
        for tpl in self.templates.list():
            certs = tpl.rootfs / "etc/ssl/certs"
            if not certs.is_dir():
                continue
            for name, data in (("ca-certificates.crt", bundle), ("torpor-ca.pem",
                                                                 self.ca.ca_pem)):
                path = certs / name
                try:
                    if path.read_bytes() == data:
                        continue
                except OSError:
                    pass
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_bytes(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)

    # --- a sandbox's settings -------------------------------------------------------------
    def policy(self, given: dict | None, base: dict | None = None) -> dict:
        """The stored form of an egress policy: `given` over `base` (or the default)."""
        default = EgressPolicy.parse(base) if base else self.default_policy
        given = {k: v for k, v in (given or {}).items() if v is not None}
        try:
            return EgressPolicy.parse(given, default=default).to_dict()
        except PolicyError as e:
            raise Invalid(str(e), field=e.field or "network") from None

    def build_policy(self, given: dict | None) -> dict:
        """The stored egress policy of a build's sandboxes: the server's build policy
        (`build_egress*`), narrowed by the build request's `given` (never widened)."""
        try:
            return narrow(self.build_default, given).to_dict()
        except PolicyError as e:
            raise Invalid(str(e), field=e.field or "network") from None

    def grants(self, requested: dict | None, env: dict) -> dict:
        """{env var: secret name} -> {env var: {"secret", "placeholder"}}, checked."""
        out = {}
        for var, name in (requested or {}).items():
            if not ENV_NAME.match(var):
                raise Invalid(f"secrets: {var!r} is not an environment variable name",
                              field=f"secrets.{var}")
            if var in env:
                raise Invalid(f"secrets: {var} is also set in env; a variable holds either "
                              "a value or a secret's placeholder", field=f"secrets.{var}")
            try:
                self.secrets.get(name)
            except NotFound:
                raise Invalid(f"secrets: no secret named {name!r} (create it with POST "
                              "/v1/secrets)", field=f"secrets.{var}") from None
            out[var] = {"secret": name, "placeholder": new_placeholder()}
        return out

    @staticmethod
    def sandbox_env(grants: dict, env: dict) -> dict:
        """What the agent gives every process: proxy and CA settings, the placeholders,
        then the caller's own env on top."""
        return SANDBOX_ENV | {var: g["placeholder"] for var, g in grants.items()} | env

    def context(self, sid: str, credentials: bool = True) -> SandboxNet:
        """The sandbox's policy and (unless not wanted: DNS needs none) its credentials,
        read fresh: a rotated secret applies to the next connection."""
        row = self.records.find(sid)
        network, grants = (dict(row.network or {}), dict(row.secrets or {})) if row \
            else ({}, {})
        policy = EgressPolicy.parse(network, default=self.default_policy)
        creds = []
        values = {}
        if grants and credentials:
            try:
                values = self.secrets.values([g["secret"] for g in grants.values()],
                                                    missing_ok=True)
            except TorporError as e:
                # an unusable key or value: this sandbox's traffic still flows, with the
                # placeholders going out unchanged, and the operator learns why
                log.error("sandbox %s: its secrets cannot be read (%s); requests carry "
                          "placeholders", sid, e)
        for g in grants.values():
            got = values.get(g["secret"])
            if got is None:
                continue  # deleted since: the placeholder goes out unchanged
            value, info = got
            creds.append(Credential(name=info.name, placeholder=g["placeholder"],
                                    value=value, allowed_hosts=list(info.allowed_hosts),
                                    inject_body=info.inject_body))
        return SandboxNet(sandbox_id=sid, policy=policy, credentials=creds,
                          on_activity=lambda: self._touch(sid))

    def update_policy(self, sid: str, given: dict) -> None:
        row = self.records.find(sid)
        current = dict(row.network or {}) if row else {}
        stored = self.policy(given, base=current or None)
        changed = current != stored
        self.records.update(sid, network=stored)
        self.records.event(sid, "network_updated", None, None, "explicit", stored)
        if changed:
            # nothing goes on under the old policy: open connections (a CONNECT tunnel, a
            # keep-alive proxy connection) close, and their clients connect again
            for task in list(self._egress.get(sid, ())):
                task.cancel()

    # --- egress: streams the agent opens ----------------------------------------------------
    def attach(self, sid: str, chan) -> None:
        chan.on_open = lambda st, req: self._spawn(self._serve_stream(sid, st, req))

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, sid: str, st: Stream, req: dict) -> None:
        op = req.get("op")
        task = asyncio.current_task()
        if op == "egress":  # from the start: a policy change meanwhile closes it too
            self._egress.setdefault(sid, set()).add(task)
        tunnel = False
        try:
            ctx = await asyncio.to_thread(self.context, sid, op == "egress")
            self._touch(sid)
            if op == "dns":
                try:
                    query = bytes.fromhex(str(req.get("query")))
                except ValueError:
                    query = b""
                answer = await self.proxy.answer_dns(ctx, query) if query else b""
                st.reply({"answer": answer.hex()})
            elif op == "egress":
                sock = await socket_for(st, on_bytes=lambda n: self._touch(sid))
                tunnel = True  # from here the tunnel ends the stream, after its last byte
                reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
                try:
                    await self.proxy.handle(ctx, reader, writer)
                finally:
                    writer.close()
            else:
                st.reply(error={"code": "unknown_op", "message": f"unknown stream {op!r}"})
        except Exception as e:  # noqa: BLE001 - one connection's trouble stays its own
            log.warning("sandbox %s: %s stream failed: %s", sid, op, e)
            st.reply(error={"code": "internal", "message": f"{op} failed on the host"})
        finally:
            self._egress.get(sid, set()).discard(task)
            if not tunnel:
                st.abandon()  # a no-op once a reply has ended the stream

    def _touch(self, sid: str) -> None:
        t = time.monotonic()
        if t - self._touched.get(sid, 0.0) >= TOUCH_EVERY:
            self._touched[sid] = t
            self.touch(sid)

    # --- audit ------------------------------------------------------------------------------
    def _audit(self, record: dict) -> None:
        self._audit_buf.append(record)

    async def _flush_loop(self) -> None:
        pruned = 0.0
        while True:
            await asyncio.sleep(AUDIT_FLUSH)
            try:
                if self._audit_buf:
                    self.flush_audit()
                if time.monotonic() - pruned > PRUNE_EVERY:
                    pruned = time.monotonic()
                    await asyncio.to_thread(self.prune_audit)
            except Exception:  # keep logging; the next round retries
                log.exception("writing the egress log")

    def prune_audit(self) -> int:
        """Drop egress records older than the retention (`egress_log_days`)."""
        days = self.settings.egress_log_days
        if not days:
            return 0
        return self.records.prune_egress(now() - timedelta(days=days))

    def flush_audit(self) -> None:
        batch, self._audit_buf = self._audit_buf, []
        if not batch:
            return
        self.records.add_egress(batch)

    def egress_log(self, sid: str, limit: int = 100, before: int | None = None) -> list:
        """A sandbox's egress records, newest first. A deleted sandbox's (a build step's,
        say) stay readable until the records' retention ends."""
        row = self.records.find(sid)
        if row is None or row.pooled:
            self.records.get(sid)  # the usual 404
        self.flush_audit()
        return self.records.egress(sid, limit, before)

    def refusals(self, sid: str, limit: int = 5) -> list[str]:
        """The sandbox's latest egress refusals, oldest first, one line each
        ("pypi.org:443 refused: always-deny: ..."), distinct; [] if none."""
        self.flush_audit()
        out: dict[str, None] = {}
        for r in self.records.egress(sid, 200):
            if not r.allowed:
                out.setdefault(f"{r.host}:{r.port} ({r.protocol}) refused: {r.rule}")
                if len(out) == limit:
                    break
        return list(reversed(out))

    # --- preview: connections into the sandbox ---------------------------------------------
    async def open_port(self, sid: str, port: int):
        """A connection to 127.0.0.1:port inside the sandbox, woken first if asleep."""
        try:
            st = await self.connect(sid, port)
        except NotFound:
            raise PreviewError(404, f"no sandbox {sid}") from None
        except TorporError as e:
            raise PreviewError(503, str(e)) from None
        try:
            kind, _ = await asyncio.wait_for(st.events.get(), 30)
        except TimeoutError:
            st.abandon()
            raise PreviewError(504, f"sandbox {sid} did not answer in time") from None
        if kind != "msg":
            err = st.error or {}
            if err.get("code") == "connection_refused":
                raise PreviewError(502, f"no process is listening on port {port} in sandbox "
                                        f"{sid}")
            raise PreviewError(502, f"sandbox {sid}, port {port}: "
                                    f"{err.get('message', 'connection failed')}")
        sock = await socket_for(st, on_bytes=lambda n: self._touch(sid))
        return await asyncio.open_connection(sock=sock, limit=1 << 20)

    async def _lookup(self, host: str) -> Route | None:
        parsed = self.gateway.parse_host(host)
        if parsed is not None:
            port, sid = parsed
            row = self.records.find(sid)
            if row is None or row.pooled or row.state in (State.DELETED, State.FAILED):
                return None
            public = bool((row.ports or {}).get(str(port), {}).get("public"))
            return Route(sid, port, public)
        d = self.records.domain(host.split(":")[0].lower())
        if d is None:
            return None
        return Route(d.sandbox_id, d.port, d.public)

    def _check_key(self, key: str) -> bool:
        try:
            self.keys.check(key)
        except TorporError:
            return False
        return True

    def _previews_on(self) -> None:
        if not self.settings.preview_port:
            raise Unavailable("previews are off on this server (--preview-port 0)")

    def preview_base(self, sid: str, port: int) -> str:
        s = self.settings
        return f"http://{port}-{sid}.{s.preview_domain}:{s.preview_port}/"

    def preview_url(self, sid: str, port: int, expires_in: float) -> dict:
        self._previews_on()
        self.records.get(sid)
        _check_port(port)
        limit = self.settings.preview_max_expiry
        if not 0 < expires_in <= limit:
            raise Invalid(f"expires_in must be more than 0 and at most {limit:.0f} seconds",
                          field="expires_in")
        expires_at = int(time.time() + expires_in)
        token = self.signer.sign(sid, port, expires_at)
        return {"url": f"{self.preview_base(sid, port)}?torpor_token={token}", "token": token,
                "port": port, "expires_at": expires_at}

    def set_port(self, sid: str, port: int, public: bool) -> dict:
        self._previews_on()
        _check_port(port)
        ports = dict(self.records.get(sid).ports or {})
        if public:
            ports[str(port)] = {"public": True}
        else:
            ports.pop(str(port), None)
        self.records.update(sid, ports=ports)
        return {"port": port, "public": public, "url": self.preview_base(sid, port)}

    # --- custom domains ---------------------------------------------------------------------
    def add_domain(self, domain: str, sid: str, port: int, public: bool = False) -> DomainRow:
        self._previews_on()
        domain = domain.strip().lower().rstrip(".")
        if not DOMAIN.match(domain):
            raise Invalid(f"{domain!r} is not a domain name", field="domain")
        if domain == self.settings.preview_domain or domain.endswith(
                "." + self.settings.preview_domain):
            raise Invalid(f"{domain} is inside the preview domain; use the sandbox's preview "
                          "URL", field="domain")
        _check_port(port)
        self.records.get(sid)
        row = DomainRow(domain=domain, sandbox_id=sid, port=port, public=public)
        if not self.records.add_domain(row):
            raise Conflict(f"domain {domain} is already mapped; delete it first",
                           field="domain")
        return row

    def domains(self) -> list[DomainRow]:
        return self.records.domains()

    def remove_domain(self, domain: str) -> None:
        if not self.records.remove_domain(domain.strip().lower().rstrip(".")):
            raise NotFound(f"no domain {domain}")

    def forget(self, sid: str) -> None:
        """A deleted sandbox's domains go with it."""
        self.records.remove_domains_of(sid)
        self._touched.pop(sid, None)
        self._egress.pop(sid, None)
        self.proxy.forget(sid)

    def info(self, row: SandboxRow) -> dict[str, Any]:
        # a stored policy is whole (`policy()` wrote it); a pool sandbox's is still empty
        return {"network": dict(row.network) if row.network else self.default_policy.to_dict(),
                "secrets": {v: g["secret"] for v, g in (row.secrets or {}).items()},
                "ports": {p: dict(v) for p, v in (row.ports or {}).items()}}


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise Invalid("port must be between 1 and 65535", field="port")
