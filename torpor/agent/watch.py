"""File watch: inotify through ctypes (stdlib only), imported on the first `watch` op.

One `watch` stream is one inotify instance. Its events leave as MSG frames
{"events": [{"type", "path", "old_path"?, "dir"}...]}, paths relative to the watched
directory ("" is the directory itself):
- create: a file or directory appeared (also for what a directory moved or created under
  a recursive watch already held when its own watch was added);
- write: a file's contents changed (IN_MODIFY). Writes to one path coalesce: a write is
  not queued again while an unsent write for the same path waits, so a burst of writes
  the host has not taken yet is one event; at most one event per path per flush;
- remove: deleted, or moved out of the watched tree;
- rename: moved within the tree (`old_path` -> `path`); a move into the tree is a create;
- chmod: attributes changed (IN_ATTRIB: mode, owner, timestamps set by touch/utime);
- overflow: the kernel's queue (or ours, past MAX_PENDING) overflowed: events were lost;
- gone: the watched directory itself was removed or moved away; the stream ends.
Recursive watches add a watch for every new subdirectory.

The stream ends when the host closes it (then the inotify instance is closed), or with the
watched directory. inotify instances do not outlive a restore of the sandbox in any way the
host could rely on: the host re-establishes the watch after a hibernation.
"""

from __future__ import annotations

import ctypes
import os
import stat as _stat
import struct

import fsops
import miniloop
from protocol import OpError

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
EVENT = struct.Struct("iIII")
READ_SIZE = 64 * 1024
MAX_PENDING = 10000  # events queued for the host at most; past it: one overflow event
BATCH = 500  # events per MSG frame at most (a frame's payload stays far below 1 MiB)
MAX_DIRS = 100000  # directories one recursive watch follows at most

_libc = None


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


def _join(rel: str, name: str) -> str:
    return name if not rel else rel + "/" + name


class Watch:
    def __init__(self, root: str, recursive: bool):
        self.root = root
        self.recursive = recursive
        lib = _lib()
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OpError("os_error", f"inotify_init1: {os.strerror(e)}")
        self.fd = fd
        self.dirs: dict[int, str] = {}  # watch descriptor -> directory, relative to root
        self.wds: dict[str, int] = {}  # the reverse
        self.pending: list[dict] = []
        self.unsent_writes: set[str] = set()
        self.moves: dict[int, tuple[str, bool]] = {}  # cookie -> (old path, is dir)
        self.changed = miniloop.Event()
        self.gone = False
        self.overflowed = False

    # --- watches --------------------------------------------------------------------------
    def add(self, rel: str, report: bool) -> None:
        """Watch directory `rel` (and, when recursive, what is under it). With `report`, say
        `create` for what it already holds: it appeared before its watch did."""
        path = self.root if not rel else self.root + "/" + rel
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if not rel:
                raise OSError(e, os.strerror(e), path)
            return  # gone again, or not a directory any more: its events say so
        old = self.dirs.get(wd)
        if old is not None:
            self.wds.pop(old, None)
        self.dirs[wd] = rel
        self.wds[rel] = wd
        if not self.recursive:
            return
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for e in entries:
            sub = _join(rel, e.name)
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if report:
                self._queue({"type": "create", "path": sub, "dir": is_dir})
            if is_dir and len(self.dirs) < MAX_DIRS:
                self.add(sub, report)

    def _forget(self, rel: str) -> None:
        """Drop the bookkeeping of directory `rel` and those under it (their watches go by
        themselves when the directories do)."""
        prefix = rel + "/"
        for d in [d for d in self.wds if d == rel or d.startswith(prefix)]:
            self.dirs.pop(self.wds.pop(d), None)

    def _moved(self, old: str, new: str) -> None:
        prefix = old + "/"
        for d in [d for d in self.wds if d == old or d.startswith(prefix)]:
            wd = self.wds.pop(d)
            nd = new + d[len(old):]
            self.wds[nd] = wd
            self.dirs[wd] = nd

    # --- events ---------------------------------------------------------------------------
    def _queue(self, ev: dict) -> None:
        if ev["type"] == "write":
            if ev["path"] in self.unsent_writes:
                return  # coalesced with the write still waiting to leave
            self.unsent_writes.add(ev["path"])
        if len(self.pending) >= MAX_PENDING:
            if not self.overflowed:
                self.overflowed = True
                self.pending.append({"type": "overflow", "path": "", "dir": True})
            return
        self.pending.append(ev)
        self.changed.set()

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return
        pos = 0
        while pos + EVENT.size <= len(data):
            wd, mask, cookie, n = EVENT.unpack_from(data, pos)
            raw = data[pos + EVENT.size:pos + EVENT.size + n]
            pos += EVENT.size + n
            name = os.fsdecode(raw.rstrip(b"\0"))
            self._event(wd, mask, cookie, name)
        # a move out of the tree has no MOVED_TO: what is left unpaired after a read was
        # removed from the tree (the kernel queues both halves of a rename together)
        for old, is_dir in self.moves.values():
            self._queue({"type": "remove", "path": old, "dir": is_dir})
            if is_dir:
                self._forget(old)
        self.moves.clear()

    def _event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self._queue({"type": "overflow", "path": "", "dir": True})
            return
        rel = self.dirs.get(wd)
        if mask & IN_IGNORED:
            if rel is not None:
                self.wds.pop(rel, None)
            self.dirs.pop(wd, None)
            if rel == "":
                self._root_gone()
            return
        if rel is None:
            return
        is_dir = bool(mask & IN_ISDIR)
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            if rel == "":
                self._root_gone()
            return  # a subdirectory: its parent's watch reports it
        path = _join(rel, name)
        if mask & IN_CREATE:
            self._queue({"type": "create", "path": path, "dir": is_dir})
            if is_dir and self.recursive and len(self.dirs) < MAX_DIRS:
                self.add(path, True)
        elif mask & IN_MODIFY:
            self._queue({"type": "write", "path": path, "dir": is_dir})
        elif mask & IN_ATTRIB:
            self._queue({"type": "chmod", "path": path, "dir": is_dir})
        elif mask & IN_DELETE:
            self._queue({"type": "remove", "path": path, "dir": is_dir})
            if is_dir:
                self._forget(path)
        elif mask & IN_MOVED_FROM:
            self.moves[cookie] = (path, is_dir)
        elif mask & IN_MOVED_TO:
            src = self.moves.pop(cookie, None)
            if src is not None:
                self._queue({"type": "rename", "path": path, "old_path": src[0],
                             "dir": is_dir})
                if is_dir:
                    self._moved(src[0], path)
            else:
                self._queue({"type": "create", "path": path, "dir": is_dir})
                if is_dir and self.recursive and len(self.dirs) < MAX_DIRS:
                    self.add(path, True)

    def _root_gone(self) -> None:
        if not self.gone:
            self.gone = True
            self.pending.append({"type": "gone", "path": "", "dir": True})
            self.changed.set()

    def take(self) -> list[dict]:
        out = self.pending[:BATCH]
        del self.pending[:BATCH]
        for ev in out:
            if ev["type"] == "write":
                self.unsent_writes.discard(ev["path"])
        if not self.pending:
            self.overflowed = False
            self.changed.clear()
        return out

    def close(self) -> None:
        if self.fd >= 0:
            miniloop.get_loop().forget_fd(self.fd)
            os.close(self.fd)
            self.fd = -1


async def op_watch(agent, st, path, recursive=True, user="user"):
    """Stream the changes under directory `path` until the host closes the stream (or the
    directory goes). First MSG {"watching": path, "dirs": n}, then MSG {"events": [...]}."""
    full = fsops._resolve(path, user)
    try:
        info = os.stat(full)
    except OSError as e:
        raise fsops._oserror(e, full) from None
    if not _stat.S_ISDIR(info.st_mode):
        raise OpError("not_directory", f"{full}: not a directory (watch a directory)",
                      path=full)
    w = Watch(full, bool(recursive))
    loop = miniloop.get_loop()
    try:
        try:
            w.add("", False)
        except OSError as e:
            raise fsops._oserror(e, full) from None
        loop.add_reader(w.fd, w.on_readable)
        await st.msg({"watching": full, "dirs": len(w.dirs)})
        while not st.closed:
            if not w.pending:
                w.changed.clear()
                await w.changed.wait()
                continue
            gone = w.gone
            await st.msg({"events": w.take()})
            if gone and not w.pending:
                break
        return {"path": full, "gone": w.gone}
    finally:
        w.close()


HANDLERS = {"watch": op_watch}
