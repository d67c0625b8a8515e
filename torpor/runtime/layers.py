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
import hashlib
import logging
import os
import secrets
import shutil
import struct
import subprocess
import threading
import time
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


log = logging.getLogger("torpor.runtime")
# the file system of every sandbox's disk: no journal (a sandbox's disk does not outlive a
# host crash in any useful state anyway), inode tables initialised lazily, nothing reserved
MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E",
        "lazy_itable_init=1,nodiscard"]


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


def format_disk(image: Path, disk_mb: int) -> None:
    """A sparse file of disk_mb holding an empty ext4 file system (~2 MB really used)."""
    with open(image, "wb") as f:
        f.truncate(disk_mb << 20)
    _run(*MKFS, str(image))


def copy_sparse(src: Path, dest: Path) -> None:
    """A copy of a disk image that stays sparse (a reflink where the file system has them)."""
    _run("cp", "--sparse=always", "--reflink=auto", "--", str(src), str(dest))


def _copy_key(src: Path) -> str:
    """The stock's name for the image at `src` as it is now: a rebuilt template's snapshot
    is a new file (another inode or mtime), never confused with the one it replaced."""
    st = os.stat(src)
    ident = f"{os.path.realpath(src)}:{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


class DiskStock:
    """Disk images made ahead of need, so that a sandbox's start renames one into place
    (~0.1 ms) instead of making it on its path: blank ones (mkfs.ext4, ~8 ms, and a process
    that competes with runsc for the host's cores) and copies of a boot snapshot's disk
    (a sparse copy, ~4 ms for a few MB in use, more for templates that wrote more).

    `<dir>/<disk_mb>-<random>.img` (blank) and `<dir>/copy-<key>-<random>.img` (a copy of
    the image whose `_copy_key` is key), `keep` of each kind a start asked for (the `sizes`
    most recently asked kinds), made by one thread once no start has asked for `settle`
    seconds (`refill()` wakes it), never on a start's path. Images are whole when they have
    their final name (written as `.tmp` first). Copies of an image that changed, went, or is
    no longer among the kinds asked for are removed (they hold a template's data; a new
    stock removes every copy, not knowing their sources). The directory lives in the
    server's data dir, and `close()` stops the thread.
    """

    def __init__(self, directory: Path, keep: int = 2, sizes: int = 4, settle: float = 0.25):
        self.dir = Path(directory)
        self.keep = keep
        self.settle = settle
        self.max_sizes = sizes
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):  # a fill the last server did not finish
            tmp.unlink(missing_ok=True)
        for old in self.dir.glob("copy-*.img"):  # copies of sources this stock cannot name
            old.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        # kinds, most recently asked last: a size in MB (blank), or (key, source path)
        self._wanted: list[int | tuple[str, Path]] = []
        for mb in sorted({n for n, _ in self._images() if isinstance(n, int)}):
            self._wanted.append(mb)
        self._thread: threading.Thread | None = None
        self._asked_at = 0.0  # monotonic time of the last take or refill

    def _images(self) -> list[tuple[int | str, Path]]:
        """(size in MB, path) of each blank image, (key, path) of each copy."""
        out = []
        for p in self.dir.glob("*.img"):
            kind, _, rest = p.name.partition("-")
            if kind.isdigit():
                out.append((int(kind), p))
            elif kind == "copy" and "-" in rest:
                out.append((rest.partition("-")[0], p))
        return out

    def count(self, kind: int | Path) -> int:
        """Images in stock of a size (blank) or copies of an image (`Path`)."""
        key = kind if isinstance(kind, int) else _copy_key(kind)
        return sum(1 for k, _ in self._images() if k == key)

    def take(self, kind: int | Path, dest: Path) -> bool:
        """Move a blank image of `kind` MB, or a copy of the image at `kind` (a Path), to
        `dest`; False if there is none (the caller makes one). Asks for the kind to be
        stocked either way."""
        if isinstance(kind, int):
            key, want = kind, kind
        else:
            key = _copy_key(kind)
            want = (key, Path(kind))
        with self._lock:
            self._asked_at = time.monotonic()
            if want in self._wanted:
                self._wanted.remove(want)
            self._wanted.append(want)
            del self._wanted[:-self.max_sizes]
            for k, p in self._images():
                if k != key:
                    continue
                try:
                    os.rename(p, dest)
                    return True
                except FileNotFoundError:  # taken meanwhile
                    continue
        return False

    def refill(self) -> None:
        """Make what is missing, in the stock's thread (started on first use)."""
        with self._lock:
            if self._closing:
                return
            self._asked_at = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, name="disk-stock",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def _prune(self) -> None:
        """Remove copies of images no longer asked for, changed or gone (under the lock)."""
        wanted = {}
        for w in self._wanted:
            if isinstance(w, tuple):
                try:
                    current = _copy_key(w[1]) == w[0]
                except OSError:
                    current = False
                if current:
                    wanted[w[0]] = w
        self._wanted = [w for w in self._wanted if not isinstance(w, tuple) or w[0] in wanted]
        for k, p in self._images():
            if isinstance(k, str) and k not in wanted:
                p.unlink(missing_ok=True)

    def _missing(self) -> int | tuple[str, Path] | None:
        images = self._images()
        for w in reversed(self._wanted):
            key = w[0] if isinstance(w, tuple) else w
            if sum(1 for k, _ in images if k == key) < self.keep:
                return w
        return None

    def _fill(self) -> None:
        while True:
            with self._lock:
                want = None
                while not self._closing and (want := self._missing()) is None:
                    self._wake.wait()
                # let the starts that asked finish first (mkfs takes a core for ~8 ms): wait
                # until none has asked for `settle` seconds
                while not self._closing and (
                        left := self._asked_at + self.settle - time.monotonic()) > 0:
                    self._wake.wait(left)
                if self._closing:
                    return
                self._prune()
                want = self._missing()
                if want is None:
                    continue
            if isinstance(want, tuple):
                tmp = self.dir / f"copy-{want[0]}-{secrets.token_hex(6)}.tmp"
            else:
                tmp = self.dir / f"{want}-{secrets.token_hex(6)}.tmp"
            try:
                if isinstance(want, tuple):
                    copy_sparse(want[1], tmp)
                    # written back now: attaching a loop device to a file with dirty pages
                    # writes them first (measured 4-5 ms of the start, 0.6 once synced;
                    # mkfs syncs its own)
                    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                else:
                    format_disk(tmp, want)
                tmp.rename(tmp.with_suffix(".img"))
            except OSError as e:
                tmp.unlink(missing_ok=True)
                log.warning("could not make a disk of %s ahead (%s); sandboxes make their own",
                            want if isinstance(want, int) else want[1], e)
                with self._lock:  # not asked again until a start asks for it
                    if want in self._wanted:
                        self._wanted.remove(want)
            else:
                with self._lock:  # its source changed while it was copied: not a copy of it
                    if isinstance(want, tuple):
                        self._prune()

    def close(self) -> None:
        """Stop the thread (after the image it is making, if any); the images stay."""
        with self._lock:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def clear(self) -> None:
        """Remove every image (the server's data dir is being removed)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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

    def create(self, stock: DiskStock | None = None) -> None:
        """A new disk (a blank one from `stock` if it has one of this size, else formatted
        now), mounted with the overlays over it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if stock is None or not stock.take(self.disk_mb, self.image):
            format_disk(self.image, self.disk_mb)
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
        """Unmount the overlays and the disk (its loop device detaches with the last one),
        and whatever else is mounted in the sandbox's directory (its drives), deepest
        first."""
        points = mount_points()
        for d in (self.usr, self.rootfs, self.disk):
            if os.path.realpath(d) in points:
                _unmount(d)
        inside = os.path.realpath(self.dir) + "/"
        for p in sorted((p for p in points if p.startswith(inside)), key=len, reverse=True):
            if p in mount_points():  # (a lazy unmount of its parent took it already)
                _unmount(Path(p))

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
        inside = os.path.realpath(self.dir) + "/"
        left = [p for p in mount_points() if p.startswith(inside)]
        if left:  # never remove files through a mount (a drive's)
            raise StorageError(f"{self.dir}: still mounted: {', '.join(left)}")
        shutil.rmtree(self.dir, ignore_errors=True)

    def disk_bytes(self) -> int:
        """Bytes the image really takes on the host (it is sparse)."""
        try:
            return os.stat(self.image).st_blocks * 512
        except OSError:
            return 0
