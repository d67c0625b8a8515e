"""Network benchmark: egress through the proxy and preview URLs, each beside the same thing
done directly on the host, in the same run. Loopback only.

Starts its own `torpor serve --pool-size 0` with `--egress-allow-cidr 127.0.0.0/8`, static
names for the upstreams (`--egress-resolve api.test=127.0.0.1`) and their CA, plus local
HTTP and HTTPS upstreams (tests/upstreams.py, own test CA). Sections (`--only a,b`):

  https     a 1 KiB HTTPS GET, keep-alive, N times, timed by a Python client inside the
            sandbox (http.client through HTTPS_PROXY: CONNECT, then TLS end to end), and the
            same script run on the host straight to the upstream. Added latency = p50
            sandbox - p50 host. Also the same with a credential rule for the host (the
            proxy terminates TLS and swaps the placeholder), and with the client inside
            talking to a TLS server inside the sandbox (gVisor's own cost, no proxy).
  download  100 MiB through the proxy with curl inside the sandbox, plain HTTP (the proxy
            relays requests) and HTTPS (CONNECT tunnel); host curl straight beside it, and
            curl over HTTPS to a server inside the same sandbox (no proxy: the floor that
            TLS under gVisor's ptrace platform sets).
  preview   a small page served inside the sandbox (HTTP/1.1 keep-alive server), GET from
            the host through the preview port with a token, one keep-alive client; and
            WebSocket echo round trips through the preview port (wsproto client, echo
            server inside). Plus each inside the sandbox, client and server both inside.

Prints one JSON object to stdout (and writes bench/results/network.json on a full run, or
--out FILE), then a table to stderr.

    .venv/bin/python bench/network.py            # full run, ~2 minutes
    .venv/bin/python bench/network.py --quick    # fewer requests
    .venv/bin/python bench/network.py --only preview

Needs root and runsc. No timed assertions: targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import wsproto
import wsproto.events as we

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import (
    Server,
    default_out,
    finish,
    machine,
    ms_since,
    reproduce_cmd,
    run_sections,
    say,
    stats,
    stop_on_sigterm,
)
from upstreams import Upstreams

SECTIONS = ["https", "download", "preview"]
TARGETS = {
    "https.added_ms_p50": ("<=", 5.0),
    "download.http_mib_s": (">=", 50.0),
    "preview.http_get_ms.p50": ("<=", 10.0),
    "preview.websocket_echo_ms.p50": ("<=", 5.0),
}

# timed inside the sandbox (or on the host): n keep-alive GETs, one JSON line of ms
HTTPS_CLIENT = r'''
import http.client, json, os, ssl, sys, time
host, port, n, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca if ca != "-" else None)
proxy = os.environ.get("HTTPS_PROXY")
if proxy and host not in ("127.0.0.1", "localhost"):
    c = http.client.HTTPSConnection("127.0.0.1", 3128, context=ctx, timeout=30)
    c.set_tunnel(host, port)
else:
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
out = []
for i in range(n + 5):
    t0 = time.perf_counter()
    c.request("GET", "/bytes/1024", headers={"Authorization": "Bearer " + os.environ.get("TOKEN", "x")})
    r = c.getresponse(); body = r.read()
    assert r.status == 200 and len(body) == 1024, (r.status, len(body))
    if i >= 5:
        out.append((time.perf_counter() - t0) * 1000)
print(json.dumps(out))
'''

# a TLS server inside the sandbox for the "no proxy" floor
TLS_SERVER = r'''
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def do_GET(self):
        body = b"x" * int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/bytes/") else b"<h1>hi</h1>"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
port = int(sys.argv[1])
s = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
if len(sys.argv) > 2:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
'''

WS_ECHO = (Path(__file__).resolve().parents[1] / "tests" / "integration" / "test_network.py").read_text(
).split("WS_ECHO = r'''")[1].split("'''")[0]


class Bench:
    def __init__(self) -> None:
        self.up = Upstreams().start()
        self.srv = Server(tempfile.mkdtemp(prefix="tnb", dir="/tmp") + "/d", pool_size=0,
                          args=["--egress-allow-cidr", "127.0.0.0/8",
                                "--egress-resolve", "api.test=127.0.0.1",
                                "--egress-resolve", "other.test=127.0.0.1",
                                "--egress-upstream-ca", str(self.up.ca)]).start()
        self.api = httpx.Client(base_url=self.srv.url, timeout=300,
                                headers={"Authorization": f"Bearer {self.srv.api_key}"})
        self.sid: str | None = None

    def close(self) -> list[str]:
        try:
            self.api.close()
        finally:
            self.up.stop()
            shutil.rmtree(self.up.dir, ignore_errors=True)
        return self.srv.stop()

    # --- helpers ------------------------------------------------------------------------
    def create(self, **body) -> str:
        r = self.api.post("/v1/sandboxes", json={"standby_after": 0, **body})
        r.raise_for_status()
        return r.json()["id"]

    def put(self, sid: str, path: str, data: bytes) -> None:
        self.api.put(f"/v1/sandboxes/{sid}/files", params={"path": path},
                     content=data).raise_for_status()

    def sh(self, sid: str, cmd: str, timeout: float = 600, **kw) -> dict:
        r = self.api.post(f"/v1/sandboxes/{sid}/commands",
                          json={"cmd": cmd, "timeout": timeout, **kw})
        r.raise_for_status()
        res = r.json()
        if res["exit_code"] != 0:
            raise RuntimeError(f"{cmd!r} failed: {res['stderr'][-2000:]}")
        return res

    def wait_port(self, sid: str, port: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            r = self.api.post(f"/v1/sandboxes/{sid}/commands", json={
                "cmd": f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', "
                       f"{port}))\""}).json()
            if r["exit_code"] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} never listened in the sandbox")
            time.sleep(0.2)

    def tls_server_inside(self, sid: str, port: int) -> None:
        """A TLS server in the sandbox with the upstreams' certificate, on `port`."""
        d = Path(self.up.dir)
        self.put(sid, "/tmp/server.pem", (d / "server.pem").read_bytes())
        self.put(sid, "/tmp/server.key", (d / "server.key").read_bytes())
        self.put(sid, "/tmp/tls_server.py", TLS_SERVER.encode())
        self.api.post(f"/v1/sandboxes/{sid}/commands", json={
            "cmd": f"exec python3 /tmp/tls_server.py {port} /tmp/server.pem /tmp/server.key",
            "background": True}).raise_for_status()
        self.wait_port(sid, port)

    # --- sections -----------------------------------------------------------------------
    def https(self, n: int) -> dict:
        sid = self.create()
        ca = "/tmp/upstream-ca.pem"
        self.put(sid, ca, self.up.ca.read_bytes())
        self.put(sid, "/tmp/client.py", HTTPS_CLIENT.encode())
        port = self.up.https_port
        say(f"https: {n} keep-alive GETs from the host, straight")
        host = subprocess.run([sys.executable, "-c", HTTPS_CLIENT, "127.0.0.1", str(port),
                               str(n), str(self.up.ca)], capture_output=True, text=True,
                              check=True, env={k: v for k, v in os.environ.items()
                                               if "proxy" not in k.lower()})
        host_ms = json.loads(host.stdout)
        say("https: the same from inside the sandbox, through the proxy (CONNECT)")
        ours = json.loads(self.sh(sid, f"python3 /tmp/client.py api.test {port} {n} {ca}")
                          ["stdout"])
        # with a credential rule: the proxy terminates TLS (the sandbox trusts its CA)
        self.api.post("/v1/secrets", json={"name": "bench", "value": "sk-bench-value",
                                           "allowed_hosts": ["api.test"]}).raise_for_status()
        sid2 = self.create(secrets={"TOKEN": "bench"})
        self.put(sid2, "/tmp/client.py", HTTPS_CLIENT.encode())
        say("https: the same with a credential rule (intercepted, placeholder swapped)")
        inter = json.loads(self.sh(sid2, f"python3 /tmp/client.py api.test {port} {n} -")
                           ["stdout"])
        assert self.up.https.seen[-1]["headers"]["authorization"] == "Bearer sk-bench-value"
        say("https: client and TLS server both inside the sandbox (no proxy)")
        self.tls_server_inside(sid, 8443)
        inside = json.loads(self.sh(sid, f"python3 /tmp/client.py 127.0.0.1 8443 {n} {ca}")
                            ["stdout"])
        for s in (sid, sid2):
            self.api.delete(f"/v1/sandboxes/{s}")
        h, o = stats(host_ms), stats(ours)
        return {"n": n, "host_direct_ms": h, "sandbox_via_proxy_ms": o,
                "sandbox_via_proxy_intercepted_ms": stats(inter),
                "sandbox_inside_only_ms": stats(inside),
                "added_ms_p50": round(o["p50"] - h["p50"], 2),
                "added_intercepted_ms_p50": round(stats(inter)["p50"] - h["p50"], 2)}

    def download(self, mib: int) -> dict:
        sid = self.create()
        ca = "/tmp/upstream-ca.pem"
        self.put(sid, ca, self.up.ca.read_bytes())
        n = mib << 20
        out = {"mib": mib}
        for scheme, port, extra in (("http", self.up.http_port, ""),
                                    ("https", self.up.https_port, f"--cacert {ca} ")):
            url = f"{scheme}://api.test:{port}/bytes/{n}"
            say(f"download: {mib} MiB over {scheme} through the proxy")
            r = self.sh(sid, f"curl -sS -o /dev/null {extra}-w '%{{size_download}} "
                             f"%{{time_total}}' {url}")
            size, secs = r["stdout"].split()
            assert int(size) == n, r
            out[f"{scheme}_mib_s"] = round(mib / float(secs), 1)
            host_url = url.replace("api.test", "127.0.0.1")
            p = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--noproxy", "*",
                                *(["--cacert", str(self.up.ca)] if scheme == "https" else []),
                                "-w", "%{size_download} %{time_total}", host_url],
                               capture_output=True, text=True, check=True)
            size, secs = p.stdout.split()
            out[f"host_direct_{scheme}_mib_s"] = round(mib / float(secs), 1)
        # the sandbox's own floor for TLS: curl and a TLS server both inside, no proxy
        self.tls_server_inside(sid, 8443)
        say(f"download: {mib} MiB over https inside the sandbox (no proxy)")
        r = self.sh(sid, f"curl -sS -o /dev/null --cacert {ca} -w '%{{time_total}}' "
                         f"https://127.0.0.1:8443/bytes/{n}")
        out["sandbox_inside_https_mib_s"] = round(mib / float(r["stdout"]), 1)
        self.api.delete(f"/v1/sandboxes/{sid}")
        return out

    def preview(self, n: int) -> dict:
        sid = self.create()
        self.put(sid, "/tmp/page.py", TLS_SERVER.encode())
        self.put(sid, "/tmp/ws.py", WS_ECHO.encode())
        for cmd in ("exec python3 /tmp/page.py 8000", "exec python3 /tmp/ws.py"):
            self.api.post(f"/v1/sandboxes/{sid}/commands",
                          json={"cmd": cmd, "background": True}).raise_for_status()
        self.wait_port(sid, 8000)
        self.wait_port(sid, 9000)
        token = self.api.post(f"/v1/sandboxes/{sid}/preview-urls",
                              json={"port": 8000}).json()["token"]
        say(f"preview: {n} GETs through the preview port")
        get_ms = []
        with httpx.Client(timeout=30) as c:
            url = f"http://127.0.0.1:{self.srv.preview_port}/"
            headers = {"Host": f"8000-{sid}.localhost", "X-Torpor-Token": token}
            for i in range(n + 5):
                t0 = time.perf_counter()
                r = c.get(url, headers=headers)
                ms = ms_since(t0)
                assert r.status_code == 200 and b"<h1>hi</h1>" in r.content, r.text
                if i >= 5:
                    get_ms.append(ms)
        say(f"preview: {n} WebSocket echoes")
        ws_token = self.api.post(f"/v1/sandboxes/{sid}/preview-urls",
                                 json={"port": 9000}).json()["token"]
        ws_ms = websocket_echo(self.srv.preview_port, f"9000-{sid}.localhost", ws_token, n)
        # the same page fetched inside the sandbox (client and server both under gVisor)
        inside = json.loads(self.sh(sid, "python3 -c \"" + INSIDE_GET.replace('"', '\\"') +
                                    f"\" {n}")["stdout"])
        self.api.delete(f"/v1/sandboxes/{sid}")
        return {"n": n, "http_get_ms": stats(get_ms), "websocket_echo_ms": stats(ws_ms),
                "inside_sandbox_get_ms": stats(inside)}


INSIDE_GET = ("import http.client, json, sys, time; n = int(sys.argv[1]); "
              "c = http.client.HTTPConnection('127.0.0.1', 8000); out = []\n"
              "for i in range(n + 5):\n"
              " t0 = time.perf_counter(); c.request('GET', '/'); c.getresponse().read()\n"
              " out.append((time.perf_counter() - t0) * 1000)\n"
              "print(json.dumps(out[5:]))")


def websocket_echo(port: int, host: str, token: str, n: int) -> list[float]:
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(ws.send(we.Request(host=host, target="/",
                                     extra_headers=[(b"x-torpor-token", token.encode())])))
        _wait(ws, s, we.AcceptConnection)
        for i in range(n + 5):
            t0 = time.perf_counter()
            s.sendall(ws.send(we.Message(data=f"echo {i}")))
            msg = _wait(ws, s, we.TextMessage)
            ms = ms_since(t0)
            assert msg.data == f"echo {i}"
            if i >= 5:
                out.append(ms)
        s.sendall(ws.send(we.CloseConnection(code=1000)))
    return out


def _wait(ws, s, kind):
    while True:
        data = s.recv(65536)
        if not data:
            raise RuntimeError("websocket closed")
        ws.receive_data(data)
        for e in ws.events():
            if isinstance(e, we.RejectConnection):
                raise ConnectionError(f"websocket rejected: {e.status_code}")
            if isinstance(e, kind):
                return e


def table(report: dict) -> str:
    r = report["results"]
    rows = [("what", "ours", "direct / inside", "target")]

    def f(d, k="p50"):
        return "-" if not d or k not in d else f"{d[k]:.2f}"

    if "https" in r:
        h = r["https"]
        rows.append(("HTTPS 1 KiB GET keep-alive p50 ms (sandbox via proxy | host direct)",
                     f(h["sandbox_via_proxy_ms"]), f(h["host_direct_ms"]), ""))
        rows.append(("  added latency p50 ms", f"{h['added_ms_p50']:.2f}", "", "<= 5"))
        rows.append(("  with a credential rule (TLS intercepted) p50 ms",
                     f(h["sandbox_via_proxy_intercepted_ms"]), "", ""))
        rows.append(("  client+server both inside the sandbox p50 ms", "",
                     f(h["sandbox_inside_only_ms"]), ""))
    if "download" in r:
        d = r["download"]
        rows.append((f"{d['mib']} MiB download MiB/s over http (proxied requests)",
                     str(d["http_mib_s"]), str(d["host_direct_http_mib_s"]), ">= 50"))
        rows.append((f"{d['mib']} MiB download MiB/s over https (CONNECT)",
                     str(d["https_mib_s"]), str(d["host_direct_https_mib_s"]), ""))
        rows.append(("  https with client and server both inside (the sandbox's TLS floor)",
                     "", str(d.get("sandbox_inside_https_mib_s", "-")), ""))
    if "preview" in r:
        p = r["preview"]
        rows.append(("preview GET small page p50/p90 ms",
                     f"{f(p['http_get_ms'])}/{f(p['http_get_ms'], 'p90')}",
                     f(p["inside_sandbox_get_ms"]), "p50 <= 10"))
        rows.append(("preview WebSocket echo p50/p90 ms",
                     f"{f(p['websocket_echo_ms'])}/{f(p['websocket_echo_ms'], 'p90')}", "",
                     "p50 <= 5"))
    for k, t in report.get("targets", {}).items():
        rows.append((f"target {k}", str(t["value"]), t["target"],
                     "met" if t["met"] else "NOT MET"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     for row in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, 20 MiB download")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", help="write the JSON here (default on a full run: "
                    "bench/results/network.json)")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else SECTIONS
    if set(only) - set(SECTIONS):
        ap.error(f"unknown sections; known: {SECTIONS}")
    n = 50 if args.quick else 300
    mib = 20 if args.quick else 100

    stop_on_sigterm()
    report = {"bench": "network", "machine": machine(),
              "settings": {"sections": only, "requests": n, "download_mib": mib,
                           "upstreams": "tests/upstreams.py on 127.0.0.1 (own test CA)",
                           "server_args": "--pool-size 0 --egress-allow-cidr 127.0.0.0/8 "
                                          "--egress-resolve api.test=127.0.0.1 "
                                          "--egress-upstream-ca <test ca>"},
              "reproduce": reproduce_cmd("bench/network.py"), "results": {}, "errors": {}}
    t_start = time.time()
    b = Bench()
    sections = {"https": lambda: b.https(n), "download": lambda: b.download(mib),
                "preview": lambda: b.preview(n)}
    run_sections(report, [s for s in SECTIONS if s in only], lambda name: sections[name](),
                 lambda keep: b.close())
    out = default_out(args, "network")
    return finish(report, TARGETS, t_start, out, table)


if __name__ == "__main__":
    sys.exit(main())
