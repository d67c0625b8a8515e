"""Volumes and drives on the host: ext4 images that outlive sandboxes, and each sandbox's
`/drives` directory where drives are attached while it runs.

A volume (or a drive: the same thing on disk) is a sparse ext4 image of `size_mb`
(`<data>/volumes/<id>/volume.img`), loop-mounted at `<data>/volumes/<id>/mnt` with the
helpers of a sandbox's layer (`layers.py`), so its size is a real filesystem limit: a write
past it fails with ENOSPC inside the sandbox. Its root belongs to uid/gid 1000 (the
sandbox's `user`). A mount reuses the loop device the image already has, if any: a running
sandbox's gofer may still hold the file system after the host let go of its own mount
(a server stopped and started again), and a second loop device over one image would be
two file systems writing one disk.

A sandbox's `/drives` is a bind mount of `<sandbox>/drives`, a small tmpfs made a shared
mount on the host, given to runsc with `rslave` propagation: a drive bind-mounted under it
on the host later appears inside the running sandbox (its gofer's mount namespace receives
the mount; the sentry revalidates the directory, `--file-access-mounts=shared` being
runsc's default), and a lazy unmount takes it away again. Measured on runsc 0.0~20240729:
visible at once; a write in one sandbox read in another within tens of ms.
The tmpfs is tiny (the sandbox can write into `/drives` itself, as root) and every mount
point in it is opened without following links before anything is mounted on it: the
sandbox could have put a symlink there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path

from torpor.runtime.layers import (
    MNT_DETACH,
    MS_NOATIME,
    StorageError,
    _attach_loop,
    _libc,
    _mount,
    _unmount,
    format_disk,
    mount_points,
)

MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_SHARED = 1 << 20
UMOUNT_NOFOLLOW = 8
SANDBOX_UID = 1000  # the sandbox's `user`: owns a volume's root and files put from the host
DRIVES_TMPFS = "size=256k,nr_inodes=512,mode=0755"  # only mount points live there


def _loop_of(image: Path) -> str | None:
    """The loop device already backed by `image`, if any."""
    want = str(image)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip() == want:
                return "/dev/" + backing.parent.parent.name
        except OSError:
            continue
    return None


class VolumeImages:
    """The images of volumes and drives under `root` (`<data>/volumes`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def image(self, vid: str) -> Path:
        return self.root / vid / "volume.img"

    def mnt(self, vid: str) -> Path:
        return self.root / vid / "mnt"

    def exists(self, vid: str) -> bool:
        return self.image(vid).is_file()

    def free_bytes(self) -> int:
        """What the host's file system holding the images has free (for unprivileged use)."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def create(self, vid: str, size_mb: int) -> Path:
        d = self.root / vid
        d.mkdir(mode=0o700)
        try:
            format_disk(self.image(vid), size_mb)
            mnt = self.mount(vid)
            os.rmdir(mnt / "lost+found")  # e2fsck makes it again if it ever needs it
            os.chown(mnt, SANDBOX_UID, SANDBOX_UID)
            os.chmod(mnt, 0o755)
        except OSError:
            self.delete(vid)
            raise
        return mnt

    def mount(self, vid: str) -> Path:
        """Mount the image at its `mnt` (idempotent) and return that directory."""
        mnt = self.mnt(vid)
        if not self.exists(vid):
            raise StorageError(f"volume {vid}: its image is missing ({self.image(vid)})")
        mnt.mkdir(exist_ok=True)
        if os.path.realpath(mnt) in mount_points():
            return mnt
        # hostile content (a sandbox wrote it): no device nodes, no set-uid on the host
        flags = MS_NOATIME | MS_NOSUID | MS_NODEV
        dev = _loop_of(self.image(vid))
        if dev is not None:  # the file system lives on (a gofer holds it): the same one
            _mount(dev, mnt, "ext4", flags, "")
            return mnt
        dev, loop_fd = _attach_loop(self.image(vid))
        try:
            _mount(dev, mnt, "ext4", flags, "")
        finally:
            os.close(loop_fd)
        return mnt

    def unmount(self, vid: str) -> None:
        if os.path.realpath(self.mnt(vid)) in mount_points():
            _unmount(self.mnt(vid))

    def delete(self, vid: str) -> None:
        d = self.root / vid
        self.unmount(vid)
        if os.path.realpath(self.mnt(vid)) in mount_points():
            raise StorageError(f"volume {vid}: still mounted at {self.mnt(vid)}")
        shutil.rmtree(d, ignore_errors=True)

    def usage(self, vid: str) -> dict:
        """used_bytes (inside its file system), size_bytes, disk_bytes (the image on the
        host: it is sparse)."""
        st = os.statvfs(self.mount(vid))
        try:
            disk = os.stat(self.image(vid)).st_blocks * 512
        except OSError:
            disk = 0
        return {"used_bytes": (st.f_blocks - st.f_bfree) * st.f_frsize,
                "size_bytes": st.f_blocks * st.f_frsize, "disk_bytes": disk}


# --- a sandbox's /drives ---------------------------------------------------------------
def drives_dir(sandbox_dir: Path) -> Path:
    return Path(sandbox_dir) / "drives"


def setup_drives(sandbox_dir: Path, drives: dict[str, Path]) -> None:
    """Mount the sandbox's drives directory (a shared tmpfs) and every drive in it by its
    name (idempotent): before its start, restore or adoption."""
    top = drives_dir(sandbox_dir)
    top.mkdir(exist_ok=True)
    points = mount_points()
    if os.path.realpath(top) not in points:
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, DRIVES_TMPFS)
        if _libc.mount(None, str(top).encode(), None, MS_SHARED, None) != 0:
            err = ctypes.get_errno()
            _unmount(top)
            raise StorageError(f"making {top} a shared mount failed: {os.strerror(err)}")
        points = mount_points()
    real = os.path.realpath(top)
    for name, source in drives.items():
        if os.path.join(real, name) not in points:
            attach_drive(sandbox_dir, name, source)


def attach_drive(sandbox_dir: Path, name: str, source: Path) -> None:
    """Bind-mount `source` at `<sandbox>/drives/<name>`: it appears in the running sandbox
    at /drives/<name>. The mount point is made and opened without following links (the
    sandbox may have put anything there), and the mount goes onto that open directory."""
    if not name or "/" in name or name in (".", ".."):
        raise StorageError(f"bad drive mount name {name!r}")
    top = os.open(drives_dir(sandbox_dir), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for attempt in (0, 1):
            try:
                os.mkdir(name, 0o755, dir_fd=top)
            except FileExistsError:
                pass
            try:
                fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                break
            except OSError as e:  # a symlink or a file the sandbox put there: away with it
                if e.errno not in (errno.ELOOP, errno.ENOTDIR) or attempt:
                    raise StorageError(f"drive mount point {name}: {e}") from None
                os.unlink(name, dir_fd=top)
        try:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):
                raise StorageError(f"drive mount point {name} is not a directory")
            if _libc.mount(str(source).encode(), f"/proc/self/fd/{fd}".encode(), None,
                           MS_BIND, None) != 0:
                err = ctypes.get_errno()
                raise StorageError(f"mounting drive {source} at {name} failed: "
                                   f"{os.strerror(err)}")
        finally:
            os.close(fd)
    finally:
        os.close(top)


def detach_drive(sandbox_dir: Path, name: str) -> None:
    """Take the drive at `<sandbox>/drives/<name>` away (lazily: a process of the sandbox
    that has a file of it open keeps that file, nothing more) and remove its mount point."""
    # the mount table's path (real); a mount point cannot be replaced by a link meanwhile
    target = os.path.join(os.path.realpath(drives_dir(sandbox_dir)), name)
    if (target in mount_points()
            and _libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0):
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise StorageError(f"unmounting drive {target} failed: {os.strerror(err)}")
    try:
        top = os.open(drives_dir(sandbox_dir), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        os.rmdir(name, dir_fd=top)
    except OSError:
        pass
    finally:
        os.close(top)
