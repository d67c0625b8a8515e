"""Volumes and drives: storage of a fixed size that outlives sandboxes.

A **volume** is mounted into a sandbox at its start (`create(volumes={"/data": "data"})`)
and stays mounted across standby, hibernation and restarts: one sandbox writes it at a
time, or many read it (a second writer gets 409 naming the sandbox that holds it). A
**drive** is written by many sandboxes at once, attached to a running sandbox at
`/drives/<name>` and detached again (the driver's `attach_drive`). Both are the driver's
images (`create_volume`); which sandbox uses which is a record (`attachments`), read when
a sandbox's spec is made, dropped when the sandbox is deleted. Files go in and out without
a sandbox through `volume_files.py`.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import secrets
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from torpor.engine import volume_files
from torpor.engine.records import Records
from torpor.engine.states import IN_MEMORY, State
from torpor.errors import Conflict, Invalid, NotFound, Unavailable
from torpor.runtime.base import Driver, DriverError, SandboxSpec, VolumeMount
from torpor.store.models import AttachmentRow, VolumeRow

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MIN_MB, MAX_MB = 16, 1 << 20
# where a volume may not go: the agent's bundle, the runtime's own mounts, the drives
RESERVED = ("/proc", "/sys", "/dev", "/.torpor", "/drives")
KINDS = {"volume": "vol", "drive": "drv"}  # kind -> id prefix
_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class VolumeInfo:
    """A volume or a drive as the doors show it."""

    id: str
    name: str
    kind: str
    size_mb: int
    created_at: datetime
    used_bytes: int | None  # inside its file system
    disk_bytes: int | None  # what its (sparse) image takes on the host
    users: list[dict] = field(default_factory=list)  # {sandbox_id, path, read_only}


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise Invalid(f"a {kind} name is 1-63 lowercase letters, digits and '-' (not at "
                      f"either end): {name!r}", field="name")


def _dest(path: object) -> str:
    """A volume's mount point inside a sandbox: absolute, normalised, not reserved."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise Invalid(f"a volume's mount path must be absolute: {path!r}", field="volumes")
    norm = posixpath.normpath(path)
    if norm != path.rstrip("/") or "/.." in path or len(norm) > 255:
        raise Invalid(f"a volume's mount path must be a plain absolute path: {path!r}",
                      field="volumes")
    if norm == "/" or any(norm == r or norm.startswith(r + "/") for r in RESERVED):
        raise Invalid(f"a volume cannot be mounted at {norm} (reserved: /, "
                      f"{', '.join(RESERVED)})", field="volumes")
    return norm


class Volumes:
    def __init__(self, records: Records, driver: Driver,
                 live_spec: Callable[[str], SandboxSpec | None]):
        self.records = records
        self.driver = driver
        self.live_spec = live_spec  # the spec of a sandbox the lifecycle holds, if any

    # --- volumes and drives themselves --------------------------------------------------
    def create(self, kind: str, name: str, size_mb: int) -> VolumeInfo:
        _check_name(kind, name)
        if not isinstance(size_mb, int) or not MIN_MB <= size_mb <= MAX_MB:
            raise Invalid(f"size_mb must be between {MIN_MB} and {MAX_MB}", field="size_mb")
        # images are sparse (a new one takes ~2 MiB), but a volume the host could never
        # hold is refused now rather than failing its writers later
        free = self.driver.volume_space()
        if size_mb << 20 > free:
            raise Invalid(f"a {kind} of {size_mb} MiB is larger than the host's free disk "
                          f"({free >> 20} MiB)", field="size_mb", free_mb=free >> 20)
        if self.records.volume(kind, name) is not None:
            raise Conflict(f"a {kind} named {name!r} exists already", field="name")
        vid = KINDS[kind] + "".join(secrets.choice(_ALPHABET) for _ in range(13))
        try:
            self.driver.create_volume(vid, size_mb)
        except (DriverError, OSError) as e:
            raise Unavailable(f"{kind} {name} could not be made: {e}") from None
        self.records.add_volume(VolumeRow(id=vid, name=name, kind=kind, size_mb=size_mb))
        return self.info(self.row(kind, name))

    def row(self, kind: str, name: str) -> VolumeRow:
        row = self.records.volume(kind, name) if isinstance(name, str) else None
        if row is None:
            raise NotFound(f"no {kind} {name!r}; `torpor {kind} list` shows them",
                           field=kind)
        return row

    def info(self, row: VolumeRow) -> VolumeInfo:
        try:
            use = self.driver.volume_usage(row.id)
        except (DriverError, OSError):
            use = {}
        users = [{"sandbox_id": a.sandbox_id, "path": self._shown_path(row.kind, a.path),
                  "read_only": a.read_only} for a in self.records.users(row.id)]
        return VolumeInfo(id=row.id, name=row.name, kind=row.kind, size_mb=row.size_mb,
                          created_at=row.created_at, used_bytes=use.get("used_bytes"),
                          disk_bytes=use.get("disk_bytes"), users=users)

    @staticmethod
    def _shown_path(kind: str, path: str) -> str:
        return "/drives/" + path if kind == "drive" else path

    def list(self, kind: str) -> list[VolumeInfo]:
        return [self.info(r) for r in self.records.volumes(kind)]

    def get(self, kind: str, name: str) -> VolumeInfo:
        return self.info(self.row(kind, name))

    def delete(self, kind: str, name: str) -> None:
        """Remove it and its files; 409 naming the sandboxes that use it."""
        row = self.row(kind, name)
        users = self.records.users(row.id)
        if users:
            who = ", ".join(sorted({a.sandbox_id for a in users})[:10])
            raise Conflict(f"{kind} {name} is in use by sandbox {who}; delete those sandboxes"
                           + (" or detach it" if kind == "drive" else "") + " first",
                           sandboxes=sorted({a.sandbox_id for a in users})[:50])
        try:
            self.driver.delete_volume(row.id)
        except (DriverError, OSError) as e:
            raise Unavailable(f"{kind} {name} could not be removed: {e}") from None
        self.records.remove_volume(row.id)

    # --- volumes of a sandbox being created ---------------------------------------------
    def resolve(self, volumes: dict | None) -> list[tuple[VolumeRow, str, bool]]:
        """What a create asks for ({path: name} or {path: {volume, read_only}}), checked:
        (volume, path, read_only) each."""
        if not volumes:
            return []
        if not isinstance(volumes, dict):
            raise Invalid("volumes maps mount paths to volume names", field="volumes")
        out, seen = [], set()
        for path, want in volumes.items():
            dest = _dest(path)
            if isinstance(want, str):
                name, ro = want, False
            elif isinstance(want, dict) and isinstance(want.get("volume"), str) \
                    and set(want) <= {"volume", "read_only"}:
                name, ro = want["volume"], bool(want.get("read_only", False))
            else:
                raise Invalid(f"volumes[{path!r}]: a volume name, or {{volume, read_only}}",
                              field="volumes")
            row = self.row("volume", name)
            if dest in seen or row.id in {r.id for r, _, _ in out}:
                raise Invalid(f"volumes: {name} or {dest} given twice", field="volumes")
            seen.add(dest)
            out.append((row, dest, ro))
        return out

    def check(self, wanted: list[tuple[VolumeRow, str, bool]]) -> None:
        """409 if a volume asked for has a writer (or readers, for a writer), naming who.
        The caller claims them with no await in between: two creates cannot both pass."""
        for row, _, ro in wanted:
            users = self.records.users(row.id)
            writers = [a.sandbox_id for a in users if not a.read_only]
            if writers:
                raise Conflict(f"volume {row.name} is mounted read-write by sandbox "
                               f"{writers[0]}: one writer at a time (mount it read_only, "
                               "or delete that sandbox first)", sandbox_id=writers[0],
                               volume=row.name)
            if not ro and users:
                who = ", ".join(sorted({a.sandbox_id for a in users})[:10])
                raise Conflict(f"volume {row.name} is mounted read-only by sandbox {who}: "
                               "a writer needs it alone (mount it read_only too, or delete "
                               "those first)", sandboxes=sorted({a.sandbox_id for a in users}),
                               volume=row.name)

    def claim(self, sid: str, wanted: list[tuple[VolumeRow, str, bool]]) -> None:
        """Record that `sid` uses these volumes (checked by `check` just before)."""
        self.records.attach([AttachmentRow(sandbox_id=sid, volume_id=row.id, path=dest,
                                           read_only=ro) for row, dest, ro in wanted])

    def fill(self, spec: SandboxSpec) -> None:
        """Put the sandbox's volumes and drives (its records) into its spec."""
        for a, v in self.records.attachments(spec.id):
            if v.kind == "drive":
                spec.drives[a.path] = v.id
            else:
                spec.volumes.append(VolumeMount(v.id, a.path, a.read_only))

    def forget(self, sid: str) -> None:
        """The sandbox is deleted (or never started): what it used is free."""
        self.records.detach(sid)

    # --- drives on running sandboxes ----------------------------------------------------
    def drive_name(self, path: str | None, drive: str) -> str:
        name = (path or drive).removeprefix("/drives/")
        if not NAME.match(name):
            raise Invalid(f"a drive is attached at /drives/<name> (name: 1-63 lowercase "
                          f"letters, digits, '-'): {path!r}", field="path")
        return name

    async def attach(self, sid: str, spec: SandboxSpec, state: State, drive: str,
                     path: str | None) -> str:
        """Attach `drive` to the sandbox (under its transition lock, held by the caller):
        at once if its container lives, at its restore if it is hibernated."""
        row = self.row("drive", drive)
        name = self.drive_name(path, drive)
        for a, v in self.records.attachments(sid):
            if v.kind == "drive" and (a.path == name or v.id == row.id):
                raise Conflict(f"sandbox {sid} has drive {v.name} at /drives/{a.path} "
                               "already; detach it first", sandbox_id=sid)
        if state in IN_MEMORY:
            try:
                await asyncio.to_thread(self.driver.attach_drive, spec, name, row.id)
            except (DriverError, OSError) as e:
                raise Unavailable(f"{e}", sandbox_id=sid) from None
        else:
            spec.drives[name] = row.id
        self.records.attach([AttachmentRow(sandbox_id=sid, volume_id=row.id, path=name,
                                           read_only=False)])
        return "/drives/" + name

    async def detach(self, sid: str, spec: SandboxSpec, state: State, drive: str) -> None:
        row = self.row("drive", drive)
        mine = [a for a, v in self.records.attachments(sid) if v.id == row.id]
        if not mine:
            raise NotFound(f"drive {drive} is not attached to sandbox {sid}",
                           sandbox_id=sid, field="drive")
        if state in IN_MEMORY:
            try:
                await asyncio.to_thread(self.driver.detach_drive, spec, mine[0].path)
            except (DriverError, OSError) as e:
                raise Unavailable(f"{e}", sandbox_id=sid) from None
        else:
            spec.drives.pop(mine[0].path, None)
        self.records.detach(sid, row.id)

    # --- files in and out without a sandbox ---------------------------------------------
    def _root(self, kind: str, name: str):
        row = self.row(kind, name)
        try:
            return self.driver.volume_path(row.id)
        except (DriverError, OSError) as e:
            raise Unavailable(f"{kind} {name}: {e}") from None

    def read(self, kind: str, name: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks) of a regular file of the volume; links are never followed."""
        root = self._root(kind, name)
        return volume_files.read(root, path, f"{kind} {name}")

    async def write(self, kind: str, name: str, path: str,
                    chunks: AsyncIterator[bytes]) -> int:
        """Write a file (made, or replaced whole), its directories made as needed, owned
        by the sandbox's user; the bytes written."""
        root = self._root(kind, name)
        return await volume_files.write(root, path, chunks, f"{kind} {name}")

    def list_files(self, kind: str, name: str, path: str) -> list[dict]:
        root = self._root(kind, name)
        return volume_files.listdir(root, path, f"{kind} {name}")
