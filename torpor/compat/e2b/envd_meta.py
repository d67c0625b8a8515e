"""E2B's file metadata (`X-Metadata-<key>` on an upload, `metadata` on EntryInfo), kept by
the door in the sandbox's door state, because gVisor's root filesystem has no user extended
attributes (envd keeps them as `user.e2b.<key>` xattrs; setxattr answers EOPNOTSUPP here).

Each file's metadata is recorded with its absolute path, its inode and its ctime, and shown
only while the file at that path is unchanged since: the door's own uploads, Move and
Remove keep the record right, but a change a program in the sandbox makes to the file (a
write, chmod, mv, or removing it and making another, which may reuse the inode) drops it
from view, where xattrs would have stayed on a file changed in place. As on envd, an
upload replaces the file's metadata whole
(no X-Metadata-* header: none), keys are lowercased, keys and values are printable ASCII,
a key is 246 bytes at most and one file's metadata 4096 bytes, prefixes counted.
"""

from __future__ import annotations

import re

from torpor.compat.e2b import sandboxes as sbx

KEY = "file_meta"  # in the door state: {absolute path: {"ino", "ctime", "meta": {k: v}}}
PREFIX = "user.e2b."
MAX_KEY = 246
MAX_TOTAL = 4096
MAX_FILES = 10_000  # files with metadata per sandbox
_KEY = re.compile(r"\A[A-Za-z0-9!#$%&'*+\-.^_`|~]+\Z")
_VALUE = re.compile(r"\A[\x20-\x7e]*\Z")


class MetadataError(ValueError):
    pass


def from_headers(scope) -> dict[str, str]:
    """The upload's metadata, validated as envd does; {} when it has none."""
    meta: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        if not k.startswith(b"x-metadata-"):
            continue
        key = k[len(b"x-metadata-"):].decode("latin-1").lower()
        value = v.decode("latin-1")
        if not key or not _KEY.match(key):
            raise MetadataError(f"invalid metadata key {key!r}")
        if len(key.encode()) > MAX_KEY:
            raise MetadataError(f"metadata key {key[:32]!r}... is over {MAX_KEY} bytes")
        if not _VALUE.match(value):
            raise MetadataError(f"metadata value of {key!r} must be printable US-ASCII")
        meta.setdefault(key, value)  # the first of a repeated header wins
    total = sum(len(PREFIX) + len(k) + len(v) for k, v in meta.items())
    if total > MAX_TOTAL:
        raise MetadataError(f"metadata of {total} bytes is over {MAX_TOTAL} (keys with their "
                            f"{PREFIX!r} prefix, and values)")
    return meta


class Metadata:
    def __init__(self, engine):
        self.engine = engine

    def table(self, sid: str) -> dict:
        return self.engine.door_state(sid, sbx.DOOR).get(KEY) or {}

    def _save(self, sid: str, table: dict) -> None:
        self.engine.set_door_state(sid, sbx.DOOR, **{KEY: table or None})

    @staticmethod
    def of(table: dict, entry: dict) -> dict | None:
        rec = table.get(entry.get("path"))
        if rec is not None and (rec.get("ino"), rec.get("ctime")) == (entry.get("ino"),
                                                                      entry.get("ctime")):
            return dict(rec["meta"])
        return None

    def set(self, sid: str, entry: dict, meta: dict[str, str]) -> None:
        """The file's metadata after an upload: `meta` ({}: none)."""
        table = self.table(sid)
        path = entry["path"]
        if not meta:
            if path in table:
                table = dict(table)
                del table[path]
                self._save(sid, table)
            return
        if path not in table and len(table) >= MAX_FILES:
            raise MetadataError(f"{MAX_FILES} files with metadata at most per sandbox")
        self._save(sid, {**table, path: {"ino": entry.get("ino"), "ctime": entry.get("ctime"),
                                         "meta": meta}})

    def moved(self, sid: str, src: str, entry: dict) -> None:
        """`src` (absolute) became `entry` (the moved file as it is now: a rename changes
        its ctime), with what was under it."""
        table = self.table(sid)
        if not table:
            return
        dst = entry["path"]
        out = {}
        for p, rec in table.items():
            if p == src or p.startswith(src + "/"):
                rec = dict(rec)
                if p == src and (rec.get("ino") == entry.get("ino")):
                    rec["ctime"] = entry.get("ctime")
                out[dst + p[len(src):]] = rec
            elif not (p == dst or p.startswith(dst + "/")):
                out[p] = rec
        if out != table:
            self._save(sid, out)

    def removed(self, sid: str, path: str) -> None:
        table = self.table(sid)
        out = {p: r for p, r in table.items() if p != path and not p.startswith(path + "/")}
        if out != table:
            self._save(sid, out)
