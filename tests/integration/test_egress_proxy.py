"""The egress proxy over real loopback sockets: HTTP proxy, CONNECT (relay and TLS
interception with credential swap), SOCKS5, DNS answers, audit records and the CA.

Upstreams are threaded loopback servers; names reach them through the operator's static
resolve map. Nothing here touches any address but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import socket
import ssl
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from torpor.network.ca import CertAuthority
from torpor.network.http_relay import Redactor, swap_headers
from torpor.network.policy import EgressPolicy, OperatorNet
from torpor.network.proxy import Credential, EgressProxy, SandboxNet

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
SECRET = "sk-real-secret-value-0123456789"
PLACEHOLDER = "TORPOR_PLACEHOLDER_OPENAI_abc123"
BASIC_SECRET = "hunter2-real"
BASIC_PLACEHOLDER = "TORPOR_PLACEHOLDER_PASS_xyz"
BIG = 32 * 1024 * 1024

# ------------------------------------------------------------------ upstream servers


class Echo(BaseHTTPRequestHandler):
    """Records each request and answers with it as JSON. /reflect also reflects the
    Authorization header into a response header; /big?n streams n bytes."""

    protocol_version = "HTTP/1.1"
    log: ClassVar[list] = []

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self):
        body = self._body()
        rec = {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
               "body": body.decode("latin-1"), "port": self.server.server_address[1]}
        Echo.log.append(rec)
        if self.path.startswith("/big"):
            n = int(self.path.split("?")[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"x" * (256 * 1024)
            while n > 0:
                self.wfile.write(chunk[:n])
                n -= len(chunk)
            return
        out = json.dumps(rec).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.path.startswith("/reflect"):
            self.send_header("X-Echo-Auth", self.headers.get("Authorization", ""))
            self.send_header("Content-Length", str(len(out)))
        elif self.path.startswith("/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.path.startswith("/chunked"):
            # one byte per chunk: a secret echoed back is split across many reads
            for i in range(len(out)):
                self.wfile.write(b"1\r\n" + out[i:i + 1] + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_HEAD = _serve


def make_test_ca(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A test CA (for the HTTPS upstream) and a server context for the upstream."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream test CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
          .sign(key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("api.example.test"),
                                       x509.DNSName("secure.example.test"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream")]))
            .issuer_name(name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                key.public_key()), False)
            .sign(key, hashes.SHA256()))
    ca_path = tmp / "upstream-ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = tmp / "upstream-leaf.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain)
    return ca_path, ctx


def start_tcp_echo() -> int:
    """A raw TCP server that echoes bytes, or serves N bytes after 'GET N\\n'."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            data = conn.recv(65536)
            if data.startswith(b"GET "):
                n = int(data.split()[1])
                block = b"y" * (256 * 1024)
                while n > 0:
                    conn.sendall(block[:n])
                    n -= len(block)
                return
            while data:
                conn.sendall(data)
                data = conn.recv(65536)

    def accept():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


class Env:
    """Servers and a background event loop running proxy listeners."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.ca_path, server_ctx = make_test_ca(tmp)
        self.https = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        self.https.daemon_threads = True
        self.https.socket = server_ctx.wrap_socket(self.https.socket, server_side=True)
        threading.Thread(target=self.https.serve_forever, daemon=True).start()
        self.http_port = self.http.server_address[1]
        self.https_port = self.https.server_address[1]
        self.echo_port = start_tcp_echo()
        self.ca = CertAuthority(tmp / "egress-ca")
        (tmp / "egress-bundle.pem").write_bytes(self.ca.ca_pem)
        self.audit: list[dict] = []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        resolve = OperatorNet.parse_resolve([
            "api.example.test=127.0.0.1", "other.example.test=127.0.0.1",
            "secure.example.test=127.0.0.1", "example.test=127.0.0.1",
            "deep.a.example.test=127.0.0.1", "rebind.example.test=10.1.2.3",
            "evil.test=127.0.0.1"])
        self.operator = OperatorNet(allow_cidrs=LOOPBACK, resolve=resolve,
                                    upstream_ca=[str(self.ca_path)], protected_ports={7070},
                                    connect_timeout=3)
        self.strict = OperatorNet(allow_cidrs=[], resolve=resolve, protected_ports=set())

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def proxy(self, policy: dict | None = None, credentials=(), operator=None,
              sandbox_id="sb1") -> tuple[int, EgressProxy, SandboxNet]:
        proxy = EgressProxy(operator or self.operator, self.ca, self.audit.append)
        ctx = SandboxNet(sandbox_id, EgressPolicy.parse(policy), list(credentials))

        async def start():
            return await asyncio.start_server(lambda r, w: proxy.handle(ctx, r, w),
                                              "127.0.0.1", 0)

        server = self.run(start())
        return server.sockets[0].getsockname()[1], proxy, ctx

    def records(self, sandbox_id: str, n: int = 1, timeout: float = 5) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [r for r in self.audit if r["sandbox_id"] == sandbox_id]
            if len(got) >= n:
                return got
            time.sleep(0.01)
        return [r for r in self.audit if r["sandbox_id"] == sandbox_id]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("egress"))
    yield e
    e.loop.call_soon_threadsafe(e.loop.stop)
    e.http.shutdown()
    e.https.shutdown()


@pytest.fixture(autouse=True)
def _clear_log():
    Echo.log.clear()


def client(port: int, **kw) -> httpx.Client:
    return httpx.Client(proxy=f"http://127.0.0.1:{port}", trust_env=False, timeout=10, **kw)


def raw(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
            if not read_until_close and b"\r\n\r\n" in out:
                return out


def connect_tunnel(port: int, target: str) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


# ------------------------------------------------------------------ CONNECT


def test_connect_relays_bytes_and_audits(env):
    port, _, _ = env.proxy(sandbox_id="relay")
    s, head = connect_tunnel(port, f"api.example.test:{env.echo_port}")
    assert head.startswith(b"HTTP/1.1 200 Connection established\r\n")
    s.sendall(b"hello through the tunnel")
    got = b""
    while len(got) < 24:
        got += s.recv(100)
    assert got == b"hello through the tunnel"
    s.shutdown(socket.SHUT_WR)
    assert s.recv(100) == b""
    s.close()
    (rec,) = env.records("relay")
    assert rec["protocol"] == "connect" and rec["allowed"] and rec["status"] == 200
    assert rec["host"] == "api.example.test" and rec["port"] == env.echo_port
    assert rec["address"] == "127.0.0.1" and rec["rule"] == "allow-all"
    assert rec["bytes_up"] == 24 and rec["bytes_down"] == 24
    assert rec["secrets"] == [] and rec["duration_ms"] > 0


def test_connect_pipelined_bytes_are_relayed(env):
    port, _, _ = env.proxy()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        target = f"api.example.test:{env.echo_port}"
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly".encode())
        out = b""
        while not out.endswith(b"early"):
            chunk = s.recv(4096)
            assert chunk
            out += chunk
    assert out == b"HTTP/1.1 200 Connection established\r\n\r\nearly"


def test_connect_denied_403(env):
    port, _, _ = env.proxy({"egress": "deny-all", "allow": ["*.example.test"]},
                           sandbox_id="deny403")
    out = raw(port, b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"content-type: text/plain" in head.lower()
    assert b"\r\nx-torpor-egress-rule: deny-all: no allow rule matches evil.test" in head.lower()
    assert body == b"torpor egress: CONNECT evil.test:443 denied " \
                   b"(deny-all: no allow rule matches evil.test)\n"
    (rec,) = env.records("deny403")
    assert rec["status"] == 403 and not rec["allowed"]
    assert rec["rule"] == "deny-all: no allow rule matches evil.test"


@pytest.mark.parametrize(("policy", "target", "allowed", "rule"), [
    ({"egress": "deny-all", "allow": ["*.example.test"]}, "deep.a.example.test", True,
     "allow: *.example.test"),
    ({"egress": "deny-all", "allow": ["*.example.test"]}, "example.test", False,
     "deny-all: no allow rule matches example.test"),
    ({"egress": "deny-all", "allow": ["api.example.test:{echo}"]}, "api.example.test", True,
     "allow: api.example.test:{echo}"),
    ({"egress": "deny-all", "allow": ["api.example.test:1"]}, "api.example.test", False,
     "deny-all: no allow rule matches api.example.test"),
    ({"egress": "deny-all", "allow": ["*.example.test"], "deny": ["api.example.test"]},
     "api.example.test", False, "deny: api.example.test"),
    ({"egress": "deny-all", "allow": ["127.0.0.0/24"]}, "other.example.test", True,
     "allow: 127.0.0.0/24"),
    ({"egress": "deny-all", "allow": ["127.0.0.1"]}, "127.0.0.1", True, "allow: 127.0.0.1"),
    ({"deny": ["127.0.0.0/8"]}, "api.example.test", False, "deny: 127.0.0.0/8"),
    ({}, "rebind.example.test", False, "always-deny: 10.0.0.0/8 private range (10.1.2.3)"),
    ({}, "127.0.0.1:7070", False, "server port 7070"),
])
def test_connect_rule_kinds(env, policy, target, allowed, rule):
    policy = json.loads(json.dumps(policy).replace("{echo}", str(env.echo_port)))
    rule = rule.replace("{echo}", str(env.echo_port))
    port, _, _ = env.proxy(policy)
    if ":" not in target:
        target = f"{target}:{env.echo_port}"
    s, head = connect_tunnel(port, target)
    s.close()
    assert head.startswith(b"HTTP/1.1 200 " if allowed else b"HTTP/1.1 403 "), head
    if not allowed:
        assert f"x-torpor-egress-rule: {rule}\r\n".encode() in head.lower()


@pytest.mark.parametrize(("target", "why"), [
    ("10.0.0.1:443", "10.0.0.0/8 private range"),
    ("169.254.169.254:80", "169.254.0.0/16 link-local range"),
    ("[::ffff:127.0.0.1]:{echo}", "127.0.0.0/8 loopback range"),
    ("0x7f.1:{echo}", "127.0.0.0/8 loopback range"),
    ("2130706433:{echo}", "127.0.0.0/8 loopback range"),
    ("api.example.test:{echo}", "127.0.0.0/8 loopback range"),
    ("rebind.example.test:443", "10.0.0.0/8 private range (10.1.2.3)"),
])
def test_always_deny_without_operator_allow(env, target, why):
    port, _, _ = env.proxy(operator=env.strict)
    s, head = connect_tunnel(port, target.replace("{echo}", str(env.echo_port)))
    s.close()
    assert head.startswith(b"HTTP/1.1 403 "), head
    assert b"x-torpor-egress-rule: always-deny: " + why.encode() in head.lower()


def test_connect_unresolvable_and_refused(env):
    port, _, _ = env.proxy()
    out = raw(port, b"CONNECT nowhere.invalid:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert out.endswith(b"\r\n\r\ntorpor egress: CONNECT nowhere.invalid:443: "
                        b"cannot resolve nowhere.invalid\n")
    closed = socket.create_server(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()
    out = raw(port, f"CONNECT api.example.test:{dead} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 502 ") and b"connection refused" in out
    out = raw(port, b"CONNECT no-port-here HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")


def test_connect_throughput(env):
    port, _, _ = env.proxy(sandbox_id="fast")
    s, head = connect_tunnel(port, f"api.example.test:{env.echo_port}")
    assert head.startswith(b"HTTP/1.1 200 ")
    t0 = time.monotonic()
    s.sendall(f"GET {BIG}\n".encode())
    got = 0
    buf = bytearray(1024 * 1024)
    while got < BIG:
        n = s.recv_into(buf)
        assert n
        got += n
    elapsed = time.monotonic() - t0
    s.close()
    assert got == BIG
    # well above 50 MiB/s on a quiet machine; the bound here only catches gross regressions
    assert BIG / elapsed > 20 * 1024 * 1024, f"{BIG / elapsed / 2**20:.0f} MiB/s"
    (rec,) = env.records("fast")
    assert rec["bytes_down"] == BIG


# ------------------------------------------------------------------ plain HTTP


def test_plain_http_absolute_form_and_audit(env):
    port, _, _ = env.proxy(sandbox_id="plain")
    with client(port) as c:
        r = c.post(f"http://api.example.test:{env.http_port}/hello?x=1", content=b"abc",
                   headers={"Proxy-Authorization": "Basic eDp5", "X-Keep": "yes",
                            "Connection": "X-Drop", "X-Drop": "gone"})
    assert r.status_code == 200
    seen = r.json()
    assert seen["path"] == "/hello?x=1" and seen["body"] == "abc"
    hdrs = seen["headers"]
    assert hdrs["host"] == f"api.example.test:{env.http_port}"
    assert hdrs["x-keep"] == "yes"
    assert "proxy-authorization" not in hdrs and "x-drop" not in hdrs
    (rec,) = env.records("plain")
    assert rec["protocol"] == "http" and rec["method"] == "POST" and rec["status"] == 200
    assert rec["path"] == "/hello?x=1" and rec["address"] == "127.0.0.1"
    assert rec["bytes_up"] > 3 and rec["bytes_down"] > len(r.content)


def test_keepalive_host_switch_rechecks_policy(env):
    port, _, _ = env.proxy({"egress": "deny-all", "allow": ["api.example.test"]},
                           sandbox_id="switch")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(f"GET http://api.example.test:{env.http_port}/one HTTP/1.1\r\n"
                  f"Host: api.example.test\r\n\r\n".encode())
        assert f.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)
        # same connection, another host: checked again and refused
        s.sendall(f"GET http://other.example.test:{env.http_port}/two HTTP/1.1\r\n"
                  f"Host: api.example.test\r\n\r\n".encode())
        status = f.readline()
        rest = f.read()
    assert status.startswith(b"HTTP/1.1 403")
    assert b"deny-all: no allow rule matches other.example.test" in rest
    assert [r["path"] for r in Echo.log] == ["/one"]
    recs = env.records("switch", 2)
    assert [(r["host"], r["allowed"]) for r in recs] == [("api.example.test", True),
                                                         ("other.example.test", False)]


def test_not_a_proxy_request_and_https_absolute(env):
    port, _, _ = env.proxy()
    out = raw(port, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"set HTTP_PROXY" in out
    out = raw(port, b"GET https://api.example.test/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"CONNECT" in out


@pytest.mark.parametrize("request_bytes", [
    (b"POST http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://api.example.test:{p}/smuggled "
     b"HTTP/1.1\r\nHost: a\r\n\r\n"),
    (b"POST http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
     b"Content-Length: 40\r\n\r\nabcd"),
    b"GET http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\nX-Bad: a\x00b\r\n\r\n",
    b"GET http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\nX-Bad : b\r\n\r\n",
    (b"POST http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\n"
     b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    b"GET http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    b"POST http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST http://api.example.test:{p}/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1,2\r\n\r\n",
])
def test_smuggling_attempts_get_400(env, request_bytes):
    port, _, _ = env.proxy()
    out = raw(port, request_bytes.replace(b"{p}", str(env.http_port).encode()))
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert not any(r["path"] == "/smuggled" for r in Echo.log)
    assert env.audit[-1]["status"] == 400 and not env.audit[-1]["allowed"]


# ------------------------------------------------------------------ credentials


def creds(allowed=("api.example.test",), inject_body=False) -> list[Credential]:
    return [Credential("OPENAI_KEY", PLACEHOLDER, SECRET, list(allowed), inject_body),
            Credential("PASS", BASIC_PLACEHOLDER, BASIC_SECRET, list(allowed))]


def test_header_injection_plain_http_only_for_allowed_host(env):
    port, _, _ = env.proxy(credentials=creds(), sandbox_id="inject")
    basic = base64.b64encode(f"user:{BASIC_PLACEHOLDER}".encode()).decode()
    with client(port) as c:
        r1 = c.get(f"http://api.example.test:{env.http_port}/a?key={PLACEHOLDER}",
                   headers={"Authorization": f"Bearer {PLACEHOLDER}"})
        r2 = c.get(f"http://api.example.test:{env.http_port}/b",
                   headers={"Authorization": f"Basic {basic}"})
        r3 = c.get(f"http://other.example.test:{env.http_port}/c",
                   headers={"Authorization": f"Bearer {PLACEHOLDER}"})
    assert r1.status_code == r2.status_code == r3.status_code == 200
    up1, up2, up3 = Echo.log
    assert up1["headers"]["authorization"] == f"Bearer {SECRET}"
    assert up1["path"] == f"/a?key={PLACEHOLDER}"  # never in the URL
    assert base64.b64decode(up2["headers"]["authorization"][6:]) == \
        f"user:{BASIC_SECRET}".encode()
    assert up3["headers"]["authorization"] == f"Bearer {PLACEHOLDER}"  # foreign host
    # what came back to the sandbox has placeholders only
    for r in (r1, r2, r3):
        assert SECRET not in r.text and BASIC_SECRET not in r.text
        assert BASIC_SECRET.encode() not in base64.b64decode(basic)
    assert r1.json()["headers"]["authorization"] == f"Bearer {PLACEHOLDER}"
    recs = env.records("inject", 3)
    assert [r["secrets"] for r in recs] == [["OPENAI_KEY"], ["PASS"], []]
    assert SECRET not in json.dumps(env.audit) and BASIC_SECRET not in json.dumps(env.audit)


def test_intercepted_https_injects_and_redacts(env):
    port, _, _ = env.proxy(credentials=creds(), sandbox_id="mitm")
    trust = ssl.create_default_context(cafile=str(env.tmp / "egress-bundle.pem"))
    with client(port, verify=trust) as c:
        r = c.get(f"https://api.example.test:{env.https_port}/reflect?k={PLACEHOLDER}",
                  headers={"Authorization": f"Bearer {PLACEHOLDER}",
                           "Host": "evil.test"})
        r2 = c.get(f"https://api.example.test:{env.https_port}/chunked",
                   headers={"Authorization": f"Bearer {PLACEHOLDER}"})
        r3 = c.post(f"https://api.example.test:{env.https_port}/body",
                    content=f'{{"key": "{PLACEHOLDER}"}}'.encode())
    assert r.status_code == r3.status_code == 200
    up = Echo.log[0]
    assert up["headers"]["authorization"] == f"Bearer {SECRET}"
    assert up["headers"]["host"] == f"api.example.test:{env.https_port}"  # not evil.test
    assert up["path"] == f"/reflect?k={PLACEHOLDER}"
    # the upstream echoed the secret in a header and the body: the sandbox sees placeholders
    assert r.headers["x-echo-auth"] == f"Bearer {PLACEHOLDER}"
    assert SECRET not in r.text and PLACEHOLDER in r.text
    # split across one-byte chunks
    assert SECRET not in r2.text and r2.json()["headers"]["authorization"] == \
        f"Bearer {PLACEHOLDER}"
    assert Echo.log[1]["headers"]["authorization"] == f"Bearer {SECRET}"
    # inject_body is off: the body goes out as sent
    assert Echo.log[2]["body"] == f'{{"key": "{PLACEHOLDER}"}}'
    recs = env.records("mitm", 3)
    assert [r["protocol"] for r in recs] == ["https"] * 3
    assert recs[0]["secrets"] == ["OPENAI_KEY"] and recs[2]["secrets"] == []
    assert recs[0]["address"] == "127.0.0.1"


def test_body_injection(env):
    port, _, _ = env.proxy(credentials=creds(inject_body=True), sandbox_id="body")
    trust = ssl.create_default_context(cafile=str(env.tmp / "egress-bundle.pem"))
    payload = f'{{"key": "{PLACEHOLDER}", "again": "{PLACEHOLDER}"}}'.encode()
    with client(port, verify=trust) as c:
        r = c.post(f"https://api.example.test:{env.https_port}/body", content=payload)
        gz = c.post(f"https://api.example.test:{env.https_port}/gz", content=payload,
                    headers={"Content-Encoding": "gzip"})
        chunked = c.post(f"https://api.example.test:{env.https_port}/chunk",
                         content=iter([payload[:10], payload[10:]]))
    assert r.status_code == gz.status_code == chunked.status_code == 200
    sent = Echo.log[0]
    assert sent["body"] == payload.decode().replace(PLACEHOLDER, SECRET)
    assert int(sent["headers"]["content-length"]) == len(sent["body"])
    assert Echo.log[1]["body"] == payload.decode()  # compressed bodies are left alone
    assert Echo.log[2]["body"] == payload.decode().replace(PLACEHOLDER, SECRET)
    assert SECRET not in r.text
    assert [x["secrets"] for x in env.records("body", 3)] == [["OPENAI_KEY"], [],
                                                              ["OPENAI_KEY"]]


def test_body_injection_limit_and_100_continue(env):
    port, _, _ = env.proxy(credentials=creds(inject_body=True), sandbox_id="limit")
    url = f"http://api.example.test:{env.http_port}/up"
    out = raw(port, f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n"
              .encode())
    assert out.startswith(b"HTTP/1.1 413 ") and b"8 MiB" in out
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(PLACEHOLDER)}\r\n"
                  f"Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")
        s.sendall(PLACEHOLDER.encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 ") and SECRET.encode() not in out
    assert Echo.log[0]["body"] == SECRET and "expect" not in Echo.log[0]["headers"]


def test_connect_without_applicable_credential_is_not_intercepted(env):
    port, _, _ = env.proxy(credentials=creds(allowed=["other.example.test"]),
                           sandbox_id="passthru")
    upstream_trust = ssl.create_default_context(cafile=str(env.ca_path))
    with client(port, verify=upstream_trust) as c:  # trusts only the upstream's own CA
        r = c.get(f"https://secure.example.test:{env.https_port}/x",
                  headers={"Authorization": f"Bearer {PLACEHOLDER}"})
    assert r.status_code == 200
    assert Echo.log[0]["headers"]["authorization"] == f"Bearer {PLACEHOLDER}"
    (rec,) = env.records("passthru")
    assert rec["protocol"] == "connect" and rec["bytes_down"] > 0


def test_credential_host_non_tls_traffic_is_relayed(env):
    port, _, _ = env.proxy(credentials=creds(allowed=["api.example.test"]), sandbox_id="nontls")
    s, head = connect_tunnel(port, f"api.example.test:{env.echo_port}")
    assert head.startswith(b"HTTP/1.1 200 ")
    s.sendall(f"plain {PLACEHOLDER}".encode())
    got = b""
    while len(got) < 6 + len(PLACEHOLDER):
        got += s.recv(100)
    s.close()
    assert got == f"plain {PLACEHOLDER}".encode()  # not TLS: relayed untouched
    (rec,) = env.records("nontls")
    assert rec["protocol"] == "connect"


def test_intercepted_upstream_tls_failure_is_502(env):
    port, _, _ = env.proxy(credentials=creds(), sandbox_id="uptls")
    trust = ssl.create_default_context(cafile=str(env.tmp / "egress-bundle.pem"))
    with client(port, verify=trust) as c:
        # the upstream at this port speaks plain HTTP, not TLS
        r = c.get(f"https://api.example.test:{env.http_port}/x")
    assert r.status_code == 502 and "TLS" in r.text
    (rec,) = env.records("uptls")
    assert rec["protocol"] == "https" and rec["status"] == 502


def test_intercept_with_untrusting_client_fails_cleanly(env):
    port, _, _ = env.proxy(credentials=creds(), sandbox_id="untrusted")
    with client(port) as c, pytest.raises(httpx.ConnectError):
        c.get(f"https://api.example.test:{env.https_port}/x")
    (rec,) = env.records("untrusted")
    assert "client TLS handshake failed" in rec["rule"] and "trust" in rec["rule"]


# ------------------------------------------------------------------ SOCKS5


def socks(port: int, atyp: int, addr: bytes, dport: int, cmd: int = 1):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(bytes([5, cmd, 0, atyp]) + addr + struct.pack("!H", dport))
    reply = s.recv(10)
    return s, reply[1]


def test_socks5(env):
    port, _, _ = env.proxy({"egress": "deny-all", "allow": ["api.example.test"]},
                           sandbox_id="socks")
    name = b"api.example.test"
    s, code = socks(port, 3, bytes([len(name)]) + name, env.echo_port)
    assert code == 0
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    s.close()
    s, code = socks(port, 3, b"\x09evil.test", env.echo_port)
    s.close()
    assert code == 2
    s, code = socks(port, 1, socket.inet_aton("127.0.0.1"), env.echo_port)
    s.close()
    assert code == 2  # deny-all: the bare IP matches no rule
    s, code = socks(port, 3, bytes([len(name)]) + name, env.echo_port, cmd=2)
    s.close()
    assert code == 7
    s, code = socks(port, 3, b"\x0fnowhere.invalid", 443)
    s.close()
    assert code == 2  # deny-all: the unknown name is refused before any lookup
    recs = env.records("socks", 5)
    assert recs[0]["protocol"] == "socks" and recs[0]["bytes_up"] == 4
    assert recs[0]["bytes_down"] == 4 and recs[0]["status"] == 0
    assert [r["allowed"] for r in recs] == [True, False, False, False, False]
    port, _, _ = env.proxy(operator=env.strict)
    s, code = socks(port, 4, socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1"), 80)
    s.close()
    assert code == 2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x05\x01\x02")  # username/password only: refused
        assert s.recv(2) == b"\x05\xff"
    deadline = time.monotonic() + 5  # the refusal is on record too
    while not [r for r in env.audit if r["rule"] == "SOCKS5 without authentication only"]:
        assert time.monotonic() < deadline, "no audit record of the refused handshake"
        time.sleep(0.01)


# ------------------------------------------------------------------ DNS


def ask(env, proxy, ctx, name: str, qtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    return dns.message.from_wire(env.run(proxy.answer_dns(ctx, q.to_wire())))


def test_dns(env):
    _, proxy, ctx = env.proxy({"egress": "deny-all", "allow": ["*.example.test"]},
                              sandbox_id="dns")
    r = ask(env, proxy, ctx, "api.example.test")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.QR
    (rrset,) = r.answer
    assert [x.address for x in rrset] == ["127.0.0.1"] and rrset.ttl == 30
    assert ask(env, proxy, ctx, "evil.test").rcode() == dns.rcode.NXDOMAIN
    assert ask(env, proxy, ctx, "example.test").rcode() == dns.rcode.NXDOMAIN
    r = ask(env, proxy, ctx, "api.example.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    r = ask(env, proxy, ctx, "api.example.test", "MX")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    assert ask(env, proxy, ctx, "evil.test", "TXT").rcode() == dns.rcode.NXDOMAIN
    assert env.run(proxy.answer_dns(ctx, b"\x00\x01garbage")) == b""
    assert env.run(proxy.answer_dns(ctx, b"")) == b""
    recs = env.records("dns", 6)
    assert recs[0]["protocol"] == "dns" and recs[0]["method"] == "A"
    assert recs[0]["allowed"] and recs[0]["rule"] == "allow: *.example.test"
    assert not recs[1]["allowed"] and recs[1]["rule"].startswith("deny-all")
    # a rebinding name gets NXDOMAIN: its only address is private
    _, proxy, ctx = env.proxy(operator=env.strict)
    assert ask(env, proxy, ctx, "rebind.example.test").rcode() == dns.rcode.NXDOMAIN


def test_dns_answer_lets_bare_ip_through(env):
    # a client that resolves names itself then connects to the IP (socks5:// not socks5h://)
    port, proxy, ctx = env.proxy({"egress": "deny-all", "allow": ["api.example.test"]},
                                 sandbox_id="dnsip")
    ip = socket.inet_aton("127.0.0.1")
    s, code = socks(port, 1, ip, env.echo_port)
    s.close()
    assert code == 2
    ask(env, proxy, ctx, "api.example.test")
    s, code = socks(port, 1, ip, env.echo_port)
    s.close()
    assert code == 0
    rec = env.records("dnsip", 3)[-1]
    assert rec["rule"] == "allow: api.example.test (DNS answer for api.example.test)"


# ------------------------------------------------------------------ CA and units


def test_ca_persists_and_signs_verifiable_leaves(tmp_path):
    a = CertAuthority(tmp_path / "ca")
    b = CertAuthority(tmp_path / "ca")
    assert a.ca_pem == b.ca_pem
    assert (tmp_path / "ca").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(a.ca_pem)
    assert cert.subject.rfc4514_string().startswith("CN=Torpor egress CA ")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert a.server_context("api.example.test") is a.server_context("API.example.test.")
    bundle = b.bundle(tmp_path / "missing.crt")
    assert bundle == a.ca_pem
    (tmp_path / "sys.crt").write_bytes(b"SYSTEM")
    assert b.bundle(tmp_path / "sys.crt") == b"SYSTEM\n" + a.ca_pem
    # a leaf from instance b verifies against the CA that instance a created
    for host in ["api.example.test", "127.0.0.1"]:
        server_ctx = b.server_context(host)
        client_ctx = ssl.create_default_context(cadata=a.ca_pem.decode())
        srv = socket.create_server(("127.0.0.1", 0))

        def serve(ctx=server_ctx, srv=srv):
            conn, _ = srv.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(srv.getsockname(), timeout=5) as raw_sock, \
                client_ctx.wrap_socket(raw_sock, server_hostname=host) as tls:
            assert tls.recv(2) == b"ok"
            assert tls.selected_alpn_protocol() is None
        t.join(5)
        srv.close()


def test_redactor_handles_split_values():
    creds_ = [Credential("A", "PH_A", "secretvalue", []), Credential("B", "PH_B", "xy", [])]
    data = b"start secretvalue mid xy end secretval"
    for size in range(1, len(data) + 1):
        r = Redactor(creds_)
        out = b"".join(r.feed(data[i:i + size]) for i in range(0, len(data), size))
        out += r.flush()
        assert out == b"start PH_A mid PH_B end secretval", size


def test_swap_headers_basic_and_bearer():
    cred = [Credential("K", "PH", "REAL", ["x"])]
    basic = b"Basic " + base64.b64encode(b"u:PH")
    out, used = swap_headers([(b"authorization", basic), (b"x-api-key", b"PH"),
                              (b"cookie", b"a=b")], cred)
    assert out[0] == (b"authorization", b"Basic " + base64.b64encode(b"u:REAL"))
    assert out[1] == (b"x-api-key", b"REAL") and out[2] == (b"cookie", b"a=b")
    assert used == {"K"}
    out, used = swap_headers([(b"authorization", b"Basic !!notb64")], cred)
    assert out == [(b"authorization", b"Basic !!notb64")] and used == set()
    assert "REAL" not in repr(cred[0])
