"""The gVisor driver: each sandbox is one runsc container with `--network=none`.

The container's first process is the agent, started from a read-only bundle: the host's
`/usr` mounted at `/.torpor/usr` and this package's `agent/` at `/.torpor/agent`; the
interpreter runs through the host's dynamic loader, so the template needs no Python and
sandboxed code cannot touch the agent. A holder process per sandbox (`holder.py`) owns
the container's stdio, so the sandbox does not depend on the server process.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from torpor.channel import Channel, ChannelClosed
from torpor.runtime.base import DriverError, Limits, Load, SandboxSpec, Usage
from torpor.runtime.cgroups import Cgroup, favor_dynmods
from torpor.runtime.layers import DiskStock, Layer, StorageError, copy_sparse
from torpor.runtime.snapshot import live_snapshot, stage_dir, staged_bytes
from torpor.runtime.volumes import (
    VolumeImages,
    attach_drive,
    detach_drive,
    drives_dir,
    setup_drives,
)

log = logging.getLogger("torpor.runtime")
AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
HOLDER = Path(__file__).resolve().parent / "holder.py"
CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
# The agent's interpreter flags and entry. -S: no `site` (the host's .pth files and
# sitecustomize are not the agent's business, and cost ~10 ms of every start under
# ptrace); imported, not run as a script, so its bytecode comes from __pycache__ instead
# of compiling agent.py at every start (~8 ms).
AGENT_ARGS = ["-S", "-s", "-B", "-c",
              "import sys; sys.path[0] = '/.torpor/agent'; import agent; agent.main()"]
SENTRY_OVERHEAD_MB = 96  # sentry + gofer + page tables, measured ~48 MB idle, doubled
# On the ptrace platform every task in the sandbox costs the host ~15-20 threads (the
# sentry's thread for it plus ptrace stubs): measured 45 threads idle, +300 per 20 sleeps.
HOST_THREADS_PER_PROCESS = 20
PIDS_OVERHEAD = 256  # host threads of the sentry and gofer themselves
CHECKPOINT_HEADROOM = 64 << 20  # bytes of disk kept free beyond the memory to save
RESTORED_PING = 1.0  # seconds a restored agent has to answer before it gets SIGHUP
CHECKPOINT_TIMEOUT = 300.0  # seconds a checkpoint may take before it counts as failed
PID_MAX = 4194304  # the kernel's maximum; Debian's default of 32768 fits ~1600 sandbox tasks


def find_host_python() -> tuple[str, str, str]:
    """The host's Debian interpreter, its dynamic loader and library dir, all under /usr."""
    for cand in ("/usr/bin/python3",):
        if os.path.exists(cand):
            exe = os.path.realpath(cand)
            break
    else:
        raise DriverError("no /usr/bin/python3 on the host: the agent runs on the host's "
                            "Python; install Debian's python3-minimal")
    loaders = sorted(glob.glob("/usr/lib/*-linux-gnu/ld-linux*.so.*"))
    if not loaders:
        raise DriverError("no dynamic loader under /usr/lib/*-linux-gnu")
    loader = os.path.realpath(loaders[0])
    return exe, loader, os.path.dirname(loader)


def compile_agent(python: str) -> None:
    """Bring the agent's bytecode up to date, with the interpreter it runs on: the agent
    never writes bytecode in a sandbox (-B, a read-only bundle), so a stale or missing
    `__pycache__` would have every sandbox compile it at its start (~10 ms under ptrace)."""
    p = subprocess.run([python, "-m", "compileall", "-q", str(AGENT_DIR)], check=False,
                       capture_output=True, text=True)
    if p.returncode != 0:
        log.warning("could not compile the agent's bytecode in %s (sandboxes start slower): "
                    "%s", AGENT_DIR, (p.stderr or p.stdout).strip()[-300:])


def raise_pid_max() -> None:
    """Sandbox tasks cost the host many threads here (see HOST_THREADS_PER_PROCESS), so the
    host's PID space must be large, as on any container host; raise it if it is small."""
    path = "/proc/sys/kernel/pid_max"
    try:
        with open(path) as f:
            current = int(f.read())
        if current < PID_MAX:
            with open(path, "w") as f:
                f.write(str(PID_MAX))
            log.info("raised kernel.pid_max from %d to %d", current, PID_MAX)
    except (OSError, ValueError) as e:
        log.warning("could not raise kernel.pid_max (%s): a fork bomb in one sandbox may "
                    "exhaust the host's PIDs sooner", e)


def runsc_version(runsc: str) -> str:
    p = subprocess.run([runsc, "--version"], check=False, capture_output=True, text=True)
    return p.stdout.split("\n")[0].replace("runsc version ", "").strip()


def release_date(version: str) -> int:
    """20240729 of "0.0~20240729.0" (Debian's versions of gVisor are its release dates);
    0 when the version does not say."""
    m = re.search(r"(20\d{6})", version)
    return int(m.group(1)) if m else 0


# Releases before this one lose the sandbox (the checkpoint panics half-way) when a process
# waits with epoll on a TCP/UDP socket: measured on 0.0~20221219; 0.0~20240729 saves it.
# No release here saves a file deleted while open on a host-backed mount (the disk at `/`,
# `/usr`): "deleted and invalidated dentries can't be restored", and the sandbox is lost.
CHECKPOINT_FIXED = 20240729
# The OCI annotation recording how runsc was told to build the sandbox's root file system:
# a restore must build it the same way as the sandbox it restores.
ROOT_OVERLAY = "dev.torpor.root-overlay"
TMP_SHARE = 2  # /tmp is a tmpfs of memory_mb / TMP_SHARE, in the sandbox's memory


def root_overlay(runsc: str) -> str | None:
    """"none" where runsc has `--overlay2`: `/` is then the sandbox's disk itself (through
    the gofer), so `df /` shows disk_mb and a full disk answers ENOSPC to every write. runsc's
    default, root:self, keeps changes in a file system of the sentry's own that has no size
    (`df /` showed 8.0E) and answers EIO once the disk image under its file fills. None for
    releases without the flag (they have no root overlay)."""
    p = subprocess.run([runsc, "flags"], check=False, capture_output=True, text=True)
    return "none" if "-overlay2" in p.stdout + p.stderr else None


def checkpoint_flags(runsc: str, compression: str) -> list[str]:
    """`runsc checkpoint` options for the image format asked for: "none" (memory pages as
    they are: restores ~25% faster, an image as large as the memory in use) or "flate"
    (compressed, smaller, slower to restore). Releases without --compression always
    compress."""
    p = subprocess.run([runsc, "checkpoint", "--help"], check=False, capture_output=True,
                       text=True)
    if "-compression" not in p.stdout + p.stderr:
        return []
    return ["--compression=" + ("none" if compression == "none" else "flate-best-speed")]


def root_flags(config: dict) -> list[str]:
    """runsc's flags for the root file system an OCI spec records; a spec written before the
    record gets runsc's default, as its sandbox had."""
    mode = config.get("annotations", {}).get(ROOT_OVERLAY)
    return [f"--overlay2={mode}"] if mode else []


class Spans:
    """Where a start's time goes, in milliseconds from one mark to the next: kept beside
    the sandbox (`start.json`) for the benches, and logged at debug."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = [("", time.monotonic())]

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.append((name, time.monotonic() if at is None else at))

    def save(self, path: Path, status: dict) -> None:
        """With the holder's `runsc run --detach` (from its status: the monotonic clock is
        the host's) placed between the holder's start and the agent's HELLO."""
        marks = list(self.marks)
        began, ended = status.get("runsc_began"), status.get("runsc_ended")
        names = [n for n, _ in marks]
        if began and ended and "holder" in names:
            # holder: until runsc runs; runsc: `run --detach`; agent: until its HELLO
            i = names.index("holder")
            marks[i:i + 1] = [("holder", began), ("runsc", ended)]
        marks.sort(key=lambda m: m[1])
        out = {n: round((t - marks[i][1]) * 1000, 2) for i, (n, t) in enumerate(marks[1:])}
        out["total"] = round((marks[-1][1] - marks[0][1]) * 1000, 2)
        log.debug("start %s: %s", path.parent.name, out)
        try:
            path.write_text(json.dumps(out))
        except OSError:
            pass


NICE = shutil.which("nice")


def _popen_holder(arg: str, cwd: Path, stdin, out) -> subprocess.Popen:
    """`python -I -S holder.py ARG` in a session of its own (it outlives the server). A
    spare starts at the lowest priority (`nice -n 19`, the same process): its Python start
    (~25 ms of a core) then takes only what the sandbox just started and the server leave
    idle (measured: the first command after a start 29 -> 23 ms). It takes priority 0
    again when it is given work, before it starts runsc."""
    nice = [NICE, "-n", "19"] if arg == "--spare" and NICE else []
    return subprocess.Popen([*nice, sys.executable, "-I", "-S", str(HOLDER), arg],
                            stdin=stdin, stdout=out, stderr=out, start_new_session=True,
                            close_fds=True, cwd=str(cwd))


class GVisorDriver:
    name = "gvisor"

    def __init__(self, data_dir: Path, runsc: str | None = None, platform: str = "ptrace",
                 start_timeout: float = 30.0, image_compression: str = "none",
                 output_spill_mb: int = 256):
        self.data_dir = Path(data_dir)
        # what a sandbox's agent keeps of its processes' output on the sandbox's disk
        self.output_spill_mb = output_spill_mb
        self.runsc = runsc or shutil.which("runsc") or "/usr/bin/runsc"
        if not os.path.exists(self.runsc):
            raise DriverError("runsc is not installed: run `apt-get install runsc` "
                                "(or `make serve`, which installs it)")
        self.platform = platform
        self.start_timeout = start_timeout
        self.state_dir = self.data_dir / "runsc"
        self.sock_dir = self.data_dir / "run"
        self.sandboxes_dir = self.data_dir / "sandboxes"
        for d in (self.state_dir, self.sock_dir, self.sandboxes_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._holders: dict[int, subprocess.Popen] = {}  # pid -> a holder we started
        self._spare: subprocess.Popen | None = None  # a holder started ahead of need
        self.disks = DiskStock(self.data_dir / "disks")  # blank disk images, made ahead
        self.volumes = VolumeImages(self.data_dir / "volumes")  # volumes and drives
        self.python, self.loader, self.libdir = find_host_python()
        compile_agent(self.python)
        self.version = runsc_version(self.runsc)
        self.checkpoint_flags = checkpoint_flags(self.runsc, image_compression)
        self.root_overlay = root_overlay(self.runsc)
        # kinds of hibernate_check problems this runsc cannot checkpoint without losing the
        # sandbox: the server refuses to hibernate while any is present
        self.checkpoint_blockers: frozenset[str] = (
            frozenset({"deleted_file"}) if release_date(self.version) >= CHECKPOINT_FIXED
            else frozenset({"deleted_file", "epoll_socket"}))
        raise_pid_max()
        log.info("cgroup favordynmods: %s", favor_dynmods())

    # --- paths ------------------------------------------------------------------------
    def sandbox_dir(self, sid: str) -> Path:
        return self.sandboxes_dir / sid

    def socket_path(self, sid: str) -> str:
        return str(self.sock_dir / f"{sid}.sock")

    def cgroup(self, sid: str) -> Cgroup:
        return Cgroup(f"/torpor/{sid}")

    def layer(self, spec: SandboxSpec) -> Layer:
        return Layer(self.sandbox_dir(spec.id), spec.template, spec.disk_mb)

    def runsc_base(self) -> list[str]:
        return [self.runsc, "--root", str(self.state_dir), "--platform", self.platform,
                "--network", "none"]

    # --- the OCI spec -----------------------------------------------------------------
    def oci_spec(self, spec: SandboxSpec, layer: Layer) -> dict:
        in_usr = "/.torpor" + self.python  # /usr/bin/python3.11 -> /.torpor/usr/bin/...
        args = ["/.torpor" + self.loader, "--library-path", "/.torpor" + self.libdir,
                in_usr, *AGENT_ARGS]
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            # in memory (files deleted while open there do not stop a hibernation), bounded
            # so that it cannot take more than its share of the sandbox's memory
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777",
                         f"size={(spec.memory_mb << 10) // TMP_SHARE}k"]},
            {"destination": "/.torpor/usr", "type": "bind", "source": "/usr",
             "options": ["rbind", "ro", "nosuid", "nodev"]},
            {"destination": "/.torpor/agent", "type": "bind", "source": str(AGENT_DIR),
             "options": ["rbind", "ro", "nosuid", "nodev"]},
        ]
        if spec.template.usr_from:
            mounts.insert(5, {"destination": "/usr", "type": "bind", "source": str(layer.usr),
                              "options": ["rbind", "rw"]})
        mounts += self.storage_mounts(spec)
        hard_mb = int(spec.memory_mb * 1.25) + SENTRY_OVERHEAD_MB
        # no CPU quota here: the driver sets it on the cgroup once the sandbox runs, so
        # that runsc's own restore work is not throttled by it (measured: 353 -> 530 ms)
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONHOME=/.torpor/usr",
                        "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1",
                        # listen for egress inside: the sandbox's loopback is its own
                        "TORPOR_EGRESS=1", f"TORPOR_OUTPUT_SPILL_MB={self.output_spill_mb}"],
                "cwd": "/",
                "capabilities": {k: CAPS for k in
                                 ("bounding", "effective", "inheritable", "permitted")},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
                "noNewPrivileges": False,
            },
            "root": {"path": str(layer.rootfs), "readonly": False},
            "annotations": {ROOT_OVERLAY: self.root_overlay} if self.root_overlay else {},
            "hostname": spec.hostname,
            "mounts": mounts,
            "linux": {
                "cgroupsPath": f"/torpor/{spec.id}",
                "resources": {
                    "memory": {"limit": hard_mb << 20},
                    "pids": {"limit": self.limits(spec).tasks},
                },
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            },
        }

    # --- lifecycle --------------------------------------------------------------------
    async def start(self, spec: SandboxSpec) -> Channel:
        d = self.sandbox_dir(spec.id)
        layer = self.layer(spec)
        spans = Spans()
        await asyncio.to_thread(layer.create, self.disks)
        await asyncio.to_thread(self._mount_storage, spec)
        spans.mark("layer")
        config = self.oci_spec(spec, layer)
        (d / "config.json").write_text(json.dumps(config))
        spans.mark("spec")
        cmd = self.runsc_base() + root_flags(config) + ["run", "--detach", "--bundle", str(d),
                                                        spec.id]
        try:
            chan = await self._start_holder(spec, cmd, spans=spans)
        finally:
            self.disks.refill()  # the next start's disk, made once this one is done
        self.cgroup(spec.id).set_cpu_limit(spec.cpu)
        spans.mark("cpu_limit")
        spans.save(d / "start.json", self._status(spec.id))
        return chan

    async def _start_holder(self, spec: SandboxSpec, command: list[str],
                            restored: bool = False, spans: Spans | None = None) -> Channel:
        d = self.sandbox_dir(spec.id)
        sock = self.socket_path(spec.id)
        status = d / "status.json"
        status.unlink(missing_ok=True)
        cfg = {"id": spec.id, "socket": sock, "command": command, "restored": restored,
               "agent_log": str(d / "agent.log"), "status": str(status)}
        (d / "holder.json").write_text(json.dumps(cfg))
        holder = self._launch_holder(d)
        self._holders[holder.pid] = holder
        try:
            return await self._connect_holder(spec, restored, spans)
        finally:
            # the next spare starts once this start is done: its Python start-up would
            # take one of the host's cores from runsc's and the agent's
            self._replenish_spare()

    async def _connect_holder(self, spec: SandboxSpec, restored: bool,
                              spans: Spans | None) -> Channel:
        sock = self.socket_path(spec.id)
        deadline = time.monotonic() + self.start_timeout
        chan = None
        while chan is None:
            try:
                chan = await Channel.connect(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                if self._status(spec.id).get("state") == "start_failed":
                    raise DriverError(self._start_failure(spec.id)) from None
                if time.monotonic() > deadline:
                    raise DriverError(f"sandbox {spec.id}: holder did not come up") from None
                await asyncio.sleep(0.002)
        if spans is not None:
            spans.mark("holder")  # connected: the holder listens, runsc runs
        try:
            if restored:
                await self._wake_restored(spec, chan, deadline)
            else:
                await chan.wait_ready(max(deadline - time.monotonic(), 1.0))
            if spans is not None:
                spans.mark("agent")
        except (ChannelClosed, TimeoutError, OSError) as e:
            await chan.close()
            raise DriverError(f"{e}; {self._start_failure(spec.id)}") from None
        return chan

    async def _wake_restored(self, spec: SandboxSpec, chan: Channel, deadline: float) -> None:
        """Wait for the restored agent to answer. The agent polls with poll(2), which sees
        the new stdin that restore hands it; an agent checkpointed by an older Torpor (epoll)
        does not, until SIGHUP makes it register its fds again: the fallback, once the
        restore is done (the holder's status) and RESTORED_PING passed without an answer.
        The ping leaves at once: the holder hands it on as soon as `runsc restore` returns,
        with no poll of the status between them."""
        ping = asyncio.ensure_future(chan.ping(timeout=max(deadline - time.monotonic(), 1.0)))
        # a failed restore closes the channel (the holder exits): no fast poll needed, and
        # a 2 ms one took the server's share of the cores runsc restores with
        closed = asyncio.ensure_future(chan.closed.wait())
        running_at = None
        try:
            while True:
                await asyncio.wait({ping, closed}, timeout=0.025,
                                   return_when=asyncio.FIRST_COMPLETED)
                if ping.done():
                    ping.result()  # TimeoutError: not even by the deadline
                    return
                state = self._status(spec.id).get("state")
                if state == "start_failed" or chan.closed.is_set():
                    raise ChannelClosed("runsc restore failed")
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError("runsc restore did not finish in time")
                if state == "running":
                    running_at = running_at or now
                    if now - running_at > RESTORED_PING:
                        break
        finally:
            ping.cancel()
            closed.cancel()
        proc = await asyncio.create_subprocess_exec(
            *self.runsc_base(), "kill", spec.id, "HUP",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise ChannelClosed(f"runsc kill HUP failed: {err.decode().strip()}")
        await chan.ping(timeout=max(deadline - time.monotonic(), 1.0))

    # --- standby and hibernation ------------------------------------------------------
    def freeze(self, spec: SandboxSpec, frozen: bool) -> None:
        """Stop (or let go on) every task of the sandbox; memory stays resident."""
        self.cgroup(spec.id).freeze(frozen)

    def is_frozen(self, spec: SandboxSpec) -> bool:
        return self.cgroup(spec.id).frozen()

    def image_dir(self, sid: str) -> Path:
        return self.sandbox_dir(sid) / "image"

    def image_bytes(self, sid: str) -> int:
        d = self.image_dir(sid)
        return sum(f.stat().st_blocks * 512 for f in d.iterdir()) if d.is_dir() else 0

    async def checkpoint(self, spec: SandboxSpec) -> dict:
        """Checkpoint the sandbox to disk and stop it: no process is left on the host.
        Writes into a fresh directory and swaps it in only when complete, so a failed
        checkpoint (disk full, refusal) leaves the sandbox running and any older image."""
        final = self.image_dir(spec.id)
        tmp = final.with_name("image.new")
        shutil.rmtree(tmp, ignore_errors=True)
        self._remove_dropped(spec.id)
        tmp.mkdir(exist_ok=True)  # (exists only if it is a mount point of its own)
        # this runsc loses the sandbox when a checkpoint fails half-way (disk full): make
        # sure the image fits first. It is at most the memory in use (less if compressed).
        need = (self.cgroup(spec.id).memory_bytes() or 0) + CHECKPOINT_HEADROOM
        free = shutil.disk_usage(tmp).free
        if free < need:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DriverError(f"sandbox {spec.id}: not enough disk for its checkpoint image "
                                f"({free >> 20} MiB free, up to {need >> 20} MiB needed)")
        was_frozen = self.is_frozen(spec)
        if was_frozen:
            self.freeze(spec, False)  # runsc pauses it itself; a frozen sentry cannot answer
        self.cgroup(spec.id).set_cpu_limit(None)  # the sandbox's quota would slow runsc
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self.runsc_base(), "checkpoint", *self.checkpoint_flags, "--image-path",
            str(tmp), spec.id,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), CHECKPOINT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            err = f"runsc checkpoint took over {CHECKPOINT_TIMEOUT:.0f}s".encode()
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            self.cgroup(spec.id).set_cpu_limit(spec.cpu)
            if was_frozen:
                self.freeze(spec, True)  # back to standby, as it was
            raise DriverError(f"sandbox {spec.id}: checkpoint failed: "
                                f"{err.decode(errors='replace').strip()[-500:]}")
        seconds = time.monotonic() - t0
        await asyncio.to_thread(self._after_checkpoint, spec, tmp, final)
        return {"seconds": round(seconds, 3), "image_bytes": self.image_bytes(spec.id)}

    def _after_checkpoint(self, spec: SandboxSpec, tmp: Path, final: Path) -> None:
        # the container stopped; its holder exits when stdout closes. Clear runsc's record
        # so the id can be restored, and unmount the layer: a hibernated sandbox holds no
        # mount or loop device (the restore mounts it again, ~3 ms)
        subprocess.run(self.runsc_base() + ["delete", "--force", spec.id], check=False,
                       capture_output=True)
        try:
            self.layer(spec).unmount()
        except OSError as e:  # hibernated all the same; the next restore or delete retries
            log.warning("sandbox %s: hibernated, but its layer stays mounted: %s", spec.id, e)
        old = final.with_name("image.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        self.cgroup(spec.id).remove()

    async def restore(self, spec: SandboxSpec, spans: Spans | None = None) -> Channel:
        """Start a hibernated sandbox from its image. The image is kept: the caller removes
        it (`drop_image`) once the sandbox answered. Its spans go to `resume.json` (those of
        a start from a boot snapshot, begun by the caller, to `start.json`)."""
        name = "resume.json" if spans is None else "start.json"
        spans = spans or Spans()
        img = self.image_dir(spec.id)
        if not (img / "checkpoint.img").is_file():
            raise DriverError(f"sandbox {spec.id}: its checkpoint image is missing ({img})")
        await asyncio.to_thread(self.layer(spec).mount)
        await asyncio.to_thread(self._mount_storage, spec)
        spans.mark("mount")
        if any(self.state_dir.glob(f"*{spec.id}*")):
            # runsc still has a record of it (the server died between checkpoint and delete)
            await asyncio.to_thread(subprocess.run,
                                    self.runsc_base() + ["delete", "--force", spec.id],
                                    check=False, capture_output=True)
        config = json.loads((self.sandbox_dir(spec.id) / "config.json").read_text())
        cmd = self.runsc_base() + root_flags(config) + [
            "restore", "--detach", "--image-path", str(img),
            "--bundle", str(self.sandbox_dir(spec.id)), spec.id]
        try:
            chan = await self._start_holder(spec, cmd, restored=True, spans=spans)
        except (DriverError, OSError):
            # leave nothing of the attempt running or mounted; the image is kept (the
            # caller records the failure)
            await asyncio.to_thread(self.stop, spec)
            raise
        self.cgroup(spec.id).set_cpu_limit(spec.cpu)
        spans.mark("cpu_limit")
        spans.save(self.sandbox_dir(spec.id) / name, self._status(spec.id))
        return chan

    # --- templates: layers and boot snapshots ------------------------------------------
    def capture(self, spec: SandboxSpec, dest: Path) -> None:
        """Stop the sandbox and copy what it changed on its disk into dest/{root,usr}: a
        template's layer (see Layer.export_changes)."""
        self.stop(spec)
        self.layer(spec).export_changes(dest)

    def snapshot_live(self, spec: SandboxSpec, dest: Path, memory: bool) -> dict:
        """Snapshot a live sandbox into `dest`, which runs on (see runtime/snapshot.py)."""
        return live_snapshot(self, spec, dest, memory)

    def export_snapshot(self, spec: SandboxSpec, dest: Path) -> None:
        """Keep a checkpointed sandbox as a boot snapshot in `dest`: its disk, its image and
        its OCI spec (with the id it had, for `start_from_snapshot` to replace)."""
        img = self.image_dir(spec.id)
        if not (img / "checkpoint.img").is_file():
            raise DriverError(f"sandbox {spec.id}: no checkpoint image to keep ({img})")
        dest.mkdir(parents=True)
        d = self.sandbox_dir(spec.id)
        self.layer(spec).unmount()
        subprocess.run(["cp", "--sparse=always", "--", str(d / "disk.img"),
                        str(dest / "disk.img")], check=True, capture_output=True)
        os.rename(img, dest / "image")
        (dest / "snapshot.json").write_text(json.dumps({"id": spec.id}))
        shutil.copy2(d / "config.json", dest / "config.json")

    async def start_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> Channel:
        """Start a sandbox as a copy of a boot snapshot: its own disk (a sparse copy of the
        snapshot's), restored from the snapshot's image (hard links: nothing copied), so
        its processes run as they were when the snapshot was taken. The caller calls
        `drop_image` once it answered."""
        spans = Spans()
        old = json.loads((snapshot / "snapshot.json").read_text())["id"]
        d = self.sandbox_dir(spec.id)
        d.mkdir(parents=True)

        def prepare() -> None:
            # its own disk: a copy made ahead (the stock's), else one made now
            if not self.disks.take(snapshot / "disk.img", d / "disk.img"):
                copy_sparse(snapshot / "disk.img", d / "disk.img")
            spans.mark("disk")
            (d / "image").mkdir()
            for f in (snapshot / "image").iterdir():
                os.link(f, d / "image" / f.name)
            (d / "config.json").write_text(
                (snapshot / "config.json").read_text().replace(old, spec.id))
            self._storage_into(d / "config.json", spec)
            spans.mark("image")
        try:
            await asyncio.to_thread(prepare)
        except OSError as e:
            self.disks.refill()
            raise DriverError(f"sandbox {spec.id}: could not copy the boot snapshot "
                              f"({snapshot}): {e}") from None
        try:
            return await self.restore(spec, spans)
        finally:
            self.disks.refill()  # the next start's copy, made once this one is done

    def drop_image(self, sid: str) -> None:
        """Remove the image of a sandbox that resumed. It is renamed away at once (the next
        hibernation writes a fresh one) and deleted in a thread: unlinking an uncompressed
        image of 256 MiB takes ~15 ms, which a waking request need not wait for. (What a
        thread did not finish, the next hibernation or the delete removes.)"""
        gone = self.sandbox_dir(sid) / f"image.dropped-{time.monotonic_ns()}"
        try:
            os.rename(self.image_dir(sid), gone)
        except FileNotFoundError:
            return
        threading.Thread(target=shutil.rmtree, args=(gone,), kwargs={"ignore_errors": True},
                         name=f"drop-image-{sid}", daemon=True).start()

    def _remove_dropped(self, sid: str) -> None:
        """What a drop_image thread left (the server stopped before it finished)."""
        for old in self.sandbox_dir(sid).glob("image.dropped-*"):
            shutil.rmtree(old, ignore_errors=True)

    def _launch_holder(self, d: Path) -> subprocess.Popen:
        """A holder for the sandbox in `d`: the spare one, started ahead of need, when it is
        alive (it then skips Python's start, ~25 ms of every start and restore), else a new
        one. `_replenish_spare` starts the next spare."""
        spare, self._spare = self._spare, None
        holder = None
        if spare is not None and spare.poll() is None:
            try:
                spare.stdin.write(f"{d / 'holder.json'}\n".encode())
                spare.stdin.close()
                holder = spare
            except OSError:  # it died meanwhile: a new one does the work
                spare.kill()
                self._holders[spare.pid] = spare
        if holder is None:
            with open(d / "holder.log", "ab") as log:
                holder = _popen_holder(str(d / "holder.json"), d, subprocess.DEVNULL, log)
        return holder

    def _replenish_spare(self) -> None:
        """A spare holder for the next start or restore, unless one waits already."""
        if self._spare is not None and self._spare.poll() is None:
            return
        # until it is given work the spare's output goes nowhere; then to its holder.log
        self._spare = _popen_holder("--spare", self.sandboxes_dir, subprocess.PIPE,
                                    subprocess.DEVNULL)

    def reap(self) -> None:
        """Collect holders that exited (they are the server's children until it dies). One
        waitid() peek finds whether any child exited (no Python work per holder; the kernel
        walks the children, ~0.1 ms with 500); a pass over them only when some child did."""
        while True:  # every holder that exited, not one a call: many go at once
            try:
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no child at all
                return
            if exited is None:
                return
            holder = self._holders.pop(exited.si_pid, None)
            if holder is None and self._spare is not None and self._spare.pid == exited.si_pid:
                holder = self._spare  # a spare that died: the next start replaces it
            if holder is None:
                # another child (a runsc its caller waits for, which the peek would show
                # again): check the holders in case one exited behind it
                for pid, proc in list(self._holders.items()):
                    if proc.poll() is not None:
                        del self._holders[pid]
                return
            if holder.poll() is None:  # reaped by someone else meanwhile
                return

    def close(self) -> None:
        """Let the spare holder go (it exits at the end of its stdin) and stop making blank
        disks (those made stay for the next server); sandboxes and their holders are not
        touched."""
        self.disks.close()
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                spare.stdin.close()
            except OSError:
                pass
            try:
                spare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                spare.kill()
                spare.wait()

    def _status(self, sid: str) -> dict:
        try:
            return json.loads((self.sandbox_dir(sid) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def _start_failure(self, sid: str) -> str:
        d = self.sandbox_dir(sid)
        tail = ""
        for name in ("agent.log", "holder.log"):
            try:
                text = (d / name).read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                tail += f" [{name}: {text[-600:]}]"
        return f"sandbox {sid} failed to start (runsc {self.version}){tail}"

    async def adopt(self, spec: SandboxSpec, ping: bool = True) -> Channel:
        st = self._status(spec.id)
        if st.get("state") != "running":
            raise DriverError(f"sandbox {spec.id}: holder reports {st.get('state', 'nothing')}")
        pid = st.get("holder_pid")
        if not pid or not _alive(pid):
            raise DriverError(f"sandbox {spec.id}: its holder process is gone")
        # its disk, mounted before the channel is used (a no-op if it still is)
        await asyncio.to_thread(self.layer(spec).mount)
        await asyncio.to_thread(self._mount_storage, spec)
        try:
            chan = await Channel.connect(self.socket_path(spec.id))
            if ping:
                await chan.ping(timeout=10)
        except (OSError, ChannelClosed, TimeoutError) as e:
            raise DriverError(f"sandbox {spec.id}: agent does not answer ({e})") from None
        return chan

    async def destroy(self, spec: SandboxSpec) -> None:
        await asyncio.to_thread(self._destroy_sync, spec)

    def _destroy_sync(self, spec: SandboxSpec) -> None:
        self.stop(spec)
        self.layer(spec).destroy()
        try:
            os.unlink(self.socket_path(spec.id))
        except FileNotFoundError:
            pass

    def stop(self, spec: SandboxSpec) -> None:
        """Stop the container and its holder, unmount the layer, keep the disk image."""
        try:
            if self.is_frozen(spec):
                self.freeze(spec, False)  # frozen tasks would not die until thawed
        except OSError:
            pass
        subprocess.run(self.runsc_base() + ["delete", "--force", spec.id],
                       check=False, capture_output=True)
        pid = self._status(spec.id).get("holder_pid")
        if pid and _alive(pid):
            # it exits by itself once the container's stdout closes; do not wait long
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.01)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.layer(spec).unmount()
        self.cgroup(spec.id).remove()

    # --- volumes and drives -------------------------------------------------------------
    def storage_mounts(self, spec: SandboxSpec) -> list[dict]:
        """The OCI mounts of the sandbox's volumes and of its /drives (see volumes.py)."""
        out = [{"destination": "/drives", "type": "bind",
                "source": str(drives_dir(self.sandbox_dir(spec.id))),
                "options": ["rbind", "rw", "rslave", "nosuid", "nodev"]}]
        for v in spec.volumes:
            out.append({"destination": v.dest, "type": "bind",
                        "source": str(self.volumes.mnt(v.volume)),
                        "options": ["rbind", "ro" if v.read_only else "rw", "nosuid",
                                    "nodev"]})
        return out

    def _storage_into(self, config_path: Path, spec: SandboxSpec) -> None:
        """A boot snapshot's spec with this sandbox's volumes (and /drives, which one made
        before drives lacks): runsc restores a checkpoint with mounts added (measured)."""
        config = json.loads(config_path.read_text())
        mine = self.storage_mounts(spec)
        dests = {m["destination"] for m in mine}
        theirs = str(self.volumes.root) + "/"  # the volumes of the snapshot's sandbox
        config["mounts"] = [m for m in config["mounts"]
                            if m["destination"] not in dests
                            and not str(m.get("source", "")).startswith(theirs)] + mine
        config_path.write_text(json.dumps(config))

    def _mount_storage(self, spec: SandboxSpec) -> None:
        """Mount what the sandbox's volumes and drives need on the host (idempotent)."""
        try:
            for v in spec.volumes:
                self.volumes.mount(v.volume)
            setup_drives(self.sandbox_dir(spec.id),
                         {name: self.volumes.mount(vid) for name, vid in spec.drives.items()})
        except OSError as e:
            raise DriverError(f"sandbox {spec.id}: mounting its volumes: {e}") from None

    def _has_drives(self, sid: str) -> bool:
        try:
            config = json.loads((self.sandbox_dir(sid) / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return any(m.get("destination") == "/drives" for m in config.get("mounts", []))

    def create_volume(self, vid: str, size_mb: int) -> None:
        try:
            self.volumes.create(vid, size_mb)
        except OSError as e:
            raise DriverError(f"volume {vid}: could not be made: {e}") from None

    def volume_path(self, vid: str) -> Path:
        try:
            return self.volumes.mount(vid)
        except OSError as e:
            raise DriverError(f"volume {vid}: could not be mounted: {e}") from None

    def volume_usage(self, vid: str) -> dict:
        try:
            return self.volumes.usage(vid)
        except OSError as e:
            raise DriverError(f"volume {vid}: {e}") from None

    def volume_space(self) -> int:
        return self.volumes.free_bytes()

    def release_volume(self, vid: str) -> None:
        try:
            self.volumes.unmount(vid)
        except OSError as e:
            log.warning("volume %s stays mounted: %s", vid, e)

    def delete_volume(self, vid: str) -> None:
        try:
            self.volumes.delete(vid)
        except OSError as e:
            raise DriverError(f"volume {vid}: could not be removed: {e}") from None

    def attach_drive(self, spec: SandboxSpec, name: str, vid: str) -> None:
        if not self._has_drives(spec.id):
            raise DriverError(f"sandbox {spec.id} was started before drives existed (it has "
                              "no /drives): drives attach to sandboxes created since")
        try:
            setup_drives(self.sandbox_dir(spec.id), {})
            attach_drive(self.sandbox_dir(spec.id), name, self.volumes.mount(vid))
        except OSError as e:
            raise DriverError(f"sandbox {spec.id}: attaching drive {vid} at /drives/{name} "
                              f"failed: {e}") from None
        spec.drives[name] = vid

    def detach_drive(self, spec: SandboxSpec, name: str) -> None:
        try:
            detach_drive(self.sandbox_dir(spec.id), name)
        except (OSError, StorageError) as e:
            raise DriverError(f"sandbox {spec.id}: detaching /drives/{name} failed: "
                              f"{e}") from None
        spec.drives.pop(name, None)

    def usage(self, spec: SandboxSpec) -> Usage:
        cg = self.cgroup(spec.id)
        return Usage(cpu_seconds=cg.cpu_seconds(), memory_bytes=cg.memory_bytes(),
                     oom_kills=cg.oom_kills())

    def load(self, spec: SandboxSpec) -> Load:
        cg = self.cgroup(spec.id)
        return Load(tasks=cg.tasks(), memory_charged=cg.memory_charged())

    def memory_in_use(self, spec: SandboxSpec) -> int | None:
        used = self.cgroup(spec.id).memory_bytes()
        # a snapshot's image on the tmpfs is charged to it for a moment (runtime/snapshot.py)
        return None if used is None else max(used - staged_bytes(spec.id), 0)

    def memory_alert(self, spec: SandboxSpec, threshold: int) -> int | None:
        return self.cgroup(spec.id).memory_alert(threshold)

    def limits(self, spec: SandboxSpec) -> Limits:
        # runsc has no guest OOM killer here: past the cgroup's hard limit the host kills
        # the whole sentry, so the engine stops the largest process before that (soft)
        return Limits(soft_memory_bytes=(spec.memory_mb + SENTRY_OVERHEAD_MB // 2) << 20,
                      tasks=spec.pids * HOST_THREADS_PER_PROCESS + PIDS_OVERHEAD)

    def disk_bytes(self, spec: SandboxSpec) -> int:
        return self.layer(spec).disk_bytes() + self.image_bytes(spec.id)

    def release(self, spec: SandboxSpec) -> None:
        """A hibernated sandbox holds no mount or loop device (an older server, or one
        killed mid-hibernation, left its layer mounted)."""
        self.layer(spec).unmount()

    def describe(self) -> dict:
        return {"driver": self.name, "runsc": self.runsc, "version": self.version,
                "platform": self.platform}

    def checkpoint_refusal(self, problem: dict) -> str:
        who = f"process {problem.get('pid')} ({problem.get('cmdline', '')[:80]})"
        if problem.get("kind") == "epoll_socket":
            return (f"{who} waits on TCP/UDP sockets with epoll (an event-loop server or "
                    f"client), which runsc {self.version} cannot checkpoint. Stop it, or keep "
                    "the sandbox in standby")
        if "path" in problem:
            return (f"{who} holds {problem.get('path')}, a file deleted while open on disk, "
                    f"which runsc {self.version} cannot checkpoint. Close it, or keep such "
                    "files in /tmp or /dev/shm (memory)")
        return str(problem.get("error", "the check failed"))

    def leftovers(self, sid: str) -> list[str]:
        out = []
        if (self.state_dir / sid).exists() or any(self.state_dir.glob(f"{sid}*")):
            out.append(f"runsc state for {sid}")
        with open("/proc/self/mounts") as f:
            out += [f"mount {line.split()[1]}" for line in f if sid in line.split()[1]]
        out += [f"cgroup {p}" for p in self.cgroup(sid).leftovers()]
        if self.sandbox_dir(sid).exists():
            out.append(f"directory {self.sandbox_dir(sid)}")
        if os.path.exists(self.socket_path(sid)):
            out.append(f"socket {self.socket_path(sid)}")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if sid.encode() in cmd:
                shown = cmd.replace(b"\0", b" ")[:120]
                out.append(f"process {pid}: {shown!r}")
        return out


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (a killed holder whose parent, the
    server that started it, is gone stays a zombie until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def purge(data_dir: Path, runsc: str = "runsc") -> list[str]:
    """Stop every sandbox under a data dir and undo its mounts and holders: the operator's
    last resort (and the test suite's teardown). Returns what it removed."""
    data_dir = Path(data_dir).resolve()
    done = []
    # a frozen sandbox (standby) cannot die: `runsc delete --force` waited for it forever
    for sdir in data_dir.glob("sandboxes/*"):
        cg = Cgroup(f"/torpor/{sdir.name}")
        try:
            if cg.frozen():
                cg.freeze(False)
                done.append(f"thawed {sdir.name}")
        except OSError:
            pass
    state = data_dir / "runsc"
    if state.is_dir():
        p = subprocess.run([runsc, "--root", str(state), "list", "--quiet"], check=False,
                           capture_output=True, text=True)
        for cid in p.stdout.split():
            subprocess.run([runsc, "--root", str(state), "delete", "--force", cid],
                           check=False, capture_output=True)
            done.append(f"container {cid}")
    for status in data_dir.glob("sandboxes/*/status.json"):
        try:
            pid = json.loads(status.read_text()).get("holder_pid")
        except (OSError, ValueError):
            continue
        if pid and _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                done.append(f"holder {pid}")
            except ProcessLookupError:
                pass
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f]
    for m in reversed(mounts):
        if m.startswith(str(data_dir) + "/"):
            subprocess.run(["umount", "-l", m], check=False, capture_output=True)
            done.append(f"mount {m}")
    for sdir in data_dir.glob("sandboxes/*"):
        Cgroup(f"/torpor/{sdir.name}").remove()
    # blank disk images made ahead (DiskStock): plain files, not worth reporting
    shutil.rmtree(data_dir / "disks", ignore_errors=True)
    if stage_dir(data_dir).exists():  # snapshot images on the tmpfs (memory)
        shutil.rmtree(stage_dir(data_dir), ignore_errors=True)
        done.append(f"snapshot images in {stage_dir(data_dir)}")
    return done
