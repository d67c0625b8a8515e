"""The Connect protocol (connectrpc.com/docs/protocol), as much of it as envd's clients
speak: the JSON codec over HTTP/1.1, no compression.

- unary: `POST /<service>/<Method>`, `application/json` both ways; an error is a non-200
  status with `{"code": "not_found", "message": ...}`;
- streams (server, client): `application/connect+json`, each message an envelope
  `[flags u8][length u32 BE][json]`; the server's last envelope has flag 0x02 (end of
  stream) and holds `{"error"?: {code, message}}`; errors in a stream travel there, under
  a 200.

Hand-written rather than built on `connectrpc` (the protocol's Python library, which the
e2b SDK uses as its client): its server decodes every message into generated protobuf-py
classes (E2B's are only in the e2b client package), and it always ends a stream with an
end-of-stream envelope, while E2B cuts the stream of a killed sandbox at the transport.
"""

from __future__ import annotations

import json
import struct

from torpor.errors import TorporError

END_STREAM = 0x02
COMPRESSED = 0x01
HEADER = struct.Struct(">BI")
MAX_MESSAGE = 16 * 1024 * 1024  # bytes of one request message
UNARY_TYPE = "application/json"
STREAM_TYPE = "application/connect+json"

# Connect's codes and the HTTP status a unary error carries
STATUS = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
    "not_found": 404, "already_exists": 409, "permission_denied": 403,
    "resource_exhausted": 429, "failed_precondition": 400, "aborted": 409,
    "out_of_range": 400, "unimplemented": 501, "internal": 500, "unavailable": 503,
    "data_loss": 500, "unauthenticated": 401,
}

# agent error codes (an engine error's `agent_code`) as Connect codes, as envd answers them
_AGENT = {
    "not_found": "not_found", "no_such_process": "not_found", "not_a_terminal": "not_found",
    "exists": "already_exists", "not_directory": "invalid_argument",
    "is_directory": "invalid_argument", "bad_path": "invalid_argument",
    "bad_request": "invalid_argument", "bad_cwd": "invalid_argument",
    "name_too_long": "invalid_argument", "unknown_user": "invalid_argument",
    "bad_signal": "invalid_argument", "permission_denied": "permission_denied",
    "read_only": "permission_denied", "no_space": "resource_exhausted",
    "too_many": "resource_exhausted", "not_running": "failed_precondition",
    "stdin_closed": "failed_precondition", "not_empty": "failed_precondition",
}
# engine errors by their own code
_ENGINE = {
    "not_found": "not_found", "invalid": "invalid_argument", "conflict": "failed_precondition",
    "too_large": "resource_exhausted", "unauthorized": "unauthenticated",
    "forbidden": "permission_denied", "unavailable": "unavailable",
    "timeout": "deadline_exceeded",
}


class ConnectError(Exception):
    """An RPC's failure as the client sees it: a Connect code and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def from_engine(e: TorporError) -> ConnectError:
    """An engine error as envd would have answered it (the agent's code first)."""
    code = _AGENT.get(e.extra.get("agent_code", "")) or _ENGINE.get(e.code, "internal")
    return ConnectError(code, e.message)


def envelope(message: dict, flags: int = 0) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(flags, len(data)) + data


def end_stream(error: ConnectError | None = None) -> bytes:
    return envelope({"error": error.to_dict()} if error is not None else {}, END_STREAM)


class EnvelopeReader:
    """Messages out of a streamed request body, whatever its chunking."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self.buf += data
        out = []
        while len(self.buf) >= HEADER.size:
            flags, n = HEADER.unpack_from(self.buf)
            if n > MAX_MESSAGE:
                raise ConnectError("resource_exhausted",
                                   f"message of {n} bytes is over {MAX_MESSAGE}")
            if len(self.buf) < HEADER.size + n:
                break
            raw = bytes(self.buf[HEADER.size:HEADER.size + n])
            del self.buf[:HEADER.size + n]
            if flags & COMPRESSED:
                raise ConnectError("unimplemented", "compressed messages are not supported")
            if flags & END_STREAM:
                continue  # a client's end-of-stream carries nothing we need
            out.append(decode(raw))
        return out

    def leftover(self) -> bool:
        return bool(self.buf)


def decode(raw: bytes) -> dict:
    if not raw.strip():
        return {}
    try:
        msg = json.loads(raw)
    except ValueError as e:
        raise ConnectError("invalid_argument", f"the message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ConnectError("invalid_argument", "the message must be a JSON object")
    return msg


def header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def timeout_of(scope) -> float | None:
    """The client's deadline (`connect-timeout-ms`), in seconds; None: none."""
    v = header(scope, b"connect-timeout-ms")
    if v is None or not v.strip().isdigit():
        return None
    ms = int(v.strip())
    return ms / 1000 if ms > 0 else None


def is_stream(scope) -> bool:
    ctype = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return ctype.startswith("application/connect+")


def check_codec(scope) -> None:
    ctype = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if ctype not in (UNARY_TYPE, STREAM_TYPE):
        raise ConnectError("unimplemented",
                           f"content type {ctype!r}: only the JSON codec is served "
                           f"({UNARY_TYPE}, {STREAM_TYPE})")
    enc = (header(scope, b"content-encoding") or header(scope, b"connect-content-encoding")
           or "identity").strip().lower()
    if enc != "identity":
        raise ConnectError("unimplemented", f"compression {enc!r} is not supported")


async def read_body(receive, limit: int = MAX_MESSAGE) -> bytes:
    body = bytearray()
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            raise ConnectError("canceled", "the client went away")
        body += m.get("body", b"")
        if len(body) > limit:
            raise ConnectError("resource_exhausted", f"request over {limit} bytes")
        if not m.get("more_body"):
            return bytes(body)


async def send_unary(send, message: dict) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", UNARY_TYPE.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_unary_error(send, error: ConnectError) -> None:
    body = json.dumps(error.to_dict()).encode()
    await send({"type": "http.response.start", "status": STATUS.get(error.code, 500),
                "headers": [(b"content-type", UNARY_TYPE.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def start_stream(send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", STREAM_TYPE.encode())]})
