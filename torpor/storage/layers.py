"""A sandbox's writable layer: its own disk over a read-only template.

The layer is a sparse ext4 image of `disk_mb` (so the disk limit is a real filesystem
limit: writes past it fail with ENOSPC inside the sandbox, nothing else is affected),
mounted through a loop device. Overlayfs puts its upper directories over the template's
rootfs (and over the host `/usr` for templates that borrow it). The image survives the
sandbox's processes and the server; mounting is idempotent so a restarted server can
bring a layer back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from torpor.storage.templates import Template


class StorageError(Exception):
    pass


def _run(*argv: str) -> None:
    p = subprocess.run(argv, check=False, capture_output=True, text=True)
    if p.returncode != 0:
        raise StorageError(f"{' '.join(argv)} failed: {p.stderr.strip() or p.stdout.strip()}")


def mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class Layer:
    def __init__(self, sandbox_dir: Path, template: Template, disk_mb: int):
        self.dir = Path(sandbox_dir)
        self.template = template
        self.disk_mb = disk_mb
        self.image = self.dir / "disk.img"
        self.disk = self.dir / "disk"
        self.rootfs = self.dir / "rootfs"
        self.usr = self.dir / "usr"

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.disk_mb << 20)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
             "-E", "lazy_itable_init=1,nodiscard", str(self.image))
        self.mount()

    def mount(self) -> None:
        for d in (self.disk, self.rootfs, self.usr):
            d.mkdir(exist_ok=True)
        if not mounted(self.disk):
            _run("mount", "-o", "loop,noatime", str(self.image), str(self.disk))
        for d in ("root-upper", "root-work", "usr-upper", "usr-work"):
            (self.disk / d).mkdir(exist_ok=True)
        if not mounted(self.rootfs):
            _run("mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={self.template.rootfs},upperdir={self.disk}/root-upper,"
                 f"workdir={self.disk}/root-work", str(self.rootfs))
        if self.template.usr_from and not mounted(self.usr):
            _run("mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={self.template.usr_from},upperdir={self.disk}/usr-upper,"
                 f"workdir={self.disk}/usr-work", str(self.usr))

    def unmount(self) -> None:
        for d in (self.usr, self.rootfs, self.disk):
            if d.exists() and mounted(d):
                p = subprocess.run(["umount", str(d)], check=False, capture_output=True, text=True)
                if p.returncode != 0 and mounted(d):
                    # something still holds it (a dying runsc gofer): detach lazily
                    _run("umount", "-l", str(d))

    def destroy(self) -> None:
        self.unmount()
        shutil.rmtree(self.dir, ignore_errors=True)

    def disk_bytes(self) -> int:
        """Bytes the image really takes on the host (it is sparse)."""
        try:
            return os.stat(self.image).st_blocks * 512
        except OSError:
            return 0
