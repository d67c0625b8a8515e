"""Template builds: steps run inside sandboxes, each step's changes kept as a cached layer.

A build starts from a template (`base` unless a `from_template` step names another), or from
a source fetched on the host (`from_image`, `from_archive`, `from_debian`: torpor/sources),
and runs its steps in order. Steps that change files (`run`, `apt_install`, `pip_install`,
`copy`) each run in a sandbox of their own, started from the template built so far, as the
template's user (package installs as root), under the server's egress policy, never on the
host; the sandbox's changes are then kept as a layer (`Lifecycle.capture`) under the hash
of everything before it, so a rebuild runs only the steps after the first change. `env`,
`workdir` and `user` change defaults only. A `start_cmd` (last) ends the build with a boot
snapshot: a sandbox of the finished template runs the command until its ready check passes,
and is checkpointed; a create then restores that instead of booting.

The name moves to the new template only once everything succeeded: a failed build leaves
the previous version of the name as it was. Two builds of one name at once: the second is
refused (409).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import logging
import shlex
import shutil
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath

from torpor.builtin_templates import builtin
from torpor.engine.lifecycle import Lifecycle
from torpor.engine.processes import Processes
from torpor.engine.types import Exited, Failed, Output
from torpor.errors import Conflict, Invalid, NotFound, Timeout, TorporError
from torpor.sources import SOURCE_STEPS, Sources
from torpor.templates import BASE, Template, TemplateStore, digest_of, parse_ref

log = logging.getLogger("torpor.builds")

FILE_STEPS = ("run", "apt_install", "pip_install", "copy")
META_STEPS = ("env", "workdir", "user")
STEP_TIMEOUT = 3600.0  # seconds one step may run
READY_POLL = 0.1  # seconds between ready checks
LOG_TAIL = 20  # lines of a failed step's output in its error
CONTEXT_MAX = 64 << 20  # bytes of a build context, decoded


def _layer_key(parent: str, step: dict, extra: str = "") -> str:
    blob = json.dumps([parent, step, extra], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _command(step: dict) -> tuple[list[str], str | None]:
    """The command a file step runs, and as whom (None: the template's user)."""
    kind = step["type"]
    if kind == "run":
        return ["sh", "-c", step["cmd"]], step.get("user")
    if kind == "apt_install":
        pkgs = " ".join(shlex.quote(p) for p in step["packages"])
        script = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                  f"--no-install-recommends {pkgs}")
        return ["sh", "-c", script], "root"
    if kind == "pip_install":
        # the system Python is Debian's, which refuses pip without this (PEP 668); the
        # packages land in /usr/local, in the layer
        return ["python3", "-m", "pip", "install", "--no-cache-dir",
                "--break-system-packages", *step["packages"]], "root"
    raise AssertionError(kind)


def _ready_check(ready: dict | None) -> list[str] | None:
    if not ready:
        return None
    if "port" in ready:
        code = ("import socket,sys\ns=socket.socket()\ns.settimeout(1)\n"
                f"sys.exit(s.connect_ex(('127.0.0.1', {int(ready['port'])})))")
        return ["python3", "-c", code]
    if "file" in ready:
        return ["test", "-e", str(ready["file"])]
    return ["sh", "-c", str(ready["cmd"])]


class Builds:
    def __init__(self, store: TemplateStore, lifecycle: Lifecycle, processes: Processes,
                 boot: Callable[[Template, str, dict], Awaitable[str]],
                 delete: Callable[[str, str], Awaitable[None]],
                 write_file: Callable[[str, str, bytes], Awaitable[None]],
                 built: Callable[[], None] = lambda: None,
                 network: Callable[[dict | None], dict] = lambda given: dict(given or {}),
                 refusals: Callable[[str], list[str]] = lambda sid: [],
                 sources: Sources | None = None):
        self.store = store
        self.sources = sources or Sources(store)  # from_image, from_archive, from_debian
        self.lifecycle = lifecycle
        self.processes = processes
        self.boot = boot  # (template, build name, egress policy) -> id of a new sandbox
        self.delete = delete  # (sid, reason)
        self.write_file = write_file  # (sid, path, bytes), as root
        self.built = built  # a name moved to a new template (the warm pool looks again)
        self.network = network  # a build's `network` -> its sandboxes' policy (or Invalid)
        self.refusals = refusals  # sid -> its last egress refusals, for a failed step's error
        self._running: set[str] = set()
        self._finished: dict[str, asyncio.Event] = {}  # set when the name's build ends

    # --- checking what is asked ---------------------------------------------------------
    def _check(self, name: str, tag: str, steps: list[dict]) -> Template | None:
        """The template to build on; None when the first step is a source (fetched once
        the build runs)."""
        try:
            parse_ref(f"{name}:{tag}")
        except ValueError as e:
            raise Invalid(str(e), field="name") from None
        if name == BASE:
            raise Invalid("`base` is built in; give the template another name", field="name")
        source = BASE
        for i, step in enumerate(steps):
            kind = step.get("type")
            if kind == "from_template":
                if i != 0:
                    raise Invalid("from_template must be the first step", field=f"steps.{i}")
                source = step["template"]
            elif kind in SOURCE_STEPS:
                self.sources.check(step, i)
                source = None
            elif kind == "start_cmd" and i != len(steps) - 1:
                raise Invalid("start_cmd must be the last step", field=f"steps.{i}")
            elif kind not in FILE_STEPS + META_STEPS + ("start_cmd",):
                raise Invalid(f"unknown step type {kind!r}", field=f"steps.{i}")
        if source is None:
            return None
        parent = self.store.get(source)
        if parent is None:
            raise NotFound(f"no template {source!r} to build on", field="steps.0")
        if parent.usr_from and any(s.get("type") == "apt_install" for s in steps):
            raise Invalid("apt_install needs a template with its own Debian package database; "
                          f"{source!r} borrows the host's /usr (use run or pip_install)",
                          field="steps")
        return parent

    def _context(self, context: bytes | None) -> Path | None:
        """The build context (a gzip'd tar) unpacked into a temporary directory, refusing
        what would land outside it (absolute paths, `..`, links out, devices)."""
        if not context:
            return None
        if len(context) > CONTEXT_MAX:
            raise Invalid(f"the build context is over {CONTEXT_MAX >> 20} MiB", field="context")
        d = Path(tempfile.mkdtemp(prefix="torpor-context-"))
        try:
            with tarfile.open(fileobj=io.BytesIO(context), mode="r:*") as tar:
                tar.extractall(d, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(d, ignore_errors=True)
            raise Invalid(f"the build context is not a usable tar archive: {e}",
                          field="context") from None
        return d

    @staticmethod
    def _copy_source(ctx: Path | None, src: str, i: int) -> Path:
        rel = PurePosixPath(src)
        if ctx is None:
            raise Invalid(f"step {i}: copy needs a build context holding {src!r}",
                          field=f"steps.{i}")
        if rel.is_absolute() or ".." in rel.parts:
            raise Invalid(f"step {i}: copy source {src!r} is outside the build context",
                          field=f"steps.{i}")
        path = ctx / rel
        if not path.exists():
            raise Invalid(f"step {i}: the build context has no {src!r}", field=f"steps.{i}")
        return path

    @staticmethod
    def _tar_of(path: Path) -> tuple[bytes, str]:
        """A tar of a context file or directory (its contents), and its hash."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            if path.is_dir():
                for child in sorted(path.iterdir()):
                    tar.add(child, arcname=child.name)
            else:
                tar.add(path, arcname=path.name)
        data = buf.getvalue()
        return data, hashlib.sha256(data).hexdigest()

    # --- the build ----------------------------------------------------------------------
    async def build(self, name: str, tag: str, steps: list[dict] | None,
                    context: bytes | str | None, resources: dict,
                    network: dict | None = None) -> AsyncIterator[dict]:
        """Check the request (raising engine errors), then return the build's events.

        No steps and the name of a built-in template (`torpor/builtin_templates.py`): the
        built-in's steps. `network` narrows the server's build egress policy for this
        build's sandboxes (it cannot widen it)."""
        resources = dict(resources or {})
        if not steps and builtin(name) is not None:
            b = builtin(name)
            steps = b.steps()
            if context is None and b.context is not None:
                context = b.context()
            resources = {"description": b.description, **b.resources,
                         **{k: v for k, v in resources.items() if v is not None}}
        steps = list(steps or [])
        parent = self._check(name, tag, steps)
        policy = self.network(network)
        if isinstance(context, str):
            try:
                context = base64.b64decode(context, validate=True)
            except ValueError:
                raise Invalid("context must be base64", field="context") from None
        if name in self._running:
            raise Conflict(f"template {name} is being built already; wait for that build "
                           "(its name moves only once it succeeds)", field="name")
        ctx = self._context(context)
        self._running.add(name)
        self._finished[name] = asyncio.Event()
        return self._run(name, tag, steps, parent, ctx, resources, policy)

    def building(self, name: str) -> bool:
        return name in self._running

    async def wait(self, name: str) -> None:
        """Until the build of `name` that runs now (if one does) has ended."""
        done = self._finished.get(name)
        if done is not None:
            await done.wait()

    async def _run(self, name: str, tag: str, steps: list[dict], parent: Template | None,
                   ctx: Path | None, resources: dict, policy: dict) -> AsyncIterator[dict]:
        sandboxes: list[str] = []
        tmps: list[Path] = []
        t0 = time.monotonic()
        try:
            if parent is None:  # a source step: its root filesystem, fetched unless stored
                async for ev in self.sources.fetch(steps[0], len(steps), ctx, name):
                    if isinstance(ev, Template):
                        parent = ev
                    else:
                        yield ev
            assert parent is not None
            self.store.hold(f"build:{name}", digest=parent.digest)
            cur = dataclasses.replace(
                parent, name=name, tag=tag, parent=parent.digest,
                base_rootfs=str(parent.rootfs), snapshot=False, start_cmd=None, ready=None,
                steps=[], **{k: v for k, v in resources.items() if v is not None})
            key = parent.digest
            total = len(steps)
            for i, step in enumerate(steps):
                kind = step["type"]
                cached = False
                if kind in SOURCE_STEPS:  # (its event came with the fetch)
                    cur.steps.extend(parent.steps)
                    continue
                if kind == "from_template":
                    pass
                elif kind in META_STEPS:
                    cur = self._meta(cur, step)
                elif kind in FILE_STEPS:
                    payload = None
                    extra = ""
                    if kind == "copy":
                        payload, extra = self._tar_of(self._copy_source(ctx, step["src"], i))
                    key = _layer_key(key, {"step": step, "env": cur.env, "user": cur.user,
                                           "workdir": cur.workdir}, extra)
                    self.store.hold(f"build:{name}", layer=key)  # (from gc, until the end)
                    cached = self.store.has_layer(key)
                    yield {"type": "step", "index": i, "total": total, "step": step,
                           "cached": cached}
                    if not cached:
                        async for ev in self._file_step(cur, step, key, payload, sandboxes,
                                                        policy):
                            yield ev
                    cur = dataclasses.replace(cur, layers=[*cur.layers, key])
                    cur.steps.append(step)
                    continue
                elif kind == "start_cmd":
                    cur = dataclasses.replace(cur, start_cmd=step["cmd"],
                                              ready=step.get("ready"), snapshot=True,
                                              steps=[*cur.steps, step])
                    existing = self.store.by_digest(digest_of(cur.config()))
                    cached = existing is not None and existing.snapshot_dir.is_dir()
                    yield {"type": "step", "index": i, "total": total, "step": step,
                           "cached": cached}
                    if not cached:
                        self.store.images.mkdir(parents=True, exist_ok=True)
                        tmps.append(Path(tempfile.mkdtemp(prefix=".snapshot-",
                                                          dir=self.store.images)))
                        async for ev in self._snapshot(cur, step, sandboxes,
                                                       tmps[-1] / "snapshot", policy):
                            yield ev
                    continue
                cur.steps.append(step)
                yield {"type": "step", "index": i, "total": total, "step": step,
                       "cached": cached}
            final = self.store.put(cur, snapshot=tmps[-1] / "snapshot" if tmps else None)
            self.store.tag(name, tag, final.digest)
            self.built()
            log.info("template %s:%s built: %s (%.1fs)", name, tag, final.digest,
                     time.monotonic() - t0)
            # (not its host path: events reach the doors as they are)
            yield {"type": "done", "template": {k: v for k, v in final.to_dict().items()
                                                if k != "path"}}
        except TorporError as e:
            log.info("template %s:%s: build failed: %s", name, tag, e.message)
            yield {"type": "error", "error": e.to_dict(), "status": e.status}
        finally:
            self._running.discard(name)
            self.sources.release(name)
            done = self._finished.pop(name, None)
            if done is not None:
                done.set()
            for sid in sandboxes:
                try:
                    await self.delete(sid, "build")
                except (TorporError, OSError) as e:
                    log.warning("build of %s: sandbox %s could not be deleted: %s", name,
                                sid, e)
            if ctx is not None:
                shutil.rmtree(ctx, ignore_errors=True)
            for tmp in tmps:  # (a snapshot that was kept has been moved out)
                shutil.rmtree(tmp, ignore_errors=True)
            self.store.release(f"build:{name}")

    @staticmethod
    def _meta(cur: Template, step: dict) -> Template:
        kind = step["type"]
        if kind == "env":
            return dataclasses.replace(cur, env={**cur.env, **step["env"]})
        if kind == "workdir":
            return dataclasses.replace(cur, workdir=step["path"])
        return dataclasses.replace(cur, user=step["name"])

    async def _start(self, cur: Template, sandboxes: list[str], policy: dict) -> str:
        stored = self.store.put(dataclasses.replace(cur, snapshot=False, start_cmd=None,
                                                    ready=None))
        self.store.hold(f"build:{cur.name}", digest=stored.digest)
        sid = await self.boot(stored, cur.name, policy)
        sandboxes.append(sid)
        return sid

    async def _file_step(self, cur: Template, step: dict, key: str, payload: bytes | None,
                         sandboxes: list[str], policy: dict) -> AsyncIterator[dict]:
        sid = await self._start(cur, sandboxes, policy)
        if step["type"] == "copy":
            tmp_tar = "/tmp/.torpor-copy.tar"
            await self.write_file(sid, tmp_tar, payload or b"")
            dst = step["dst"]
            # (the archive stays in /tmp, memory the layer does not keep)
            script = (f"mkdir -p {shlex.quote(dst)} && tar -C {shlex.quote(dst)} -xf {tmp_tar} "
                      "--no-same-owner")
            argv = ["sh", "-c", script]
            user = step.get("user") or cur.user
        else:
            argv, user = _command(step)
            user = user or cur.user
        async for ev in self._run_logged(sid, argv, user, cur):
            yield ev
        tmp = self.store.layer_tmp(key)
        try:
            await self.lifecycle.capture(sid, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        sandboxes.remove(sid)
        await asyncio.to_thread(self.store.commit_layer, tmp, key)

    async def _run_logged(self, sid: str, argv: list[str], user: str,
                          cur: Template) -> AsyncIterator[dict]:
        tail: list[str] = []
        events = await self.processes.run(sid, argv, env=cur.env, cwd=cur.workdir, user=user,
                                          timeout=STEP_TIMEOUT)
        async for ev in events:
            if isinstance(ev, Output):
                tail = (tail + ev.data.splitlines())[-LOG_TAIL:]
                yield {"type": "log", "stream": ev.stream, "data": ev.data}
            elif isinstance(ev, Failed):
                raise ev.error
            elif isinstance(ev, Exited) and (ev.exit_code != 0 or ev.signal or ev.timed_out):
                why = (f"exit code {ev.exit_code}" if ev.exit_code is not None
                       else f"signal {ev.signal}") + (" (timed out)" if ev.timed_out
                                                      else "")
                refused = self.refusals(sid)
                raise StepFailed(f"the step `{shlex.join(argv)[:200]}` failed with {why}; "
                                 "its last lines:\n" + "\n".join(tail) + _refused(refused),
                                 exit_code=ev.exit_code, signal=ev.signal,
                                 output_tail=tail, egress_refusals=refused)

    async def _snapshot(self, cur: Template, step: dict, sandboxes: list[str],
                        dest: Path, policy: dict) -> AsyncIterator[dict]:
        """Start the finished template, run its start command until ready, checkpoint it."""
        sid = await self._start(cur, sandboxes, policy)
        t0 = time.monotonic()
        await self.processes.start(sid, ["sh", "-c", step["cmd"]], env=cur.env,
                                   cwd=cur.workdir, user=cur.user, tag="start_cmd")
        check = _ready_check(step.get("ready"))
        timeout = float(step.get("timeout") or 60)
        deadline = time.monotonic() + timeout
        while check is not None:
            events = await self.processes.run(sid, check, user=cur.user, cwd=cur.workdir,
                                              timeout=10)
            code = None
            async for ev in events:
                if isinstance(ev, Exited):
                    code = ev.exit_code
            if code == 0:
                break
            if time.monotonic() > deadline:
                procs = await self.processes.list(sid)
                out, running = "", False
                for p in procs:
                    if p.get("tag") == "start_cmd":
                        chunks = []
                        async for ev in await self.processes.follow(sid, p["pid"], 0, False):
                            if isinstance(ev, Output):
                                chunks.append(ev.data)
                        out = "".join(chunks)[-2000:]
                        running = p.get("running")
                refused = self.refusals(sid)
                raise Timeout(f"the start command's ready check ({step.get('ready')}) did not "
                              f"pass within {timeout:.0f}s"
                              + ("" if running else "; the start command exited")
                              + f"; its output:\n{out}" + _refused(refused), field="steps",
                              egress_refusals=refused)
            await asyncio.sleep(READY_POLL)
        ready_s = time.monotonic() - t0
        await self.lifecycle.snapshot(sid, dest)
        sandboxes.remove(sid)
        yield {"type": "snapshot", "seconds": round(time.monotonic() - t0, 3),
               "ready_seconds": round(ready_s, 3)}


def _refused(lines: list[str]) -> str:
    if not lines:
        return ""
    return ("\nthe egress proxy refused (the build's network policy, or an always-denied "
            "range the operator did not allow):\n" + "\n".join(lines))


class StepFailed(TorporError):
    status = 422
    code = "build_failed"

