"""Request building shared by the sync and async clients.

Each REST operation of docs/api.md is one function returning a `Call`: what to send and
how to read the answer. The clients only send Calls (`_http.py`), so the two stay twins
and a fix to an operation lands once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from torpor.sdk.config import CONNECT_TIMEOUT
from torpor.sdk.models import (
    ApiKey,
    BuildInfo,
    CommandResult,
    Domain,
    EgressEntry,
    EntryInfo,
    Event,
    Port,
    PreviewUrl,
    ProcessInfo,
    SandboxInfo,
    TemplateInfo,
    Usage,
    UsageSummary,
    WriteInfo,
)

T = TypeVar("T")
NDJSON = "application/x-ndjson"
# HTTP read timeout beyond a command's own timeout, so the server's answer wins the race
COMMAND_GRACE = 30.0
# a checkpoint writes the sandbox's memory to disk, a restore reads it back: seconds
CHECKPOINT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Call(Generic[T]):
    operation: str  # for error messages: "read file /etc/hosts"
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    content: Any = None
    headers: Mapping[str, str] | None = None
    timeout: Any = httpx.USE_CLIENT_DEFAULT
    sandbox_id: str | None = None

    def request(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        return client.build_request(self.method, self.path, params=params, json=self.json,
                                    content=self.content, headers=self.headers,
                                    timeout=self.timeout)


def _model(cls: Any) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.model_validate(r.json())


def _models(cls: Any) -> Callable[[httpx.Response], list[Any]]:
    return lambda r: [cls.model_validate(x) for x in r.json()]


def _nothing(r: httpx.Response) -> None:
    return None


def _key(name: str) -> Callable[[httpx.Response], Any]:
    return lambda r: r.json()[name]


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _sbx(sid: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{quote(sid, safe='')}{rest}"


def long_timeout(seconds: float | None) -> httpx.Timeout:
    """HTTP timeout for a call the server may hold open `seconds` (None: for ever)."""
    read = None if seconds is None else seconds + COMMAND_GRACE
    return httpx.Timeout(CONNECT_TIMEOUT, read=read, write=None, pool=None)


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# --- sandboxes, templates, keys ----------------------------------------------------------

# The idle timers and expiry a sandbox is created with, or `update` changes: seconds (0
# turns one off) and what expiry does ("delete" or "hibernate"). None leaves one as it is.
TIMERS = ("standby_after", "hibernate_after", "ttl", "idle_ttl", "expire_action")


def create_sandbox(template: str | None, env: Mapping[str, str] | None,
                   metadata: Mapping[str, str] | None, cpu: float | None,
                   memory_mb: int | None, disk_mb: int | None,
                   timeout: float | None, network: Mapping[str, Any] | None = None,
                   secrets: Mapping[str, str] | None = None,
                   snapshot: str | None = None,
                   volumes: Mapping[str, Any] | None = None,
                   **timers: Any) -> Call[SandboxInfo]:
    body = _given(template=template, env=env, metadata=metadata, cpu=cpu,
                  memory_mb=memory_mb, disk_mb=disk_mb, network=network, secrets=secrets,
                  snapshot=snapshot, volumes=volumes, **_timers(timers))
    t = httpx.USE_CLIENT_DEFAULT if timeout is None else httpx.Timeout(
        CONNECT_TIMEOUT, read=timeout, write=timeout, pool=timeout)
    return Call(f"create sandbox from template {template or 'base'}", "POST", "/v1/sandboxes",
                _model(SandboxInfo), json=body, timeout=t)


def list_sandboxes(state: str | None,
                   metadata: Mapping[str, str] | None) -> Call[list[SandboxInfo]]:
    params: dict[str, Any] = {"state": state}
    params.update({f"metadata.{k}": v for k, v in (metadata or {}).items()})
    return Call("list sandboxes", "GET", "/v1/sandboxes", _models(SandboxInfo), params=params)


def get_sandbox(sid: str) -> Call[SandboxInfo]:
    return Call("get sandbox", "GET", _sbx(sid), _model(SandboxInfo), sandbox_id=sid)


def delete_sandbox(sid: str) -> Call[None]:
    return Call("delete sandbox", "DELETE", _sbx(sid), _nothing, sandbox_id=sid)


def _timers(given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(given) - set(TIMERS)
    if unknown:
        raise TypeError(f"unexpected argument {min(unknown)!r}; the timers are "
                        f"{', '.join(TIMERS)}")
    return _given(**given)


def update_sandbox(sid: str, **timers: Any) -> Call[SandboxInfo]:
    """PATCH: only the timers given change."""
    body = _timers(timers)
    if not body:
        raise ValueError(f"nothing to update: give at least one of {', '.join(TIMERS)}")
    return Call("update sandbox", "PATCH", _sbx(sid), _model(SandboxInfo), json=body,
                sandbox_id=sid)


def standby(sid: str) -> Call[SandboxInfo]:
    return Call("put sandbox in standby", "POST", _sbx(sid, "/standby"), _model(SandboxInfo),
                sandbox_id=sid)


def hibernate(sid: str) -> Call[SandboxInfo]:
    return Call("hibernate sandbox", "POST", _sbx(sid, "/hibernate"), _model(SandboxInfo),
                timeout=long_timeout(CHECKPOINT_TIMEOUT), sandbox_id=sid)


def resume(sid: str) -> Call[SandboxInfo]:
    return Call("resume sandbox", "POST", _sbx(sid, "/resume"), _model(SandboxInfo),
                timeout=long_timeout(CHECKPOINT_TIMEOUT), sandbox_id=sid)


def hold(sid: str, seconds: float) -> Call[str]:
    """POST .../keepalive: a hold that keeps the sandbox out of standby for `seconds`."""
    return Call(f"hold sandbox for {seconds:g}s", "POST", _sbx(sid, "/keepalive"),
                _key("hold_id"), json={"seconds": seconds}, sandbox_id=sid)


def release(sid: str, hold_id: str) -> Call[None]:
    return Call(f"release keep-alive hold {hold_id}", "DELETE",
                _sbx(sid, f"/keepalive/{quote(hold_id, safe='')}"), _nothing, sandbox_id=sid)


def usage(sid: str) -> Call[Usage]:
    return Call("get usage", "GET", _sbx(sid, "/usage"), _model(Usage), sandbox_id=sid)


def usage_all(state: str | None, metadata: Mapping[str, str] | None) -> Call[UsageSummary]:
    params: dict[str, Any] = {"state": state}
    params.update({f"metadata.{k}": v for k, v in (metadata or {}).items()})
    return Call("get usage", "GET", "/v1/usage", _model(UsageSummary), params=params)


def events(sid: str) -> Call[list[Event]]:
    return Call("list events", "GET", _sbx(sid, "/events"), _models(Event), sandbox_id=sid)


# --- network --------------------------------------------------------------------------------
def update_network(sid: str, network: Mapping[str, Any]) -> Call[SandboxInfo]:
    return Call("update network policy", "PATCH", _sbx(sid, "/network"), _model(SandboxInfo),
                json=dict(network), sandbox_id=sid)


def egress_log(sid: str, limit: int, before: int | None) -> Call[list[EgressEntry]]:
    return Call("read egress log", "GET", _sbx(sid, "/egress"),
                lambda r: [EgressEntry.model_validate(e) for e in r.json()["entries"]],
                params={"limit": limit, "before": before}, sandbox_id=sid)


def preview_url(sid: str, port: int, expires_in: float) -> Call[PreviewUrl]:
    return Call(f"make a preview URL for port {port}", "POST", _sbx(sid, "/preview-urls"),
                _model(PreviewUrl), json={"port": port, "expires_in": expires_in},
                sandbox_id=sid)


def expose(sid: str, port: int, public: bool) -> Call[Port]:
    return Call(f"expose port {port}", "PUT", _sbx(sid, f"/ports/{port}"), _model(Port),
                json={"public": public}, sandbox_id=sid)


def list_ports(sid: str) -> Call[list[Port]]:
    return Call("list exposed ports", "GET", _sbx(sid, "/ports"), _models(Port),
                sandbox_id=sid)


def add_domain(sid: str, domain: str, port: int, public: bool) -> Call[Domain]:
    return Call(f"map domain {domain}", "POST", "/v1/domains", _model(Domain),
                json={"domain": domain, "sandbox_id": sid, "port": port, "public": public},
                sandbox_id=sid)


def list_domains() -> Call[list[Domain]]:
    return Call("list domains", "GET", "/v1/domains", _models(Domain))


def remove_domain(domain: str) -> Call[None]:
    return Call(f"remove domain {domain}", "DELETE", f"/v1/domains/{quote(domain)}",
                _nothing)


def list_templates() -> Call[list[TemplateInfo]]:
    return Call("list templates", "GET", "/v1/templates", _models(TemplateInfo))


def _tpl(ref: str, rest: str = "") -> str:
    return f"/v1/templates/{quote(ref, safe=':')}{rest}"


def get_template(ref: str) -> Call[TemplateInfo]:
    return Call(f"get template {ref}", "GET", _tpl(ref), _model(TemplateInfo))


def delete_template(ref: str, force: bool = False) -> Call[None]:
    return Call(f"delete template {ref}", "DELETE", _tpl(ref), _nothing,
                params={"force": _bool(force)} if force else None)


def build_template(body: Mapping[str, Any]) -> Call[Any]:
    """POST /v1/templates, answered as a stream of the build's events (read line by line;
    the HTTP read timeout is off: a step may run for long without output)."""
    return Call(f"build template {body['name']}:{body.get('tag', 'latest')}", "POST",
                "/v1/templates", _nothing, json=body, headers={"Accept": NDJSON},
                timeout=long_timeout(None))


def list_builds() -> Call[list[BuildInfo]]:
    return Call("list template builds", "GET", "/v1/templates/builds", _models(BuildInfo))


def get_build(build_id: str) -> Call[BuildInfo]:
    return Call(f"get build {build_id}", "GET",
                f"/v1/templates/builds/{quote(build_id, safe='')}", _model(BuildInfo))


def build_logs(build_id: str, follow: bool, offset: int | None) -> Call[Any]:
    return Call(f"build logs {build_id}", "GET",
                f"/v1/templates/builds/{quote(build_id, safe='')}/logs", _nothing,
                params={"follow": _bool(follow), "offset": offset},
                headers={"Accept": NDJSON}, timeout=long_timeout(None))


def create_key(name: str, scope: str | None = None, e2b: bool = False) -> Call[ApiKey]:
    """POST /v1/keys; without a scope the server makes a user key."""
    body = {"name": name} if scope is None else {"name": name, "scope": scope}
    if e2b:
        body["e2b"] = True
    return Call(f"create API key {name!r}", "POST", "/v1/keys", _model(ApiKey), json=body)


def list_keys() -> Call[list[ApiKey]]:
    return Call("list API keys", "GET", "/v1/keys", _models(ApiKey))


def revoke_key(key_id: str) -> Call[None]:
    return Call(f"revoke API key {key_id}", "DELETE", f"/v1/keys/{quote(key_id, safe='')}",
                _nothing)


# --- commands and processes --------------------------------------------------------------

def run_command(sid: str, cmd: str | Sequence[str], *, env: Mapping[str, str] | None,
                cwd: str | None, user: str | int | None, stdin: str | bytes | None,
                timeout: float | None, background: bool, stream: bool,
                tag: str | None, keep_alive: bool = False) -> Call[Any]:
    """POST .../commands. The parser suits the plain answer (CommandResult) or the
    background one (ProcessInfo); a streamed answer is read line by line instead."""
    if isinstance(cmd, str):
        shell, argv = cmd, None
    else:
        shell, argv = None, [str(a) for a in cmd]
        if not argv:
            raise ValueError("cmd must be a shell string or a non-empty list of arguments")
    if isinstance(stdin, bytes):
        stdin = stdin.decode()  # the API carries stdin as text
    body: dict[str, Any] = {"cmd": shell, "argv": argv, "env": dict(env or {}), "cwd": cwd,
                            "stdin": stdin, "timeout": timeout, "background": background,
                            "stream": stream, "tag": tag}
    if user is not None:
        body["user"] = user
    if keep_alive:  # only when asked: a server without standby refuses unknown fields
        body["keep_alive"] = True
    what = shell if shell is not None else " ".join(argv or [])
    parse = _model(ProcessInfo) if background else _model(CommandResult)
    return Call(f"run {what[:80]!r}", "POST", _sbx(sid, "/commands"), parse, json=body,
                headers={"Accept": NDJSON} if stream else None,
                timeout=httpx.USE_CLIENT_DEFAULT if background else long_timeout(timeout),
                sandbox_id=sid)


def list_processes(sid: str) -> Call[list[ProcessInfo]]:
    return Call("list processes", "GET", _sbx(sid, "/processes"), _models(ProcessInfo),
                sandbox_id=sid)


def get_process(sid: str, pid: int) -> Call[ProcessInfo]:
    return Call(f"get process {pid}", "GET", _sbx(sid, f"/processes/{pid}"),
                _model(ProcessInfo), sandbox_id=sid)


def process_output(sid: str, pid: int, follow: bool, offset: int | None,
                   read_timeout: float | None = None) -> Call[None]:
    """GET .../output: an NDJSON stream, read line by line by the caller. A followed
    stream may be silent for long: it waits `read_timeout` seconds per read (None: ever)."""
    timeout = (httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout, write=None, pool=None)
               if follow else httpx.USE_CLIENT_DEFAULT)
    return Call(f"read output of process {pid}", "GET", _sbx(sid, f"/processes/{pid}/output"),
                _nothing, params={"follow": _bool(follow), "offset": offset},
                headers={"Accept": NDJSON}, timeout=timeout, sandbox_id=sid)


def attach_output(sid: str, pid: int, follow: bool, offset: int | None) -> Call[None]:
    """GET .../output?encoding=base64: the output's exact bytes with their offsets, from
    `offset` strictly (409 naming the range kept when it is not); reads wait for ever."""
    timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None, write=None, pool=None)
    return Call(f"attach to process {pid}", "GET", _sbx(sid, f"/processes/{pid}/output"),
                _nothing, params={"follow": _bool(follow), "offset": offset,
                                  "encoding": "base64"},
                headers={"Accept": NDJSON}, timeout=timeout, sandbox_id=sid)


def send_stdin(sid: str, pid: int, data: str | bytes, eof: bool) -> Call[None]:
    if isinstance(data, bytes):
        data = data.decode()
    return Call(f"send stdin to process {pid}", "POST", _sbx(sid, f"/processes/{pid}/stdin"),
                _nothing, json={"data": data, "eof": eof}, sandbox_id=sid)


def signal_process(sid: str, pid: int, signal: str) -> Call[None]:
    return Call(f"send {signal} to process {pid}", "POST",
                _sbx(sid, f"/processes/{pid}/signal"), _nothing, json={"signal": signal},
                sandbox_id=sid)


# --- files -------------------------------------------------------------------------------

def read_file(sid: str, path: str, user: str | None) -> Call[bytes]:
    return Call(f"read file {path}", "GET", _sbx(sid, "/files"), lambda r: r.content,
                params={"path": path, "user": user}, sandbox_id=sid)


def write_file(sid: str, path: str, content: Any, mode: int | str | None,
               user: str | None) -> Call[WriteInfo]:
    """PUT .../files; `content` is bytes or a (sync or async) iterator of byte chunks."""
    if isinstance(mode, int):
        mode = f"{mode:04o}"
    return Call(f"write file {path}", "PUT", _sbx(sid, "/files"), _model(WriteInfo),
                params={"path": path, "mode": mode, "user": user}, content=content,
                headers={"Content-Type": "application/octet-stream"},
                timeout=long_timeout(None), sandbox_id=sid)


def stat(sid: str, path: str, user: str | None) -> Call[EntryInfo]:
    return Call(f"stat {path}", "GET", _sbx(sid, "/files/stat"), _model(EntryInfo),
                params={"path": path, "user": user}, sandbox_id=sid)


def list_dir(sid: str, path: str, depth: int, user: str | None) -> Call[list[EntryInfo]]:
    return Call(f"list {path}", "GET", _sbx(sid, "/files/list"), _models(EntryInfo),
                params={"path": path, "depth": depth, "user": user}, sandbox_id=sid)


def exists(sid: str, path: str, user: str | None) -> Call[bool]:
    return Call(f"check {path}", "GET", _sbx(sid, "/files/exists"), _key("exists"),
                params={"path": path, "user": user}, sandbox_id=sid)


def make_dir(sid: str, path: str, parents: bool, user: str | None) -> Call[bool]:
    body: dict[str, Any] = {"path": path, "parents": parents}
    if user is not None:
        body["user"] = user
    return Call(f"make directory {path}", "POST", _sbx(sid, "/files/mkdir"), _key("created"),
                json=body, sandbox_id=sid)


def rename(sid: str, src: str, dst: str, overwrite: bool, user: str | None) -> Call[str]:
    body: dict[str, Any] = {"src": src, "dst": dst, "overwrite": overwrite}
    if user is not None:
        body["user"] = user
    return Call(f"rename {src} to {dst}", "POST", _sbx(sid, "/files/rename"), _key("path"),
                json=body, sandbox_id=sid)


def watch_dir(sid: str, path: str, recursive: bool, user: str | None) -> Call[None]:
    """GET .../files/watch: NDJSON change events for as long as it is read."""
    timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None, write=None, pool=None)
    return Call(f"watch {path}", "GET", _sbx(sid, "/files/watch"), _nothing,
                params={"path": path, "recursive": _bool(recursive), "user": user},
                headers={"Accept": NDJSON}, timeout=timeout, sandbox_id=sid)


def remove(sid: str, path: str, recursive: bool, user: str | None) -> Call[None]:
    return Call(f"remove {path}", "DELETE", _sbx(sid, "/files"), _nothing,
                params={"path": path, "recursive": _bool(recursive), "user": user},
                sandbox_id=sid)
