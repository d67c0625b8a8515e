"""Files of a volume read and written on the host, where its content is hostile.

A sandbox wrote what is in a volume: any name may be a symbolic link (to /etc/passwd, to
`..`), a FIFO that blocks a reader, a device node. So nothing here resolves a path as a
whole: each component is opened relative to the one before with O_NOFOLLOW (a link
anywhere is refused, never followed), `..` and `.` are refused before anything is opened,
a file is opened as O_PATH first and read only if it is a regular file (then reopened
through /proc/self/fd, the same inode), and a written file is made under a temporary name
and renamed over the old one (a rename replaces a link, it does not follow it). Files and
directories made here belong to uid/gid 1000, the sandbox's `user`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from torpor.errors import Invalid, NotFound, TooLarge, TorporError

OWNER = 1000  # the sandbox's user
CHUNK = 1 << 20
MAX_DEPTH = 64


def _parts(path: str, what: str, allow_root: bool = False) -> list[str]:
    if not isinstance(path, str) or "\0" in path:
        raise Invalid(f"{what}: bad path {path!r}", field="path")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise Invalid(f"{what}: '.' and '..' are not allowed in a path: {path!r}",
                      field="path")
    if (not parts and not allow_root) or len(parts) > MAX_DEPTH:
        raise Invalid(f"{what}: bad path {path!r}", field="path")
    return parts


def _refused(e: OSError, what: str, path: str) -> TorporError:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return Invalid(f"{what}: {path} goes through a symbolic link or a file (links in a "
                       "volume are not followed from the host)", field="path")
    if e.errno == errno.ENOENT:
        return NotFound(f"{what}: no {path}", field="path")
    if e.errno == errno.ENOSPC:
        return TooLarge(f"{what} is full: no space left for {path}")
    if e.errno == errno.EISDIR:
        return Invalid(f"{what}: {path} is a directory", field="path")
    return TorporError(f"{what}: {path}: {e.strerror}")


def _walk(root: Path, parts: list[str], create: bool) -> int:
    """An O_PATH descriptor of the directory root/parts..., no link followed; with
    `create`, missing directories are made (owned by the sandbox's user)."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for p in parts:
            if create:
                try:
                    os.mkdir(p, 0o755, dir_fd=fd)
                    os.chown(p, OWNER, OWNER, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            nfd = os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def read(root: Path, path: str, what: str) -> tuple[int, AsyncIterator[bytes]]:
    parts = _parts(path, what)
    try:
        dfd = _walk(root, parts[:-1], create=False)
        try:
            pfd = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            st = os.fstat(pfd)
            if stat.S_ISLNK(st.st_mode):
                raise Invalid(f"{what}: {path} is a symbolic link (not followed from the "
                              "host)", field="path")
            if stat.S_ISDIR(st.st_mode):
                raise Invalid(f"{what}: {path} is a directory", field="path")
            if not stat.S_ISREG(st.st_mode):
                raise Invalid(f"{what}: {path} is not a regular file", field="path")
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(pfd)
    except OSError as e:
        raise _refused(e, what, path) from None

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while data := await asyncio.to_thread(os.read, fd, CHUNK):
                yield data
        finally:
            os.close(fd)
    return st.st_size, chunks()


async def write(root: Path, path: str, chunks: AsyncIterator[bytes], what: str) -> int:
    parts = _parts(path, what)
    tmp = f".torpor-put-{secrets.token_hex(6)}"
    try:
        dfd = await asyncio.to_thread(_walk, root, parts[:-1], True)
    except OSError as e:
        raise _refused(e, what, path) from None
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        except OSError as e:
            raise _refused(e, what, path) from None
        total = 0
        try:
            os.fchown(fd, OWNER, OWNER)
            async for data in chunks:
                view = memoryview(data)
                while view:
                    n = await asyncio.to_thread(os.write, fd, view)
                    view = view[n:]
                    total += n
            os.close(fd)
            fd = -1
            os.rename(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            raise _refused(e, what, path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
    finally:
        os.close(dfd)
    return total


def listdir(root: Path, path: str, what: str) -> list[dict]:
    parts = _parts(path, what, allow_root=True)
    try:
        pfd = _walk(root, parts, create=False)
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            os.close(pfd)
    except OSError as e:
        raise _refused(e, what, path or "/") from None
    out = []
    try:
        for entry in os.scandir(fd):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                    else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
            out.append({"name": entry.name, "type": kind, "size": st.st_size,
                        "mtime": datetime.fromtimestamp(st.st_mtime, UTC).isoformat()})
    finally:
        os.close(fd)
    return sorted(out, key=lambda e: e["name"])
