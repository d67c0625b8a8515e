"""Templates: read-only root filesystems plus defaults, shared by every sandbox made from them.

A template is immutable and addressed by content: its `digest` is the SHA-256 of its
configuration (defaults, the layers it stacks, its start command, its parent), so a sandbox
that records the digest it started from never sees a rebuild of the name. Names with tags
(`name:tag`, `latest` by default) point at digests and move atomically.

On disk, under `<data>`:
- `templates/base/`: the `base` template, `template.json` and `rootfs/` (the bottom of every
  template). `usr_from` names a host directory that is the template's `/usr` (`base` takes
  the host's own `/usr`, so it needs no download and no copy).
- `images/layers/<key>/{root,usr}`: a layer, what one build step changed (the upper
  directories of overlayfs, whiteouts included), stored once under the hash of the steps
  that made it: identical steps on an identical parent share it.
- `images/templates/<digest>/template.json`: a template's configuration, and `snapshot/`
  when it has a boot snapshot (the checkpoint of a sandbox started from it and ready).
- `images/names/<name>/<tag>`: a symlink to `../../templates/<digest>`.
- `images/sources/<key>/{rootfs,source.json}`: a root filesystem fetched from an OCI image
  or bootstrapped from a Debian suite (`torpor/sources`), stored once per content; the
  templates made from it have it as their `base_rootfs` and their own /usr.
Sandboxes never write here: each one has a writable layer over the template (see
`torpor/runtime/layers.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BASE = "base"
LATEST = "latest"
USER_UID = 1000
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# what a template's configuration is made of (its digest covers these; not its name: two
# names built the same way share one template)
_CONFIG = ("usr_from", "env", "user", "workdir", "cpu", "memory_mb", "disk_mb",
           "description", "base_rootfs", "layers", "start_cmd", "ready", "snapshot",
           "parent", "steps")

# What of the host's /etc the base template takes: system plumbing, no secrets, no
# host identity. Everything else in /etc is generated.
_ETC_COPY = [
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf",
    "mime.types", "profile", "profile.d", "bash.bashrc", "skel", "inputrc",
    "environment", "login.defs", "shells", "protocols", "services", "localtime",
    "timezone", "os-release", "debian_version", "issue", "python3", "python3.11",
    "ssl/openssl.cnf", "ssl/certs", "ca-certificates.conf", "ca-certificates",
    "gai.conf", "host.conf", "magic", "magic.mime", "xattr.conf", "subuid", "subgid",
    "vim", "wgetrc", "gitconfig",
]
# what a sandbox's /etc says about its network, in every template (base and fetched ones)
HOSTNAME = "sandbox\n"
HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost\n"
RESOLV_CONF = "# egress goes through the Torpor proxy\nnameserver 127.0.0.1\n"


@dataclass
class Template:
    name: str
    path: Path  # its own directory: template.json, and snapshot/ if it has one
    usr_from: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str = "user"
    workdir: str = "/home/user"
    cpu: float = 1.0
    memory_mb: int = 512
    disk_mb: int = 4096
    description: str = ""
    base_rootfs: str | None = None  # the bottom rootfs (base's); None: path / "rootfs"
    layers: list[str] = field(default_factory=list)  # layer keys, bottom to top
    start_cmd: str | None = None  # running, and ready, in the boot snapshot
    ready: dict | None = None  # {"port": n} | {"file": path} | {"cmd": command}
    snapshot: bool = False  # has a boot snapshot: a create restores it
    parent: str | None = None  # the digest it was built on
    steps: list[dict] = field(default_factory=list)  # how it was built (for people)
    tag: str = LATEST
    digest: str = ""
    created_at: str | None = None
    layer_root: Path | None = None  # where its layers live (not part of its config)

    @property
    def rootfs(self) -> Path:
        return Path(self.base_rootfs) if self.base_rootfs else self.path / "rootfs"

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def snapshot_dir(self) -> Path:
        return self.path / "snapshot"

    def layer_dirs(self, part: str) -> list[Path]:
        """The `part` ("root" or "usr") of its layers, top first (overlayfs's order)."""
        if not self.layers or self.layer_root is None:
            return []
        return [self.layer_root / key / part for key in reversed(self.layers)]

    def config(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in _CONFIG}

    def to_dict(self) -> dict:
        d = self.config()
        d.update(name=self.name, path=str(self.path), tag=self.tag, digest=self.digest,
                 created_at=self.created_at)
        return d


def digest_of(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def parse_ref(ref: str) -> tuple[str, str]:
    """("name", "tag") of "name" or "name:tag"; ValueError if either is not valid."""
    name, _, tag = ref.partition(":")
    tag = tag or LATEST
    if not NAME.match(name):
        raise ValueError(f"template name {name!r} is not a DNS label (a-z, 0-9 and -, at "
                         "most 63, starting and ending with a letter or digit)")
    if not TAG.match(tag):
        raise ValueError(f"template tag {tag!r} is not valid (letters, digits, _ . -, at "
                         "most 128)")
    return name, tag


class TemplateStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "templates"  # base
        self.images = Path(data_dir) / "images"
        self.layers = self.images / "layers"
        self.configs = self.images / "templates"
        self.names = self.images / "names"
        self.sources = self.images / "sources"  # fetched root filesystems (torpor/sources)
        # source keys that builds in progress hold (set by torpor.sources.Sources): not
        # collected although no template uses them yet
        self.held_sources: Callable[[], set[str]] = set
        # what builds in progress made or stand on, by build: template digests and layer
        # keys not named yet (see hold); gc keeps them
        self._holds: dict[str, tuple[set[str], set[str]]] = {}
        self._holds_lock = threading.Lock()

    def hold(self, owner: str, digest: str | None = None, layer: str | None = None) -> None:
        """Keep a template (and what it stands on) or a layer from `gc` until
        `release(owner)`: a build's parent, its layers and the templates of its steps."""
        with self._holds_lock:
            digests, layers = self._holds.setdefault(owner, (set(), set()))
            if digest:
                digests.add(digest)
            if layer:
                layers.add(layer)

    def release(self, owner: str) -> None:
        with self._holds_lock:
            self._holds.pop(owner, None)

    def _held(self) -> tuple[set[str], set[str]]:
        with self._holds_lock:
            return ({d for ds, _ in self._holds.values() for d in ds},
                    {k for _, ks in self._holds.values() for k in ks})

    # --- reading --------------------------------------------------------------------------
    def list(self) -> list[Template]:
        """Every named template (each tag of each name), base first."""
        out = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                t = self._load(d)
                if t:
                    out.append(t)
        if self.names.is_dir():
            for nd in sorted(self.names.iterdir()):
                for tag in sorted(p.name for p in nd.iterdir()):
                    t = self._named(nd.name, tag)
                    if t:
                        out.append(t)
        return out

    def get(self, ref: str) -> Template | None:
        """A template by "name", "name:tag" or its digest ("sha256:..."); None if none."""
        if not ref or "/" in ref or ref.startswith("."):
            return None
        if ref.startswith("sha256:"):
            return self.by_digest(ref)
        try:
            name, tag = parse_ref(ref)
        except ValueError:
            return None
        named = self._named(name, tag)
        if named is not None or tag != LATEST:
            return named
        return self._load(self.root / name)  # base

    def by_digest(self, digest: str) -> Template | None:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest or ""):
            return None
        base = self._load(self.root / BASE)
        if base is not None and base.digest == digest:
            return base
        return self._load(self.configs / digest.removeprefix("sha256:"))

    def _named(self, name: str, tag: str) -> Template | None:
        link = self.names / name / tag
        try:
            target = os.readlink(link)
        except OSError:
            return None
        t = self._load((link.parent / target).resolve())
        if t is not None:
            t.name, t.tag = name, tag
        return t

    def _load(self, d: Path) -> Template | None:
        try:
            meta = json.loads((d / "template.json").read_text())
        except (OSError, ValueError):
            return None
        extra = {k: meta.pop(k) for k in ("tag", "created_at") if k in meta}
        meta.pop("path", None)
        meta.pop("digest", None)
        t = Template(path=d, layer_root=self.layers, **meta, **extra)
        t.digest = digest_of(t.config())
        return t

    # --- layers ---------------------------------------------------------------------------
    def layer_path(self, key: str) -> Path:
        return self.layers / key

    def has_layer(self, key: str) -> bool:
        return (self.layers / key / ".complete").exists()

    def commit_layer(self, tmp: Path, key: str) -> Path:
        """Move a layer written in `tmp` into the store under `key` (atomically)."""
        (tmp / ".complete").write_text("")
        final = self.layers / key
        if final.exists():  # built twice at once: the first one stays
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return final

    def layer_tmp(self, key: str) -> Path:
        self.layers.mkdir(parents=True, exist_ok=True)
        tmp = self.layers / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("root", "usr"):
            (tmp / part).mkdir(parents=True)
        return tmp

    # --- writing --------------------------------------------------------------------------
    def put(self, t: Template, snapshot: Path | None = None) -> Template:
        """Store a template's configuration under its digest (once: it never changes), with
        the boot snapshot prepared in `snapshot` (moved in)."""
        config = t.config()
        digest = digest_of(config)
        d = self.configs / digest.removeprefix("sha256:")
        if not (d / "template.json").exists():
            self.configs.mkdir(parents=True, exist_ok=True)
            tmp = d.with_name(d.name + f".{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            if snapshot is not None and snapshot.is_dir():
                os.replace(snapshot, tmp / "snapshot")
            meta = config | {"name": t.name,
                             "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
            (tmp / "template.json").write_text(json.dumps(meta, indent=2))
            if d.exists():  # the same template, stored at once by another build
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, d)
        loaded = self._load(d)
        assert loaded is not None
        loaded.name, loaded.tag = t.name, t.tag
        return loaded

    def tag(self, name: str, tag: str, digest: str) -> None:
        """Point name:tag at a digest (replacing what it pointed at, atomically)."""
        nd = self.names / name
        nd.mkdir(parents=True, exist_ok=True)
        tmp = nd / f".{tag}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"../../templates/{digest.removeprefix('sha256:')}", tmp)
        os.replace(tmp, nd / tag)

    def untag(self, name: str, tag: str) -> None:
        (self.names / name / tag).unlink(missing_ok=True)
        try:
            (self.names / name).rmdir()
        except OSError:
            pass

    def gc(self, in_use: set[str]) -> list[str]:
        """Remove the templates no name, no template built on them and nothing in `in_use`
        (digests of sandboxes that exist) needs, then the layers none of the rest uses.
        Returns what it removed."""
        held_digests, held_layers = self._held()
        keep = {t.digest for t in self.list()} | set(in_use) | held_digests
        configs = {}
        if self.configs.is_dir():
            for d in self.configs.iterdir():
                t = self._load(d)
                if t is not None:
                    configs[t.digest] = t
        changed = True
        while changed:  # what is kept keeps its parents
            changed = False
            for dg in list(keep):
                parent = configs.get(dg).parent if dg in configs else None
                if parent and parent not in keep:
                    keep.add(parent)
                    changed = True
        removed = []
        for dg, t in configs.items():
            if dg not in keep:
                shutil.rmtree(t.path, ignore_errors=True)
                removed.append(dg)
        layers_used = {k for dg, t in configs.items() if dg in keep for k in t.layers}
        layers_used |= held_layers
        if self.layers.is_dir():
            for d in self.layers.iterdir():
                if d.name not in layers_used and not d.name.startswith("."):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(f"layer {d.name}")
        sources_used = {Path(t.base_rootfs).parent.name for dg, t in configs.items()
                        if dg in keep and t.base_rootfs
                        and Path(t.base_rootfs).parent.parent == self.sources}
        sources_used |= self.held_sources()
        if self.sources.is_dir():
            for d in self.sources.iterdir():  # (".*.tmp": a fetch in progress)
                if d.is_dir() and d.name not in sources_used and not d.name.startswith("."):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(f"source {d.name}")
        return removed

    def ensure_base(self) -> Template:
        """Build the `base` template from the host's system tree if it is not there yet."""
        existing = self.get(BASE)
        if existing is not None:
            return existing
        final = self.root / BASE
        tmp = self.root / f".{BASE}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        rootfs = tmp / "rootfs"
        build_base_rootfs(rootfs)
        t = Template(name=BASE, path=final, usr_from="/usr",
                     description="The host's Debian system tree (/usr) with a fresh /etc")
        (tmp / "template.json").write_text(json.dumps(t.config() | {"name": BASE}, indent=2))
        os.replace(tmp, final)
        return self.get(BASE)


def build_base_rootfs(rootfs: Path) -> None:
    rootfs.mkdir(parents=True)
    for d in ["usr", "etc", "root", "home", "tmp", "var/tmp", "var/log", "var/cache",
              "var/lib", "run", "mnt", "opt", "srv", "media", "proc", "sys", "dev",
              ".torpor/usr", ".torpor/agent"]:
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for link in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"]:
        target = f"usr/{link}"
        if os.path.lexists(f"/{link}") or os.path.isdir(f"/usr/{link}"):
            os.symlink(target, rootfs / link)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "var/tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    etc = rootfs / "etc"
    for name in _ETC_COPY:
        src = Path("/etc") / name
        dst = etc / name
        if not os.path.lexists(src):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
    _quicker_profile(etc / "profile")
    _write(etc / "passwd",
           "root:x:0:0:root:/root:/bin/bash\n"
           f"user:x:{USER_UID}:{USER_UID}:Sandbox user:/home/user:/bin/bash\n"
           "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    _write(etc / "group",
           "root:x:0:\nsudo:x:27:user\nusers:x:100:user\n"
           f"user:x:{USER_UID}:\nnogroup:x:65534:\n")
    _write(etc / "shadow", "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n", 0o640)
    _write(etc / "hostname", HOSTNAME)
    _write(etc / "hosts", HOSTS)
    _write(etc / "resolv.conf", RESOLV_CONF)
    _write(etc / "machine-id", "")
    home = rootfs / "home/user"
    if (etc / "skel").is_dir():
        shutil.copytree(etc / "skel", home, symlinks=True)
    else:
        home.mkdir()
    for dirpath, dirnames, filenames in os.walk(home):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            os.lchown(n, USER_UID, USER_UID)
    os.chmod(home, 0o750)


def _quicker_profile(profile: Path) -> None:
    """Debian's /etc/profile asks `$(id -u)`: a fork and an exec, 20-30 ms under gVisor's
    ptrace platform, paid by every login shell (E2B's SDK runs each command in
    `bash -l -c`). Bash knows the answer as $EUID; other shells still ask id."""
    if profile.is_file() and not profile.is_symlink():
        text = profile.read_text()
        profile.write_text(text.replace('"$(id -u)"', '"${EUID:-$(id -u)}"'))


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    os.chmod(path, mode)
