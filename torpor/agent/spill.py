"""Process output spilled to the sandbox's own disk, imported when a process's output first
outgrows its in-memory log (procs.LOG_LIMIT).

Output older than the in-memory log goes to segment files under SPILL_DIR (root-only, on
the sandbox's disk, not the /tmp tmpfs, which is memory), one directory per process. All
processes together keep at most TORPOR_OUTPUT_SPILL_MB MiB there (default 256; 0: no
spill, the old behaviour: the oldest output is dropped); past it the oldest segment of any
process goes. A segment is records `kind (u8) | offset (u64) | length (u32) | bytes`;
a sparse index in memory (one entry per INDEX_EVERY bytes) finds an offset without
scanning a whole segment. A write that fails (the disk is full) drops what that process had
spilled: what is kept stays one contiguous range of offsets.

The directory is per agent start (`<SPILL_DIR>/<boot>`): what an earlier start of the agent
left (a template's build) is removed when this one first spills. A hibernated sandbox's
agent finds its own files again after the restore (they are on the sandbox's disk).
"""

from __future__ import annotations

import bisect
import os
import shutil
import struct

SPILL_DIR = os.environ.get("TORPOR_SPILL_DIR", "/.torpor-run/output")  # tests run it elsewhere
REC = struct.Struct(">BQI")
SEGMENT = 4 << 20  # bytes of output per segment file
INDEX_EVERY = 64 * 1024
READ_BATCH = 256 * 1024


def _limit() -> int:
    try:
        return max(0, int(os.environ.get("TORPOR_OUTPUT_SPILL_MB", "256"))) << 20
    except ValueError:
        return 256 << 20


class Segment:
    __slots__ = ("end", "fd", "index", "path", "size", "start")

    def __init__(self, start: int, path: str):
        self.start = start  # offset of its first byte
        self.end = start  # offset after its last byte
        self.path = path
        self.size = 0  # file size
        self.index: list[tuple[int, int]] = []  # (offset, file position) of some records
        self.fd = -1


class ProcSpill:
    """One process's spilled output: segments in offset order."""

    def __init__(self, store: Store, pid: int):
        self.store = store
        self.pid = pid
        self.dir = os.path.join(store.dir, str(pid))
        self.segments: list[Segment] = []
        self.n = 0
        self.bytes = 0

    @property
    def start(self) -> int | None:
        return self.segments[0].start if self.segments else None

    def put(self, off: int, kind: int, data: bytes) -> bool:
        """Append a record (it follows the last one); False if it could not be kept."""
        if self.store.limit <= 0 or len(data) > self.store.limit:
            return False
        seg = self.segments[-1] if self.segments else None
        try:
            if seg is None or seg.end - seg.start >= SEGMENT or seg.end != off:
                if seg is not None and seg.end != off:
                    self.drop_all()  # not contiguous: start again from here
                if seg is not None:
                    seg_close(seg)
                if not self.segments:
                    os.makedirs(self.dir, mode=0o700, exist_ok=True)
                self.n += 1
                seg = Segment(off, os.path.join(self.dir, f"{self.n:08d}"))
                seg.fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                 | os.O_CLOEXEC, 0o600)
                self.segments.append(seg)
                self.store.order.append((self, seg))
            rec = REC.pack(kind, off, len(data)) + data
            n = os.write(seg.fd, rec)
            if n != len(rec):
                raise OSError(28, "short write")
        except OSError:
            if seg is not None and seg.fd >= 0:
                try:
                    os.ftruncate(seg.fd, seg.size)
                except OSError:
                    pass
            self.drop_all()
            return False
        if not seg.index or seg.size - seg.index[-1][1] >= INDEX_EVERY:
            seg.index.append((off, seg.size))
        seg.size += len(rec)
        seg.end = off + len(data)
        self.bytes += len(data)
        self.store.total += len(data)
        self.store.shrink()
        return True

    def read(self, pos: int, until: int):
        """Records from `pos` (cut to start there) below `until`, READ_BATCH bytes at most:
        a list of (offset, kind, bytes); empty if `pos` is not kept here."""
        segs = self.segments
        i = bisect.bisect_right([s.start for s in segs], pos) - 1
        if i < 0 or pos >= segs[i].end:
            return []
        seg = segs[i]
        j = bisect.bisect_right([o for o, _ in seg.index], pos) - 1
        fpos = seg.index[max(j, 0)][1]
        out = []
        got = 0
        try:
            fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            data = os.pread(fd, READ_BATCH + REC.size, fpos)
            while got < READ_BATCH:
                if len(data) < REC.size:
                    more = os.pread(fd, READ_BATCH + REC.size, fpos)
                    if len(more) < REC.size:
                        break
                    data = more
                kind, off, n = REC.unpack_from(data, 0)
                if len(data) < REC.size + n:
                    data = os.pread(fd, REC.size + n, fpos)
                    if len(data) < REC.size + n:
                        break
                end = off + n
                if off >= until:
                    break
                if end > pos:
                    chunk = data[REC.size:REC.size + n]
                    if off < pos:
                        chunk, off = chunk[pos - off:], pos
                    if off + len(chunk) > until:
                        chunk = chunk[:until - off]
                    out.append((off, kind, chunk))
                    got += len(chunk)
                fpos += REC.size + n
                data = data[REC.size + n:]
        finally:
            os.close(fd)
        return out

    def drop_oldest(self) -> None:
        seg = self.segments.pop(0)
        seg_close(seg)
        try:
            os.unlink(seg.path)
        except OSError:
            pass
        self.bytes -= seg.end - seg.start
        self.store.total -= seg.end - seg.start
        if not self.segments:
            try:
                os.rmdir(self.dir)
            except OSError:
                pass

    def drop_all(self) -> None:
        while self.segments:
            self.drop_oldest()

    def finished(self) -> None:
        """The process's pipes are closed: no more writes."""
        if self.segments:
            seg_close(self.segments[-1])


def seg_close(seg: Segment) -> None:
    if seg.fd >= 0:
        try:
            os.close(seg.fd)
        except OSError:
            pass
        seg.fd = -1


class Store:
    def __init__(self):
        self.limit = _limit()
        self.dir = os.path.join(SPILL_DIR, f"{os.getpid()}-{int.from_bytes(os.urandom(4))}")
        self.total = 0
        self.order: list = []  # (ProcSpill, Segment) oldest first
        os.makedirs(SPILL_DIR, mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(SPILL_DIR), 0o700)
        os.chmod(SPILL_DIR, 0o700)
        for name in os.listdir(SPILL_DIR):  # what an earlier start of the agent left
            shutil.rmtree(os.path.join(SPILL_DIR, name), ignore_errors=True)
        os.makedirs(self.dir, mode=0o700)

    def shrink(self) -> None:
        while self.total > self.limit and self.order:
            ps, seg = self.order[0]
            if not ps.segments or ps.segments[0] is not seg:
                self.order.pop(0)  # dropped already
                continue
            self.order.pop(0)
            ps.drop_oldest()


_store: Store | None = None


def store() -> Store:
    global _store
    if _store is None:
        _store = Store()
    return _store
