"""`E2BDoor`: the ASGI layer (outermost) that sends each request where E2B's SDK means it.

E2B's SDK speaks to one host for everything when `E2B_API_URL` and `E2B_SANDBOX_URL` are
the same: a request for a sandbox carries an `E2b-Sandbox-Id` header (and
`E2b-Sandbox-Port`, default envd's 49983), or a Host `{port}-{id}.{domain}`; anything
else is the control plane. So:

- a sandbox request: an unknown, deleted or failed sandbox, or one E2B paused without
  autoResume, gets E2B's 502; port 49983 goes to envd (`envd.create_envd_app`, with
  `scope["e2b_sandbox_id"]`), any other port through the preview gateway to that port
  inside the sandbox (49999: the code interpreter's server);
- a signed `/files` URL that names no sandbox (the SDK's download/upload URLs, whose host
  E2B_SANDBOX_URL replaced) goes to the envd of the secure sandbox whose token signed it;
- control-plane paths (`/sandboxes...`, `/v2/...`, `/v3/...`, `/snapshots...`,
  `/templates...`) go to the control app (`control.py`);
- everything else goes on to the native app unchanged, except on the door's own port
  (`e2b_port`), which serves E2B only.
"""

from __future__ import annotations

import hmac
import json
import logging
import re

from torpor.compat.e2b import sandboxes as sbx
from torpor.errors import TorporError

log = logging.getLogger("torpor.e2b")

# a Torpor sandbox id (engine's new_id: "sbx" and 13 of [a-z0-9]) in the first label only, so
# an operator's own host name that happens to start with digits and a dash is not taken
HOST = re.compile(r"^(\d{1,5})-(sbx[a-z0-9]{13})\.")
CONTROL = re.compile(r"^/(sandboxes|snapshots|templates)(/|$)|^/v[23]/")
PORT_MAX = 65535
DEBUG_ID = "debug_sandbox_id"  # what E2B's SDK calls the sandbox in debug mode


def not_found_body(sid: str) -> bytes:
    return json.dumps({"sandboxId": sid, "message": "The sandbox was not found",
                       "code": 502}).encode()


async def send_json(send, status: int, body: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return ""


def target_of(scope) -> tuple[str, int] | None:
    """(sandbox id, port) a request is for, or None for the control plane / native app.
    The headers win over the Host, as on E2B's proxy."""
    sid = port = host = None
    for k, v in scope.get("headers", ()):
        if k == b"e2b-sandbox-id":
            sid = v.decode("latin-1").strip()
        elif k == b"e2b-sandbox-port":
            port = v.decode("latin-1").strip()
        elif k == b"host":
            host = v.decode("latin-1").strip().lower()
    if sid is not None:
        if port is None:
            return sid, sbx.ENVD_PORT
        return sid, int(port) if port.isdigit() and 0 < int(port) <= PORT_MAX else -1
    if host is not None:
        m = HOST.match(host)
        if m is not None and 0 < int(m.group(1)) <= PORT_MAX:
            return m.group(2), int(m.group(1))
    return None


def signed_target(engine, scope) -> tuple[str, int] | None:
    """A signed `/files` URL with no sandbox named (the SDK's `download_url` and
    `upload_url` put the sandbox in the host, which E2B_SANDBOX_URL replaces): the secure
    sandbox whose access token makes that signature."""
    if b"signature=" not in scope.get("query_string", b""):
        return None
    from torpor.compat.e2b.envd_files import sandbox_of_signature

    sid = sandbox_of_signature(engine, scope)
    return (sid, sbx.ENVD_PORT) if sid is not None else None


class E2BDoor:
    """See the module's docstring. `app` is the native app; `e2b_port` (0: none) is a port
    of the door's own, on which the native app is not reachable."""

    def __init__(self, app, engine, e2b_port: int = 0):
        self.app = app
        self.engine = engine
        self.e2b_port = e2b_port
        self._control = None
        self._envd = None

    def control(self):
        if self._control is None:
            from torpor.compat.e2b.control import create_control_app

            self._control = create_control_app(self.engine)
        return self._control

    def envd(self):
        if self._envd is None:
            try:
                from torpor.compat.e2b.envd import create_envd_app
            except ImportError:
                return None  # envd is not part of this build yet: its sandboxes answer 502
            self._envd = create_envd_app(self.engine)
        return self._envd

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan
        target = target_of(scope)
        if target is None and kind == "http" and scope["path"] == "/files":
            target = signed_target(self.engine, scope)
        if target is not None:
            return await self.to_sandbox(scope, receive, send, *target)
        own_port = self.e2b_port and (scope.get("server") or (None, None))[1] == self.e2b_port
        if kind == "http" and (own_port or CONTROL.match(scope["path"])):
            return await self.control()(scope, receive, send)
        if own_port:  # a WebSocket to no sandbox on the door's own port
            return await send({"type": "websocket.close", "code": 4404})
        return await self.app(scope, receive, send)

    async def to_sandbox(self, scope, receive, send, sid: str, port: int):
        debug = sid == DEBUG_ID and bool(self.engine.settings.e2b_debug_sandbox)
        if debug:
            sid = self.engine.settings.e2b_debug_sandbox
        v = sbx.view(self.engine, sid) if port > 0 else None
        if v is not None and not debug and not sbx.is_e2b(v):
            # made through Torpor's own API and never connected through E2B: its envd and
            # ports are not open to anyone without a key (E2B's connect opens them)
            v = None
        if v is not None and v.state == "paused":
            if not v.door.get("auto_resume") or v.door.get("cold_snapshot") \
                    or v.door.get("auto_pause_memory") is False:
                v = None  # (a memory-less pause resumes by connect only, as on E2B)
            else:
                try:
                    sbx.stop_clock(self.engine, v)
                    await self.engine.resume(sid, "e2b_auto_resume")
                except TorporError as e:
                    log.warning("sandbox %s: auto-resume failed: %s", sid, e.message)
                    v = None
                else:
                    sbx.unpause(self.engine, v)
        if v is None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 4502})
            return await send_json(send, 502, not_found_body(sid))
        if port == sbx.ENVD_PORT:
            app = self.envd()
            if app is None:
                return await send_json(send, 502, not_found_body(sid))
            return await app({**scope, "e2b_sandbox_id": sid}, receive, send)
        token = v.door.get("traffic_token")
        if token and not hmac.compare_digest(
                _header(scope, b"e2b-traffic-access-token").encode(), token.encode()):
            body = json.dumps({"code": 403, "message": f"sandbox {sid} takes no public "
                               "traffic: send its E2B-Traffic-Access-Token"}).encode()
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 4403})
            return await send_json(send, 403, body)
        path = scope.get("path") or "/"
        await self.engine.traffic.gateway.asgi(scope, receive, send, sid, port, path)
