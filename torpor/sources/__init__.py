"""Template sources: the root filesystem a template starts from, other than `base`.

A build's first step may name a source instead of a template:
- `{"type": "from_image", "image": "python:3.12-slim"}`: an OCI image from a registry
  (docker's short names, the operator's mirrors, credentials, CAs and insecure hosts);
- `{"type": "from_archive", "src": "image.tar"}`: a `docker save` archive, or an OCI
  layout (a directory or a tar of one), inside the build context;
- `{"type": "from_debian", "suite": "bookworm"}`: a Debian suite, bootstrapped with
  mmdebstrap from the operator's Debian mirror.

Fetching runs on the host, with the tools made for it (skopeo copies an image into an OCI
layout, umoci unpacks its layers with their whiteouts applied; mmdebstrap bootstraps a
suite), into a temporary directory under `<data>/images/sources/` (root's only, like all
of `<data>`). The content is hostile: `rootfs.prepare` removes device nodes and overlayfs
xattrs, resolves every path it touches inside the rootfs, and adds what a sandbox needs
(mount points, /etc/hosts, resolv.conf, the user `user`). The result is stored once per
content, `images/sources/<key>/{rootfs/, source.json}`, keyed by the image's manifest
digest (or the bootstrap's inputs), and becomes the bottom of the template (its
`base_rootfs`, with its own /usr: `usr_from` is None). Nothing of it is mounted on the host
but as a lower layer of a sandbox's overlay.

From the image's configuration a template takes `Env`, `WorkingDir` and `User` as its
defaults (no `User`: Torpor's `user`); `Cmd` and `Entrypoint` are recorded in
`source.json` but start nothing: a start command is a `start_cmd` step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from torpor.errors import Invalid, NotFound, TorporError
from torpor.sources import debian, oci, rootfs
from torpor.templates import Template, TemplateStore

log = logging.getLogger("torpor.sources")

SOURCE_STEPS = ("from_image", "from_archive", "from_debian")
# what a stored source is made by: a change here makes new keys (old sources are collected
# once no template uses them)
IMPORT_VERSION = 1
INSPECT_TIMEOUT = 120.0  # seconds skopeo may take to find an image
FETCH_TIMEOUT = 3600.0  # seconds a copy, an unpack or a bootstrap may take
LOG_TAIL = 20
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class SourceFailed(TorporError):
    """The registry, the archive or the mirror could not give the source."""
    status = 502
    code = "source_failed"


class RegistryUnreachable(SourceFailed):
    code = "registry_unreachable"


class DiskFull(TorporError):
    status = 507
    code = "disk_full"


class _Failed(Exception):
    def __init__(self, argv: list[str], code: int | None, tail: list[str], stderr: str):
        super().__init__(f"{argv[0]} exited with {code}")
        self.argv, self.code, self.tail, self.stderr = argv, code, tail, stderr


@dataclasses.dataclass
class _Plan:
    """A source step, resolved: where its content comes from and the key it is stored at."""
    kind: str
    key: str
    step: dict  # the step as recorded in the template (with what it resolved to)
    origin: str  # for people: docker.io/library/python@sha256:..., debian bookworm
    src: str = ""  # skopeo's source (transport:reference), or the suite
    mirror: str = ""


def _key(*parts) -> str:
    blob = json.dumps([*parts, ARCH, IMPORT_VERSION], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class Sources:
    def __init__(self, store: TemplateStore, *, registry_mirror: list[str] = (),
                 registry_insecure: list[str] = (), registry_auth_file: str | None = None,
                 registry_cert_dir: str | None = None, debian_mirror: str | None = None):
        self.store = store
        self.root = store.sources
        # (a config file may give one string where a list is meant)
        if isinstance(registry_mirror, str):
            registry_mirror = [registry_mirror]
        if isinstance(registry_insecure, str):
            registry_insecure = [registry_insecure]
        try:
            self.mirrors, plain = oci.parse_mirrors(list(registry_mirror or ()))
        except ValueError as e:
            raise Invalid(str(e), field="registry_mirror") from None
        self.insecure = {h.strip() for h in registry_insecure or () if h.strip()} | plain
        self.auth_file = registry_auth_file or None
        self.cert_dir = registry_cert_dir or None
        self.debian_mirror = (debian_mirror or "").rstrip("/") or None
        self._locks: dict[str, asyncio.Lock] = {}
        self._pins: dict[str, set[str]] = {}  # build name -> source keys it holds
        store.held_sources = self.pinned  # (the store's gc keeps them)

    @classmethod
    def for_settings(cls, store: TemplateStore, settings) -> Sources:
        return cls(store, **{k: getattr(settings, k, None) for k in (
            "registry_mirror", "registry_insecure", "registry_auth_file", "registry_cert_dir",
            "debian_mirror")})

    # --- checking a step (before the build starts) ----------------------------------------
    @staticmethod
    def check(step: dict, i: int) -> None:
        kind = step.get("type")
        field = f"steps.{i}"
        if i != 0:
            raise Invalid(f"{kind} must be the first step", field=field)
        if kind == "from_image":
            try:
                oci.parse_image(step.get("image"))
            except ValueError as e:
                raise Invalid(str(e), field=field + ".image") from None
        elif kind == "from_archive":
            src = step.get("src")
            rel = PurePosixPath(src) if isinstance(src, str) and src else None
            if rel is None or rel.is_absolute() or ".." in rel.parts:
                raise Invalid(f"from_archive: src {src!r} must be a path inside the build "
                              "context", field=field + ".src")
        elif kind == "from_debian":
            suite = step.get("suite")
            if suite not in debian.SUITES:
                raise Invalid(f"unknown Debian suite {suite!r}; known: "
                              f"{', '.join(debian.SUITES)}", field=field + ".suite")

    # --- the step -------------------------------------------------------------------------
    async def fetch(self, step: dict, total: int, ctx: Path | None, build: str
                    ) -> AsyncIterator[dict | Template]:
        """Resolve a source step, fetch it unless it is stored, and end with the template
        of it (stored). Yields the step's event and log events before that. The source stays
        held for `build` (not collected) until `release(build)`."""
        plan = await self._plan(step, ctx)
        self._pins.setdefault(build, set()).add(plan.key)
        stored = self._meta(plan.key)
        yield {"type": "step", "index": 0, "total": total, "step": step,
               "cached": stored is not None}
        if stored is None:
            lock = self._locks.setdefault(plan.key, asyncio.Lock())
            async with lock:
                if self._meta(plan.key) is None:
                    async for ev in self._make(plan, ctx):
                        yield ev
            stored = self._meta(plan.key)
            if stored is None:
                raise SourceFailed(f"{plan.origin}: fetched, but not stored (see the log)")
        yield self.store.put(self._template(plan, stored))

    def release(self, build: str) -> None:
        self._pins.pop(build, None)

    def pinned(self) -> set[str]:
        return {k for keys in self._pins.values() for k in keys}

    def _meta(self, key: str) -> dict | None:
        try:
            return json.loads((self.root / key / "source.json").read_text())
        except (OSError, ValueError):
            return None

    def _template(self, plan: _Plan, meta: dict) -> Template:
        config = meta.get("config") or {}
        env = {}
        for item in config.get("Env") or []:
            k, sep, v = str(item).partition("=")
            if sep and k:
                env[k] = v
        user = str(config.get("User") or "").split(":")[0] or "user"
        if not user.isdigit() and user != "root":
            names = {e.split(":")[0] for e in (rootfs.read_text(
                self.root / plan.key / "rootfs", "etc/passwd") or "").splitlines()}
            if user not in names:
                log.warning("%s: its user %r is not in its /etc/passwd; templates of it run "
                            "as `user`", plan.origin, user)
                user = "user"
        return Template(name=plan.kind.removeprefix("from_"), path=self.root / plan.key,
                        usr_from=None, env=env, user=user,
                        workdir=config.get("WorkingDir") or "/home/user",
                        base_rootfs=str(self.root / plan.key / "rootfs"),
                        steps=[plan.step], description=plan.origin)

    # --- resolving ------------------------------------------------------------------------
    async def _plan(self, step: dict, ctx: Path | None) -> _Plan:
        kind = step["type"]
        if kind == "from_debian":
            mirror = self.debian_mirror or debian.host_mirror()
            suite = step["suite"]
            return _Plan(kind, _key("debian", suite, debian.VARIANT, mirror),
                         {**step, "variant": debian.VARIANT, "mirror": mirror},
                         f"Debian {suite} ({debian.VARIANT}) from {mirror}", suite, mirror)
        if kind == "from_image":
            ref = oci.parse_image(step["image"])
            info = await self._inspect(f"docker://{ref}", ref)
            digest = info["Digest"]
            return _Plan(kind, _key("oci", digest),
                         {**step, "reference": str(ref), "digest": digest},
                         f"{ref.name}@{digest}", f"docker://{ref.pinned(digest)}")
        src = await self._archive(step["src"], ctx)
        info = await self._inspect(src, None)
        digest = info["Digest"]
        return _Plan(kind, _key("oci", digest), {**step, "digest": digest},
                     f"{step['src']} (from the build context) @{digest}", src)

    async def _archive(self, src: str, ctx: Path | None) -> str:
        """skopeo's source for an archive in the build context (the context was unpacked
        with tarfile's data filter: nothing in it points outside)."""
        if ctx is None:
            raise Invalid(f"from_archive needs a build context holding {src!r}",
                          field="steps.0.src")
        path = ctx / PurePosixPath(src)
        if path.is_symlink() or not path.exists():
            raise Invalid(f"the build context has no {src!r}", field="steps.0.src")
        if path.is_dir():
            if (path / "oci-layout").is_file() and (path / "index.json").is_file():
                return f"oci:{path}"
            raise Invalid(f"{src!r} is a directory but not an OCI layout (no oci-layout and "
                          "index.json in it)", field="steps.0.src")
        try:
            with tarfile.open(path, "r:*") as tar:
                names = {PurePosixPath(n).as_posix().removeprefix("./") for n in
                         tar.getnames()}
                if "manifest.json" in names:
                    return f"docker-archive:{path}"
                if {"oci-layout", "index.json"} <= names:
                    out = Path(tempfile.mkdtemp(prefix=".oci-", dir=ctx))
                    await asyncio.to_thread(tar.extractall, out, filter="data")
                    return f"oci:{out}"
        except (tarfile.TarError, OSError, EOFError) as e:
            raise Invalid(f"{src!r} is not a readable tar archive: {e}",
                          field="steps.0.src") from None
        raise Invalid(f"{src!r} is neither a `docker save` archive (manifest.json) nor an "
                      "OCI layout (oci-layout, index.json)", field="steps.0.src")

    def _where(self, ref: oci.ImageRef | None) -> str:
        if ref is None:
            return ""
        mirror = self.mirrors.get(ref.registry)
        return f"registry {ref.registry}" + (f" (through its mirror {mirror})" if mirror
                                              else "")

    async def _inspect(self, src: str, ref: oci.ImageRef | None) -> dict:
        argv = [*self._skopeo(), "inspect", "--no-tags", *self._access(), src]
        try:
            out = await self._capture(argv, INSPECT_TIMEOUT)
            info = json.loads(out)
            if not str(info.get("Digest", "")).startswith("sha256:"):
                raise ValueError("no sha256 digest")
            return info
        except _Failed as e:
            raise self._error(e, ref, src) from None
        except ValueError as e:
            raise SourceFailed(f"skopeo inspect {src}: unexpected answer ({e})") from None

    def _error(self, e: _Failed, ref: oci.ImageRef | None, src: str) -> TorporError:
        reason = (oci.skopeo_reason(e.stderr) if e.code is not None
                  else f"no answer within {INSPECT_TIMEOUT:.0f}s")
        what = str(ref) if ref else src.split(":", 1)[-1]
        kind = oci.classify(reason) if e.code is not None else "unreachable"
        extra = {"image": what, "reason": reason}
        if ref is not None:
            extra["registry"] = ref.registry
        if kind == "disk_full":
            return DiskFull(f"no space left on the data disk while fetching {what}",
                            **extra)
        if ref is None:  # an archive: nothing remote
            return Invalid(f"the archive {what} could not be read: {reason}",
                           field="steps.0.src", **extra)
        where = self._where(ref)
        if kind == "not_found":
            return NotFound(f"no image {ref} in {where}: {reason}", field="steps.0.image",
                            **extra)
        if kind == "denied":
            return NotFound(f"{where} refused {ref} (it does not exist, or the credentials "
                            f"in --registry-auth-file do not reach it): {reason}",
                            field="steps.0.image", **extra)
        if kind == "unreachable":
            return RegistryUnreachable(f"cannot reach {where} for {ref}: {reason}"
                                       + oci.hint(reason), **extra)
        return SourceFailed(f"fetching {ref} from {where} failed: {reason}", **extra)

    # --- fetching -------------------------------------------------------------------------
    async def _make(self, plan: _Plan, ctx: Path | None) -> AsyncIterator[dict]:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        tmp = Path(tempfile.mkdtemp(prefix=f".{plan.key[:16]}.", suffix=".tmp", dir=self.root))
        t0 = time.monotonic()
        try:
            (tmp / "tmp").mkdir()
            if plan.kind == "from_debian":
                yield _log(f"bootstrapping {plan.origin}\n")
                config: dict = {}
                async for ev in self._stream(debian.mmdebstrap_argv(
                        plan.src, tmp / "rootfs", plan.mirror), tmp, plan):
                    yield ev
            else:
                yield _log(f"fetching {plan.origin}\n")
                layout = f"oci:{tmp / 'layout'}:image"
                async for ev in self._stream([*self._skopeo(), "copy", "--remove-signatures",
                                              *self._access("src"), plan.src, layout],
                                             tmp, plan):
                    yield ev
                image = json.loads(await self._run_quiet(
                    [*self._skopeo(), "inspect", "--config", layout], tmp, plan))
                arch = image.get("architecture")
                if arch and arch != ARCH:
                    raise Invalid(f"{plan.origin} is an image for {arch}; this host runs "
                                  f"{ARCH}", field="steps.0")
                config = image.get("config") or {}
                yield _log("unpacking its layers\n")
                async for ev in self._stream(["umoci", "raw", "unpack", "--image",
                                              str(tmp / "layout") + ":image",
                                              str(tmp / "rootfs")], tmp, plan):
                    yield ev
                shutil.rmtree(tmp / "layout")
            did = await asyncio.to_thread(rootfs.prepare, tmp / "rootfs",
                                          config.get("WorkingDir") or None)
            shutil.rmtree(tmp / "tmp")
            meta = {"kind": plan.kind, "origin": plan.origin, "step": plan.step,
                    "arch": ARCH, "import_version": IMPORT_VERSION,
                    "config": {k: config.get(k) for k in ("Env", "WorkingDir", "User", "Cmd",
                                                          "Entrypoint", "ExposedPorts")
                               if config.get(k)},
                    "prepared": did, "seconds": round(time.monotonic() - t0, 1),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
            (tmp / "source.json").write_text(json.dumps(meta, indent=2))
            final = self.root / plan.key
            if final.exists():  # stored meanwhile by another server process
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, final)
            yield _log(f"stored as source {plan.key[:12]} ({meta['seconds']}s)"
                       + (f"; added user(s) {', '.join(did['users_added'])}"
                          if did["users_added"] else "")
                       + (f"; removed {did['devices']} device node(s)" if did["devices"]
                          else "") + "\n")
        except OSError as e:
            if rootfs.is_enospc(e):
                raise DiskFull(f"no space left on the data disk while fetching {plan.origin}"
                               f" ({self.root}); nothing was kept") from None
            raise SourceFailed(f"fetching {plan.origin} failed: {e}") from None
        except rootfs.UnsafeRootfs as e:
            raise Invalid(f"{plan.origin}: {e}", field="steps.0") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _skopeo(self) -> list[str]:
        conf = self.root.parent / "registries.conf"
        text = oci.registries_conf(self.mirrors, self.insecure)
        conf.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if conf.read_text() == text:
                return ["skopeo", "--registries-conf", str(conf), "--policy",
                        str(self._policy())]
        tmp = conf.with_name(f".registries.conf.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, conf)
        return ["skopeo", "--registries-conf", str(conf), "--policy", str(self._policy())]

    def _policy(self) -> Path:
        # images are pinned by digest; signatures are not checked (see docs/operations.md)
        path = self.root.parent / "policy.json"
        if not path.exists():
            path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        return path

    def _access(self, side: str = "") -> list[str]:
        prefix = f"--{side}-" if side else "--"
        out = []
        if self.auth_file:
            out += [f"{prefix}authfile", self.auth_file]
        if self.cert_dir:
            out += [f"{prefix}cert-dir", self.cert_dir]
        return out

    async def _capture(self, argv: list[str], timeout: float, env: dict | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise _Failed(argv, None, [], "") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            text = err.decode(errors="replace")
            raise _Failed(argv, proc.returncode, text.splitlines()[-LOG_TAIL:], text)
        return out.decode(errors="replace")

    def _env(self, tmp: Path) -> dict:
        # (temporary files of the tools land on the data disk, and go with `tmp`)
        return {**os.environ, "TMPDIR": str(tmp / "tmp")}

    async def _run_quiet(self, argv: list[str], tmp: Path, plan: _Plan) -> str:
        try:
            return await self._capture(argv, FETCH_TIMEOUT, self._env(tmp))
        except _Failed as e:
            raise self._fetch_error(e, plan) from None

    async def _stream(self, argv: list[str], tmp: Path, plan: _Plan) -> AsyncIterator[dict]:
        """Run a tool, its output as log events; its failure as an engine error."""
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self._env(tmp))
        tail: list[str] = []
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                assert proc.stdout is not None
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace")
                    tail = [*tail, line.rstrip("\n")][-LOG_TAIL:]
                    yield _log(line)
                await proc.wait()
        except TimeoutError:
            raise self._fetch_error(_Failed(argv, None, tail, ""), plan) from None
        finally:
            if proc.returncode is None:  # (the build was given up, or timed out)
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise self._fetch_error(_Failed(argv, proc.returncode, tail, "\n".join(tail)),
                                    plan)

    def _fetch_error(self, e: _Failed, plan: _Plan) -> TorporError:
        text = "\n".join(e.tail)
        tool = os.path.basename(e.argv[0])
        if "no space left on device" in e.stderr.lower() or "no space left" in text.lower():
            return DiskFull(f"no space left on the data disk while fetching {plan.origin} "
                            f"({self.root}); nothing was kept", reason=text)
        if e.code is None:
            return SourceFailed(f"{tool} did not finish fetching {plan.origin} within "
                                f"{FETCH_TIMEOUT:.0f}s; its last lines:\n{text}")
        if plan.kind == "from_debian":
            return SourceFailed(f"mmdebstrap could not bootstrap {plan.origin} (exit code "
                                f"{e.code}); its last lines:\n{text}", mirror=plan.mirror)
        if plan.kind == "from_image":
            ref = oci.parse_image(plan.step["reference"])
            return self._error(e, ref, plan.src)
        return Invalid(f"{plan.step.get('src')}: {tool} could not read it (exit code "
                       f"{e.code}): {oci.skopeo_reason(e.stderr)}", field="steps.0.src")


def _log(data: str) -> dict:
    return {"type": "log", "stream": "stdout", "data": data}
