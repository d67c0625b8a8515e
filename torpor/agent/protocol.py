"""The wire format of the channel between the host and the in-sandbox agent.

Stdlib only: this module is loaded by the agent inside the sandbox, by the per-sandbox
holder on the host and by the server. One channel carries many streams. Every frame is

    kind (u8) | stream id (u32, big endian) | payload length (u32) | payload

Streams are opened by the host with odd ids (the agent will use even ids for streams it
opens itself, such as egress). Stream 0 carries channel-wide control frames.

A stream starts with OPEN (JSON: {"op": ..., args}), may carry MSG (JSON events), OUT and
ERR (raw bytes: a process's stdout/stderr, or file contents), IN (raw bytes towards the
agent), EOF (no more IN), and ends with CLOSE (JSON: {"result": ...} or {"error": ...}).
Raw bytes are flow-controlled: each side may send at most WINDOW bytes of OUT/ERR/IN on a
stream before the receiver grants more with CREDIT (payload: u32 bytes).
"""

from __future__ import annotations

import struct

try:
    # The C half of the json package. `import json` also compiles the pure-Python decoder's
    # regular expressions (importing re, enum, functools, collections): ~30 ms of the agent's
    # start inside gVisor. The C encoder and scanner give byte-identical results.
    import _json
except ImportError:  # pragma: no cover - an interpreter built without it
    _json = None

HEADER = struct.Struct(">BII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20  # a larger payload is a protocol error: the peer is broken or hostile
WINDOW = 1 << 20  # initial send window per stream and direction, in bytes
CHUNK = 256 * 1024  # how much raw data one frame carries at most

OPEN = 1
MSG = 2
OUT = 3
ERR = 4
IN = 5
EOF = 6
CLOSE = 7
CREDIT = 8
HELLO = 9  # stream 0, agent -> host: {"version", "pid"} once the agent is ready
RESET = 10  # stream 0, holder -> agent: the host side went away, drop every stream
PING = 11  # stream 0, either way; answered with PONG carrying the same payload
PONG = 12

KIND_NAMES = {
    OPEN: "OPEN", MSG: "MSG", OUT: "OUT", ERR: "ERR", IN: "IN", EOF: "EOF", CLOSE: "CLOSE",
    CREDIT: "CREDIT", HELLO: "HELLO", RESET: "RESET", PING: "PING", PONG: "PONG",
}

VERSION = 1


class ProtocolError(Exception):
    """The byte stream is not a valid sequence of frames."""


class OpError(Exception):
    """An agent operation failed in a way the caller should see.

    `code` is a short stable word (not_found, bad_request, ...) that crosses the wire."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message, **self.extra}


def _not_serializable(o):
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


if _json is not None:
    class _DecoderConfig:
        # what json.JSONDecoder() hands its scanner by default
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                          "NaN": float("nan")}.__getitem__

    _scan = _json.make_scanner(_DecoderConfig())

    def dumps(obj) -> str:
        """json.dumps(obj, separators=(",", ":"))"""
        if isinstance(obj, str):
            return _json.encode_basestring_ascii(obj)
        # a fresh encoder per call, as json.dumps makes: its circular-reference markers
        # must not outlive a failed call
        encode = _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii,
                                    None, ":", ",", False, False, True)
        return "".join(encode(obj, 0))

    def loads(data):
        """json.loads(data) for UTF-8 bytes or str; errors are ValueErrors."""
        if isinstance(data, (bytes, bytearray)):
            data = data.decode("utf-8")
        s = data.strip(" \t\n\r")
        try:
            obj, end = _scan(s, 0)
        except StopIteration as e:
            raise ValueError(f"Expecting value: char {e.value}") from None
        if end != len(s):
            raise ValueError(f"Extra data: char {end}")
        return obj
else:  # pragma: no cover
    import json

    def dumps(obj) -> str:
        return json.dumps(obj, separators=(",", ":"))

    loads = json.loads


def frame(kind: int, sid: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, sid, len(payload)) + payload


def jframe(kind: int, sid: int, obj: object) -> bytes:
    return frame(kind, sid, dumps(obj).encode())


def credit_frame(sid: int, n: int) -> bytes:
    return frame(CREDIT, sid, struct.pack(">I", n))


def parse_credit(payload: bytes) -> int:
    return struct.unpack(">I", payload)[0]


class FrameReader:
    """Incremental parser: feed bytes, take whole frames. Never holds more than one frame
    plus one read's worth of bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def pending(self) -> int:
        return len(self._buf)

    def frames(self):
        buf = self._buf
        pos = 0
        out = []
        while len(buf) - pos >= HEADER_SIZE:
            kind, sid, n = HEADER.unpack_from(buf, pos)
            if n > MAX_PAYLOAD or kind not in KIND_NAMES:
                raise ProtocolError(f"bad frame header kind={kind} length={n}")
            end = pos + HEADER_SIZE + n
            if len(buf) < end:
                break
            out.append((kind, sid, bytes(buf[pos + HEADER_SIZE:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def raw_frames(self):
        """Whole frames as raw bytes (header included), for relays that do not decode."""
        buf = self._buf
        pos = 0
        out = []
        while len(buf) - pos >= HEADER_SIZE:
            kind, _sid, n = HEADER.unpack_from(buf, pos)
            if n > MAX_PAYLOAD or kind not in KIND_NAMES:
                raise ProtocolError(f"bad frame header kind={kind} length={n}")
            end = pos + HEADER_SIZE + n
            if len(buf) < end:
                break
            out.append((kind, bytes(buf[pos:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


# --- operations: the `op` word of a stream's OPEN, written once ----------------------------
class Op:
    """The agent's operations. The agent and the host (torpor/channel/client.py) both use
    these names; they live here, in a module the agent imports anyway, because every module
    more costs the agent's start under gVisor. The strings are the wire: an agent
    checkpointed by an older Torpor still speaks them after a restore, so never change one;
    add a new word instead. Each line says the OPEN's arguments -> the CLOSE's result (a
    stream's other frames in brackets); every op may end in an error instead (`OpError`)."""

    # --- the host opens these; the agent answers (agent.py, fsops.py, netops.py) -----------
    PING = "ping"  # () -> {pid}
    CONFIGURE = "configure"  # (env?) -> {env, egress_errors}: the base env of every command
    EXEC = "exec"  # (argv, env?, cwd?, user="user", stdin=False, timeout?, tag?,
    # background=False) -> process info; not background: [MSG start {pid}, OUT/ERR output,
    # MSG truncated {lost}], with stdin=True the stream's IN bytes and EOF are its stdin
    PROC_LIST = "proc_list"  # () -> [process info]
    PROC_INFO = "proc_info"  # (pid) -> process info
    PROC_FOLLOW = "proc_follow"  # (pid, offset?, follow=True) -> process info [as EXEC's]
    PROC_STDIN = "proc_stdin"  # (pid, data?, eof=False) -> {pid}; without data, the IN bytes
    PROC_SIGNAL = "proc_signal"  # (pid, signal="SIGTERM") -> {pid}
    PROC_WAIT = "proc_wait"  # (pid) -> process info, once it exited
    OOM_KILL = "oom_kill"  # () -> {killed, ...}: the session using the most memory, killed
    PIDS_KILL = "pids_kill"  # () -> {killed, ...}: the session with most processes, killed
    HIBERNATE_CHECK = "hibernate_check"  # () -> {problems}: what would fail a checkpoint
    RESUMED = "resumed"  # (warm_up=False) -> {}: after a restore; warm_up: run a process
    # once the answer has left, so the first command does not pay for a cold cache
    FS_STAT = "fs_stat"  # (path, user="user") -> entry
    FS_EXISTS = "fs_exists"  # (path, user="user") -> {exists}
    FS_LIST = "fs_list"  # (path, depth=1, user="user") -> [entry]
    FS_MKDIR = "fs_mkdir"  # (path, parents=True, user="user") -> {created, path}
    FS_WRITE = "fs_write"  # (path, user="user", mode?, append=False, data?, in_place=False)
    # -> {path, size}; without data, the IN bytes until EOF
    FS_READ = "fs_read"  # (path, user="user", offset=0, length?) -> {path, size}
    # [MSG size {size}, OUT bytes]
    FS_RENAME = "fs_rename"  # (src, dst, overwrite=False, user="user") -> {path}
    FS_REMOVE = "fs_remove"  # (path, recursive=False, user="user") -> {removed, path}
    WATCH = "watch"  # (path, recursive=True, user="user") -> {path, gone}, once the host
    # closes it or the directory goes [MSG {watching, dirs}, MSG {events: [{type, path,
    # old_path?, dir}]}]; watch.py, imported on first use
    CONNECT = "connect"  # (port, host="127.0.0.1") -> {bytes_to_host, bytes_to_socket}
    # [MSG connected {port}, OUT/IN the socket's bytes, EOF a half-close]
    # terminals (ptys.py, imported on first use): a terminal is a process (PROC_INFO, _LIST,
    # _SIGNAL, _WAIT, _FOLLOW work on it) whose info has pty {cols, rows}
    PTY_CREATE = "pty_create"  # (cols, rows, cmd?: argv (default: the user's login shell),
    # env?, cwd?, user="user", tag?) -> process info; it runs until it exits or is signalled
    PTY_ATTACH = "pty_attach"  # (pid, offset?, replay=65536) -> process info, once it exited
    # [MSG attached {offset, pid}, MSG truncated {lost}, OUT its output from offset (None:
    # the last `replay` bytes still kept), live; the stream's IN bytes are its input]
    PTY_RESIZE = "pty_resize"  # (pid, cols, rows) -> {pid, cols, rows}; 1..4096 each

    # --- the agent opens these towards the host (netops.Egress; Channel.on_open) ------------
    EGRESS = "egress"  # (listener: "http"|"socks", peer_port) [OUT/IN the connection]
    DNS = "dns"  # (query: hex) -> {answer: hex}, the host's answer in its CLOSE


HOST_OPS = frozenset({
    Op.PING, Op.CONFIGURE, Op.EXEC, Op.WATCH, Op.PROC_LIST, Op.PROC_INFO, Op.PROC_FOLLOW,
    Op.PROC_STDIN, Op.PROC_SIGNAL, Op.PROC_WAIT, Op.OOM_KILL, Op.PIDS_KILL,
    Op.HIBERNATE_CHECK, Op.RESUMED, Op.FS_STAT, Op.FS_EXISTS, Op.FS_LIST, Op.FS_MKDIR,
    Op.FS_WRITE, Op.FS_READ, Op.FS_RENAME, Op.FS_REMOVE, Op.CONNECT,
    Op.PTY_CREATE, Op.PTY_ATTACH, Op.PTY_RESIZE,
})
AGENT_OPS = frozenset({Op.EGRESS, Op.DNS})
