"""Upstream servers for network tests and benchmarks: plain HTTP and HTTPS on loopback,
with a CA of their own (never any other address).

`Upstreams.start()` serves on 127.0.0.1 with ephemeral ports; every request is recorded
(method, path, headers, body) so a test can see what the egress proxy really sent.

    GET|POST /echo       -> JSON {method, path, headers, body}
    GET /bytes/N         -> N bytes (Content-Length)
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import shutil
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAMES = ["api.test", "other.test", "localhost"]
CHUNK = b"x" * (1 << 20)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for NAMES and 127.0.0.1: (ca.pem, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Torpor test upstream CA"))
          .issuer_name(_name("Torpor test upstream CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(n) for n in NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(_name("api.test"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # one write per response, sent at once: without these, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive request
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def _record(self, body: bytes) -> dict:
        rec = {"method": self.command, "path": self.path,
               "headers": {k.lower(): v for k, v in self.headers.items()},
               "body": body.decode("latin-1")}
        self.server.seen.append(rec)
        return rec

    def _body(self) -> bytes:
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        rec = self._record(self._body())
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                k = min(n, len(CHUNK))
                self.wfile.write(CHUNK[:k])
                n -= k
            return
        self._send(200, json.dumps(rec).encode())

    do_POST = do_GET


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict] = []
        self.tls = tls

    def finish_request(self, request, client_address) -> None:
        # the TLS handshake in the connection's own thread: a slow client blocks no other
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)


class Upstreams:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tpt-up-"))
        self.ca, cert, key = make_ca(self.dir)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.http = _Server(None)
        self.https = _Server(tls)
        self.http_port = self.http.server_address[1]
        self.https_port = self.https.server_address[1]
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True)
                         for s in (self.http, self.https)]

    def start(self) -> Upstreams:
        for t in self._threads:
            t.start()
        return self

    def seen(self) -> list[dict]:
        return self.http.seen + self.https.seen

    def clear(self) -> None:
        self.http.seen.clear()
        self.https.seen.clear()

    def stop(self) -> None:
        for s in (self.http, self.https):
            s.shutdown()
            s.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)  # the test CA and its key
