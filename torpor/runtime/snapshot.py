"""Snapshots of a live gVisor sandbox: its memory and disk at one instant, the sandbox
running on after a short pause.

The sandbox is paused (`runsc pause`: the sentry stops every task, the container stays),
checkpointed with `runsc checkpoint --leave-running` (this runsc, 0.0~20240729, saves and
keeps the sandbox in place, same processes and same stdio, and leaves a paused sandbox
paused: measured), its disk's file system synced and the disk image copied (sparse: only
the blocks in use), then resumed. The image and the disk are thus of the same instant; the
checkpoint has flushed the sentry's cached writes to the disk before the copy. The result
has the layout of a template's boot snapshot (`disk.img`, `image/`, `config.json`,
`snapshot.json`), so a sandbox starts from it as from a boot snapshot
(`GVisorDriver.start_from_snapshot`).

The image is written to a tmpfs (`/dev/shm/torpor-<key of the data dir>/`, root-only) when
the host has the memory for it, and copied to the store after the sandbox resumed: writing
256 MiB into the page cache of the host's disk took 130 ms at best but up to 1.9 s while
other work wrote to the same disk (dirty-page throttling and the file system's journal),
the tmpfs 140-270 ms (measured: bench/snapshots.py, docs/snapshots.md). The sentry writes
the image, so its tmpfs pages are charged to the sandbox's memory cgroup: its hard limit is
raised by the image's bound while they exist, and `staged_bytes` tells the driver's
`memory_in_use` (the watchdog, metering) to leave them out. Where the host lacks the memory,
the image goes to the disk as before and is then written out and dropped from the page
cache (`_uncharge`).

Without memory, nothing is checkpointed: the sandbox is paused for the disk copy alone,
and what it changed on its disk (the upper directories of its overlays) becomes a template
layer (`dest/root`, `dest/usr`), read from the copy after the sandbox runs again.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from torpor.runtime.base import DriverError, SandboxSpec
from torpor.runtime.layers import Layer

if TYPE_CHECKING:
    from torpor.runtime.gvisor import GVisorDriver

log = logging.getLogger("torpor.runtime")
_libc = ctypes.CDLL(None, use_errno=True)
HEADROOM = 64 << 20  # bytes of disk kept free beyond what a snapshot needs
RUNSC_TIMEOUT = 300.0  # seconds a pause, checkpoint or resume may take
SHM = Path("/dev/shm")
HOST_MEMORY_SPARE = 512 << 20  # host memory left available beyond a staged image
STAGE_SLACK = 64 << 20  # beyond the memory charged: what an image may take more
_staged: dict[str, Path] = {}  # sandbox id -> the tmpfs directory of its image, if any


def staged_bytes(sid: str) -> int:
    """Bytes of a snapshot image of this sandbox on the tmpfs, charged to its memory
    cgroup for a moment: not memory the sandbox uses (a stat of its one or two files)."""
    d = _staged.get(sid)
    if d is None:
        return 0
    total = 0
    try:
        for f in os.scandir(d / "image"):
            total += f.stat(follow_symlinks=False).st_blocks * 512
    except OSError:  # not written yet, or gone
        pass
    return total


def stage_dir(data_dir: Path) -> Path:
    """This data dir's directory on the tmpfs (another server's data dir has another)."""
    key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    return SHM / f"torpor-{key}"


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError):
        pass
    return 0


def _stage(drv: GVisorDriver, spec: SandboxSpec, cg) -> tuple[Path, int, int] | None:
    """A tmpfs directory for the image and the raised memory limit, or None (then the
    image goes to the disk): no tmpfs, too little host memory, or a cgroup without a
    limit to raise. Returns (directory, the old limit, the bytes staged)."""
    bound = (cg.memory_charged() or 0) + STAGE_SLACK
    limit = cg.memory_limit()
    if limit is None or not SHM.is_dir():
        return None
    try:
        if (_available_memory() < bound + HOST_MEMORY_SPARE
                or shutil.disk_usage(SHM).free < bound + HOST_MEMORY_SPARE):
            return None
        root = stage_dir(drv.data_dir)
        root.mkdir(mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        d = root / f"{spec.id}.{time.monotonic_ns()}"
        _staged[spec.id] = d  # first: another snapshot's clean-up keeps its directory
        for old in root.iterdir():  # what a killed server left
            if old.name.split(".")[0] not in _staged:
                shutil.rmtree(old, ignore_errors=True)
        d.mkdir(mode=0o700)
        cg.set_memory_limit(limit + bound)
    except OSError as e:
        _staged.pop(spec.id, None)
        log.warning("sandbox %s: snapshot image to the disk, not the tmpfs: %s", spec.id, e)
        return None
    return d, limit, bound


def _unstage(spec: SandboxSpec, cg, staged: tuple[Path, int, int]) -> None:
    """Remove the tmpfs copy (its pages leave the sandbox's charge), then the limit as it
    was (retried: the sandbox may have grown into the room for a moment)."""
    d, limit, _ = staged
    shutil.rmtree(d, ignore_errors=True)
    _staged.pop(spec.id, None)
    for attempt in range(20):
        try:
            cg.set_memory_limit(limit)
            return
        except OSError as e:
            if attempt == 19:
                log.warning("sandbox %s: its memory limit stays raised after a snapshot: "
                            "%s", spec.id, e)
            time.sleep(0.05)


def _copy_image(src: Path, dest: Path) -> None:
    dest.mkdir()
    for f in src.iterdir():
        shutil.copyfile(f, dest / f.name)


def _syncfs(path: Path) -> None:
    """Write the dirty pages of the file system mounted at `path` to its device (the disk
    image, through its loop device): what the copy reads is then all of it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _copy_sparse(src: Path, dst: Path) -> None:
    # --reflink=auto shares the blocks where the host's file system can (xfs, btrfs)
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", "--", str(src), str(dst)],
                   check=True, capture_output=True)


def _runsc(drv: GVisorDriver, *args: str) -> None:
    try:
        p = subprocess.run([*drv.runsc_base(), *args], check=False, capture_output=True,
                           text=True, timeout=RUNSC_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DriverError(f"runsc {args[0]} took over {RUNSC_TIMEOUT:.0f}s") from None
    if p.returncode != 0:
        raise DriverError(f"runsc {args[0]} failed: {p.stderr.strip()[-500:]}")


def needed_bytes(drv: GVisorDriver, spec: SandboxSpec, memory: bool) -> int:
    """What a snapshot may take on the host's disk: the blocks its disk uses, and with
    memory the memory in use (the image is at most that, uncompressed)."""
    need = drv.layer(spec).disk_bytes() + HEADROOM
    if memory:
        need += drv.cgroup(spec.id).memory_bytes() or 0
    return need


def live_snapshot(drv: GVisorDriver, spec: SandboxSpec, dest: Path, memory: bool) -> dict:
    """Snapshot a running (or frozen) sandbox into `dest` (which must not exist; on
    failure it does not, and the sandbox runs on as it was). Returns figures: pause_ms (the
    sandbox stood still), checkpoint_ms, disk_ms, bytes (what `dest` takes)."""
    layer = drv.layer(spec)
    free = shutil.disk_usage(dest.parent).free
    need = needed_bytes(drv, spec, memory)
    if free < need:
        raise DriverError(f"sandbox {spec.id}: not enough disk for a snapshot "
                          f"({free >> 20} MiB free, up to {need >> 20} MiB needed)")
    d = drv.sandbox_dir(spec.id)
    config = json.loads((d / "config.json").read_text())
    cg = drv.cgroup(spec.id)
    work = dest.with_name(dest.name + ".disk") if not memory else dest
    work.mkdir(parents=True)
    was_frozen = drv.is_frozen(spec)
    figures: dict = {}
    staged = _stage(drv, spec, cg) if memory else None
    image = staged[0] / "image" if staged else dest / "image"
    figures["staged"] = staged is not None
    try:
        if was_frozen:
            drv.freeze(spec, False)  # runsc pauses it itself; a frozen sentry cannot answer
        if memory:
            cg.set_cpu_limit(None)  # the sandbox's quota would slow runsc's save
        t0 = time.monotonic()
        _runsc(drv, "pause", spec.id)
        try:
            if memory:
                from torpor.runtime.gvisor import root_flags
                t1 = time.monotonic()
                _runsc(drv, *root_flags(config), "checkpoint", *drv.checkpoint_flags,
                       "--leave-running", "--image-path", str(image), spec.id)
                figures["checkpoint_ms"] = round((time.monotonic() - t1) * 1000, 1)
            t2 = time.monotonic()
            _syncfs(layer.disk)
            _copy_sparse(layer.image, work / "disk.img")
            figures["disk_ms"] = round((time.monotonic() - t2) * 1000, 1)
        finally:
            try:
                _runsc(drv, "resume", spec.id)
            except DriverError as e:  # once more: a paused sandbox answers nothing
                log.warning("sandbox %s: resume after a snapshot failed, again: %s",
                            spec.id, e)
                _runsc(drv, "resume", spec.id)
            figures["pause_ms"] = round((time.monotonic() - t0) * 1000, 1)
        if staged:
            t3 = time.monotonic()
            _copy_image(image, dest / "image")
            figures["copy_ms"] = round((time.monotonic() - t3) * 1000, 1)
    except (DriverError, OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        msg = e.stderr.decode(errors="replace").strip() if isinstance(
            e, subprocess.CalledProcessError) else str(e)
        raise DriverError(f"sandbox {spec.id}: snapshot failed (the sandbox runs on): "
                          f"{msg[-500:]}") from None
    finally:
        if staged:
            _unstage(spec, cg, staged)
        try:
            if memory:
                cg.set_cpu_limit(spec.cpu)
            if was_frozen:
                drv.freeze(spec, True)  # back to standby, as it was
        except OSError as e:
            log.warning("sandbox %s: after its snapshot: %s", spec.id, e)
    try:
        if memory:
            if not staged:
                _uncharge(dest / "image")
            (dest / "snapshot.json").write_text(json.dumps({"id": spec.id}))
            shutil.copy2(d / "config.json", dest / "config.json")
        else:
            _export_layer(spec, work, dest)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise DriverError(f"sandbox {spec.id}: snapshot failed while it was kept (the "
                          f"sandbox runs on): {e}") from None
    finally:
        if not memory:
            shutil.rmtree(work, ignore_errors=True)
    figures["bytes"] = tree_bytes(dest)
    return figures


def _uncharge(image: Path) -> None:
    """Write the image out and drop it from the page cache. The sentry wrote it, so its
    cache pages are charged to the sandbox's memory: left there, a sandbox using half its
    memory went over its limit after a snapshot and the watchdog stopped its largest
    process (measured: 256 MiB in use of 512)."""
    for f in image.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _export_layer(spec: SandboxSpec, work: Path, dest: Path) -> None:
    """What the sandbox changed, from the copy of its disk in `work`, as dest/{root,usr}."""
    copy = Layer(work, spec.template, spec.disk_mb)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        copy.export_changes(dest)
    finally:
        copy.unmount()


def tree_bytes(path: Path) -> int:
    """Bytes on disk under `path` (sparse files by their blocks, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
