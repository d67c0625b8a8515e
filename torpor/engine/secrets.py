"""Secrets for credential brokering: values encrypted at rest, never returned by the API.

A value is sealed with AES-256-GCM under a key kept in `<data>/secrets.key` (32 random
bytes, mode 0600, made on first use). Each stored value is `version | nonce | ciphertext`
with the secret's name as associated data, so a ciphertext copied onto another name does
not decrypt. Only server-internal callers (the egress proxy) read values, through `value`
and `values`; a sandbox granted a secret sees a placeholder from `new_placeholder`.

Host patterns (`allowed_hosts`) are stored canonical: lowercase, `host` or `host:port`,
`*.example.com` for any subdomain of example.com, IPv6 literals as `[addr]`: the egress
policy's entry grammar, which the proxy matches them with (`policy.host_matches`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from torpor.errors import Conflict, Invalid, NotFound, TorporError
from torpor.store.models import SecretRow, now

log = logging.getLogger("torpor.secrets")

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
VERSION = b"\x01"  # AES-256-GCM, 12-byte nonce, AAD = name
MAX_VALUE_BYTES = 65536
MAX_HOSTS = 64
PLACEHOLDER_PREFIX = "torpor_ph_"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_BAD_VALUE_CHARS = ("\r", "\n", "\0")
_HINT = "`torpor secret list` shows them"


def new_placeholder() -> str:
    """A fresh placeholder: what a sandbox sees in place of a secret's value (160 random
    bits, so it never collides with real data by chance)."""
    return PLACEHOLDER_PREFIX + secrets.token_hex(20)


@dataclass
class SecretInfo:
    """A secret's metadata. It never carries the value."""

    name: str
    allowed_hosts: list[str]
    inject_body: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: SecretRow) -> SecretInfo:
        return cls(name=row.name, allowed_hosts=list(row.allowed_hosts or []),
                   inject_body=bool(row.inject_body), created_at=row.created_at,
                   updated_at=row.updated_at)


# --- validation --------------------------------------------------------------------------

def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Invalid("name: a secret's name starts with a letter and has at most 64 letters, "
                      "digits, '_', '.' or '-'", field="name")
    return name


def check_value(value: object) -> str:
    """The value goes into HTTP headers, so CR, LF and NUL (header injection) are refused.
    Messages never quote the value."""
    if not isinstance(value, str):
        raise Invalid("value: must be a string", field="value")
    size = len(value.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= MAX_VALUE_BYTES:
        raise Invalid(f"value: must be 1 to {MAX_VALUE_BYTES} bytes (got {size})",
                      field="value")
    if any(c in value for c in _BAD_VALUE_CHARS):
        raise Invalid("value: must not contain CR, LF or NUL characters (it is sent in HTTP "
                      "headers); strip the trailing newline", field="value")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("value: must be valid Unicode text (it has a lone surrogate)",
                      field="value") from None
    return value


def check_hosts(hosts: object) -> list[str]:
    """Validate and canonicalize a list of host patterns; duplicates are dropped."""
    if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)):
        raise Invalid("allowed_hosts: must be a list of host patterns, e.g. "
                      '["api.openai.com"]', field="allowed_hosts")
    if not 1 <= len(hosts) <= MAX_HOSTS:
        raise Invalid(f"allowed_hosts: give 1 to {MAX_HOSTS} host patterns (got "
                      f"{len(hosts)}); a secret is only sent to hosts listed here",
                      field="allowed_hosts")
    result: list[str] = []
    for i, h in enumerate(hosts):
        p = check_host(h, field=f"allowed_hosts.{i}")
        if p not in result:
            result.append(p)
    return result


def check_host(pattern: object, field: str = "allowed_hosts") -> str:
    """One host pattern -> its canonical form: `api.openai.com`, `*.example.com`,
    `10.0.0.1:8443`, `[::1]:443`. No scheme, path, user info, spaces or other wildcards."""

    def bad(why: str) -> Invalid:
        return Invalid(f"{field}: {pattern!r} is not a host pattern: {why} (e.g. "
                       "api.openai.com, *.example.com, api.example.com:8443)", field=field)

    if not isinstance(pattern, str) or not pattern:
        raise Invalid(f"{field}: a host pattern is a non-empty string", field=field)
    if len(pattern) > 300:
        raise Invalid(f"{field}: a host pattern has at most 300 characters", field=field)
    text = pattern.lower()
    if "://" in text:
        raise bad("give the host only, without a scheme")
    if any(c.isspace() for c in text):
        raise bad("it has spaces")
    if any(c in text for c in "/?#@\\"):
        raise bad("give the host only, without a path, query or user")
    host, port = _split_port(text, bad)
    if port is not None:
        if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise bad("the port must be a number from 1 to 65535")
        port = str(int(port))
    if host.startswith("[") or ":" in host:
        try:
            addr = ipaddress.IPv6Address(host.strip("[]") if host.startswith("[") else host)
        except ValueError:
            raise bad("not a valid IPv6 address") from None
        host = f"[{addr.compressed}]"
    else:
        host = _check_name_or_ipv4(host, bad)
    return f"{host}:{port}" if port else host


def _split_port(text: str, bad) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise bad("an IPv6 address in brackets needs the closing ']'")
        rest = text[end + 1:]
        if rest and not rest.startswith(":"):
            raise bad("only ':port' may follow ']'")
        return text[:end + 1], (rest[1:] if rest else None)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None  # no port, or a bare IPv6 address (several colons)


def _check_name_or_ipv4(host: str, bad) -> str:
    if not host.isascii():
        raise bad("give an international name in its ASCII (xn--) form")
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if "*" in name:
        raise bad("a wildcard is only allowed as the whole first label, as in *.example.com")
    if name.endswith("."):
        raise bad("drop the trailing dot")
    if not name or len(name) > 253:
        raise bad("a host name has 1 to 253 characters")
    labels = name.split(".")
    if all(x.isdigit() for x in labels):
        if wildcard:
            raise bad("a wildcard cannot apply to an IP address")
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise bad("not a valid IPv4 address") from None
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise bad("each label is 1 to 63 letters, digits or '-', not starting or ending "
                      "with '-'")
    if wildcard and len(labels) < 2:
        raise bad("a wildcard needs a domain with at least two labels, as in *.example.com")
    return f"*.{name}" if wildcard else name


# --- the key -----------------------------------------------------------------------------

class KeyFileError(TorporError):
    """The key file is unusable (wrong size, unreadable): an operator problem."""


SECRETS_KEY_LOSS = ("restore it from a backup (without it the stored secrets cannot be "
                    "decrypted), or delete it and the secrets together")


def load_or_create_key(path: Path, what: str = "secrets key",
                       if_lost: str = SECRETS_KEY_LOSS) -> bytes:
    """Read the 32-byte key at `path`, or make one there (mode 0600) if there is none.
    Creation is atomic: the key is written to a temporary file, then linked into place,
    so a crash never leaves a short key and two processes agree on one key. `what` names
    the key in errors; `if_lost` says what to do about a damaged one."""
    try:
        return _read_key(path, what, if_lost)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if it exists: whoever linked first wins
            log.info("made a new %s at %s", what, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return _read_key(path, what, if_lost)


def _read_key(path: Path, what: str, if_lost: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyFileError(f"cannot open the {what} {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the {what} {path} is not a regular file")
        if st.st_mode & 0o077:
            # others could use it (read every secret, sign URLs): take their access away
            log.warning("%s %s had mode %o; setting 0600", what, path, st.st_mode & 0o777)
            try:
                os.fchmod(f.fileno(), 0o600)
            except OSError as e:
                raise KeyFileError(f"the {what} {path} is readable by other users and "
                                   f"cannot be made private ({e.strerror}); chmod 600 it"
                                   ) from None
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"the {what} {path} has {len(key)} bytes, not {KEY_BYTES}; "
                           f"{if_lost}")
    return key


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- the store ---------------------------------------------------------------------------

class SecretStore:
    """Secrets in the `secrets` table, values sealed under the key at `key_path`.

    Metadata methods return SecretInfo, which never holds a value; `value` and `values`
    decrypt and are for server-internal use only. The key is loaded (or made) on first use.
    """

    def __init__(self, sessions: sessionmaker[Session], key_path: Path):
        self.sessions = sessions
        self.key_path = Path(key_path)
        self._aead: AESGCM | None = None
        self._lock = threading.Lock()

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            with self._lock:
                if self._aead is None:
                    self._aead = AESGCM(load_or_create_key(self.key_path))
        return self._aead

    def _seal(self, name: str, value: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return VERSION + nonce + self._cipher().encrypt(nonce, value.encode(), name.encode())

    def _open(self, name: str, blob: bytes) -> str:
        blob = bytes(blob)
        if blob[:1] != VERSION or len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
            raise TorporError(f"secret {name}: its stored value has an unknown format "
                              f"(version byte {blob[:1].hex() or 'missing'}); set it again "
                              "with `torpor secret update`")
        nonce, sealed = blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:]
        try:
            return self._cipher().decrypt(nonce, sealed, name.encode()).decode()
        except InvalidTag:
            raise TorporError(f"secret {name} cannot be decrypted with the key in "
                              f"{self.key_path}: the key file was replaced or the record was "
                              "altered; restore the key, or set the secret again with "
                              "`torpor secret update`") from None

    def create(self, name: str, value: str, allowed_hosts: list[str],
               inject_body: bool = False) -> SecretInfo:
        """Store a new secret; Conflict if the name is taken, Invalid on a bad field."""
        check_name(name)
        check_value(value)
        hosts = check_hosts(allowed_hosts)
        t = now()
        row = SecretRow(name=name, ciphertext=self._seal(name, value), allowed_hosts=hosts,
                        inject_body=bool(inject_body), created_at=t, updated_at=t)
        try:
            with self.sessions.begin() as s:
                if s.get(SecretRow, name) is not None:
                    raise Conflict(f"secret {name} exists; change it with `torpor secret "
                                   "update` (PUT /v1/secrets/{name})", field="name")
                s.add(row)
        except IntegrityError:  # created concurrently between the check and the insert
            raise Conflict(f"secret {name} exists", field="name") from None
        return SecretInfo.of(row)

    def replace(self, name: str, value: str | None = None,
                allowed_hosts: list[str] | None = None,
                inject_body: bool | None = None) -> SecretInfo:
        """Rotate the value and/or change the hosts or inject_body; None leaves a field as
        it is. NotFound if there is no such secret, Invalid if nothing is given."""
        if value is None and allowed_hosts is None and inject_body is None:
            raise Invalid("nothing to change: give value, allowed_hosts or inject_body")
        if value is not None:
            check_value(value)
        hosts = check_hosts(allowed_hosts) if allowed_hosts is not None else None
        sealed = self._seal(name, value) if value is not None else None
        with self.sessions.begin() as s:
            row = s.get(SecretRow, name)
            if row is None:
                raise NotFound(f"no secret {name}; {_HINT}")
            if sealed is not None:
                row.ciphertext = sealed
            if hosts is not None:
                row.allowed_hosts = hosts
            if inject_body is not None:
                row.inject_body = bool(inject_body)
            row.updated_at = now()
            return SecretInfo.of(row)

    def list(self) -> list[SecretInfo]:
        with self.sessions() as s:
            return [SecretInfo.of(r)
                    for r in s.scalars(select(SecretRow).order_by(SecretRow.name))]

    def get(self, name: str) -> SecretInfo:
        with self.sessions() as s:
            row = s.get(SecretRow, name)
            if row is None:
                raise NotFound(f"no secret {name}; {_HINT}")
            return SecretInfo.of(row)

    def delete(self, name: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(SecretRow, name)
            if row is None:
                raise NotFound(f"no secret {name}; {_HINT}")
            s.delete(row)

    def value(self, name: str) -> str:
        """The decrypted value. Server-internal: never send it through the API."""
        with self.sessions() as s:
            row = s.get(SecretRow, name)
            if row is None:
                raise NotFound(f"no secret {name}; {_HINT}")
            blob = row.ciphertext
        return self._open(name, blob)

    def values(self, names: Iterable[str],
               missing_ok: bool = False) -> dict[str, tuple[str, SecretInfo]]:
        """name -> (decrypted value, metadata) for several secrets in one query.
        Server-internal. A missing name raises NotFound (naming all missing ones), or is
        left out of the result with `missing_ok`."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        with self.sessions() as s:
            rows = list(s.scalars(select(SecretRow).where(SecretRow.name.in_(wanted))))
        found = {r.name: r for r in rows}
        missing = [n for n in wanted if n not in found]
        if missing and not missing_ok:
            raise NotFound(f"no secret {', '.join(missing)}; {_HINT}", field="secrets",
                           missing=missing)
        return {n: (self._open(n, r.ciphertext), SecretInfo.of(r)) for n, r in found.items()}
