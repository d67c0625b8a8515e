"""Preview URL primitives: errors, routes, signed access tokens, and the header surgery
that finds and removes Torpor credentials before a request goes into a sandbox.

Everything here is synchronous and allocation-light: it runs once per proxied request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

TOKEN_PARAM = "torpor_token"  # query parameter and cookie name
TOKEN_HEADER = b"x-torpor-token"
API_KEY_HEADER = b"x-api-key"
_TOKEN_PARAM_B = TOKEN_PARAM.encode()
_TOKEN_VERSION = "v1"

# RFC 9110 hop-by-hop headers, plus the legacy ones proxies still see
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate",
})

Headers = list[tuple[bytes, bytes]]


class PreviewError(Exception):
    """A failure the preview gateway answers with `status` (401/403/404/502/503/504) and
    `message` as a short text body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Route:
    """Where a preview host name leads; `public` ports need no credential."""

    sandbox_id: str
    port: int
    public: bool


class TokenSigner:
    """HMAC-SHA256 access tokens bound to one (sandbox, port) and an expiry.

    Format `v1.<expires_at>.<base64url mac>`: URL-, cookie- and header-safe, no padding.
    """

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("token key must be at least 16 bytes")
        self._key = key

    def _mac(self, sandbox_id: str, port: int, expires_at: int) -> str:
        # newline separators: no field can contain one, so no two tuples share a message
        msg = f"{_TOKEN_VERSION}\n{sandbox_id}\n{port}\n{expires_at}".encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, sandbox_id: str, port: int, expires_at: int) -> str:
        """A token valid for `port` of `sandbox_id` until `expires_at` (unix seconds)."""
        expires_at = int(expires_at)
        return f"{_TOKEN_VERSION}.{expires_at}.{self._mac(sandbox_id, port, expires_at)}"

    def expires_at(self, token: str) -> int | None:
        """The expiry written in a well-formed token (not verified), else None."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _TOKEN_VERSION or not parts[1].isdigit():
            return None
        return int(parts[1])

    def check(self, token: str, sandbox_id: str, port: int,
              now: float | None = None) -> str | None:
        """None if the token is valid, else a short reason fit for a 403 body."""
        exp = self.expires_at(token)
        if exp is None or len(token) > 128:
            return "malformed preview token"
        expected = self._mac(sandbox_id, port, exp)
        if not hmac.compare_digest(expected.encode(), token.rsplit(".", 1)[1].encode()):
            return f"preview token is not valid for port {port} of sandbox {sandbox_id}"
        if exp <= (time.time() if now is None else now):
            return "preview token has expired"
        return None

    def verify(self, token: str, sandbox_id: str, port: int, now: float | None = None) -> bool:
        """True only for an unexpired token signed for exactly this sandbox and port."""
        try:
            return self.check(token, sandbox_id, port, now) is None
        except (ValueError, UnicodeError):
            return False


@dataclass
class Credentials:
    """Torpor credentials found on one request; `headers` and `target` have them removed."""

    query_tokens: list[str]
    other_tokens: list[str]  # header and cookie
    api_key_ok: bool
    api_key_seen: bool
    headers: Headers
    target: bytes


def authorise(signer: TokenSigner, route: Route, creds: Credentials,
              now: float | None = None) -> tuple[tuple[int, str] | None, bytes | None]:
    """Whether `creds` may use `route`: (denial as (status, text) or None, Set-Cookie
    value to send or None). Public routes pass; else any valid token or the API key."""
    if route.public:
        return None, None
    now = time.time() if now is None else now
    sid, port = route.sandbox_id, route.port
    for tok in creds.query_tokens:
        if signer.verify(tok, sid, port, now):
            exp = signer.expires_at(tok) or 0
            return None, token_cookie(tok, int(exp - now))
    for tok in creds.other_tokens:
        if signer.verify(tok, sid, port, now):
            return None, None
    if creds.api_key_ok:
        return None, None
    tokens = creds.query_tokens + creds.other_tokens
    if tokens:
        try:
            reason = signer.check(tokens[0], sid, port, now)
        except (ValueError, UnicodeError):
            reason = None
        return (403, reason or "malformed preview token"), None
    if creds.api_key_seen:
        return (401, "invalid API key"), None
    text = (f"port {port} of sandbox {sid} is private: pass a preview token "
            "(?torpor_token=...) or an API key")
    return (401, text), None


def strip_query_token(target: bytes) -> tuple[bytes, list[str]]:
    """`target` without any `torpor_token` query parameter (other bytes untouched), and the
    token values removed."""
    path, sep, query = target.partition(b"?")
    if not sep or _TOKEN_PARAM_B not in query and b"%" not in query:
        return target, []
    kept, found = [], []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == TOKEN_PARAM:
            found.append(unquote(value.decode("latin-1")))
        else:
            kept.append(part)
    if not found:
        return target, []
    return (path + b"?" + b"&".join(kept) if kept else path), found


def _strip_cookie(value: bytes) -> tuple[bytes, list[str]]:
    if _TOKEN_PARAM_B not in value:
        return value, []
    kept, found = [], []
    for part in value.split(b";"):
        name, _, val = part.strip().partition(b"=")
        if name == _TOKEN_PARAM_B:
            found.append(val.strip(b'"').decode("latin-1"))
        elif part.strip():
            kept.append(part.strip())
    return b"; ".join(kept), found


def _bearer(value: bytes) -> str | None:
    scheme, _, cred = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return cred.strip().decode("latin-1")


def extract_credentials(headers: Headers, target: bytes,
                        check_api_key) -> Credentials:
    """Find tokens (query, X-Torpor-Token, cookie) and API keys (Bearer, X-API-Key), and
    return headers/target with all of them removed. An Authorization header that is not
    the API key belongs to the app and is kept."""
    target, query_tokens = strip_query_token(target)
    other: list[str] = []
    out: Headers = []
    key_ok = key_seen = False
    for name, value in headers:
        if name == TOKEN_HEADER:
            other.append(value.decode("latin-1").strip())
            continue
        if name == b"cookie":
            value, found = _strip_cookie(value)
            other.extend(found)
            if not value:
                continue
        elif name == b"authorization":
            cred = _bearer(value)
            if cred is not None:
                key_seen = True
                if cred and check_api_key(cred):
                    key_ok = True
                    continue
        elif name == API_KEY_HEADER:
            key_seen = True
            cred = value.decode("latin-1").strip()
            if cred and check_api_key(cred):
                key_ok = True
                continue
        out.append((name, value))
    return Credentials(query_tokens, other, key_ok, key_seen, out, target)


def connection_tokens(headers: Headers) -> set[bytes]:
    """Lowercased tokens of every Connection header."""
    toks: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            toks.update(t.strip().lower() for t in value.split(b","))
    return toks


def end_to_end(headers: Headers, keep: frozenset[bytes] = frozenset()) -> Headers:
    """`headers` without hop-by-hop ones (and those a Connection header names), except
    names in `keep`."""
    drop = (HOP_BY_HOP | connection_tokens(headers)) - keep
    return [(n, v) for n, v in headers if n not in drop]


def header(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def forwarded_headers(headers: list, peer: str, host: bytes | None, proto: bytes,
                      extra: tuple = ()) -> list:
    """`headers` with X-Forwarded-For appended to and X-Forwarded-Proto/Host replaced."""
    out, xff = [], b""
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff = xff + b", " + value if xff else value
        elif name not in (b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix"):
            out.append((name, value))
    peer_b = peer.encode()
    out.append((b"x-forwarded-for", xff + b", " + peer_b if xff else peer_b))
    out.append((b"x-forwarded-proto", proto))
    if host:
        out.append((b"x-forwarded-host", host))
    out.extend(extra)
    return out


def token_cookie(token: str, max_age: int) -> bytes:
    """The Set-Cookie value that lets a browser's follow-up requests carry the token."""
    return (f"{TOKEN_PARAM}={token}; Path=/; HttpOnly; SameSite=Lax; "
            f"Max-Age={max(0, max_age)}").encode()
