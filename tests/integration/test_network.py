"""The network of real sandboxes: egress policy through the proxy, credential brokering,
DNS, the audit log, and preview URLs (real runsc, real sockets).

Upstreams are servers this module starts on loopback with a CA of its own; the server
under test allows 127.0.0.0/8 explicitly (`--egress-allow-cidr`) and resolves the test
names statically (`--egress-resolve`). No traffic goes anywhere else.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import pytest
import wsproto
import wsproto.events as we
from conftest import (
    Server,
    cli,
    make_data_dir,
    run,
    teardown_data_dir,
    wait_for,
    wait_listening,
)
from upstreams import Upstreams

REAL = "sk-real-" + os.urandom(12).hex()  # never sent into a sandbox by this test


@pytest.fixture(scope="module")
def up():
    u = Upstreams().start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def net(up):
    srv = Server(make_data_dir(), pool_size=1, args=[
        "--egress-allow-cidr", "127.0.0.0/8",
        "--egress-resolve", "api.test=127.0.0.1", "--egress-resolve", "other.test=127.0.0.1",
        "--egress-resolve", "rebind.test=10.0.0.7",
        "--egress-upstream-ca", str(up.ca)]).start()
    yield srv
    teardown_data_dir(srv)


@pytest.fixture(scope="module")
def api(net):
    with net.client() as c:
        yield c


def create(api, **body) -> str:
    r = api.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def sh(api, sid: str, cmd: str, **kw) -> dict:
    return run(api, sid, cmd, timeout=60, **kw)


def curl(api, sid: str, args: str) -> dict:
    return sh(api, sid, f"curl -sS --max-time 20 {args}")


def put_test_ca(api, sid: str, up) -> None:
    r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/upstream-ca.pem"},
                content=up.ca.read_bytes())
    assert r.status_code in (200, 201), r.text


# --- egress policy ------------------------------------------------------------------------
def test_http_and_https_leave_through_the_proxy_and_are_logged(api, up):
    sid = create(api)
    try:
        r = curl(api, sid, f"http://api.test:{up.http_port}/echo?x=1")
        assert r["exit_code"] == 0, r
        assert json.loads(r["stdout"])["path"] == "/echo?x=1"
        put_test_ca(api, sid, up)  # CONNECT is a tunnel: the client checks the upstream
        r = curl(api, sid, f"--cacert /tmp/upstream-ca.pem https://api.test:{up.https_port}/echo")
        assert r["exit_code"] == 0, r
        # python's urllib, through the same environment
        r = sh(api, sid, "python3 -c \"import urllib.request as u; print(u.urlopen("
                         f"'http://other.test:{up.http_port}/bytes/5').read())\"")
        assert r["stdout"].strip() == "b'xxxxx'", r
        entries = api.get(f"/v1/sandboxes/{sid}/egress").json()["entries"]
        http_ = [e for e in entries if e["protocol"] == "http" and e["host"] == "api.test"]
        assert http_ and http_[0]["method"] == "GET" and http_[0]["path"] == "/echo?x=1"
        assert http_[0]["allowed"] and http_[0]["status"] == 200 and http_[0]["bytes_down"] > 0
        tunnels = [e for e in entries if e["protocol"] == "connect"]
        assert tunnels and tunnels[0]["port"] == up.https_port and tunnels[0]["bytes_up"] > 0
        assert tunnels[0]["address"] == "127.0.0.1"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_deny_all_with_an_allowlist_and_a_live_policy_change(api, up):
    sid = create(api, network={"egress": "deny-all", "allow": ["api.test"]})
    try:
        info = api.get(f"/v1/sandboxes/{sid}").json()
        assert info["network"] == {"egress": "deny-all", "allow": ["api.test"], "deny": []}
        assert curl(api, sid, f"http://api.test:{up.http_port}/echo")["exit_code"] == 0
        r = curl(api, sid, f"-i http://other.test:{up.http_port}/echo")
        assert "403" in r["stdout"].splitlines()[0], r
        assert "other.test" in r["stdout"] and "deny-all" in r["stdout"], r
        r = curl(api, sid, f"https://other.test:{up.https_port}/")
        assert r["exit_code"] != 0 and "403" in r["stderr"], r
        # a policy change applies to the next connection
        r = api.patch(f"/v1/sandboxes/{sid}/network", json={"allow": ["api.test",
                                                                      "*.test"]})
        assert r.status_code == 200 and r.json()["network"]["allow"] == ["api.test", "*.test"]
        assert curl(api, sid, f"http://other.test:{up.http_port}/echo")["exit_code"] == 0
        api.patch(f"/v1/sandboxes/{sid}/network", json={"deny": ["other.test"]})
        r = curl(api, sid, f"-i http://other.test:{up.http_port}/echo")
        assert "403" in r["stdout"].splitlines()[0]
        denied = [e for e in api.get(f"/v1/sandboxes/{sid}/egress").json()["entries"]
                  if not e["allowed"]]
        assert denied and all(e["rule"] for e in denied)
        bad = api.patch(f"/v1/sandboxes/{sid}/network", json={"allow": ["exa mple.com"]})
        assert bad.status_code == 422 and "exa mple.com" in bad.text
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


KEEP_ALIVE_CLIENT = """
import http.client, os, sys, time
c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=20)
def get():
    c.request("GET", "http://api.test:%s/echo" % sys.argv[1])
    r = c.getresponse()
    return r.status, r.read()
print("first", get()[0], flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
try:
    print("second", get()[0], flush=True)
except (OSError, http.client.HTTPException) as e:
    print("second failed", type(e).__name__, flush=True)
"""


def test_a_policy_change_closes_open_connections(api, up):
    sid = create(api)
    try:
        api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/ka.py"},
                content=KEEP_ALIVE_CLIENT)
        proc = api.post(f"/v1/sandboxes/{sid}/commands", json={
            "cmd": f"python3 /tmp/ka.py {up.http_port}", "background": True}).json()
        wait_for(lambda: "first 200" in api.get(
            f"/v1/sandboxes/{sid}/processes/{proc['pid']}/output").text, every=0.1)
        r = api.patch(f"/v1/sandboxes/{sid}/network",
                      json={"egress": "deny-all", "allow": ["other.test"]})
        assert r.status_code == 200
        sh(api, sid, "touch /tmp/go")
        out = api.post(f"/v1/sandboxes/{sid}/processes/{proc['pid']}/wait").json()
        assert out["exit_code"] == 0
        text = api.get(f"/v1/sandboxes/{sid}/processes/{proc['pid']}/output").text
        # the keep-alive connection was closed: no second request under the old policy
        assert "second 200" not in text and ("second failed" in text or "second 403" in text)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_always_denied_destinations(api, net, up):
    sid = create(api)  # allow-all: public addresses, plus what the operator allowed
    try:
        targets = [f"http://127.0.0.1:{net.port}/healthz",  # the server's own API
                   f"http://127.0.0.1:{net.preview_port}/",  # and its preview port
                   "http://169.254.169.254/latest/meta-data/",  # link-local metadata
                   f"http://rebind.test:{up.http_port}/",  # a name that resolves private
                   "http://10.0.0.1/", "http://[::ffff:10.0.0.1]/"]
        for url in targets:  # through the proxy (NO_PROXY keeps loopback inside)
            r = curl(api, sid, f"-i --noproxy '' -x http://127.0.0.1:3128 {url}")
            assert r["stdout"].startswith("HTTP/1.1 403"), (url, r)
        for target in ("10.0.0.1:443", "169.254.169.254:443", f"127.0.0.1:{net.port}"):
            r = curl(api, sid, f"-p --noproxy '' -x http://127.0.0.1:3128 http://{target}/")
            assert r["exit_code"] != 0 and "403" in r["stderr"], (target, r)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_no_way_around_the_proxy(api, up):
    sid = create(api)
    try:
        # without the proxy variables the upstream's port is the sandbox's own loopback
        r = sh(api, sid, f"env -u http_proxy -u HTTP_PROXY -u ALL_PROXY -u all_proxy "
                         f"curl -sS --max-time 10 --noproxy '*' http://api.test:{up.http_port}/")
        assert r["exit_code"] != 0, r
        r = sh(api, sid, "ip -o addr 2>/dev/null || cat /proc/net/dev")
        assert "eth" not in r["stdout"], r  # no interface but loopback
        # even root inside cannot add one
        r = sh(api, sid, "ip link add dummy0 type dummy", user="root")
        assert r["exit_code"] != 0
        assert not [x for x in up.seen() if x["path"] == "/"]
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_dns_answers_only_what_the_policy_allows(api):
    sid = create(api, network={"egress": "deny-all", "allow": ["api.test"]})
    try:
        r = sh(api, sid, "getent hosts api.test")
        assert r["exit_code"] == 0 and r["stdout"].split()[0] == "127.0.0.1", r
        assert sh(api, sid, "getent hosts other.test")["exit_code"] != 0
        dns = [e for e in api.get(f"/v1/sandboxes/{sid}/egress").json()["entries"]
               if e["protocol"] == "dns"]
        assert {e["host"] for e in dns} >= {"api.test", "other.test"}
        assert any(not e["allowed"] and e["host"] == "other.test" for e in dns)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_egress_survives_standby_and_hibernation(api, up):
    sid = create(api)
    try:
        for verb in ("standby", "hibernate"):
            assert api.post(f"/v1/sandboxes/{sid}/{verb}").status_code == 200
            r = curl(api, sid, f"http://api.test:{up.http_port}/echo")
            assert r["exit_code"] == 0, (verb, r)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


# --- credential brokering -------------------------------------------------------------------
def sentry_memory_and_disk_contain(net, sid: str, needle: bytes) -> list[str]:
    """Where on the host the sandbox's memory and disk hold `needle`: the sentry's memory
    file (all application memory and gVisor's own page cache) and the disk image."""
    found = []
    state = subprocess.run(["runsc", "--root", str(net.data_dir / "runsc"), "state", sid],
                           capture_output=True, text=True, check=True)
    pid = json.loads(state.stdout)["pid"]
    files = [net.data_dir / "sandboxes" / sid / "disk.img"]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "runsc-memory" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                files.append(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    assert len(files) >= 2, "the sentry's memory file was not found"
    for path in files:
        with open(path, "rb") as f:
            fd = f.fileno()
            pos = 0
            while True:
                try:
                    pos = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, pos, os.SEEK_HOLE)
                os.lseek(fd, pos, os.SEEK_SET)
                tail = b""
                while pos < end:
                    chunk = os.read(fd, min(8 << 20, end - pos))
                    if not chunk:
                        break
                    if needle in tail + chunk:
                        found.append(str(path))
                        break
                    tail = chunk[-len(needle):]
                    pos += len(chunk)
                pos = end
    return found


def test_a_secret_is_swapped_only_on_its_hosts_and_never_enters_the_sandbox(api, net, up):
    r = api.post("/v1/secrets", json={"name": "openai", "value": REAL,
                                      "allowed_hosts": ["api.test"]})
    assert r.status_code == 201, r.text
    assert REAL not in r.text
    sid = create(api, secrets={"OPENAI_API_KEY": "openai"})
    try:
        info = api.get(f"/v1/sandboxes/{sid}").json()
        assert info["secrets"] == {"OPENAI_API_KEY": "openai"} and REAL not in json.dumps(info)
        ph = sh(api, sid, "printf %s \"$OPENAI_API_KEY\"")["stdout"]
        assert ph.startswith("torpor_ph_") and REAL not in ph
        up.clear()
        # to the secret's host, over TLS: the proxy intercepts (the sandbox trusts the
        # installation's CA) and swaps the placeholder in the header
        auth = '-H "Authorization: Bearer $OPENAI_API_KEY"'
        r = curl(api, sid, f"{auth} https://api.test:{up.https_port}/echo?key=$OPENAI_API_KEY")
        assert r["exit_code"] == 0, r
        seen = up.https.seen[-1]
        assert seen["headers"]["authorization"] == f"Bearer {REAL}"
        assert seen["path"] == f"/echo?key={ph}"  # never in the URL
        # the upstream echoed the real value back: the sandbox sees the placeholder
        assert REAL not in r["stdout"] and f"Bearer {ph}" in r["stdout"], r
        # the installation's CA is in the system store too, not only in the env variables
        r = sh(api, sid, "env -u CURL_CA_BUNDLE -u SSL_CERT_FILE -u REQUESTS_CA_BUNDLE "
                         f"curl -sS --max-time 20 https://api.test:{up.https_port}/echo")
        assert r["exit_code"] == 0, r
        # basic auth, plain http, and the body are swapped only where the rule says
        r = curl(api, sid, f"-u \"user:$OPENAI_API_KEY\" http://api.test:{up.http_port}/echo")
        assert r["exit_code"] == 0
        user, pw = base64.b64decode(up.http.seen[-1]["headers"]["authorization"][6:]).decode(
        ).split(":", 1)
        assert (user, pw) == ("user", REAL)
        r = curl(api, sid, f"-d \"k=$OPENAI_API_KEY\" http://api.test:{up.http_port}/echo")
        assert up.http.seen[-1]["body"] == f"k={ph}"  # this secret does not inject bodies
        r = curl(api, sid, f"'http://other.test:{up.http_port}/echo?key='$OPENAI_API_KEY")
        assert up.http.seen[-1]["path"] == f"/echo?key={ph}"  # a foreign host: unchanged
        # anywhere else, the placeholder goes out unchanged
        put_test_ca(api, sid, up)
        for url in (f"https://other.test:{up.https_port}/echo",
                    f"http://other.test:{up.http_port}/echo"):
            extra = "--cacert /tmp/upstream-ca.pem " if url.startswith("https") else ""
            r = curl(api, sid, f"{extra}{auth} {url}")
            assert r["exit_code"] == 0, r
            assert up.seen()[-1]["headers"]["authorization"] == f"Bearer {ph}"
        log = api.get(f"/v1/sandboxes/{sid}/egress").json()["entries"]
        assert any(e["secrets"] == ["openai"] and e["host"] == "api.test" for e in log)
        assert all(e["host"] == "api.test" for e in log if e["secrets"])
        assert REAL not in json.dumps(log)
        # nowhere in the sandbox: environment, files, memory of every process
        r = sh(api, sid, "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c "
                         "torpor_ph_; grep -r -l -s sk-real- /home /tmp /etc /root",
               user="root")
        assert REAL not in r["stdout"]
        assert sentry_memory_and_disk_contain(net, sid, REAL.encode()) == []
        assert sentry_memory_and_disk_contain(net, sid, ph.encode()), "the scan finds nothing"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        api.delete("/v1/secrets/openai")


def test_body_injection_when_the_rule_says_so(api, up):
    api.post("/v1/secrets", json={"name": "hook", "value": REAL + "-body",
                                  "allowed_hosts": [f"api.test:{up.http_port}"],
                                  "inject_body": True})
    sid = create(api, secrets={"HOOK_TOKEN": "hook"})
    try:
        r = curl(api, sid, f"-d \"token=$HOOK_TOKEN\" http://api.test:{up.http_port}/echo")
        assert r["exit_code"] == 0
        assert up.http.seen[-1]["body"] == f"token={REAL}-body"
        assert REAL not in r["stdout"]
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        api.delete("/v1/secrets/hook")


def test_granting_a_missing_secret_is_refused(api):
    r = api.post("/v1/sandboxes", json={"secrets": {"KEY": "nope"}})
    assert r.status_code == 422 and "nope" in r.text
    r = api.post("/v1/sandboxes", json={"secrets": {"BAD NAME": "nope"}})
    assert r.status_code == 422


# --- previews -------------------------------------------------------------------------------
WS_ECHO = r'''
import base64, hashlib, socket, struct, threading
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        req += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    f = c.makefile("rb")
    while True:
        h = f.read(2)
        if len(h) < 2: return
        op, n = h[0] & 15, h[1] & 127
        if n == 126: n = struct.unpack(">H", f.read(2))[0]
        mask = f.read(4); data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        if op == 8: c.sendall(b"\x88\x00"); return
        c.sendall(bytes([0x80 | op, len(data)]) + data)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000)); s.listen()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


@pytest.fixture(scope="module")
def site(api):
    """A sandbox serving a page on 8000 and a WebSocket echo on 9000."""
    sid = create(api)
    sh(api, sid, "mkdir -p /tmp/site && echo '<h1>hello preview</h1>' > /tmp/site/index.html")
    api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/ws.py"}, content=WS_ECHO)
    for cmd in ("cd /tmp/site && exec python3 -m http.server 8000 --bind 127.0.0.1",
                "exec python3 /tmp/ws.py"):
        assert api.post(f"/v1/sandboxes/{sid}/commands",
                        json={"cmd": cmd, "background": True}).status_code == 201
    for port in (8000, 9000):
        wait_listening(api, sid, port)
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


def preview_get(net, sid: str, port: int = 8000, path: str = "/", headers=None,
                host: str | None = None) -> httpx.Response:
    h = {"Host": host or f"{port}-{sid}.localhost:{net.preview_port}", **(headers or {})}
    return httpx.get(f"http://127.0.0.1:{net.preview_port}{path}", headers=h, timeout=30)


def test_preview_needs_a_token_or_the_key_and_never_forwards_them(api, net, site):
    assert preview_get(net, site).status_code == 401
    url = api.post(f"/v1/sandboxes/{site}/preview-urls", json={"port": 8000}).json()["url"]
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == f"8000-{site}.localhost" and parts.port == net.preview_port
    r = preview_get(net, site, path=f"/?{parts.query}")
    assert r.status_code == 200 and "hello preview" in r.text
    assert "torpor_token" in r.headers.get("set-cookie", "")
    token = urllib.parse.parse_qs(parts.query)["torpor_token"][0]
    r = preview_get(net, site, headers={"Cookie": f"torpor_token={token}"})
    assert r.status_code == 200
    r = preview_get(net, site, headers={"Authorization": f"Bearer {net.key}"})
    assert r.status_code == 200
    # the same page through the API, with the key
    r = api.get(f"/v1/sandboxes/{site}/ports/8000/index.html")
    assert r.status_code == 200 and "hello preview" in r.text
    # a token is for one sandbox and port, and expires
    other = create(api)
    try:
        r = preview_get(net, other, headers={"X-Torpor-Token": token})
        assert r.status_code == 403
    finally:
        api.delete(f"/v1/sandboxes/{other}")
    assert preview_get(net, site, port=9000, headers={"X-Torpor-Token": token}
                       ).status_code == 403
    short = api.post(f"/v1/sandboxes/{site}/preview-urls",
                     json={"port": 8000, "expires_in": 1}).json()["token"]
    time.sleep(2.1)
    assert preview_get(net, site, headers={"X-Torpor-Token": short}).status_code == 403
    assert preview_get(net, site, host=f"8000-sbxnosuchsandbox.localhost:{net.preview_port}"
                       ).status_code == 404


def test_public_ports_custom_domains_and_missing_listeners(api, net, site):
    r = api.put(f"/v1/sandboxes/{site}/ports/8000", json={"public": True})
    assert r.status_code == 200 and r.json()["public"]
    try:
        assert preview_get(net, site).status_code == 200
        assert preview_get(net, site, port=9000).status_code == 401  # only 8000 is public
        r = api.post("/v1/domains", json={"domain": "app.example.test", "sandbox_id": site,
                                          "port": 8000, "public": True})
        assert r.status_code == 201, r.text
        r = preview_get(net, site, host=f"app.example.test:{net.preview_port}")
        assert r.status_code == 200 and "hello preview" in r.text
        assert api.post("/v1/domains", json={"domain": "app.example.test", "sandbox_id": site,
                                             "port": 8000}).status_code == 409
        assert api.delete("/v1/domains/app.example.test").status_code == 204
        assert preview_get(net, site, host="app.example.test").status_code == 404
    finally:
        api.delete(f"/v1/sandboxes/{site}/ports/8000")
    assert preview_get(net, site).status_code == 401
    r = api.get(f"/v1/sandboxes/{site}/ports/8765/")
    assert r.status_code == 502 and "no process is listening on port 8765" in r.text


def test_preview_keep_alive_cannot_switch_to_another_sandbox(api, net, site):
    token = api.post(f"/v1/sandboxes/{site}/preview-urls", json={"port": 8000}).json()["token"]
    other = create(api)
    try:
        with socket.create_connection(("127.0.0.1", net.preview_port), timeout=30) as s:
            f = s.makefile("rb")
            s.sendall(f"GET / HTTP/1.1\r\nHost: 8000-{site}.localhost\r\nX-Torpor-Token: "
                      f"{token}\r\n\r\n".encode())
            status, length = _read_response(f)
            assert status == 200 and length > 0
            s.sendall(f"GET / HTTP/1.1\r\nHost: 8000-{other}.localhost\r\n\r\n".encode())
            status, _ = _read_response(f)
            assert status == 401
    finally:
        api.delete(f"/v1/sandboxes/{other}")


def _read_response(f) -> tuple[int, int]:
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline().strip()):
        k, _, v = line.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
    f.read(length)
    return status, length


def _ws_events(ws, s, until):
    """Feed the socket to wsproto until an event of type `until` arrives."""
    for _ in range(100):  # bounded: each recv waits at most the socket's timeout
        data = s.recv(65536)
        assert data, "the connection closed"
        ws.receive_data(data)
        events = list(ws.events())
        for e in events:
            if isinstance(e, we.RejectConnection):
                pytest.fail(f"websocket rejected: status {e.status_code}")
            if isinstance(e, until):
                return e
    pytest.fail("no websocket event")


def test_websocket_through_the_preview_port(api, net, site):
    token = api.post(f"/v1/sandboxes/{site}/preview-urls", json={"port": 9000}).json()["token"]
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", net.preview_port), timeout=30) as s:
        s.sendall(ws.send(we.Request(host=f"9000-{site}.localhost", target="/",
                                     extra_headers=[(b"x-torpor-token", token.encode())])))
        _ws_events(ws, s, we.AcceptConnection)
        for i in range(5):
            s.sendall(ws.send(we.Message(data=f"ping {i}")))
            assert _ws_events(ws, s, we.TextMessage).data == f"ping {i}"
        s.sendall(ws.send(we.CloseConnection(code=1000)))


STREAMER = """
import http.server, os, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        def chunk(b):
            self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(b), b)); self.wfile.flush()
        chunk(b"data: first\\n\\n")
        while not os.path.exists("/tmp/release"):
            time.sleep(0.05)
        chunk(b"data: second\\n\\n")
        chunk(b"")
http.server.HTTPServer(("127.0.0.1", 8001), H).serve_forever()
"""


def test_preview_streams_a_response_as_it_is_written(api, net, site):
    api.put(f"/v1/sandboxes/{site}/files", params={"path": "/tmp/streamer.py"},
            content=STREAMER)
    api.post(f"/v1/sandboxes/{site}/commands",
             json={"cmd": "exec python3 /tmp/streamer.py", "background": True})
    sh(api, site, "rm -f /tmp/release")
    wait_listening(api, site, 8001)
    headers = {"Host": f"8001-{site}.localhost", "Authorization": f"Bearer {net.key}"}
    with httpx.Client(timeout=30) as c, c.stream(
            "GET", f"http://127.0.0.1:{net.preview_port}/", headers=headers) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        assert next(chunks) == b"data: first\n\n"  # while the server still waits
        sh(api, site, "touch /tmp/release")
        assert b"".join(chunks) == b"data: second\n\n"


def test_a_preview_request_wakes_a_sleeping_sandbox(api, net, site):
    # the previous tests' connections close asynchronously: until then standby is a 409
    t0 = time.monotonic()
    while (r := api.post(f"/v1/sandboxes/{site}/standby")).status_code == 409:
        assert time.monotonic() - t0 < 20, r.text
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "standby"
    r = preview_get(net, site, headers={"Authorization": f"Bearer {net.key}"})
    assert r.status_code == 200 and "hello preview" in r.text
    assert api.get(f"/v1/sandboxes/{site}").json()["state"] == "running"


def test_preview_url_bad_input(api, site):
    assert api.post(f"/v1/sandboxes/{site}/preview-urls",
                    json={"port": 0}).status_code == 422
    r = api.post(f"/v1/sandboxes/{site}/preview-urls", json={"port": 80, "expires_in": 1e9})
    assert r.status_code == 422 and "expires_in" in r.text
    assert api.post("/v1/sandboxes/nosuch/preview-urls", json={"port": 80}).status_code == 404
    r = api.post("/v1/domains", json={"domain": "x.localhost", "sandbox_id": site, "port": 80})
    assert r.status_code == 422
    assert re.search("domain", api.post("/v1/domains", json={
        "domain": "not a domain", "sandbox_id": site, "port": 80}).text)


# --- the SDK and the CLI, against the same server -------------------------------------------


def test_sdk_network_methods(net, up, site):
    from torpor import Sandbox, Secret
    from torpor.sdk import Domains, InvalidRequestError

    conn = {"url": net.url, "api_key": net.key}
    Secret.create("sdk-token", REAL, allowed_hosts=["api.test"], **conn)
    try:
        with Sandbox.create(network={"egress": "deny-all", "allow": ["api.test"]},
                            secrets={"TOKEN": "sdk-token"}, **conn) as sbx:
            info = sbx.info()
            assert info.network["egress"] == "deny-all" and info.secrets == {"TOKEN":
                                                                              "sdk-token"}
            r = sbx.commands.run(f"curl -sS -o /dev/null -w '%{{http_code}}' "
                                 f"http://other.test:{up.http_port}/")
            assert r.stdout == "403"
            info = sbx.update_network(allow=["api.test", "other.test"])
            assert info.network["allow"] == ["api.test", "other.test"]
            r = sbx.commands.run(f"curl -sS -o /dev/null -w '%{{http_code}}' "
                                 f"http://other.test:{up.http_port}/")
            assert r.stdout == "200"
            log = sbx.egress_log(limit=10)
            assert log[0].host == "other.test" and log[0].allowed
            assert any(not e.allowed for e in log)
            with pytest.raises(InvalidRequestError):
                sbx.update_network(egress="sometimes")
        site_sbx = Sandbox(site, **conn)
        url = site_sbx.preview_url(8000, expires_in=600)
        assert f"8000-{site}.localhost:{net.preview_port}" in url and "torpor_token=" in url
        # the URL as handed out works from Python's own resolver on this host (httpx and
        # urllib), with nothing added to /etc/hosts: `make` installs libnss-myhostname
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and "hello preview" in r.text
        with urllib.request.urlopen(url, timeout=30) as page:
            assert "hello preview" in page.read().decode()
        port = site_sbx.expose(8000, public=True)
        assert port.public and [p.port for p in site_sbx.ports()] == [8000]
        site_sbx.expose(8000, public=False)
        assert site_sbx.ports() == []
        d = site_sbx.add_domain("sdk.example.test", 8000)
        assert d.url == f"http://sdk.example.test:{net.preview_port}/"
        with Domains(**conn) as domains:
            assert [x.domain for x in domains.list()] == ["sdk.example.test"]
        site_sbx.remove_domain("sdk.example.test")
        site_sbx.close()
    finally:
        Secret.delete("sdk-token", **conn)


def test_cli_network_verbs(net, up, site):
    p = cli(net, "sandbox", "create", "--egress", "deny-all", "--allow", "api.test")
    assert p.returncode == 0, p.stderr
    sid = p.stdout.strip()
    try:
        p = cli(net, "sandbox", "network", sid, "--allow", "other.test", "--json")
        assert p.returncode == 0 and json.loads(p.stdout)["allow"] == ["other.test"]
        p = cli(net, "exec", sid, "--", "curl", "-fsS", "-o", "/dev/null",
                 f"http://api.test:{up.http_port}/")
        assert p.returncode != 0  # api.test is no longer allowed
        p = cli(net, "sandbox", "egress", sid)
        assert p.returncode == 0 and "DENIED" in p.stdout and "api.test" in p.stdout
        p = cli(net, "sandbox", "preview-url", site, "8000", "--expires-in", "10m")
        assert p.returncode == 0 and "torpor_token=" in p.stdout
        p = cli(net, "sandbox", "expose", site, "8000")
        assert p.returncode == 0 and f"8000-{site}" in p.stdout
        p = cli(net, "sandbox", "expose", site, "8000", "--private")
        assert p.returncode == 0
        p = cli(net, "secret", "create", "cli-secret", "--host", "api.test", input=REAL)
        assert p.returncode == 0, p.stderr
        p = cli(net, "secret", "list")
        assert "cli-secret" in p.stdout and REAL not in p.stdout
        assert cli(net, "secret", "delete", "cli-secret").returncode == 0
        p = cli(net, "sandbox", "network", sid, "--egress", "sometimes")
        assert p.returncode != 0
    finally:
        cli(net, "sandbox", "rm", sid)
