"""Terminal benchmark: a keystroke to its echo over the WebSocket (issue 14: p50 <= 10 ms).

Starts its own `torpor serve --pool-size 0` (or uses one given by --url/--key), creates a
sandbox and a terminal in it (the user's login shell, bash), opens
/v1/sandboxes/{id}/pty/{pid}/ws and types, one key at a time, waiting for each key's echo
before the next: `a` (bash's readline echoes it: the byte goes client -> server -> agent ->
pty -> bash and back) and a backspace (readline answers with a cursor move), in turns, so
the line never grows. Latency = the send to the first output frame holding the echo, on
one client thread (no callbacks in between). Beside it `tty`: the same keys to `cat`
waiting for a line, where the terminal's line discipline echoes without a process in the
loop; the difference is what the shell adds.

    .venv/bin/python bench/terminal.py                 # 300 keys each, ~15 s
    .venv/bin/python bench/terminal.py --keys 100 --out /tmp/t.json

Writes bench/results/terminal.json on a full run. bench/toolkit.py's `pty` section runs
`measure` from here against its own server. Needs root and runsc.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Server, machine, ms_since, reproduce_cmd, say, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from torpor.sdk._ws import SyncWebSocket
from torpor.sdk.config import ClientConfig

OUT = ROOT / "bench" / "results" / "terminal.json"
TARGET_P50_MS = 10.0


def _wait_for(ws: SyncWebSocket, needle: bytes, limit: float = 10.0) -> bytes:
    got = b""
    deadline = time.monotonic() + limit
    while needle not in got:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {needle!r} in {got[-200:]!r}")
        msg = ws.recv()
        if isinstance(msg, bytes):
            got += msg
    return got


def _type(ws: SyncWebSocket, keys: int, pairs: list[tuple[bytes, bytes]]) -> list[float]:
    out = []
    for i in range(keys):
        key, echo = pairs[i % len(pairs)]
        t = time.perf_counter()
        ws.send(key)
        _wait_for(ws, echo)
        out.append(ms_since(t))
    return out


def measure(api: httpx.Client, config: ClientConfig, sid: str, keys: int) -> dict:
    """Keystroke-to-echo figures in sandbox `sid`: `shell` (bash's readline echoes) and
    `tty` (the line discipline echoes, `cat` waiting for a line)."""
    res = {}
    for name, cmd, ready, pairs in (
            ("shell", None, b"$ ", [(b"a", b"a"), (b"\x7f", b"\x08")]),
            ("tty", ["cat"], None, [(b"a", b"a"), (b"\x7f", b"\x08")])):
        body = {"cols": 120, "rows": 40}
        if cmd:
            body["cmd"] = cmd
        r = api.post(f"/v1/sandboxes/{sid}/pty", json=body)
        r.raise_for_status()
        pid = r.json()["pid"]
        ws = SyncWebSocket.connect(config, f"/v1/sandboxes/{sid}/pty/{pid}/ws",
                                   {"offset": 0})
        try:
            if ready:
                _wait_for(ws, ready, 30)
            else:
                time.sleep(0.3)
            _type(ws, 20, pairs)  # warm-up
            res[name] = {"echo_ms": stats(_type(ws, keys, pairs))}
        finally:
            ws.close()
            api.post(f"/v1/sandboxes/{sid}/pty/{pid}/kill", json={"signal": "SIGKILL"})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=300)
    ap.add_argument("--out", help=f"default: {OUT.relative_to(ROOT)} (full runs)")
    args = ap.parse_args()
    srv = Server(tempfile.mkdtemp(prefix="termb-", dir="/tmp"), pool_size=0).start()
    report = {"bench": "terminal", "reproduce": reproduce_cmd("bench/terminal.py"),
              "machine": machine()}
    try:
        config = ClientConfig.resolve(srv.url, srv.api_key)
        with httpx.Client(base_url=srv.url, timeout=120,
                          headers={"Authorization": f"Bearer {srv.api_key}"}) as api:
            r = api.post("/v1/sandboxes", json={})
            r.raise_for_status()
            sid = r.json()["id"]
            try:
                report["results"] = measure(api, config, sid, args.keys)
            finally:
                api.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.stop()
    p50 = report["results"]["shell"]["echo_ms"]["p50"]
    report["targets"] = {"shell.echo_ms.p50": {"value": p50, "target": f"<= {TARGET_P50_MS}",
                                               "met": p50 <= TARGET_P50_MS}}
    print(json.dumps(report, indent=2))
    out = args.out or (str(OUT) if args.keys >= 300 else None)
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
