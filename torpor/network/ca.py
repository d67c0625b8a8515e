"""The per-installation certificate authority the egress proxy signs leaf certificates with.

Sandboxes trust it (the bundle goes into their trust store) so that the proxy can terminate
TLS for hosts where it injects credentials. The CA key never leaves the data directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=30)
LEAF_RENEW_AFTER = datetime.timedelta(days=7)
LEAF_CACHE_SIZE = 512


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the start."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CertAuthority:
    """ca.key (EC P-256, 0600) and ca.pem in `directory` (0700), created on first use and
    loaded afterwards. `server_context(host)` gives a TLS server context with a leaf for host."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        key_path, pem_path = self.directory / "ca.key", self.directory / "ca.pem"
        if key_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            _write_private(key_path, self._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        if pem_path.exists():
            self._cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
        else:
            # a key without its certificate: a crash between the two writes; finish the job
            self._cert = self._make_ca_cert()
            _write_private(pem_path, self._cert.public_bytes(serialization.Encoding.PEM))
            os.chmod(pem_path, 0o644)
        self.ca_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        self._cache: OrderedDict[str, tuple[datetime.datetime, ssl.SSLContext]] = OrderedDict()
        self._lock = threading.Lock()

    def _make_ca_cert(self) -> x509.Certificate:
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Torpor"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Torpor egress CA {secrets.token_hex(4)}"),
        ])
        now = datetime.datetime.now(datetime.UTC)
        public = self._key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _make_leaf(self, hostname: str) -> x509.Certificate:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
        except ValueError:
            san = x509.DNSName(hostname)
        now = datetime.datetime.now(datetime.UTC)
        public = self._leaf_key.public_key()
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
            .issuer_name(self._cert.subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + LEAF_VALIDITY, self._cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def server_context(self, hostname: str) -> ssl.SSLContext:
        """A server-side context presenting a leaf for `hostname` (a DNS name or IP), signed
        by this CA; cached per hostname (LRU) and renewed well before the leaf expires."""
        hostname = hostname.strip("[]").lower().removesuffix(".")
        now = datetime.datetime.now(datetime.UTC)
        with self._lock:
            hit = self._cache.get(hostname)
            if hit and now - hit[0] < LEAF_RENEW_AFTER:
                self._cache.move_to_end(hostname)
                return hit[1]
        leaf = self._make_leaf(hostname)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # load_cert_chain reads files only; the file lives in the private dir for a moment
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".leaf-") as f:
            f.write(leaf.public_bytes(serialization.Encoding.PEM) + self._leaf_key_pem)
            f.flush()
            ctx.load_cert_chain(f.name)
        with self._lock:
            self._cache[hostname] = (now, ctx)
            self._cache.move_to_end(hostname)
            while len(self._cache) > LEAF_CACHE_SIZE:
                self._cache.popitem(last=False)
        return ctx

    def bundle(self, system_bundle: Path = Path("/etc/ssl/certs/ca-certificates.crt")) -> bytes:
        """The system CA bundle (if readable) followed by this CA, for sandbox trust stores."""
        try:
            system = Path(system_bundle).read_bytes()
        except OSError:
            system = b""
        if system and not system.endswith(b"\n"):
            system += b"\n"
        return system + self.ca_pem
