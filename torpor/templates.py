"""Templates: read-only root filesystems plus defaults, shared by every sandbox made from them.

A template lives in `<data>/templates/<name>/` as `template.json` (defaults) and `rootfs/`.
`usr_from` names a host directory that is the template's `/usr` (the `base` template takes
the host's own `/usr`, so it needs no download and no copy); a template with its own `/usr`
inside `rootfs/` leaves it empty. Sandboxes never write here: each one has a writable layer
over the template (see `layers.py`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

BASE = "base"
USER_UID = 1000

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


@dataclass
class Template:
    name: str
    path: Path
    usr_from: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str = "user"
    workdir: str = "/home/user"
    cpu: float = 1.0
    memory_mb: int = 512
    disk_mb: int = 4096
    description: str = ""

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class TemplateStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "templates"

    def list(self) -> list[Template]:
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            t = self._load(d)
            if t:
                out.append(t)
        return out

    def get(self, name: str) -> Template | None:
        if not name or "/" in name or name.startswith("."):
            return None
        return self._load(self.root / name)

    def _load(self, d: Path) -> Template | None:
        try:
            meta = json.loads((d / "template.json").read_text())
        except (OSError, ValueError):
            return None
        meta.pop("path", None)
        return Template(path=d, **meta)

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
        meta = t.to_dict()
        meta.pop("path")
        (tmp / "template.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)
        return t


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
    _write(etc / "passwd",
           "root:x:0:0:root:/root:/bin/bash\n"
           f"user:x:{USER_UID}:{USER_UID}:Sandbox user:/home/user:/bin/bash\n"
           "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    _write(etc / "group",
           "root:x:0:\nsudo:x:27:user\nusers:x:100:user\n"
           f"user:x:{USER_UID}:\nnogroup:x:65534:\n")
    _write(etc / "shadow", "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n", 0o640)
    _write(etc / "hostname", "sandbox\n")
    _write(etc / "hosts", "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost\n")
    _write(etc / "resolv.conf", "# egress goes through the Torpor proxy\nnameserver 127.0.0.1\n")
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


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    os.chmod(path, mode)
