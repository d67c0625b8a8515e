"""A sandbox's cgroup, on cgroup v1 (one directory per controller) or v2 (unified).

runsc places the sandbox's sentry and gofer into `linux.cgroupsPath` of the OCI spec; this
module reads what they use and freezes or thaws them, for either layout.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def favor_dynmods() -> str:
    """Set cgroup2's `favordynmods` mount option, if the kernel has it and it is not set.

    Moving a process into a cgroup (what runsc does for every sandbox it starts or
    restores) otherwise waits for an RCU grace period under a lock shared by all
    hierarchies: measured 7.5-28 ms per first write to `cgroup.procs` here, 0.2 ms with the
    option. The kernel's documentation: it makes "dynamic cgroup modifications such as task
    migrations" cheaper at a small cost to forks and exits. It stays set until the next
    boot (on 6.18, migrations stay fast even after a remount without it). Returns what
    happened, for the log."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError as e:
        return f"not set: cannot read /proc/self/mounts ({e})"
    cg2 = [m for m in mounts if len(m) >= 4 and m[2] == "cgroup2"]
    if not cg2:
        return "not set: no cgroup2 mount"
    path, opts = cg2[0][1], cg2[0][3].split(",")
    if "favordynmods" in opts:
        return f"already set on {path}"
    # mount(8) keeps the mount's other options (nsdelegate, memory_recursiveprot...)
    p = subprocess.run(["mount", "-o", "remount,favordynmods", path], check=False,
                       capture_output=True, text=True)
    if p.returncode != 0:
        return f"not set on {path} (kernel without it?): {p.stderr.strip()}"
    return f"set on {path}"


class Cgroup:
    def __init__(self, rel: str):
        self.rel = rel.strip("/")
        self.v2 = is_v2()

    def _path(self, controller: str) -> Path:
        if self.v2:
            return ROOT / self.rel
        return ROOT / controller / self.rel

    def _read(self, controller: str, name: str) -> str | None:
        try:
            return (self._path(controller) / name).read_text()
        except OSError:
            return None

    def _read_int(self, controller: str, name: str) -> int | None:
        """A one-number file, read with two system calls (the watchdog reads these ten
        times a second for every running sandbox)."""
        try:
            fd = os.open(f"{self._path(controller)}/{name}", os.O_RDONLY)
        except OSError:
            return None
        try:
            text = os.read(fd, 64).strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        return int(text) if text.isdigit() else None

    def exists(self) -> bool:
        return self._path("memory").exists()

    def memory_charged(self) -> int | None:
        """Memory charged to the cgroup, file cache included: an upper bound of
        memory_bytes() at the cost of one small read (memory.stat is ~1.5 KiB to parse)."""
        return self._read_int("memory", "memory.current" if self.v2
                              else "memory.usage_in_bytes")

    def memory_limit(self) -> int | None:
        """The hard memory limit in bytes (None: none, or no cgroup)."""
        return self._read_int("memory", "memory.max" if self.v2
                              else "memory.limit_in_bytes")

    def set_memory_limit(self, limit: int) -> None:
        """Set the hard memory limit (bytes); below the usage, the kernel reclaims first
        and refuses (OSError EBUSY) what it cannot reclaim."""
        (self._path("memory") / ("memory.max" if self.v2 else "memory.limit_in_bytes")
         ).write_text(str(limit))

    def memory_alert(self, threshold: int) -> int | None:
        """An eventfd the kernel signals when the memory charged crosses `threshold` bytes
        (either way), or None where there is no such notification (cgroup v2 has none for
        a plain threshold). The caller owns the fd; the kernel also signals it when the
        cgroup is removed."""
        if self.v2:
            return None
        base = self._path("memory")
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            usage = os.open(base / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
            try:
                # the registration keeps its own reference to the usage file
                (base / "cgroup.event_control").write_text(f"{efd} {usage} {threshold}")
            finally:
                os.close(usage)
        except OSError:
            os.close(efd)
            raise
        return efd

    def tasks(self) -> int | None:
        """Host tasks (threads) in the cgroup now: pids.current."""
        return self._read_int("pids", "pids.current")

    def memory_bytes(self) -> int | None:
        """Memory in use, not counting file cache the kernel can drop."""
        if self.v2:
            cur = self._read("memory", "memory.current")
            stat = self._read("memory", "memory.stat")
            inactive_key = "inactive_file"
        else:
            cur = self._read("memory", "memory.usage_in_bytes")
            stat = self._read("memory", "memory.stat")
            inactive_key = "total_inactive_file"
        if cur is None:
            return None
        used = int(cur)
        for line in (stat or "").splitlines():
            k, _, v = line.partition(" ")
            if k == inactive_key:
                used -= int(v)
                break
        return max(used, 0)

    def oom_kills(self) -> int:
        """How many times the kernel's OOM killer fired in this cgroup."""
        text = self._read("memory", "memory.events" if self.v2 else "memory.oom_control") or ""
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def pids(self) -> tuple[int, int] | None:
        """(host tasks now, the limit) of the pids controller."""
        cur = self._read("pids", "pids.current")
        limit = self._read("pids", "pids.max")
        if cur is None or limit is None:
            return None
        limit = limit.strip()
        return int(cur), (int(limit) if limit.isdigit() else 1 << 30)

    def cpu_seconds(self) -> float | None:
        if self.v2:
            text = self._read("cpu", "cpu.stat")
            for line in (text or "").splitlines():
                k, _, v = line.partition(" ")
                if k == "usage_usec":
                    return int(v) / 1e6
            return None
        v = self._read("cpuacct", "cpuacct.usage")
        return int(v) / 1e9 if v else None

    def frozen(self) -> bool:
        """True while frozen or on the way there (v1's transient FREEZING counts)."""
        if self.v2:
            return (self._read("", "cgroup.freeze") or "0").strip() == "1"
        return (self._read("freezer", "freezer.state") or "THAWED").strip() != "THAWED"

    def freeze(self, frozen: bool) -> None:
        if self.v2:
            (self._path("") / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self._path("freezer") / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def set_cpu_limit(self, cpus: float | None, period: int = 100_000) -> None:
        """Cap CPU at `cpus` cores, or lift the cap (None)."""
        if self.v2:
            value = "max" if cpus is None else str(int(cpus * period))
            (self._path("cpu") / "cpu.max").write_text(f"{value} {period}")
        else:
            (self._path("cpu") / "cpu.cfs_period_us").write_text(str(period))
            quota = -1 if cpus is None else int(cpus * period)
            (self._path("cpu") / "cpu.cfs_quota_us").write_text(str(quota))

    def remove(self) -> None:
        """Remove the cgroup directories runsc left behind (only empty ones can go)."""
        if self.v2:
            paths = [ROOT / self.rel]
        else:
            paths = [ROOT / c / self.rel for c in os.listdir(ROOT)
                     if (ROOT / c).is_dir() and not (ROOT / c).is_symlink()]
        for p in paths:
            try:
                p.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                pass

    def leftovers(self) -> list[str]:
        if self.v2:
            paths = [ROOT / self.rel]
        else:
            paths = [ROOT / c / self.rel for c in os.listdir(ROOT)
                     if (ROOT / c).is_dir() and not (ROOT / c).is_symlink()]
        return [str(p) for p in paths if p.exists()]
