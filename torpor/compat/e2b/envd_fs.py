"""envd's `filesystem.Filesystem` over the engine's files.

Entries are E2B's EntryInfo (proto3 JSON: `size` a string, `type` a FILE_TYPE_* name, mode
the permission bits, `permissions` as `ls -l` shows them, `modifiedTime` RFC 3339). Paths
resolve as envd's: relative ones from the user's home. Watch events are fsnotify's, as
envd sends them: a rename is RENAME of the old name and CREATE of the new one.

Watchers of the non-streaming API (CreateWatcher...) are kept here: each holds the engine's
watch of its directory and buffers its events (up to MAX_EVENTS) until they are fetched; a
sandbox holds MAX_WATCHERS at most, and its watchers go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import secrets
import stat as _stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from torpor.compat.e2b.connect import ConnectError, from_engine
from torpor.compat.e2b.envd_meta import Metadata
from torpor.compat.e2b.envd_process import home_relative
from torpor.errors import NotFound, TorporError

FILE_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY",
              "symlink": "FILE_TYPE_SYMLINK"}
EVENT_TYPES = {"create": "EVENT_TYPE_CREATE", "write": "EVENT_TYPE_WRITE",
               "remove": "EVENT_TYPE_REMOVE", "chmod": "EVENT_TYPE_CHMOD"}
MAX_LINKS = 40  # symlinks followed in a chain at most (as Linux's ELOOP)
MAX_WATCHERS = 64
MAX_EVENTS = 10_000
SETTLE = 0.02  # s: how long a fetch of events waits for those still on their way
SETTLE_MAX = 0.2  # s: and at most, while they keep coming


def permissions(mode: int, kind: str) -> str:
    """`ls -l`'s mode string, as Go's FileMode.String() prints it."""
    head = {"dir": "d", "symlink": "L"}.get(kind, "-")
    return head + _stat.filemode(mode)[1:]


def entry_info(e: dict, link: tuple[str, dict | None] | None = None,
               table: dict | None = None) -> dict:
    """E2B's EntryInfo of an agent entry. A symlink's (`link`: where it leads, and the
    entry there, None if nothing is) has, as envd's, the type and permission bits of what
    it leads to, and that path as its target."""
    shown = e if link is None else (link[1] or {"type": None, "mode": 0})
    out = {
        "name": e["name"],
        "type": FILE_TYPES.get(shown.get("type"), "FILE_TYPE_UNSPECIFIED"),
        "path": e["path"],
        "size": str(e.get("size", 0)),
        "mode": shown.get("mode", 0),
        "permissions": permissions(e.get("mode", 0), e.get("type")),
        "owner": e.get("owner", ""),
        "group": e.get("group") or str(e.get("gid", "")),
        "modifiedTime": datetime.fromtimestamp(e.get("mtime", 0), UTC)
        .isoformat().replace("+00:00", "Z"),
    }
    if link is not None:
        out["symlinkTarget"] = link[0]
    meta = Metadata.of(table, e) if table else None
    if meta:
        out["metadata"] = meta
    return out


async def entry_of(files, sid: str, e: dict, user: str, table: dict | None = None) -> dict:
    """entry_info, with a symlink followed (as filepath.EvalSymlinks: to the end of the
    chain, at most MAX_LINKS; a dangling one leads to itself)."""
    if e.get("type") != "symlink":
        return entry_info(e, None, table)
    cur, at = e["path"], e
    for _ in range(MAX_LINKS):
        target = at.get("target")
        if target is None:
            break
        cur = posixpath.normpath(posixpath.join(posixpath.dirname(cur), target))
        try:
            at = await files.stat(sid, cur, user)
        except TorporError:
            break
        if at.get("type") != "symlink":
            return entry_info(e, (cur, at), table)
    return entry_info(e, (e["path"], None), table)


def _path(req: dict, field: str = "path") -> str:
    p = req.get(field)
    if not isinstance(p, str) or not p:
        raise ConnectError("invalid_argument", f"{field} is required")
    return home_relative(p)


class Watcher:
    """One CreateWatcher: the engine's watch, read by a task into a buffer."""

    def __init__(self, fs: Filesystem, sid: str, root: str, include_entry: bool, user: str):
        self.fs = fs
        self.sid = sid
        self.root = root
        self.include_entry = include_entry
        self.user = user
        self.events: list[dict] = []
        self.error: ConnectError | None = None
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def run(self, events) -> None:
        try:
            async for ev in events:
                for out in await self.fs.translate(self.sid, self.root, ev, self.include_entry,
                                                   self.user):
                    if len(self.events) >= MAX_EVENTS:
                        self.error = ConnectError("resource_exhausted",
                                                  f"over {MAX_EVENTS} events not fetched")
                        return
                    self.events.append(out)
                self.arrived.set()
        except TorporError as e:
            self.error = from_engine(e)
            if isinstance(e, NotFound):
                self.fs.drop(self.sid)  # the sandbox went
        finally:
            self.arrived.set()


class Filesystem:
    def __init__(self, engine, gone_exc: type[Exception], meta: Metadata):
        self.engine = engine
        self.Gone = gone_exc
        self.meta = meta
        self.watchers: dict[str, dict[str, Watcher]] = {}

    async def _stat(self, call, path: str) -> dict:
        e = await self.engine.files.stat(call.sid, path, call.fs_user)
        return await entry_of(self.engine.files, call.sid, e, call.fs_user,
                              self.meta.table(call.sid))

    async def _absolute(self, call, path: str) -> str | None:
        """The absolute path of an existing file (None: there is none)."""
        try:
            return (await self.engine.files.stat(call.sid, path, call.fs_user))["path"]
        except NotFound:
            return None

    async def stat(self, call, req: dict) -> dict:
        try:
            return {"entry": await self._stat(call, _path(req))}
        except NotFound:
            raise ConnectError("not_found", f"path {req['path']} does not exist") from None

    async def make_dir(self, call, req: dict) -> dict:
        path = _path(req)
        r = await self.engine.files.mkdir(call.sid, path, parents=True, user=call.fs_user)
        if not r.get("created"):
            raise ConnectError("already_exists", f"directory {r.get('path', path)} already exists")
        return {"entry": await self._stat(call, r["path"])}

    async def move(self, call, req: dict) -> dict:
        src, dst = _path(req, "source"), _path(req, "destination")
        src_abs = await self._absolute(call, src) if self.meta.table(call.sid) else None
        try:
            r = await self.engine.files.rename(call.sid, src, dst, overwrite=True,
                                               user=call.fs_user)
        except NotFound:
            raise ConnectError("not_found", f"source {src} does not exist") from None
        e = await self.engine.files.stat(call.sid, r["path"], call.fs_user)
        if src_abs is not None:
            self.meta.moved(call.sid, src_abs, e)
        return {"entry": await entry_of(self.engine.files, call.sid, e, call.fs_user,
                                        self.meta.table(call.sid))}

    async def list_dir(self, call, req: dict) -> dict:
        path = _path(req)
        depth = req.get("depth") or 1
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConnectError("invalid_argument", "depth should be at least 1")
        try:
            entries = await self.engine.files.list(call.sid, path, depth, call.fs_user)
        except NotFound:
            raise ConnectError("not_found", f"path {path} does not exist") from None
        table = self.meta.table(call.sid)
        return {"entries": [await entry_of(self.engine.files, call.sid, e, call.fs_user, table)
                            for e in entries]}

    async def remove(self, call, req: dict) -> dict:
        path = _path(req)
        full = await self._absolute(call, path) if self.meta.table(call.sid) else None
        with contextlib.suppress(NotFound):  # as envd's os.RemoveAll
            await self.engine.files.remove(call.sid, path, recursive=True, user=call.fs_user)
        if full is not None:
            self.meta.removed(call.sid, full)
        return {}

    # --- watching -------------------------------------------------------------------------
    async def _open(self, call, req: dict):
        path = _path(req)
        recursive = bool(req.get("recursive"))
        try:
            st = await self.engine.files.stat(call.sid, path, call.fs_user)
        except NotFound:
            raise ConnectError("not_found", f"path {path} not found") from None
        if st.get("type") != "dir":
            raise ConnectError("invalid_argument", f"path {st['path']} not a directory")
        events = await self.engine.files.watch(call.sid, st["path"], recursive, call.fs_user)
        return st["path"], events

    async def translate(self, sid: str, root: str, ev, include_entry: bool,
                        user: str) -> list[dict]:
        """fsnotify's events for one Torpor FsEvent."""
        if ev.type == "rename":
            pairs = [(ev.old_path or "", "EVENT_TYPE_RENAME"), (ev.path, "EVENT_TYPE_CREATE")]
        elif ev.type in EVENT_TYPES:
            pairs = [(ev.path, EVENT_TYPES[ev.type])]
        else:
            return []  # overflow, gone: fsnotify has no word for them
        out = []
        for name, kind in pairs:
            item = {"name": name, "type": kind}
            if include_entry and kind != "EVENT_TYPE_REMOVE" and kind != "EVENT_TYPE_RENAME":
                with contextlib.suppress(TorporError):
                    e = await self.engine.files.stat(sid, f"{root}/{name}" if name else root,
                                                     user)
                    item["entry"] = await entry_of(self.engine.files, sid, e, user)
            out.append(item)
        return out

    async def watch_dir(self, call, req: dict) -> AsyncIterator[dict]:
        root, events = await self._open(call, req)
        include = bool(req.get("includeEntry"))
        yield {"start": {}}
        try:
            async for ev in events:
                for out in await self.translate(call.sid, root, ev, include, call.fs_user):
                    yield {"filesystem": out}
        except NotFound:
            raise self.Gone() from None
        finally:
            await events.aclose()

    async def create_watcher(self, call, req: dict) -> dict:
        kept = self.watchers.setdefault(call.sid, {})
        if len(kept) >= MAX_WATCHERS:
            raise ConnectError("resource_exhausted",
                               f"{MAX_WATCHERS} watchers at most; remove one first")
        root, events = await self._open(call, req)
        w = Watcher(self, call.sid, root, bool(req.get("includeEntry")), call.fs_user)
        wid = "w" + secrets.token_hex(8)
        kept[wid] = w
        w.task = asyncio.create_task(w.run(events))
        return {"watcherId": wid}

    def _watcher(self, call, req: dict) -> tuple[str, Watcher]:
        wid = req.get("watcherId")
        w = self.watchers.get(call.sid, {}).get(wid) if isinstance(wid, str) else None
        if w is None:
            raise ConnectError("not_found", f"watcher with id {wid} not found")
        return wid, w

    async def get_watcher_events(self, call, req: dict) -> dict:
        _, w = self._watcher(call, req)
        # events of a change the client just made may still be on their way from the
        # agent: a round trip to it, then a moment for the watch's frames behind it
        with contextlib.suppress(TorporError):
            await self.engine.files.exists(call.sid, w.root, w.user)
        loop = asyncio.get_running_loop()
        until = loop.time() + SETTLE_MAX
        while loop.time() < until and not (w.task is not None and w.task.done()):
            w.arrived.clear()
            try:
                await asyncio.wait_for(w.arrived.wait(), SETTLE)
            except TimeoutError:
                break
        if w.error is not None and not w.events:
            raise w.error
        events, w.events = w.events, []
        return {"events": events}

    async def remove_watcher(self, call, req: dict) -> dict:
        wid, w = self._watcher(call, req)
        del self.watchers[call.sid][wid]
        await _stop(w)
        return {}

    def drop(self, sid: str) -> None:
        """Forget the watchers of a sandbox that went."""
        for w in self.watchers.pop(sid, {}).values():
            if w.task is not None and w.task is not asyncio.current_task():
                w.task.cancel()


async def _stop(w: Watcher) -> None:
    if w.task is not None and not w.task.done():
        w.task.cancel()
        with contextlib.suppress(BaseException):
            await w.task
