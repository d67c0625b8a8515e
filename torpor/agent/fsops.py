"""File operations of the agent. They run inside the sandbox, so every path, `..` and
symlink resolves in the sandbox's own filesystem: host files are not reachable from here.

Relative paths are taken from the user's home. Writes go to a temporary file in the same
directory and are renamed into place, so a failed upload never leaves half a file; new files
and directories belong to the requested user (default `user`).
"""

from __future__ import annotations

import errno
import os
import stat as _stat

import protocol as P
import users
from protocol import OpError

READ_CHUNK = P.CHUNK
NAME_MAX = 255  # bytes in one path component (ext4, tmpfs, overlay)
PATH_MAX = 4095  # bytes in a whole path, without its NUL

# errnos a caller causes, as the codes the server maps to HTTP (torpor/errors.py)
_ERRNO_CODES = {
    errno.ENOTEMPTY: ("not_empty", "directory not empty"),
    errno.ENOSPC: ("no_space", "no space left on the sandbox disk"),
    errno.EDQUOT: ("no_space", "no space left on the sandbox disk"),
    errno.EFBIG: ("no_space", "file too large for the sandbox disk"),
    errno.ENAMETOOLONG: ("name_too_long",
                         f"a name is over {NAME_MAX} bytes, or the path over {PATH_MAX}"),
    errno.EROFS: ("read_only",
                  "read-only file system (the agent's own files and /sys cannot be changed)"),
    errno.ELOOP: ("bad_path", "too many levels of symbolic links"),
    errno.EINVAL: ("bad_path", "invalid for this path (a directory moved into itself?)"),
    errno.EXDEV: ("cross_device",
                  "source and destination are on different file systems; copy, then remove"),
    errno.EBUSY: ("busy", "in use (a mount point?)"),
    errno.ETXTBSY: ("busy", "a running program's file"),
}


def _pw(user) -> users.Account:
    return users.lookup(user)


def _resolve(path: str, user="user") -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise OpError("bad_path", f"invalid path {path!r}")
    if not path.startswith("/"):
        path = os.path.join(_pw(user).home, path)
    path = os.path.normpath(path)
    raw = path.encode()  # a lone surrogate raises ValueError: the caller's bad_request
    if len(raw) > PATH_MAX or any(len(c) > NAME_MAX for c in raw.split(b"/")):
        raise OpError("name_too_long", f"{path[:64]}...: a name is over {NAME_MAX} bytes, "
                      f"or the path over {PATH_MAX}", path=path[:256])
    return path


def _oserror(e: OSError, path: str) -> OpError:
    if isinstance(e, FileNotFoundError):
        return OpError("not_found", f"{path}: no such file or directory", path=path)
    if isinstance(e, FileExistsError):
        return OpError("exists", f"{path}: already exists", path=path)
    if isinstance(e, IsADirectoryError):
        return OpError("is_directory", f"{path}: is a directory", path=path)
    if isinstance(e, NotADirectoryError):
        return OpError("not_directory", f"{path}: not a directory", path=path)
    if isinstance(e, PermissionError):
        return OpError("permission_denied", f"{path}: permission denied", path=path)
    if e.errno in _ERRNO_CODES:
        code, what = _ERRNO_CODES[e.errno]
        return OpError(code, f"{path}: {what}", path=path)
    return OpError("os_error", f"{path}: {e.strerror}", path=path)


def _entry(path: str, st: os.stat_result, snap=None) -> dict:
    mode = st.st_mode
    kind = ("dir" if _stat.S_ISDIR(mode) else "file" if _stat.S_ISREG(mode)
            else "symlink" if _stat.S_ISLNK(mode) else "other")
    d = {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": _stat.S_IMODE(mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime,
        "ino": st.st_ino,
        "ctime": st.st_ctime,
    }
    d["owner"] = users.user_name(st.st_uid, snap)
    d["group"] = users.group_name(st.st_gid, snap)
    if kind == "symlink":
        try:
            d["target"] = os.readlink(path)
        except OSError:
            d["target"] = None
    return d


async def op_stat(agent, st, path, user="user"):
    p = _resolve(path, user)
    try:
        return _entry(p, os.lstat(p))
    except OSError as e:
        raise _oserror(e, p) from None


async def op_exists(agent, st, path, user="user"):
    return {"exists": os.path.lexists(_resolve(path, user))}


async def op_list(agent, st, path, depth=1, user="user"):
    root = _resolve(path, user)
    if not isinstance(depth, int) or depth < 1:
        raise OpError("bad_request", "depth must be an integer >= 1")
    out: list[dict] = []
    snap = users.snapshot()  # one check of /etc/passwd for the whole listing

    def walk(d: str, level: int) -> None:
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise _oserror(e, d) from None
        for e in entries:
            try:
                s = e.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append(_entry(e.path, s, snap))
            if level < depth and e.is_dir(follow_symlinks=False):
                walk(e.path, level + 1)
            if len(out) > 100_000:
                raise OpError("too_many", f"{root}: more than 100000 entries; list less deep")

    walk(root, 1)
    return out


def _chown(path: str, acc: users.Account) -> None:
    os.lchown(path, acc.uid, acc.gid)


async def op_mkdir(agent, st, path, parents=True, user="user"):
    p = _resolve(path, user)
    pw = _pw(user)
    if os.path.isdir(p):
        return {"created": False, "path": p}
    try:
        missing = []
        cur = p
        while parents and not os.path.lexists(cur):
            missing.append(cur)
            cur = os.path.dirname(cur)
        if parents:
            for d in reversed(missing):
                os.mkdir(d)
                _chown(d, pw)
        else:
            os.mkdir(p)
            _chown(p, pw)
    except OSError as e:
        raise _oserror(e, p) from None
    return {"created": True, "path": p}


async def op_write(agent, st, path, user="user", mode=None, append=False, data=None,
                   in_place=False):
    """Write the IN bytes of the stream (or `data`, text) to path; parents are created.
    `in_place` truncates and writes the file itself, owned by the user before the first
    byte (a watcher sees create or write, chmod, write on that path, as from a program
    writing it), instead of writing aside and renaming the whole file into place."""
    p = _resolve(path, user)
    pw = _pw(user)
    parent = os.path.dirname(p)
    if not os.path.isdir(parent):
        await op_mkdir(agent, st, parent, True, user)
    if os.path.isdir(p):
        raise OpError("is_directory", f"{p}: is a directory", path=p)
    tmp = None
    size = 0
    try:
        if append:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        elif in_place:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.fchown(fd, pw.uid, pw.gid)
        else:
            # not named after the file: a name near NAME_MAX would make it too long
            tmp = os.path.join(parent, f".torpor-{os.urandom(6).hex()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o644)
        try:
            if data is not None:
                size += os.write(fd, data.encode())
            else:
                async for chunk in st.read_in():
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    size += len(chunk)
        finally:
            os.close(fd)
        target = tmp or p
        if tmp:
            existing = None
            try:
                existing = os.stat(p)
            except FileNotFoundError:
                pass
            if mode is None and existing is not None:
                os.chmod(tmp, _stat.S_IMODE(existing.st_mode))
            os.rename(tmp, p)
            tmp = None
        if mode is not None:
            os.chmod(p, int(mode))
        if not in_place and (not append or os.stat(target).st_uid == 0):
            _chown(p, pw)
    except OSError as e:
        raise _oserror(e, p) from None
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return {"path": p, "size": size}


async def op_read(agent, st, path, user="user", offset=0, length=None):
    p = _resolve(path, user)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise _oserror(e, p) from None
    try:
        s = os.fstat(fd)
        if _stat.S_ISDIR(s.st_mode):
            raise OpError("is_directory", f"{p}: is a directory", path=p)
        await st.msg({"event": "size", "size": s.st_size})
        if offset:
            os.lseek(fd, int(offset), os.SEEK_SET)
        left = None if length is None else int(length)
        sent = 0
        while left is None or left > 0:
            n = READ_CHUNK if left is None else min(READ_CHUNK, left)
            chunk = os.read(fd, n)
            if not chunk:
                break
            await st.send(P.OUT, chunk)
            sent += len(chunk)
            if left is not None:
                left -= len(chunk)
            if st.closed:
                break
    except OSError as e:
        raise _oserror(e, p) from None
    finally:
        os.close(fd)
    return {"path": p, "size": sent}


async def op_rename(agent, st, src, dst, overwrite=False, user="user"):
    a, b = _resolve(src, user), _resolve(dst, user)
    try:
        if not overwrite and os.path.lexists(b):
            raise OpError("exists", f"{b}: already exists", path=b)
        os.rename(a, b)
    except OSError as e:
        raise _oserror(e, a) from None
    return {"path": b}


async def op_remove(agent, st, path, recursive=False, user="user"):
    p = _resolve(path, user)
    if p == "/":
        raise OpError("bad_path", "refusing to remove /")
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            if recursive:
                import shutil  # lazily: its import loads the bz2 and lzma modules

                shutil.rmtree(p)
            else:
                os.rmdir(p)
        else:
            os.unlink(p)
    except OSError as e:
        raise _oserror(e, p) from None
    return {"removed": True, "path": p}


HANDLERS = {
    P.Op.FS_STAT: op_stat,
    P.Op.FS_EXISTS: op_exists,
    P.Op.FS_LIST: op_list,
    P.Op.FS_MKDIR: op_mkdir,
    P.Op.FS_WRITE: op_write,
    P.Op.FS_READ: op_read,
    P.Op.FS_RENAME: op_rename,
    P.Op.FS_REMOVE: op_remove,
}
