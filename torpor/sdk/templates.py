"""`Template` (sync) and `AsyncTemplate` (async): describe a template, build it on the server.

    from torpor import Template, wait_for_port

    t = (Template("web")
         .from_template("base")
         .pip_install(["flask"])
         .copy("app/", "/home/user/app/")
         .env({"FLASK_APP": "app"})
         .start_cmd("flask run --port 8000", ready=wait_for_port(8000)))
    info = t.build(on_log=print)           # streams the build's log; a TemplateInfo
    Sandbox.create(template="web")

The builder only collects steps (`to_steps()` is the JSON list `POST /v1/templates`
takes) and the local files `copy` and `from_archive` name; `build` packs those files into
a tar.gz build context and streams the build's events. Both twins share the builder
(`_Builder`) and the reading of the events (`_BuildReader`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import posixpath
import tarfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import httpx

from torpor.sdk import _api
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT, ClientConfig
from torpor.sdk.errors import (
    InvalidRequestError,
    NotFoundError,
    TemplateBuildError,
    TorporError,
)
from torpor.sdk.models import BuildInfo, TemplateInfo

LogCallback = Callable[[str], Any]
StepCallback = Callable[[dict], Any]


def wait_for_port(port: int) -> dict:
    """Ready once something accepts connections on 127.0.0.1:`port` inside."""
    return {"port": int(port)}


def wait_for_file(path: str) -> dict:
    """Ready once `path` exists inside."""
    return {"file": str(path)}


def wait_for_cmd(cmd: str) -> dict:
    """Ready once the shell command `cmd` exits 0 inside."""
    return {"cmd": str(cmd)}


def _list(packages: str | Iterable[str]) -> list[str]:
    return [packages] if isinstance(packages, str) else list(packages)


def _tarinfo(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # who owns the files here means nothing there (copies are owned by the step's user),
    # and a stable owner keeps the build's layer cache valid on another machine
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _Builder:
    """The steps of a template and the local files they read."""

    def __init__(self, name: str | None = None, tag: str = "latest", *,
                 cpu: float | None = None, memory_mb: int | None = None,
                 disk_mb: int | None = None):
        self.name = name
        self.tag = tag
        self.resources = {"cpu": cpu, "memory_mb": memory_mb, "disk_mb": disk_mb}
        self._steps: list[dict] = []
        self._files: dict[str, Path] = {}  # name in the build context -> local path
        self._dockerfile: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, tag={self.tag!r}, steps={len(self._steps)})"

    def _add(self, step: dict) -> Self:
        if self._dockerfile is not None:
            raise TypeError("a template from a Dockerfile takes no further steps; add them "
                            "to the Dockerfile")
        if self._steps and self._steps[-1]["type"] == "start_cmd":
            raise TypeError("start_cmd is the last step; add the others before it")
        if step["type"].startswith("from_") and self._steps:
            raise TypeError(f"{step['type']} is the first step (the source of the template)")
        self._steps.append(step)
        return self

    # --- sources --------------------------------------------------------------------------
    def from_template(self, ref: str) -> Self:
        """Build on a template of the server (by name, name:tag or digest). The default
        source is `base`."""
        return self._add({"type": "from_template", "template": ref})

    def from_image(self, image: str) -> Self:
        """Build on an OCI image from a registry, as `python:3.12-slim`."""
        return self._add({"type": "from_image", "image": image})

    def from_debian(self, suite: str = "bookworm") -> Self:
        """Build on a Debian suite (bookworm, trixie), bootstrapped on the server."""
        return self._add({"type": "from_debian", "suite": suite})

    def from_archive(self, path: str | os.PathLike) -> Self:
        """Build on an image saved locally: a `docker save` tar or an OCI layout
        directory, sent in the build context."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(2, "no such file or directory", str(p))
        name = f"sources/{len(self._files)}/{p.name}"
        self._files[name] = p
        return self._add({"type": "from_archive", "src": name})

    # --- steps ----------------------------------------------------------------------------
    def apt_install(self, packages: str | Iterable[str]) -> Self:
        """Debian packages, as root (the source must have its own package database)."""
        return self._add({"type": "apt_install", "packages": _list(packages)})

    def pip_install(self, packages: str | Iterable[str]) -> Self:
        """Python packages from the package index, as root, into /usr/local."""
        return self._add({"type": "pip_install", "packages": _list(packages)})

    def copy(self, src: str | os.PathLike, dst: str, *, user: str | None = None) -> Self:
        """A local file or directory into the template. A directory's contents go into
        `dst`; a file goes into `dst` if it ends with "/", else it becomes `dst`. Owned by
        `user` (default: the template's user)."""
        p = Path(src)
        if not p.exists():
            raise FileNotFoundError(2, "no such file or directory", str(p))
        n = len(self._files)
        if p.is_dir():
            name, target = f"files/{n}", dst
        elif dst.endswith("/"):
            name, target = f"files/{n}/{p.name}", dst
        else:
            name = f"files/{n}/{posixpath.basename(dst)}"
            target = posixpath.dirname(dst) or "/"
        self._files[name] = p
        src_name = name
        step = {"type": "copy", "src": src_name, "dst": target.rstrip("/") or "/"}
        if user:
            step["user"] = user
        return self._add(step)

    def env(self, env: Mapping[str, str] | None = None, **more: str) -> Self:
        """Environment variables of the template (and of the steps after this one)."""
        return self._add({"type": "env", "env": {**(env or {}), **more}})

    def workdir(self, path: str) -> Self:
        return self._add({"type": "workdir", "path": path})

    def user(self, name: str) -> Self:
        """The user the next steps, and the template's sandboxes, run as."""
        return self._add({"type": "user", "name": name})

    def run(self, cmd: str, *, user: str | None = None) -> Self:
        """A shell command, as the template's user (or `user`)."""
        step = {"type": "run", "cmd": cmd}
        if user:
            step["user"] = user
        return self._add(step)

    def start_cmd(self, cmd: str, ready: dict | None = None,
                  timeout: float | None = None) -> Self:
        """The last step: the template's sandboxes start with `cmd` running and `ready`
        (`wait_for_port(n)`, `wait_for_file(path)`, `wait_for_cmd(cmd)`): the build runs
        it, waits for ready (at most `timeout` seconds, 60 by default) and keeps that
        state as the template's boot snapshot."""
        step: dict[str, Any] = {"type": "start_cmd", "cmd": cmd}
        if ready:
            step["ready"] = dict(ready)
        if timeout is not None:
            step["timeout"] = timeout
        return self._add(step)

    # --- steps or a Dockerfile from elsewhere --------------------------------------------
    @classmethod
    def from_steps(cls, steps: Iterable[Mapping[str, Any]],
                   context: str | os.PathLike | None = None, *, name: str | None = None,
                   tag: str = "latest", **resources: Any) -> Self:
        """A template from a JSON step list (as `to_steps()` gives and `POST
        /v1/templates` takes). The `src` of its `copy` and `from_archive` steps are paths
        in the `context` directory."""
        t = cls(name, tag, **resources)
        t._steps = []
        for i, step in enumerate(steps):
            if not isinstance(step, Mapping) or not isinstance(step.get("type"), str):
                raise InvalidRequestError(f"step {i} is not an object with a type",
                                          code="invalid", details={"field": f"steps.{i}"})
            t._steps.append(dict(step))
            src = step.get("src") if step["type"] in ("copy", "from_archive") else None
            if src is None:
                continue
            rel = Path(str(src))
            if context is None or rel.is_absolute() or ".." in rel.parts:
                raise InvalidRequestError(
                    f"step {i}: {step['type']} source {src!r} is not in the build context"
                    + ("" if context is not None else " (none was given)"),
                    code="invalid", details={"field": f"steps.{i}"})
            path = Path(context) / rel
            if not path.exists() and not path.is_symlink():
                raise FileNotFoundError(2, "no such file or directory", str(path))
            t._files[str(src)] = path
        return t

    @classmethod
    def from_dockerfile(cls, path: str | os.PathLike = "Dockerfile",
                        context: str | os.PathLike = ".",
                        build_args: Mapping[str, str] | None = None, *,
                        name: str | None = None, tag: str = "latest", **resources: Any
                        ) -> Self:
        """A template from a Dockerfile (the subset torpor/dockerfile.py takes: FROM, RUN,
        COPY/ADD of local files, ENV, ARG, WORKDIR, USER, CMD/ENTRYPOINT, HEALTHCHECK).
        `context` is the directory COPY reads. It is read and checked now (an
        InvalidRequestError names the line); FROM is looked up among the server's
        templates at build time (not one of them: an image)."""
        text = Path(path).read_text()
        t = cls(name, tag, **resources)
        ctx = Path(context)
        if not ctx.is_dir():
            raise NotADirectoryError(20, "the build context is not a directory", str(ctx))
        t._dockerfile = {"text": text, "context": ctx, "build_args": dict(build_args or {}),
                         "path": str(path)}
        t._translate(lambda ref: ref == "base")  # errors now, not at build time
        return t

    def _translate(self, is_template: Callable[[str], bool]) -> None:
        from torpor.dockerfile import DirContext, DockerfileError, translate

        d = self._dockerfile
        try:
            out = translate(d["text"], build_args=d["build_args"], is_template=is_template,
                            context=DirContext(d["context"]))
        except DockerfileError as e:
            raise InvalidRequestError(f"{d['path']}: {e}", code="invalid", details={
                "field": "dockerfile", "line": e.line, "instruction": e.instruction}) from None
        self._steps = out.steps
        files = {src: d["context"] / src for src in out.sources}
        if "." in files:  # the whole context: it holds every other source
            files = {".": d["context"]}
        files.update({new: d["context"] / old for new, old in out.staged.items()})
        self._files = files

    # --- what is sent ---------------------------------------------------------------------
    def to_steps(self) -> list[dict]:
        """The steps as `POST /v1/templates` takes them (JSON)."""
        return [dict(s) for s in self._steps]

    def context(self) -> bytes | None:
        """The build context: the local files the steps read, as a tar.gz (None if
        none)."""
        if not self._files:
            return None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
            for name, path in sorted(self._files.items()):
                tar.add(path, arcname=name, recursive=True, filter=_tarinfo)
        return buf.getvalue()

    def _body(self) -> dict:
        if not self.name:
            raise InvalidRequestError("the template has no name: Template(name) or "
                                      "from_dockerfile(..., name=...)", code="invalid",
                                      details={"field": "name"})
        body: dict[str, Any] = {"name": self.name, "tag": self.tag,
                                "steps": self.to_steps()}
        ctx = self.context()
        if ctx is not None:
            body["context"] = base64.b64encode(ctx).decode()
        body.update({k: v for k, v in self.resources.items() if v is not None})
        return body


class _BuildReader:
    """A build's NDJSON events -> callbacks, then its TemplateInfo or TemplateBuildError."""

    def __init__(self, on_log: LogCallback | None, on_step: StepCallback | None):
        self.on_log = on_log
        self.on_step = on_step
        self.build_id: str | None = None
        self.result: TemplateInfo | None = None
        self.partial: dict[str, str] = {}

    def feed(self, line: str) -> list[tuple[Callable[[Any], Any], Any]]:
        """The callbacks one event line calls (the async twin awaits coroutines)."""
        line = line.strip()
        if not line:
            return []
        try:
            ev = json.loads(line)
        except ValueError:
            raise TorporError(f"the server sent a line that is not a build event: "
                              f"{line[:200]!r}", code="bad_stream") from None
        kind = ev.get("type")
        calls: list[tuple[Callable[[Any], Any], Any]] = []
        if kind == "build":
            self.build_id = ev.get("id")
        elif kind == "step":
            calls += self._flush()
            if self.on_step is not None:
                calls.append((self.on_step, ev))
        elif kind == "log" and self.on_log is not None:
            text = self.partial.pop(ev.get("stream", "stdout"), "") + (ev.get("data") or "")
            *lines, rest = text.split("\n")
            if rest:
                self.partial[ev.get("stream", "stdout")] = rest
            calls += [(self.on_log, x) for x in lines]
        elif kind == "snapshot" and self.on_log is not None:
            calls += self._flush()
            line = (f"boot snapshot: ready after {ev.get('ready_seconds')}s, taken in "
                    f"{ev.get('seconds')}s")
            calls.append((self.on_log, line))
        elif kind == "done":
            calls += self._flush()
            self.result = TemplateInfo.model_validate(ev["template"])
        elif kind == "error":
            calls += self._flush()
            err = dict(ev.get("error") or {})
            details = {k: v for k, v in err.items() if k not in ("code", "message")}
            details["build_id"] = self.build_id
            raise TemplateBuildError(str(err.get("message") or "the build failed"),
                                     status=ev.get("status"), code=err.get("code"),
                                     operation=f"build {self.build_id}", details=details)
        return calls

    def _flush(self) -> list[tuple[Callable[[Any], Any], Any]]:
        if self.on_log is None:
            return []
        out = [(self.on_log, text) for text in self.partial.values() if text]
        self.partial.clear()
        return out

    def finish(self) -> TemplateInfo:
        if self.result is None:
            raise TorporError(f"the build's stream ended before it did; it runs on: "
                              f"Templates().get_build({self.build_id!r})",
                              code="stream_closed", details={"build_id": self.build_id})
        return self.result


class Template(_Builder):
    """A template to build (see the module's docstring). The connection options of
    `build`, `list`, `get` and `delete` are those of Sandbox (`url=`, `api_key=`,
    `request_timeout=`, `transport=`)."""

    def build(self, on_log: LogCallback | None = print, on_step: StepCallback | None = None,
              *, url: str | None = None, api_key: str | None = None,
              request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
              transport: httpx.BaseTransport | None = None) -> TemplateInfo:
        """Build it on the server, calling `on_log` with each line of the steps' output
        and `on_step` with each step event (`index`, `total`, `step`, `cached`); return
        the template once built. TemplateBuildError when a step fails (its `exit_code`
        and `output_tail`); InvalidRequestError, NotFoundError, ConflictError before it
        starts. Leaving (an exception in a callback, Ctrl-C) does not stop the build."""
        session = SyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)
        try:
            if self._dockerfile is not None:
                self._translate(lambda ref: _exists(session, ref))
            call = _api.build_template(self._body())
            reader = _BuildReader(on_log, on_step)
            resp = session.open(call)
            for line in session.iter_lines(resp, call):
                for fn, arg in reader.feed(line):
                    fn(arg)
            return reader.finish()
        finally:
            session.close()

    @staticmethod
    def list(**conn: Any) -> list[TemplateInfo]:
        """Every template (each name:tag), base first."""
        return _sync(conn, _api.list_templates())

    @staticmethod
    def get(ref: str, **conn: Any) -> TemplateInfo:
        """By name, name:tag or digest, with its steps and layers."""
        return _sync(conn, _api.get_template(ref))

    @staticmethod
    def delete(ref: str, force: bool = False, **conn: Any) -> None:
        """Remove a name:tag; ConflictError naming its users unless `force`."""
        _sync(conn, _api.delete_template(ref, force))

    @staticmethod
    def builds(**conn: Any) -> list[BuildInfo]:
        return _sync(conn, _api.list_builds())

    @staticmethod
    def get_build(build_id: str, **conn: Any) -> BuildInfo:
        return _sync(conn, _api.get_build(build_id))

    @staticmethod
    def logs(build_id: str, follow: bool = False, offset: int = 0,
             **conn: Any) -> Iterator[dict]:
        """A build's events (dicts) from `offset`; with `follow`, until it ends."""
        session = SyncSession(_config(conn), conn.get("transport"))
        try:
            call = _api.build_logs(build_id, follow, offset)
            resp = session.open(call)
            for line in session.iter_lines(resp, call):
                if line.strip():
                    yield json.loads(line)
        finally:
            session.close()


class AsyncTemplate(_Builder):
    """The async twin of Template."""

    async def build(self, on_log: LogCallback | None = print,
                    on_step: StepCallback | None = None, *, url: str | None = None,
                    api_key: str | None = None,
                    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                    transport: httpx.AsyncBaseTransport | None = None) -> TemplateInfo:
        """As Template.build; callbacks may be coroutine functions."""
        session = AsyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)
        try:
            if self._dockerfile is not None:
                listed = await session.call(_api.list_templates())
                known = {t.name for t in listed} | {t.ref for t in listed}
                self._translate(lambda ref: ref in known or ref.startswith("sha256:"))
            call = _api.build_template(self._body())
            reader = _BuildReader(on_log, on_step)
            resp = await session.open(call)
            async for line in session.iter_lines(resp, call):
                for fn, arg in reader.feed(line):
                    r = fn(arg)
                    if hasattr(r, "__await__"):
                        await r
            return reader.finish()
        finally:
            await session.aclose()

    @staticmethod
    async def list(**conn: Any) -> list[TemplateInfo]:
        return await _async(conn, _api.list_templates())

    @staticmethod
    async def get(ref: str, **conn: Any) -> TemplateInfo:
        return await _async(conn, _api.get_template(ref))

    @staticmethod
    async def delete(ref: str, force: bool = False, **conn: Any) -> None:
        await _async(conn, _api.delete_template(ref, force))

    @staticmethod
    async def builds(**conn: Any) -> list[BuildInfo]:
        return await _async(conn, _api.list_builds())

    @staticmethod
    async def get_build(build_id: str, **conn: Any) -> BuildInfo:
        return await _async(conn, _api.get_build(build_id))

    @staticmethod
    async def logs(build_id: str, follow: bool = False, offset: int = 0,
                   **conn: Any) -> AsyncIterator[dict]:
        session = AsyncSession(_config(conn), conn.get("transport"))
        try:
            call = _api.build_logs(build_id, follow, offset)
            resp = await session.open(call)
            async for line in session.iter_lines(resp, call):
                if line.strip():
                    yield json.loads(line)
        finally:
            await session.aclose()


def _exists(session: SyncSession, ref: str) -> bool:
    try:
        session.call(_api.get_template(ref))
    except NotFoundError:
        return False
    return True


_CONN = ("url", "api_key", "request_timeout", "transport")


def _config(conn: Mapping[str, Any]) -> ClientConfig:
    unknown = set(conn) - set(_CONN)
    if unknown:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))} (connection "
                        f"options: {', '.join(_CONN)})")
    return ClientConfig.resolve(conn.get("url"), conn.get("api_key"),
                                conn.get("request_timeout", DEFAULT_REQUEST_TIMEOUT))


def _sync(conn: Mapping[str, Any], call: _api.Call[Any]) -> Any:
    session = SyncSession(_config(conn), conn.get("transport"))
    try:
        return session.call(call)
    finally:
        session.close()


async def _async(conn: Mapping[str, Any], call: _api.Call[Any]) -> Any:
    session = AsyncSession(_config(conn), conn.get("transport"))
    try:
        return await session.call(call)
    finally:
        await session.aclose()


__all__ = ["AsyncTemplate", "Template", "wait_for_cmd", "wait_for_file", "wait_for_port"]
