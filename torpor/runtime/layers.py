"""A sandbox's writable layer: its own disk over a read-only template.

The layer is a sparse ext4 image of `disk_mb` (so the disk limit is a real filesystem
limit: writes past it fail with ENOSPC inside the sandbox, nothing else is affected),
mounted through a loop device. Overlayfs puts its upper directories over the template's
rootfs (and over the host `/usr` for templates that borrow it). The image survives the
sandbox's processes and the server; mounting is idempotent so a restarted server can
bring a layer back. A hibernated sandbox's layer is unmounted (no mount, no loop device)
and mounted again for its restore, so mounting is on the deep-resume path: it uses the
system calls directly (~2-7 ms for the three mounts) rather than mount(8) (15-55 ms).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import struct
import subprocess
from pathlib import Path

from torpor.templates import Template

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_NOATIME = 1024
MNT_DETACH = 2
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8+: attach and set flags in one call
LO_FLAGS_AUTOCLEAR = 4  # the loop device detaches itself when its file system is unmounted


class StorageError(OSError):
    pass


def _run(*argv: str) -> None:
    p = subprocess.run(argv, check=False, capture_output=True, text=True)
    if p.returncode != 0:
        raise StorageError(f"{' '.join(argv)} failed: {p.stderr.strip() or p.stdout.strip()}")


def mount_points() -> set[str]:
    """Every mount point of this mount namespace (one read of the table)."""
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f}


def mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags,
                   data.encode()) != 0:
        err = ctypes.get_errno()
        raise StorageError(f"mounting {fstype} {source} on {target} failed: "
                           f"{os.strerror(err)}")


def _attach_loop(image: Path) -> tuple[str, int]:
    """A free loop device backed by `image`, detaching itself once unmounted: (path, an
    open fd that keeps it until the mount holds it). Retried when another attach took the
    same free device first."""
    for _ in range(20):
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
        finally:
            os.close(ctl)
        dev = f"/dev/loop{n}"
        loop_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        file_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            # struct loop_config: fd, block_size, struct loop_info64, __u64 reserved[8]
            info = struct.pack("=QQQQQIIII64s64s32sQQ", 0, 0, 0, 0, 0, 0, 0, 0,
                               LO_FLAGS_AUTOCLEAR, str(image).encode()[:63], b"", b"", 0, 0)
            fcntl.ioctl(loop_fd, LOOP_CONFIGURE, struct.pack("=II", file_fd, 0) + info
                        + bytes(64))
            return dev, loop_fd
        except OSError as e:
            os.close(loop_fd)
            if e.errno != errno.EBUSY:
                raise StorageError(f"attaching {image} to {dev} failed: {e}") from None
        finally:
            os.close(file_fd)
    raise StorageError(f"attaching {image}: no free loop device after 20 tries")


def _unmount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY:  # something still holds it (a dying runsc gofer): detach lazily
        if _libc.umount2(str(target).encode(), MNT_DETACH) == 0:
            return
        err = ctypes.get_errno()
    if err != errno.EINVAL:  # EINVAL: not a mount point (any more)
        raise StorageError(f"unmounting {target} failed: {os.strerror(err)}")


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

    def mount_disk(self) -> set[str]:
        """Mount the disk image alone (its upper directories), idempotently; the mount
        points before, for `mount`."""
        for d in (self.disk, self.rootfs, self.usr):
            d.mkdir(exist_ok=True)
        points = mount_points()
        if os.path.realpath(self.disk) not in points:
            dev, loop_fd = _attach_loop(self.image)
            try:
                _mount(dev, self.disk, "ext4", MS_NOATIME, "")
            finally:
                os.close(loop_fd)  # the mount holds the device now (or it detaches)
        return points

    def mount(self) -> None:
        points = self.mount_disk()
        for d in ("root-upper", "root-work", "usr-upper", "usr-work"):
            (self.disk / d).mkdir(exist_ok=True)
        # a built template stacks its layers over the base's rootfs (and the host's /usr):
        # overlayfs takes the lower directories top first
        if os.path.realpath(self.rootfs) not in points:
            lower = ":".join(map(str, [*self.template.layer_dirs("root"),
                                       self.template.rootfs]))
            _mount("overlay", self.rootfs, "overlay", 0,
                   f"lowerdir={lower},upperdir={self.disk}/root-upper,"
                   f"workdir={self.disk}/root-work")
        if self.template.usr_from and os.path.realpath(self.usr) not in points:
            lower = ":".join(map(str, [*self.template.layer_dirs("usr"),
                                       self.template.usr_from]))
            _mount("overlay", self.usr, "overlay", 0,
                   f"lowerdir={lower},upperdir={self.disk}/usr-upper,"
                   f"workdir={self.disk}/usr-work")

    def is_mounted(self) -> bool:
        """True if any part of the layer is mounted."""
        points = mount_points()
        return any(os.path.realpath(d) in points for d in (self.usr, self.rootfs, self.disk))

    def unmount(self) -> None:
        """Unmount the overlays and the disk; its loop device detaches with the last one."""
        points = mount_points()
        for d in (self.usr, self.rootfs, self.disk):
            if os.path.realpath(d) in points:
                _unmount(d)

    def export_changes(self, dest: Path) -> None:
        """Copy what the sandbox changed (its upper directories: files, whiteouts, opaque
        directories' xattrs) into dest/root and dest/usr, to stack as a template's layer.
        The sandbox must be stopped; the layer is left unmounted."""
        self.mount_disk()
        try:
            for part in ("root", "usr"):
                src = self.disk / f"{part}-upper"
                (dest / part).mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    _run("cp", "-a", "--", f"{src}/.", f"{dest / part}/")
        finally:
            self.unmount()

    def destroy(self) -> None:
        self.unmount()
        shutil.rmtree(self.dir, ignore_errors=True)

    def disk_bytes(self) -> int:
        """Bytes the image really takes on the host (it is sparse)."""
        try:
            return os.stat(self.image).st_blocks * 512
        except OSError:
            return 0
