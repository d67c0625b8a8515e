"""Standby benchmark: hot standby (frozen, memory resident), hibernation (checkpoint to
disk), wake on request and density of parked sandboxes, each beside what plain runsc (or
the kernel's freezer) does on the same machine in the same run.

Starts its own `torpor serve --pool-size 0` (fresh data dir under /tmp) and drives it with
httpx on one long-lived client. The sandboxes of the first three sections share one
workload: a Python process holding 256 MiB of touched memory (a bytearray, one byte written
in every 4 KiB page; `--fill random` writes every byte, incompressibly) and an HTTP server
thread on 127.0.0.1:8000 inside the sandbox; it writes /tmp/hold.json (len, checksum at
start, a sample byte, a counter) every second. Sandboxes are created with
`standby_after=0, hibernate_after=0` (no automatic timers). Sections (`--only a,b`):

  hot        `echo ok` on a running sandbox (baseline); then cycles of POST /standby, 50 ms
             frozen, POST /commands `echo ok` (the request wakes it): latency of both;
             then the same cycles streamed, to the first stdout event (the target's
             "first output"), beside a running sandbox left idle 50 ms, 2x as many
             cycles, each with http.client (stdlib: the target's figure) and with httpx
             (the SDK's client, more Python of its own per request) in turn.
             Raw: FROZEN/THAWED written straight to the sandbox's freezer cgroup (behind the
             server's back), and `echo ok` right after the thaw; and a raw runsc container
             (same memory, same CPU quota) whose process spawns `sh -c 'echo ok'` for each
             line on its stdin: freeze, 50 ms, thaw + a line, to its first output (no
             server, holder or agent). Also /usage cpu_seconds over 10 s running vs 10 s in
             standby.
  hibernate  cycles of POST /hibernate (latency; events: detail.seconds = runsc checkpoint,
             detail.image_bytes) and deep resume: POST /resume then `echo ok`; host
             processes naming the sandbox while hibernated; then the 256 MiB are checked
             (sha256 now == at start, through the in-sandbox HTTP server) and the writer's
             counter must have moved; then as many cycles with the image evicted from the
             page cache before the resume (fsync + POSIX_FADV_DONTNEED on its files: a
             resume after a long sleep). Raw, interleaved: `runsc checkpoint` /
             `runsc delete` / `runsc restore --detach` of a plain container (minimal
             bundle, host /usr read-only) whose python holds the same 256 MiB and answers a
             line on stdin; restore to first answer; and the same container again with
             linux.cgroupsPath and the sandbox's CFS quota (cpu=1.0) in its spec, as
             Torpor's spec has (runsc's own work is throttled by it). Plus the CLI costs
             the server pays around a restore (runsc delete of a gone id, runsc kill, a
             holder's python).
  wake       standby -> hibernate (the idle path), then `echo ok` straight on the
             hibernated sandbox, as a client sees it; breakdown per cycle from the events
             (resume duration_ms), the holder's status (runsc restore --detach seconds) and
             the rest (HTTP, database, the command). Checks the memory again.
  density    N sandboxes (`--density`, default 200; idle agents, default resources) created
             at concurrency 3 and answering `echo ok`; the server's CPU over 60 s before
             any exists (its own idle floor); host CPU over 20 s running idle and over 60 s
             in standby (their cgroups' cpuacct, their host processes' utime+stime incl.
             holders, the server, /proc/stat for the whole host); all hibernated:
             MemAvailable drop vs before they were created / N, host processes whose
             cmdline names a sandbox (PSS), cgroups, mounts and loop devices left, kernel
             slab (Slab, SUnreclaim) grown per sandbox, images on disk, then the server's
             CPU over 60 s with all hibernated; then all but 5 deleted (MemAvailable read
             again: what the hibernated ones held), the 5 woken with `echo ok` and deleted. Creation stops after --density-budget
             seconds; N is reported as made. Hibernations run at concurrency 3 from
             standby; a `runsc checkpoint` stuck on a FROZEN cgroup (a race in the server)
             is thawed by the bench after --unstick-after seconds and reported.

Prints one JSON object to stdout (and writes bench/results/standby.json on a full run, or
--out FILE), then a table to stderr. Progress goes to stderr.

    .venv/bin/python bench/standby.py                 # full run, ~10 minutes
    .venv/bin/python bench/standby.py --quick         # fewer cycles, 10 sandboxes
    .venv/bin/python bench/standby.py --only hot,wake

Needs root and runsc (ptrace platform). No timed assertions: targets are reported, not
enforced. Everything it starts is deleted at the end, also on failure (purge of its data
dir, raw containers deleted).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import httpx
from common import (
    VENV_BIN,
    Server,
    avail_mib,
    default_out,
    finish,
    machine,
    meminfo,
    ms_since,
    orphan_reap_ms,
    pct,
    processes,
    render_rows,
    reproduce_cmd,
    rollup_kib,
    run_sections,
    sandbox_processes,
    say,
    stats,
    stop_on_sigterm,
    vm_rss_kib,
)

from torpor.config import Settings
from torpor.runtime.cgroups import Cgroup, is_v2
from torpor.runtime.gvisor import checkpoint_flags

SECTIONS = ["hot", "hibernate", "wake", "density"]
TARGETS = {  # reported beside the figures, never asserted
    "hot.resume_first_output_ms.p50": ("<=", 10),
    "hot.resume_first_output_ms.p99": ("<=", 25),
    "hibernate.deep_resume_echo_ms.p50": ("<=", 400),
    "wake.total_ms.p50": ("<=", 400),
    "density.hibernated.mem_available_drop_per_sandbox_mib": ("<=", 5),
}
RUNSC = shutil.which("runsc") or "/usr/bin/runsc"
PLATFORM = "ptrace"
# raw checkpoints write the image format the server writes (TORPOR_IMAGE_COMPRESSION or
# its default), so the raw column compares like with like
RAW_CHECKPOINT = checkpoint_flags(RUNSC, os.environ.get("TORPOR_IMAGE_COMPRESSION",
                                                        Settings.image_compression))
MIB = 1 << 20
HOLD_MIB = 256
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stats99(samples: list[float], nd: int = 2) -> dict:
    out = stats(samples, nd)
    if samples:
        out["p99"] = round(pct(sorted(samples), 99), nd)
    return out


# --- the workload ----------------------------------------------------------------------
def fill_code(fill: str) -> str:
    """Python that makes `b`: HOLD_MIB MiB, every page touched."""
    if fill == "random":  # every byte written; a 1 MiB random block repeated (flate's
        # 32 KiB window cannot find the repeats, so the image does not compress)
        return (f"N = {HOLD_MIB} << 20\n"
                "b = bytearray(os.urandom(1 << 20)) * (N >> 20)\n")
    return (f"N = {HOLD_MIB} << 20\n"
            "b = bytearray(N)\n"
            "for i in range(0, N, 4096):\n"
            "    b[i] = (i >> 12) % 251 + 1\n")


def hold_program(fill: str) -> str:
    """The sandbox's long-lived process: the memory, an HTTP server thread on
    127.0.0.1:8000 answering {len, sha256_at_start, sha256_now}, and /tmp/hold.json
    rewritten every second."""
    return ("import hashlib, http.server, json, os, threading, time\n"
            + fill_code(fill) +
            "h0 = hashlib.sha256(b).hexdigest()\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        body = json.dumps({'len': len(b), 'sha256_at_start': h0,\n"
            "                           'sha256_now': hashlib.sha256(b).hexdigest()}).encode()\n"
            "        self.send_response(200)\n"
            "        self.send_header('Content-Length', str(len(body)))\n"
            "        self.end_headers()\n"
            "        self.wfile.write(body)\n"
            "    def log_message(self, *a):\n"
            "        pass\n"
            "srv = http.server.ThreadingHTTPServer(('127.0.0.1', 8000), H)\n"
            "threading.Thread(target=srv.serve_forever, daemon=True).start()\n"
            "n = 0\n"
            "while True:\n"
            "    n += 1\n"
            "    with open('/tmp/hold.tmp', 'w') as f:\n"
            "        json.dump({'len': len(b), 'sha256_at_start': h0, 'sample': b[4096 * 1000],\n"
            "                   'n': n, 't': time.time()}, f)\n"
            "    os.replace('/tmp/hold.tmp', '/tmp/hold.json')\n"
            "    time.sleep(1)\n")


def raw_program(fill: str) -> str:
    """The raw container's process: the same memory; a line on stdin gets a JSON line back
    (`check` hashes the memory again)."""
    return ("import hashlib, json, os, sys\n"
            + fill_code(fill) +
            "h0 = hashlib.sha256(b).hexdigest()\n"
            "print(json.dumps({'ready': 1, 'len': len(b)}), flush=True)\n"
            "n = 0\n"
            "for line in sys.stdin:\n"
            "    n += 1\n"
            "    out = {'len': len(b), 'sample': b[4096 * 1000], 'n': n}\n"
            "    if line.startswith('check'):\n"
            "        out['intact'] = hashlib.sha256(b).hexdigest() == h0\n"
            "    print(json.dumps(out), flush=True)\n")


def raw_spawner_program(fill: str) -> str:
    """The raw hot-resume container's process: the same memory; each line on stdin spawns
    `/bin/sh -c 'echo ok'` (posix_spawn, stdout to a pipe) and its first output goes back
    on stdout at once, then `done` once it has exited. What an agent does for a command,
    with no server, holder, channel or protocol around it."""
    return ("import os, sys\n"
            + fill_code(fill) +
            "print('{\"ready\": 1}', flush=True)\n"
            "for line in sys.stdin:\n"
            "    r, w = os.pipe()\n"
            "    pid = os.posix_spawn('/bin/sh', ['sh', '-c', 'echo ok'], dict(os.environ),\n"
            "                         file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)])\n"
            "    os.close(w)\n"
            "    sys.stdout.write(os.read(r, 4096).decode())\n"
            "    sys.stdout.flush()\n"
            "    while os.read(r, 4096):\n"
            "        pass\n"
            "    os.close(r)\n"
            "    os.waitpid(pid, 0)\n"
            "    print('done', flush=True)\n")


HTTP_CHECK = ("import urllib.request; print(urllib.request.urlopen("
              "'http://127.0.0.1:8000/', timeout=60).read().decode())")


# --- our server, from this worktree -----------------------------------------------------
class WtServer(Server):
    """common.Server, but started as `python -c "from torpor.cli.main import app; app()"`
    from ROOT, so that this checkout's torpor package is the one imported (the venv's
    `torpor` script would import whatever the editable install points at)."""

    def __init__(self, data_dir: str, pool_size: int = 0):
        super().__init__(data_dir, pool_size)
        self.argv = [str(VENV_BIN / "python"), "-c",
                     "from torpor.cli.main import app; app()", "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), "--data-dir", str(self.data_dir),
                     "--pool-size", str(pool_size)]


def freeze_raw(cg: Cgroup, frozen: bool) -> Path:
    """Write the cgroup's freezer directly (one open, write, close); returns its file."""
    if is_v2():
        state_file, value = cg._path("") / "cgroup.freeze", b"1" if frozen else b"0"
    else:
        state_file = cg._path("freezer") / "freezer.state"
        value = b"FROZEN" if frozen else b"THAWED"
    fd = os.open(state_file, os.O_WRONLY)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)
    return state_file


def wait_frozen(state_file: Path, t0: float) -> None:
    want = "1" if state_file.name == "cgroup.freeze" else "FROZEN"
    while state_file.read_text().strip() != want:
        if ms_since(t0) > 5000:
            raise RuntimeError(f"{state_file} did not read {want} in 5 s")


def evict(directory: Path) -> None:
    """Drop a directory's files from the page cache (written back first), as the kernel
    does with files unused for long; only these files, not the whole cache."""
    for f in directory.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def host_cpu() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    total = sum(vals[:8])  # guest time is already in user/nice
    idle = vals[3] + vals[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def dir_bytes(d: Path) -> int:
    """Bytes allocated on disk under d, not crossing into other file systems (a sandbox's
    directory holds its mounted layer)."""
    try:
        dev = os.lstat(d).st_dev
    except OSError:
        return 0
    n = 0
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if os.lstat(os.path.join(root, x)).st_dev == dev]
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if st.st_dev == dev:
                n += st.st_blocks * 512
    return n


def mounts_under(prefix: str) -> int:
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f if line.split()[1].startswith(prefix))


def loops_under(prefix: str) -> int:
    """Loop devices whose backing file lies under prefix."""
    n = 0
    for dev in Path("/sys/block").glob("loop*"):
        try:
            n += (dev / "loop" / "backing_file").read_text().startswith(prefix)
        except OSError:
            pass
    return n


class Unsticker:
    """While hibernations run: a `runsc checkpoint` of one of our sandboxes that has been
    running longer than `after` seconds while the sandbox's freezer cgroup reads FROZEN is
    waiting on a frozen sentry and would wait until the server's checkpoint timeout. Such a
    cgroup is thawed (and recorded), so the benchmark goes on; see the report."""

    def __init__(self, data_dir: Path, after: float):
        self.marker = str(data_dir).encode()
        self.after = after
        self.first_seen: dict[int, tuple[str, float]] = {}
        self.handled: set[int] = set()
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            t = time.monotonic()
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                argv = cmd.split(b"\0")
                if (b"checkpoint" not in argv or self.marker not in cmd
                        or not argv[0].endswith(b"runsc")):
                    continue
                pid = int(d)
                sid = argv[-2].decode() if argv[-1] == b"" else argv[-1].decode()
                _, t0 = self.first_seen.setdefault(pid, (sid, t))
                if pid in self.handled or t - t0 < self.after:
                    continue
                cg = Cgroup(f"/torpor/{sid}")
                state = "FROZEN" if cg.frozen() else "not frozen"
                if cg.frozen():
                    cg.freeze(False)
                    self.handled.add(pid)
                    self.events.append({"sandbox": sid, "checkpoint_running_s": round(t - t0, 1),
                                        "freezer": state, "action": "thawed by the bench"})
                    say(f"  STALL: runsc checkpoint of {sid} running {t - t0:.0f} s with its "
                        "cgroup FROZEN: thawed it")
                elif t - t0 > 4 * self.after:
                    self.handled.add(pid)
                    self.events.append({"sandbox": sid, "checkpoint_running_s": round(t - t0, 1),
                                        "freezer": state, "action": "none (not frozen)"})

    def __enter__(self):
        if self.after > 0:
            self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._t.is_alive():
            self._t.join()


class Bench:
    def __init__(self, args):
        self.args = args
        self.base = f"/tmp/tsb{os.getpid()}"
        self.srv: WtServer | None = None
        self.http: httpx.Client | None = None
        self.lean_http: http.client.HTTPConnection | None = None
        self.live: set[str] = set()
        self.work: str | None = None
        self.work_fill: str | None = None
        self.raw_dir = Path(self.base + "raw")
        self.raw_n = 0
        # the server's image format (it inherits this environment)
        self.image_compression = os.environ.get("TORPOR_IMAGE_COMPRESSION",
                                                Settings.image_compression)

    # --- server and API ---------------------------------------------------------------
    def server(self) -> WtServer:
        if self.srv is None:
            say("starting torpor serve --pool-size 0 (from this worktree)")
            self.srv = WtServer(self.base + "a", 0).start()
            self.http = httpx.Client(base_url=self.srv.url, timeout=300,
                                     headers={"Authorization": f"Bearer {self.srv.api_key}"})
        return self.srv

    @property
    def c(self) -> httpx.Client:
        self.server()
        assert self.http is not None
        return self.http

    def post(self, path: str, **kw) -> httpx.Response:
        r = self.c.post(path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:500]}")
        return r

    def create(self, **kw) -> str:
        body = {"standby_after": 0, "hibernate_after": 0} | kw
        sid = self.post("/v1/sandboxes", json=body).json()["id"]
        self.live.add(sid)
        return sid

    def delete(self, sid: str) -> None:
        r = self.c.delete(f"/v1/sandboxes/{sid}")
        if r.status_code not in (204, 404):
            raise RuntimeError(f"DELETE {sid}: {r.status_code} {r.text[:300]}")
        self.live.discard(sid)

    def run(self, sid: str, cmd: str | None = None, argv: list[str] | None = None) -> dict:
        body = {"cmd": cmd} if cmd is not None else {"argv": argv}
        return self.post(f"/v1/sandboxes/{sid}/commands", json=body).json()

    def echo(self, sid: str) -> tuple[float, bool]:
        t0 = time.perf_counter()
        r = self.run(sid, "echo ok")
        return ms_since(t0), r.get("stdout") == "ok\n" and r.get("exit_code") == 0

    def first_output(self, sid: str, lean: bool = False) -> tuple[float, bool]:
        """`echo ok` streamed (NDJSON): ms until its first stdout event reaches us (the
        issue's "first output of a command"), and whether the whole stream was right.
        `lean`: through http.client (the standard library's HTTP/1.1 client, one kept-alive
        connection) rather than httpx (the SDK's client), which runs more Python of its
        own per request (0.7 ms more against a trivial loopback server here)."""
        path = f"/v1/sandboxes/{sid}/commands"
        payload = {"cmd": "echo ok", "stream": True}
        if not lean:
            t0 = time.perf_counter()
            with self.c.stream("POST", path, json=payload) as r:
                return self._first_output(t0, r.iter_lines())
        srv = self.server()
        if self.lean_http is None:
            self.lean_http = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
        headers = {"Authorization": f"Bearer {srv.api_key}", "Content-Type": "application/json"}
        t0 = time.perf_counter()
        self.lean_http.request("POST", path, body=json.dumps(payload), headers=headers)
        r = self.lean_http.getresponse()
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status} {r.read()[:300]!r}")
        return self._first_output(t0, (line.decode() for line in iter(r.readline, b"")))

    @staticmethod
    def _first_output(t0: float, lines) -> tuple[float, bool]:
        first, out, code = None, "", None
        for line in lines:
            if not line.strip():
                continue
            ev = json.loads(line)
            if ev["type"] == "stdout":
                if first is None:
                    first = ms_since(t0)
                out += ev["data"]
            elif ev["type"] == "exit":
                code = ev["exit_code"]
        return (first if first is not None else ms_since(t0)), out == "ok\n" and code == 0

    def state(self, sid: str) -> str:
        return self.c.get(f"/v1/sandboxes/{sid}").json()["state"]

    def events(self, sid: str) -> list[dict]:
        return self.c.get(f"/v1/sandboxes/{sid}/events").json()

    def last_state_event(self, sid: str, to: str, frm: str | None = None) -> dict:
        for e in reversed(self.events(sid)):
            if e["kind"] == "state" and e["to_state"] == to and (
                    frm is None or e["from_state"] == frm):
                return e
        return {}

    def usage_cpu(self, sid: str) -> float:
        return self.c.get(f"/v1/sandboxes/{sid}/usage").json()["cpu_seconds"]

    def holder_status(self, sid: str) -> dict:
        assert self.srv is not None
        try:
            return json.loads((self.srv.data_dir / "sandboxes" / sid / "status.json")
                              .read_text())
        except (OSError, ValueError):
            return {}

    def unsticker(self) -> Unsticker:
        assert self.srv is not None
        return Unsticker(self.srv.data_dir, self.args.unstick_after)

    def sandbox_cpu(self, sid: str) -> float:
        return float(self.c.get(f"/v1/sandboxes/{sid}").json()["cpu"])

    def host_procs_of(self, sid: str) -> dict[int, str]:
        return {pid: kind for pid, kind in sandbox_processes(sid, processes()).items()}

    # --- the workload sandbox -----------------------------------------------------------
    def workload(self) -> str:
        fill = self.args.fill
        if self.work is not None and self.work_fill == fill:
            return self.work
        if self.work is not None:
            self.delete(self.work)
            self.work = None
        t0 = time.perf_counter()
        sid = self.create()
        self.c.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/hold.py"},
                   content=hold_program(fill).encode()).raise_for_status()
        self.post(f"/v1/sandboxes/{sid}/commands",
                  json={"cmd": "python3 /tmp/hold.py > /tmp/hold.log 2>&1",
                        "background": True})
        deadline = time.monotonic() + 120
        while True:
            r = self.run(sid, "cat /tmp/hold.json 2>/dev/null")
            if r["stdout"]:
                break
            if time.monotonic() > deadline:
                log = self.run(sid, "cat /tmp/hold.log")["stdout"]
                raise RuntimeError(f"the workload did not start in 120 s: {log[-500:]}")
            time.sleep(0.2)
        self.work, self.work_fill = sid, fill
        self.work_info = {"sandbox": sid, "fill": fill, "ready_s": round(ms_since(t0) / 1000, 1),
                          "hold_json": json.loads(r["stdout"]),
                          "memory_cgroup_mib": round((Cgroup(f"/torpor/{sid}").memory_bytes()
                                                      or 0) / MIB, 1)}
        say(f"workload {sid} ready in {self.work_info['ready_s']} s, cgroup memory "
            f"{self.work_info['memory_cgroup_mib']} MiB")
        return sid

    def verify(self, sid: str) -> dict:
        """The 256 MiB are intact, the HTTP server answers, the writer loop still runs."""
        out: dict = {}
        r = self.run(sid, argv=["python3", "-c", HTTP_CHECK])
        try:
            h = json.loads(r["stdout"])
            out["http_answered"] = True
            out["len"] = h["len"]
            out["memory_intact"] = (h["sha256_now"] == h["sha256_at_start"]
                                    and h["len"] == HOLD_MIB * MIB)
            out["sha256_at_start"] = h["sha256_at_start"]
        except (ValueError, KeyError):
            out["http_answered"] = False
            out["http_error"] = (r.get("stdout", "") + r.get("stderr", ""))[-400:]
        a = json.loads(self.run(sid, "cat /tmp/hold.json")["stdout"] or "{}")
        time.sleep(2.2)
        b = json.loads(self.run(sid, "cat /tmp/hold.json")["stdout"] or "{}")
        out["writer_counter"] = [a.get("n"), b.get("n")]
        out["writer_alive"] = bool(a and b and b["n"] > a["n"])
        out["sample_byte"] = b.get("sample")
        out["same_process_as_at_start"] = (
            b.get("sha256_at_start") == self.work_info["hold_json"]["sha256_at_start"]
            and b.get("n", 0) >= self.work_info["hold_json"]["n"])
        out["ok"] = bool(out.get("memory_intact") and out["writer_alive"]
                         and out["same_process_as_at_start"])
        return out

    # --- raw runsc ----------------------------------------------------------------------
    def raw_cgroup(self) -> str:
        return f"/torpor-bench{os.getpid()}/rawq"

    def raw_bundle(self, fill: str, quota: float | None = None, spawner: bool = False) -> Path:
        """The raw container's bundle; with `quota`, in a cgroup of its own with a CFS quota
        of that many CPUs (as a Torpor sandbox has: its `cpu`). `spawner`: the process
        runs raw_spawner_program instead of raw_program."""
        rootfs = self.raw_dir / "rootfs"
        if not rootfs.exists():
            for d in ("usr", "proc", "dev", "sys", "tmp", "etc"):
                (rootfs / d).mkdir(parents=True, exist_ok=True)
            for name in ("bin", "lib", "lib64", "sbin"):
                os.symlink(f"usr/{name}", rootfs / name)
        b = self.raw_dir / (f"bundle-{fill}" + (f"-q{quota}" if quota else "")
                            + ("-spawner" if spawner else ""))
        if b.exists():
            return b
        b.mkdir(parents=True)
        spec = {
            "ociVersion": "1.0.2",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                        "args": ["/usr/bin/python3", "-s", "-B", "-u", "-c",
                                 (raw_spawner_program if spawner else raw_program)(fill)],
                        "env": ["PATH=/usr/bin:/bin"], "cwd": "/"},
            "root": {"path": str(rootfs), "readonly": True},
            "hostname": "raw",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/usr", "type": "bind", "source": "/usr",
                 "options": ["rbind", "ro", "nosuid", "nodev"]},
            ],
            "linux": {"namespaces": [{"type": t} for t in
                                     ("pid", "ipc", "uts", "mount", "network")]},
        }
        if quota:
            spec["linux"]["cgroupsPath"] = self.raw_cgroup()
            spec["linux"]["resources"] = {"cpu": {"quota": int(quota * 100_000),
                                                  "period": 100_000}}
        (b / "config.json").write_text(json.dumps(spec))
        return b

    def runsc(self, *a: str) -> list[str]:
        return [RUNSC, "--root", str(self.raw_dir / "state"), "--platform", PLATFORM,
                "--network", "none", *a]

    def _raw_cli(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        with open(self.raw_dir / "runsc.log", "ab") as log:
            p = subprocess.run(argv, stderr=log, check=False, **kw)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[5:7])} failed ({p.returncode}); see "
                               f"{self.raw_dir / 'runsc.log'}")
        return p

    @staticmethod
    def _readline(fd: int, timeout: float) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"no answer from the raw container in {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the raw container closed its stdout")
            buf += chunk
        return buf

    def raw_start(self, fill: str, quota: float | None = None, spawner: bool = False) -> dict:
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.raw_n += 1
        cid = f"rawsb{os.getpid()}x{self.raw_n}"
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        t0 = time.perf_counter()
        try:
            self._raw_cli(self.runsc("run", "--detach", "--bundle",
                                     str(self.raw_bundle(fill, quota, spawner)), cid),
                          stdin=in_r, stdout=out_w)
        finally:
            os.close(in_r)
            os.close(out_w)
        c = {"cid": cid, "in": in_w, "out": out_r, "fill": fill, "quota": quota}
        line = json.loads(self._readline(out_r, 120))
        c["ready_ms"] = ms_since(t0)
        assert line.get("ready"), line
        return c

    def raw_close_fds(self, c: dict) -> None:
        for k in ("in", "out"):
            if c.get(k) is not None:
                try:
                    os.close(c[k])
                except OSError:
                    pass
                c[k] = None

    def raw_ask(self, c: dict, what: str = "q") -> dict:
        os.write(c["in"], what.encode() + b"\n")
        return json.loads(self._readline(c["out"], 120))

    def raw_cycle(self, c: dict) -> dict:
        """checkpoint -> delete -> restore --detach -> first answer, each timed."""
        img = self.raw_dir / "image"
        shutil.rmtree(img, ignore_errors=True)
        img.mkdir(parents=True)
        out = {}
        t0 = time.perf_counter()
        self._raw_cli(self.runsc("checkpoint", *RAW_CHECKPOINT, "--image-path", str(img),
                                 c["cid"]))
        out["checkpoint_ms"] = ms_since(t0)
        out["image_bytes"] = dir_bytes(img)
        self.raw_close_fds(c)
        t1 = time.perf_counter()
        subprocess.run(self.runsc("delete", "--force", c["cid"]), capture_output=True,
                       check=False)
        out["delete_ms"] = ms_since(t1)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        t2 = time.perf_counter()
        try:
            self._raw_cli(self.runsc("restore", "--detach", "--image-path", str(img),
                                     "--bundle", str(self.raw_bundle(c["fill"], c["quota"])),
                                     c["cid"]),
                          stdin=in_r, stdout=out_w)
        finally:
            os.close(in_r)
            os.close(out_w)
        out["restore_detach_ms"] = ms_since(t2)
        c["in"], c["out"] = in_w, out_r
        ans = self.raw_ask(c)
        out["restore_to_first_answer_ms"] = ms_since(t2)
        out["ok"] = ans.get("len") == HOLD_MIB * MIB
        out["sample"] = ans.get("sample")
        shutil.rmtree(img, ignore_errors=True)
        return out

    def raw_stop(self, c: dict) -> None:
        subprocess.run(self.runsc("delete", "--force", c["cid"]), capture_output=True,
                       check=False)
        self.raw_close_fds(c)

    def raw_hot(self, n: int, quota: float) -> dict:
        """Raw runsc beside the hot measure: a container holding the same memory, in a
        cgroup with the sandbox's CPU quota, whose process spawns `sh -c 'echo ok'` for each
        line on its stdin and passes the first output back. Frozen 50 ms, then thawed and
        sent a line (standby -> first output); left idle 50 ms, then sent a line."""
        say(f"hot: raw runsc, {n} cycles of freeze, 50 ms, thaw + spawn `sh -c 'echo ok'`")
        c = self.raw_start(self.args.fill, quota, spawner=True)
        cg = Cgroup(self.raw_cgroup())

        def line(t0: float) -> tuple[float, bool]:
            """Send a line; ms from t0 to the first output, whether it was right. Returns
            once the spawned shell has exited too (a freeze then finds the container idle,
            as a standby does)."""
            os.write(c["in"], b"go\n")
            out = self._readline(c["out"], 60)
            ms = ms_since(t0)
            while not out.endswith(b"done\n"):
                out += self._readline(c["out"], 60)
            return ms, out == b"ok\ndone\n"

        thawed, idle, bad = [], [], 0
        try:
            for _ in range(5):
                line(time.perf_counter())
            for _ in range(n):
                t0 = time.perf_counter()
                wait_frozen(freeze_raw(cg, True), t0)
                time.sleep(0.05)
                t0 = time.perf_counter()
                freeze_raw(cg, False)
                ms, ok = line(t0)
                thawed.append(ms)
                bad += not ok
                time.sleep(0.05)
                ms, ok = line(time.perf_counter())
                idle.append(ms)
                bad += not ok
        finally:
            freeze_raw(cg, False)
            self.raw_stop(c)
        return {"thaw_spawn_first_output_ms": stats99(thawed),
                "running_idle_spawn_first_output_ms": stats99(idle), "not_ok": bad}

    def cli_costs(self, n: int) -> dict:
        """What the server's restore path pays besides `runsc restore` itself: a
        `runsc delete --force` of an id that is already gone, `runsc kill <id> <sig>` into
        a running container (the SIGHUP that wakes the agent), and a holder's interpreter
        start (`python -I -S`)."""
        srv = self.server()
        c = self.raw_start("pages")
        dele, kill, py = [], [], []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(self.runsc("delete", "--force", "nosuchid"), capture_output=True,
                               check=False)
                dele.append(ms_since(t0))
                t0 = time.perf_counter()
                subprocess.run(self.runsc("kill", c["cid"], "CONT"), capture_output=True,
                               check=False)
                kill.append(ms_since(t0))
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=False)
                py.append(ms_since(t0))
        finally:
            self.raw_stop(c)
        del srv
        return {"runsc_delete_force_absent_ms": stats(dele),
                "runsc_kill_ms": stats(kill),
                "python_I_S_start_ms": stats(py)}

    # --- sections -----------------------------------------------------------------------
    def hot(self, n: int, usage_s: float) -> dict:
        sid = self.workload()
        say(f"hot: baseline echo, then {n} standby -> echo cycles, then {n} raw freezer cycles")
        for _ in range(5):
            self.echo(sid)
        base = [self.echo(sid)[0] for _ in range(n)]
        gets = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.c.get(f"/v1/sandboxes/{sid}").raise_for_status()
            gets.append(ms_since(t0))
        sb_ms, echo_ms, ev_ms, bad, states = [], [], [], 0, []
        for _ in range(n):
            t0 = time.perf_counter()
            r = self.post(f"/v1/sandboxes/{sid}/standby")
            sb_ms.append(ms_since(t0))
            states.append(r.json()["state"])
            time.sleep(0.05)
            ms, ok = self.echo(sid)
            echo_ms.append(ms)
            bad += not ok
        # the same, to the first output of a streamed command (the target's measure), 2n
        # cycles for each client in turn (so that p99 is not just the maximum); and, for
        # scale, a running sandbox left idle as long (idle vCPUs and parked threads wake
        # slower than busy ones)
        first_ms = {"lean": [], "httpx": []}
        idle_first_ms = {"lean": [], "httpx": []}
        for i in range(4 * n):
            client = "lean" if i % 2 else "httpx"
            self.post(f"/v1/sandboxes/{sid}/standby")
            time.sleep(0.05)
            ms, ok = self.first_output(sid, lean=client == "lean")
            first_ms[client].append(ms)
            bad += not ok
            time.sleep(0.05)
            ms, ok = self.first_output(sid, lean=client == "lean")
            idle_first_ms[client].append(ms)
            bad += not ok
        evs = [e for e in self.events(sid) if e["kind"] == "state"]
        thaw_ev = [e["detail"].get("duration_ms") for e in evs
                   if e["from_state"] == "standby" and e["to_state"] == "running"][-n:]
        freeze_ev = [e["detail"].get("duration_ms") for e in evs
                     if e["to_state"] == "standby"][-n:]
        ev_ms = thaw_ev
        # raw: the freezer cgroup written directly (the server believes it is running)
        cg = Cgroup(f"/torpor/{sid}")
        fw, fdone, tw, techo, raw_bad = [], [], [], [], 0
        for _ in range(n):
            t0 = time.perf_counter()
            state_file = freeze_raw(cg, True)
            fw.append(ms_since(t0))
            wait_frozen(state_file, t0)
            fdone.append(ms_since(t0))
            time.sleep(0.05)
            t1 = time.perf_counter()
            freeze_raw(cg, False)
            tw.append(ms_since(t1))
            r = self.run(sid, "echo ok")
            techo.append(ms_since(t1))
            raw_bad += r.get("stdout") != "ok\n"
        raw_spawn = self.raw_hot(2 * n, self.sandbox_cpu(sid))
        # CPU accounted while running vs in standby (the writer loop ticks once a second)
        say(f"hot: /usage cpu_seconds over {usage_s:.0f} s running, then {usage_s:.0f} s "
            "in standby")
        c0 = self.usage_cpu(sid)
        time.sleep(usage_s)
        c1 = self.usage_cpu(sid)
        self.post(f"/v1/sandboxes/{sid}/standby")
        c2 = self.usage_cpu(sid)
        cg0 = cg.cpu_seconds() or 0.0
        time.sleep(usage_s)
        c3 = self.usage_cpu(sid)
        cg1 = cg.cpu_seconds() or 0.0
        frozen = cg.frozen()
        self.echo(sid)
        return {
            "workload": self.work_info,
            "cycles": n, "frozen_for_s": 0.05,
            "running_echo_ms": stats99(base),
            "get_sandbox_ms": stats99(gets),
            "standby_ms": stats99(sb_ms),
            "standby_states_returned": sorted(set(states)),
            "resume_echo_ms": stats99(echo_ms),
            "first_output_client": "http.client (stdlib), one kept-alive connection",
            "resume_first_output_ms": stats99(first_ms["lean"]),
            "running_idle_first_output_ms": stats99(idle_first_ms["lean"]),
            "resume_first_output_httpx_ms": stats99(first_ms["httpx"]),
            "running_idle_first_output_httpx_ms": stats99(idle_first_ms["httpx"]),
            "resume_echo_not_ok": bad,
            "events_freeze_duration_ms": stats(freeze_ev),
            "events_thaw_duration_ms": stats(ev_ms),
            "raw_spawner": raw_spawn,
            "raw_freezer": {
                "file": str(state_file),
                "freeze_write_ms": stats99(fw, 3),
                "freeze_until_frozen_ms": stats99(fdone, 3),
                "thaw_write_ms": stats99(tw, 3),
                "thaw_then_echo_ms": stats99(techo),
                "echo_not_ok": raw_bad,
            },
            "usage_cpu_seconds": {"running": round(c1 - c0, 4), "standby": round(c3 - c2, 4),
                                  "standby_cgroup_cpuacct": round(cg1 - cg0, 6),
                                  "seconds_each": usage_s, "frozen_during": frozen},
        }

    def hibernate(self, n: int) -> dict:
        sid = self.workload()
        fill = self.args.fill
        say(f"hibernate: {n} cycles of hibernate -> resume -> echo, interleaved with raw "
            f"runsc checkpoint/restore (fill={fill})")
        self.echo(sid)
        raw = self.raw_start(fill)
        rawq = self.raw_start(fill, self.sandbox_cpu(sid))
        rows, raws, rawqs, cold = [], [], [], []
        unstick = self.unsticker()
        unstick.__enter__()
        try:
            for i in range(n):
                r: dict = {}
                t0 = time.perf_counter()
                st = self.post(f"/v1/sandboxes/{sid}/hibernate").json()["state"]
                r["hibernate_ms"] = ms_since(t0)
                r["state"] = st
                ev = self.last_state_event(sid, "hibernated")
                r["checkpoint_s"] = ev.get("detail", {}).get("seconds")
                r["image_bytes"] = ev.get("detail", {}).get("image_bytes")
                r["hibernate_event_ms"] = ev.get("detail", {}).get("duration_ms")
                time.sleep(0.3)
                left = self.host_procs_of(sid)
                r["host_procs_while_hibernated"] = len(left)
                r["host_procs_pss_kib"] = sum(rollup_kib(p).get("Pss", 0) for p in left)
                r["cgroup_left"] = bool(Cgroup(f"/torpor/{sid}").leftovers())
                t1 = time.perf_counter()
                st2 = self.post(f"/v1/sandboxes/{sid}/resume").json()["state"]
                r["resume_call_ms"] = ms_since(t1)
                echo_ms, ok = self.echo(sid)
                r["deep_resume_echo_ms"] = ms_since(t1)
                r["echo_after_resume_ms"] = echo_ms
                r["ok"] = ok and st2 == "running"
                ev = self.last_state_event(sid, "running", "hibernated")
                r["restore_event_ms"] = ev.get("detail", {}).get("duration_ms")
                r["runsc_restore_s"] = self.holder_status(sid).get("start_seconds")
                rows.append(r)
                raws.append(self.raw_cycle(raw))
                rawqs.append(self.raw_cycle(rawq))
                say(f"  {i + 1}/{n}: hibernate {r['hibernate_ms']:.0f} ms "
                    f"(checkpoint {r['checkpoint_s']} s, {r['image_bytes']} B); resume+echo "
                    f"{r['deep_resume_echo_ms']:.0f} ms (restore {r['restore_event_ms']} ms, "
                    f"runsc restore {r['runsc_restore_s']} s) | raw checkpoint "
                    f"{raws[-1]['checkpoint_ms']:.0f} ms, restore->answer "
                    f"{raws[-1]['restore_to_first_answer_ms']:.0f} ms; with the CPU quota "
                    f"{rawqs[-1]['checkpoint_ms']:.0f} / "
                    f"{rawqs[-1]['restore_to_first_answer_ms']:.0f} ms")
            # the image out of the page cache first, as after a long sleep (or this
            # machine's reclaim of pages unused for a minute): the usual deep resume
            say(f"hibernate: {n} cycles with the image evicted from the page cache")
            for i in range(n):
                self.post(f"/v1/sandboxes/{sid}/hibernate").raise_for_status()
                time.sleep(0.3)
                evict(self.srv.data_dir / "sandboxes" / sid / "image")
                t1 = time.perf_counter()
                st2 = self.post(f"/v1/sandboxes/{sid}/resume").json()["state"]
                _, ok = self.echo(sid)
                cold.append({"ms": ms_since(t1), "ok": ok and st2 == "running",
                             "runsc_restore_s": self.holder_status(sid).get("start_seconds")})
            raw_check = self.raw_ask(raw, "check")
            rawq_check = self.raw_ask(rawq, "check")
        finally:
            unstick.__exit__()
            self.raw_stop(raw)
            self.raw_stop(rawq)
        say("hibernate: verifying the workload")
        ver = self.verify(sid)

        def col(k, rs=rows, scale=1.0, nd=2):
            return stats99([x[k] * scale for x in rs if x.get(k) is not None], nd)

        return {
            "cycles": n, "fill": fill,
            "hibernate_ms": col("hibernate_ms"),
            "hibernate_event_duration_ms": col("hibernate_event_ms"),
            "checkpoint_seconds_ms": col("checkpoint_s", scale=1000),
            "image_mib": col("image_bytes", scale=1 / MIB, nd=2),
            "host_procs_while_hibernated": max(x["host_procs_while_hibernated"] for x in rows),
            "host_procs_pss_kib_while_hibernated": max(x["host_procs_pss_kib"] for x in rows),
            "cgroup_left_while_hibernated": any(x["cgroup_left"] for x in rows),
            "resume_call_ms": col("resume_call_ms"),
            "deep_resume_echo_ms": col("deep_resume_echo_ms"),
            "deep_resume_cold_echo_ms": col("ms", cold),
            "runsc_restore_cold_ms": col("runsc_restore_s", cold, scale=1000),
            "image_compression": self.image_compression,
            "echo_after_resume_ms": col("echo_after_resume_ms"),
            "restore_event_duration_ms": col("restore_event_ms"),
            "runsc_restore_detach_ms": col("runsc_restore_s", scale=1000),
            "all_ok": all(x["ok"] for x in rows + cold),
            "stalled_checkpoints": unstick.events,
            "verify_after": ver,
            "raw_runsc": {
                "process": f"python3 holding {HOLD_MIB} MiB ({fill}), answering lines on stdin",
                "ready_ms": round(raw["ready_ms"], 1),
                "checkpoint_ms": col("checkpoint_ms", raws),
                "image_mib": col("image_bytes", raws, scale=1 / MIB),
                "delete_ms": col("delete_ms", raws),
                "restore_detach_ms": col("restore_detach_ms", raws),
                "restore_to_first_answer_ms": col("restore_to_first_answer_ms", raws),
                "all_ok": all(x["ok"] for x in raws),
                "memory_intact_after": bool(raw_check.get("intact")),
                "commands": [" ".join(self.runsc("checkpoint", *RAW_CHECKPOINT, "--image-path",
                                                 "IMG", "ID")),
                             " ".join(self.runsc("delete", "--force", "ID")),
                             " ".join(self.runsc("restore", "--detach", "--image-path", "IMG",
                                                 "--bundle", "B", "ID"))],
            },
            "raw_runsc_cpu_quota": {
                "process": "the same, with linux.cgroupsPath and a CFS quota of the sandbox's "
                           f"cpu ({rawq['quota']} CPU) in the spec, as Torpor's spec has",
                "checkpoint_ms": col("checkpoint_ms", rawqs),
                "restore_detach_ms": col("restore_detach_ms", rawqs),
                "restore_to_first_answer_ms": col("restore_to_first_answer_ms", rawqs),
                "all_ok": all(x["ok"] for x in rawqs),
                "memory_intact_after": bool(rawq_check.get("intact")),
            },
            "per_cycle": rows,
        }

    def wake(self, n: int, n_cli: int) -> dict:
        sid = self.workload()
        say(f"wake: {n} cycles of standby -> hibernate -> echo on the hibernated sandbox")
        self.echo(sid)
        rows = []
        unstick = self.unsticker().__enter__()
        for i in range(n):
            r: dict = {}
            self.post(f"/v1/sandboxes/{sid}/standby")
            time.sleep(0.05)
            t0 = time.perf_counter()
            self.post(f"/v1/sandboxes/{sid}/hibernate")
            r["hibernate_from_standby_ms"] = ms_since(t0)
            time.sleep(0.3)
            t1 = time.perf_counter()
            res = self.run(sid, "echo ok")
            r["total_ms"] = ms_since(t1)
            r["ok"] = res.get("stdout") == "ok\n"
            r["second_echo_ms"] = self.echo(sid)[0]
            ev = self.last_state_event(sid, "running", "hibernated")
            r["restore_event_ms"] = ev.get("detail", {}).get("duration_ms")
            r["reason"] = ev.get("reason")
            rs = self.holder_status(sid).get("start_seconds")
            r["runsc_restore_ms"] = rs * 1000 if rs is not None else None
            if r["restore_event_ms"] is not None:
                r["outside_restore_ms"] = r["total_ms"] - r["restore_event_ms"]
                if r["runsc_restore_ms"] is not None:
                    r["restore_besides_runsc_ms"] = r["restore_event_ms"] - r["runsc_restore_ms"]
            rows.append(r)
            say(f"  {i + 1}/{n}: echo on hibernated {r['total_ms']:.0f} ms = restore "
                f"{r['restore_event_ms']} ms (runsc restore {r['runsc_restore_ms']} ms) + rest")
        unstick.__exit__()
        say("wake: verifying the workload; timing the CLI calls around a restore")
        ver = self.verify(sid)
        cli = self.cli_costs(n_cli)

        def col(k):
            return stats99([x[k] for x in rows if x.get(k) is not None])

        return {
            "cycles": n, "fill": self.args.fill,
            "total_ms": col("total_ms"),
            "restore_event_duration_ms": col("restore_event_ms"),
            "of_which_runsc_restore_detach_ms": col("runsc_restore_ms"),
            "restore_besides_runsc_ms": col("restore_besides_runsc_ms"),
            "outside_restore_ms": col("outside_restore_ms"),
            "second_echo_ms": col("second_echo_ms"),
            "hibernate_from_standby_ms": col("hibernate_from_standby_ms"),
            "stalled_checkpoints": unstick.events,
            "wake_reasons": sorted({str(x["reason"]) for x in rows}),
            "all_ok": all(x["ok"] for x in rows),
            "verify_after": ver,
            "cli_costs_on_the_restore_path": cli,
            "per_cycle": rows,
        }

    def density(self, n: int, conc: int, idle_running_s: float, idle_standby_s: float,
                budget_s: float) -> dict:
        srv = self.server()
        if self.work is not None:
            self.delete(self.work)
            self.work = None
        say(f"density: up to {n} sandboxes at concurrency {conc} (creation budget "
            f"{budget_s:.0f} s)")
        time.sleep(3)

        def cpu_window(seconds: float, sids: list[str]) -> dict:
            procs = processes()
            pids = {}
            for sid in sids:
                pids.update(sandbox_processes(sid, procs))
            cgs = [Cgroup(f"/torpor/{s}") for s in sids]
            cg0 = sum(c.cpu_seconds() or 0.0 for c in cgs)
            p0 = {p: proc_cpu_s(p) for p in pids}
            s0 = proc_cpu_s(srv.pid) or 0.0
            h0 = host_cpu()
            t = time.perf_counter()
            time.sleep(seconds)
            el = time.perf_counter() - t
            cg1 = sum(c.cpu_seconds() or 0.0 for c in cgs)
            p1 = {p: proc_cpu_s(p) for p in pids}
            s1 = proc_cpu_s(srv.pid) or 0.0
            h1 = host_cpu()
            pdelta = sum((p1[p] or 0) - (p0[p] or 0) for p in pids
                         if p0[p] is not None and p1[p] is not None)
            by_kind: dict[str, float] = {}
            for p, kind in pids.items():
                if p0[p] is not None and p1[p] is not None:
                    by_kind[kind] = by_kind.get(kind, 0.0) + p1[p] - p0[p]
            busy = h1[0] - h0[0]
            return {"seconds": round(el, 1),
                    "cgroups_cpuacct_cpu_s": round(cg1 - cg0, 4),
                    "host_procs_cpu_s": round(pdelta, 3),
                    "host_procs_cpu_s_by_kind": {k: round(v, 3) for k, v in by_kind.items()},
                    "host_procs": len(pids),
                    "server_cpu_s": round(s1 - s0, 3),
                    "server_cpu_s_per_min": round((s1 - s0) * 60 / el, 3),
                    "host_busy_cpu_s_all_users": round(busy, 2),
                    "host_busy_pct_of_all_cpus": round(100 * busy / max(h1[1] - h0[1], 1e-9), 2),
                    "cgroups_cpu_pct_of_one_cpu": round(100 * (cg1 - cg0) / el, 3)}

        say(f"density: server CPU over {idle_standby_s:.0f} s with no sandbox")
        cpu_empty = cpu_window(idle_standby_s, [])
        before = avail_mib()
        mi_before = meminfo()
        foreign_before = self.foreign_sentries()
        server_rss_before = vm_rss_kib(srv.pid) or 0
        sids: list[str] = []
        create_ms: list[float] = []
        errors: list[str] = []
        t0 = time.perf_counter()
        stop_at = time.monotonic() + budget_s

        def make(_):
            if time.monotonic() > stop_at:
                return None
            t = time.perf_counter()
            try:
                sid = self.create()
            except Exception as e:  # noqa: BLE001 - count it, go on
                return e
            return sid, ms_since(t)

        with cf.ThreadPoolExecutor(conc) as ex:
            for res in ex.map(make, range(n)):
                if res is None:
                    continue
                if isinstance(res, Exception):
                    errors.append(str(res)[:300])
                    continue
                sids.append(res[0])
                create_ms.append(res[1])
                if len(sids) % 25 == 0:
                    say(f"  {len(sids)} created")
        create_wall = time.perf_counter() - t0
        if not sids:
            raise RuntimeError(f"no sandbox could be created: {errors[:3]}")

        def check(sid):
            try:
                return self.echo(sid)[1]
            except Exception:  # noqa: BLE001
                return False

        with cf.ThreadPoolExecutor(conc) as ex:
            answered = sum(ex.map(check, sids))
        say(f"density: {len(sids)} created in {create_wall:.0f} s ({len(errors)} failed), "
            f"{answered} answer; settling 5 s")
        time.sleep(5)
        with_running = avail_mib()
        pss_running = self.pss_of(sids)

        say(f"density: CPU over {idle_running_s:.0f} s with all running idle")
        cpu_running = cpu_window(idle_running_s, sids)
        say("density: all to standby")
        sb_ms = []

        def to_standby(sid):
            t = time.perf_counter()
            st = self.post(f"/v1/sandboxes/{sid}/standby").json()["state"]
            return ms_since(t), st == "standby"

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(conc) as ex:
            res = list(ex.map(to_standby, sids))
        sb_wall = time.perf_counter() - t0
        sb_ms = [r[0] for r in res]
        in_standby = sum(r[1] for r in res)
        frozen = sum(Cgroup(f"/torpor/{s}").frozen() for s in sids)
        time.sleep(2)
        say(f"density: CPU over {idle_standby_s:.0f} s with all in standby")
        cpu_standby = cpu_window(idle_standby_s, sids)
        with_standby = avail_mib()
        say("density: all to hibernation")
        hib_ms, hib_err = [], []

        def to_hib(sid):
            t = time.perf_counter()
            try:
                self.post(f"/v1/sandboxes/{sid}/hibernate")
            except Exception as e:  # noqa: BLE001
                return None, str(e)[:300]
            return ms_since(t), None

        t0 = time.perf_counter()
        with self.unsticker() as unstick, cf.ThreadPoolExecutor(conc) as ex:
            for ms, err in ex.map(to_hib, sids):
                if err:
                    hib_err.append(err)
                else:
                    hib_ms.append(ms)
        hib_wall = time.perf_counter() - t0
        say(f"density: {len(hib_ms)} hibernated in {hib_wall:.0f} s; settling 5 s")
        time.sleep(5)
        states = {}
        for s in sids:
            st = self.state(s)
            states[st] = states.get(st, 0) + 1
        with_hib = avail_mib()
        mi_hib = meminfo()
        foreign_hib = self.foreign_sentries()
        mounts_left = mounts_under(str(srv.data_dir / "sandboxes") + "/")
        loops_left = loops_under(str(srv.data_dir / "sandboxes") + "/")
        procs = processes()
        left_procs: dict[int, str] = {}
        for sid in sids:
            left_procs.update(sandbox_processes(sid, procs))
        left_pss = sum(rollup_kib(p).get("Pss", 0) for p in left_procs) / 1024
        cgs_left = sum(bool(Cgroup(f"/torpor/{s}").leftovers()) for s in sids)
        img = [dir_bytes(srv.data_dir / "sandboxes" / s / "image") for s in sids]
        sdir = [dir_bytes(srv.data_dir / "sandboxes" / s) for s in sids]
        server_rss_hib = vm_rss_kib(srv.pid) or 0
        nh = len(hib_ms) or 1
        say(f"density: CPU over {idle_standby_s:.0f} s with all hibernated")
        cpu_hib = cpu_window(idle_standby_s, sids)
        # delete the hibernated ones but a few (MemAvailable back = what they held), then
        # wake those few and delete them too
        wake_n = min(5, len(sids) - 1)
        rest, sample = sids[wake_n:], sids[:wake_n]
        say(f"density: deleting {len(rest)} hibernated sandboxes")

        def drop(sid):
            t = time.perf_counter()
            self.delete(sid)
            return ms_since(t)

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(conc) as ex:
            del_ms = list(ex.map(drop, rest))
        del_wall = time.perf_counter() - t0
        time.sleep(5)
        after_rest = avail_mib()
        say(f"density: waking {wake_n} with echo ok, then deleting them")
        wake_ms, wake_ok = [], 0
        for s in sample:
            ms, ok = self.echo(s)
            wake_ms.append(ms)
            wake_ok += ok
        for s in sample:
            self.delete(s)
        time.sleep(5)
        end = avail_mib()
        ns = len(sids)
        return {
            "requested": n, "sandboxes": ns, "create_failed": len(errors),
            "create_errors": errors[:5], "concurrency": conc,
            "create_ms": stats(create_ms), "create_wall_s": round(create_wall, 1),
            "answered_echo_ok": answered,
            "running": {"mem_available_drop_per_sandbox_mib": round((before - with_running) / ns, 1),
                        "pss_per_sandbox_mib": round(pss_running / ns, 1),
                        "cpu": cpu_running},
            "empty_server": {"cpu": cpu_empty},
            "standby": {"ms": stats99(sb_ms), "wall_s": round(sb_wall, 1),
                        "in_standby": in_standby, "cgroups_frozen": frozen,
                        "mem_available_drop_per_sandbox_mib": round((before - with_standby) / ns,
                                                                    1),
                        "cpu": cpu_standby},
            "hibernated": {
                "ms": stats99(hib_ms), "wall_s": round(hib_wall, 1), "failed": len(hib_err),
                "errors": hib_err[:5], "states": states,
                "mem_available_drop_mib": before - with_hib,
                "mem_available_drop_per_sandbox_mib": round((before - with_hib) / nh, 2),
                "mem_available_freed_by_delete_per_sandbox_mib": round(
                    (after_rest - with_hib) / max(len(rest), 1), 2),
                "host_procs_left": len(left_procs),
                "host_procs_left_by_kind": {k: list(left_procs.values()).count(k)
                                            for k in set(left_procs.values())},
                "host_procs_left_pss_mib": round(left_pss, 1),
                "cgroups_left": cgs_left,
                "mounts_left": mounts_left,
                "loop_devices_left": loops_left,
                "per_sandbox": {
                    "mounts": round(mounts_left / nh, 2),
                    "loop_devices": round(loops_left / nh, 2),
                    "host_procs": round(len(left_procs) / nh, 2),
                    "slab_kib": round((mi_hib.get("Slab", 0) - mi_before.get("Slab", 0)) / nh,
                                      1),
                    "sunreclaim_kib": round(
                        (mi_hib.get("SUnreclaim", 0) - mi_before.get("SUnreclaim", 0)) / nh, 1),
                    "note": "growth of /proc/meminfo's Slab and SUnreclaim from before the "
                            "sandboxes were created to all hibernated, over their number"},
                "cpu": cpu_hib,
                "meminfo_delta_vs_before_mib": {
                    k: round((mi_hib.get(k, 0) - mi_before.get(k, 0)) / 1024, 1)
                    for k in ("MemFree", "MemAvailable", "Cached", "Dirty", "Shmem", "Slab",
                              "SReclaimable", "SUnreclaim", "KernelStack", "PageTables",
                              "AnonPages")},
                "stalled_checkpoints": len(unstick.events),
                "stalled_checkpoint_details": unstick.events[:20],
                "image_per_sandbox_mib": stats([b / MIB for b in img], 2),
                "sandbox_dir_on_disk_per_sandbox_mib": stats([b / MIB for b in sdir], 2),
                "server_rss_mib": {"before_create": round(server_rss_before / 1024, 1),
                                   "all_hibernated": round(server_rss_hib / 1024, 1)},
            },
            "wake_sample": {"n": wake_n, "echo_ms": stats(wake_ms), "ok": wake_ok},
            "delete_hibernated_ms": stats(del_ms), "delete_wall_s": round(del_wall, 1),
            "mem_available_mib": {"before": before, "all_running": with_running,
                                  "all_standby": with_standby, "all_hibernated": with_hib,
                                  "after_deleting_hibernated": after_rest,
                                  "after_delete": end},
            "other_sandboxes_on_host": {"before": foreign_before, "all_hibernated": foreign_hib,
                                        "note": "runsc sandboxes not ours (other users of "
                                                "the machine): they move MemAvailable and "
                                                "/proc/stat too"},
        }

    def pss_of(self, sids: list[str]) -> float:
        procs = processes()
        tot = 0
        for sid in sids:
            for pid in sandbox_processes(sid, procs):
                tot += rollup_kib(pid).get("Pss", 0)
        return tot / 1024

    def foreign_sentries(self) -> int:
        return sum(1 for _, cmd in processes().values()
                   if cmd.startswith(b"runsc-sandbox") and self.base.encode() not in cmd)

    # --- cleanup ------------------------------------------------------------------------
    def close(self, keep_logs: bool = False) -> list[str]:
        left: list[str] = []
        if self.lean_http is not None:
            self.lean_http.close()
        if self.srv is not None:
            if self.srv.proc is not None and self.srv.proc.poll() is None and self.live:
                say(f"cleanup: deleting {len(self.live)} sandboxes")

                def drop(sid):
                    try:
                        self.delete(sid)
                    except Exception as e:  # noqa: BLE001 - purge below takes care of it
                        say(f"cleanup: delete {sid}: {e}")

                with cf.ThreadPoolExecutor(3) as ex:
                    list(ex.map(drop, list(self.live)))
            if self.http is not None:
                self.http.close()
            left += self.srv.stop(keep_log=keep_logs)  # SIGTERM, purge(data_dir), rm -r
            if keep_logs:
                say(f"server log kept: {self.srv.data_dir}.log")
            self.srv = None
        state = self.raw_dir / "state"
        if state.is_dir():
            p = subprocess.run([RUNSC, "--root", str(state), "list", "--quiet"],
                               capture_output=True, text=True, check=False)
            for cid in p.stdout.split():
                subprocess.run([RUNSC, "--root", str(state), "delete", "--force", cid],
                               capture_output=True, check=False)
                left.append(f"raw container {cid}")
        shutil.rmtree(self.raw_dir, ignore_errors=True)
        for rel in (self.raw_cgroup(), os.path.dirname(self.raw_cgroup())):
            cg = Cgroup(rel)
            cg.remove()
            left += [f"raw cgroup {p} could not be removed" for p in cg.leftovers()]
        return left


# --- report -----------------------------------------------------------------------------
def table(report: dict) -> str:
    r = report["results"]
    rows: list[tuple[str, str, str, str]] = []  # what, ours, raw, target

    def f(d, k="p50", nd=1):
        return "-" if not d or d.get(k) is None else f"{d[k]:.{nd}f}"

    def pp(d, ks=("p50", "p99"), nd=1):
        return "/".join(f(d, k, nd) for k in ks)

    if "hot" in r:
        h = r["hot"]
        rf = h["raw_freezer"]
        rows.append(("hot: echo ok on a running sandbox p50/p99 ms", pp(h["running_echo_ms"]),
                     "", ""))
        rows.append(("hot: GET /v1/sandboxes/{id} p50/p99 ms (HTTP, auth, a DB read)",
                     pp(h["get_sandbox_ms"]), "", ""))
        rows.append(("hot: POST /standby p50/p99 ms", pp(h["standby_ms"]),
                     f"freeze write {pp(rf['freeze_write_ms'], nd=2)}", ""))
        rows.append(("  until freezer.state reads FROZEN p50/p99 ms", "",
                     pp(rf["freeze_until_frozen_ms"], nd=2), ""))
        rows.append(("hot: standby -> echo ok response p50/p99 ms", pp(h["resume_echo_ms"]),
                     f"thaw+echo {pp(rf['thaw_then_echo_ms'])}", ""))
        rs = h.get("raw_spawner", {})
        rows.append(("hot: standby -> first output (streamed echo ok) p50/p99 ms",
                     pp(h["resume_first_output_ms"]),
                     f"thaw+spawn {pp(rs.get('thaw_spawn_first_output_ms'))}",
                     "p50<=10, p99<=25"))
        rows.append(("  the same on a running sandbox idle 50 ms p50/p99 ms",
                     pp(h["running_idle_first_output_ms"]),
                     f"spawn {pp(rs.get('running_idle_spawn_first_output_ms'))}", ""))
        if "resume_first_output_httpx_ms" in h:
            rows.append(("  both again with httpx (the SDK's client) p50/p99 ms",
                         (f"{pp(h['resume_first_output_httpx_ms'])}, "
                          f"{pp(h['running_idle_first_output_httpx_ms'])}"), "", ""))
        rows.append(("  thaw alone p50/p99 ms (events: int ms / raw write)",
                     pp(h["events_thaw_duration_ms"], nd=0), pp(rf["thaw_write_ms"], nd=2), ""))
        u = h["usage_cpu_seconds"]
        rows.append((f"  /usage cpu_seconds in {u['seconds_each']:.0f} s: running / standby",
                     f"{u['running']} / {u['standby']}", f"cpuacct {u['standby_cgroup_cpuacct']}",
                     ""))
    if "hibernate" in r:
        h = r["hibernate"]
        w = h["raw_runsc"]
        rows.append((f"hibernate ({h['fill']}): POST /hibernate p50/max ms",
                     pp(h["hibernate_ms"], ("p50", "max")), "", ""))
        rows.append(("  runsc checkpoint p50/max ms (detail.seconds | raw)",
                     pp(h["checkpoint_seconds_ms"], ("p50", "max")),
                     pp(w["checkpoint_ms"], ("p50", "max")), ""))
        rows.append(("  image MiB p50", f(h["image_mib"], nd=2), f(w["image_mib"], nd=2), ""))
        rows.append(("  stalled checkpoints (thawed by the bench)",
                     str(len(h["stalled_checkpoints"])), "", ""))
        rows.append(("  host processes / cgroup left while hibernated",
                     f"{h['host_procs_while_hibernated']} / {h['cgroup_left_while_hibernated']}",
                     "", ""))
        label = f"deep resume ({h['image_compression']} image): POST /resume + echo ok p50/max ms"
        rows.append((label, pp(h["deep_resume_echo_ms"], ("p50", "max")),
                     f"restore->answer {pp(w['restore_to_first_answer_ms'], ('p50', 'max'))}",
                     "p50<=400"))
        rows.append(("  the image evicted from the page cache first p50/max ms",
                     pp(h["deep_resume_cold_echo_ms"], ("p50", "max")), "", ""))
        rows.append(("    of which runsc restore --detach p50/max ms",
                     pp(h["runsc_restore_cold_ms"], ("p50", "max")), "", ""))
        rows.append(("  restore (event duration_ms) p50 ms", f(h["restore_event_duration_ms"]),
                     "", ""))
        rows.append(("  runsc restore --detach p50/max ms",
                     pp(h["runsc_restore_detach_ms"], ("p50", "max")),
                     pp(w["restore_detach_ms"], ("p50", "max")), ""))
        q = h["raw_runsc_cpu_quota"]
        rows.append(("  raw with the sandbox's CPU quota: checkpoint / restore->answer p50 ms",
                     "", f"{f(q['checkpoint_ms'])} / {f(q['restore_to_first_answer_ms'])}", ""))
        rows.append(("  runsc delete after checkpoint p50 ms", "", f(w["delete_ms"]), ""))
        v = h["verify_after"]
        rows.append(("  after the cycles: 256 MiB intact / HTTP answers / writer alive",
                     (f"{v.get('memory_intact')} / {v.get('http_answered')} / "
                      f"{v.get('writer_alive')}"), f"intact {w['memory_intact_after']}", ""))
    if "wake" in r:
        h = r["wake"]
        c = h["cli_costs_on_the_restore_path"]
        rows.append(("wake: echo ok on a hibernated sandbox p50/max ms",
                     pp(h["total_ms"], ("p50", "max")), "", "p50<=400"))
        rows.append(("  restore (event duration_ms) p50 ms", f(h["restore_event_duration_ms"]),
                     "", ""))
        rows.append(("    of which runsc restore --detach p50 ms",
                     f(h["of_which_runsc_restore_detach_ms"]), "", ""))
        rows.append(("    the rest of the restore p50 ms", f(h["restore_besides_runsc_ms"]),
                     (f"delete {f(c['runsc_delete_force_absent_ms'])} + kill "
                      f"{f(c['runsc_kill_ms'])} + py {f(c['python_I_S_start_ms'])}"), ""))
        rows.append(("  outside the restore (HTTP, DB, command) p50 ms",
                     f(h["outside_restore_ms"]), "", ""))
        rows.append(("  second echo right after p50 ms", f(h["second_echo_ms"]), "", ""))
        rows.append(("  hibernate from standby p50/max ms (stalls thawed by bench)",
                     (f"{pp(h['hibernate_from_standby_ms'], ('p50', 'max'))} "
                      f"({len(h['stalled_checkpoints'])})"), "", ""))
        v = h["verify_after"]
        rows.append(("  after the cycles: 256 MiB intact / HTTP answers / writer alive",
                     (f"{v.get('memory_intact')} / {v.get('http_answered')} / "
                      f"{v.get('writer_alive')}"), "", ""))
    if "density" in r:
        d = r["density"]
        rows.append(("density: sandboxes made / asked, answered",
                     f"{d['sandboxes']}/{d['requested']}, {d['answered_echo_ok']}", "", ""))
        cr, cs = d["running"]["cpu"], d["standby"]["cpu"]
        rows.append(((f"  CPU s of all: cgroups running {cr['seconds']:.0f} s / standby "
                      f"{cs['seconds']:.0f} s"),
                     f"{cr['cgroups_cpuacct_cpu_s']} / {cs['cgroups_cpuacct_cpu_s']}", "",
                     "~0 in standby"))
        rows.append(("  CPU s of their host processes (incl. holders) running / standby",
                     f"{cr['host_procs_cpu_s']} / {cs['host_procs_cpu_s']}", "", ""))
        rows.append(("  server CPU s running / standby",
                     f"{cr['server_cpu_s']} / {cs['server_cpu_s']}", "", ""))
        if "empty_server" in d:
            ce, ch = d["empty_server"]["cpu"], d["hibernated"]["cpu"]
            n_ = d["sandboxes"]
            rows.append((f"  server CPU s per minute: none / {n_} standby / {n_} hibernated",
                         (f"{ce['server_cpu_s_per_min']} / {cs['server_cpu_s_per_min']} / "
                          f"{ch['server_cpu_s_per_min']}"), "", "flat in N"))
        rows.append(("  host busy % of all CPUs (all users) running / standby",
                     f"{cr['host_busy_pct_of_all_cpus']} / {cs['host_busy_pct_of_all_cpus']}",
                     "", ""))
        rows.append(("  MemAvailable drop per sandbox MiB: running / standby",
                     (f"{d['running']['mem_available_drop_per_sandbox_mib']} / "
                      f"{d['standby']['mem_available_drop_per_sandbox_mib']}"), "", ""))
        hb = d["hibernated"]
        rows.append(("  hibernated: MemAvailable drop per sandbox MiB (vs before create)",
                     str(hb["mem_available_drop_per_sandbox_mib"]), "", "<= 5"))
        rows.append(("  hibernated: MemAvailable freed per sandbox by deleting them MiB",
                     str(hb["mem_available_freed_by_delete_per_sandbox_mib"]), "", ""))
        rows.append(("  hibernated: Slab / SUnreclaim growth vs before, total MiB",
                     (f"{hb['meminfo_delta_vs_before_mib']['Slab']} / "
                      f"{hb['meminfo_delta_vs_before_mib']['SUnreclaim']}"), "", ""))
        rows.append(("  hibernated: host processes left (PSS MiB), cgroups left",
                     (f"{hb['host_procs_left']} ({hb['host_procs_left_pss_mib']}), "
                      f"{hb['cgroups_left']}"), "", ""))
        rows.append(("  hibernated: mounts left (all), stalled checkpoints thawed by bench",
                     f"{hb['mounts_left']}, {hb['stalled_checkpoints']}", "", ""))
        if "per_sandbox" in hb:
            ps = hb["per_sandbox"]
            rows.append(("  hibernated, per sandbox: mounts / loop devices / host processes",
                         f"{ps['mounts']} / {ps['loop_devices']} / {ps['host_procs']}", "",
                         "0 / 0 / 0"))
            rows.append(("  hibernated, per sandbox: Slab / SUnreclaim growth KiB",
                         f"{ps['slab_kib']} / {ps['sunreclaim_kib']}", "", ""))
        rows.append(("  hibernated: image / sandbox dir on disk p50 MiB",
                     (f"{f(hb['image_per_sandbox_mib'], nd=2)} / "
                      f"{f(hb['sandbox_dir_on_disk_per_sandbox_mib'], nd=2)}"), "", ""))
        rows.append(("  create / standby / hibernate / delete (hibernated) p50 ms",
                     (f"{f(d['create_ms'], nd=0)} / {f(d['standby']['ms'], nd=0)} / "
                      f"{f(hb['ms'], nd=0)} / {f(d['delete_hibernated_ms'], nd=0)}"), "", ""))
        rows.append(("  woken from hibernation: echo ok p50 ms",
                     f(d["wake_sample"]["echo_ms"], nd=0), "", ""))
    m = report["machine"]
    return render_rows(rows, report, "raw", (22, 30), [
        (f"machine: {m['cpu_model']}, {m['nproc']} cpus, {m['mem_total_mib']} MiB; "
        f"runsc {m['runsc']} --platform={PLATFORM}; {m['uname']}"),
        (f"orphans are reaped by PID 1 after {m['orphan_reap_ms']} ms here; `runsc "
        "delete` waits for that (raw containers have no subreaper of ours)")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer cycles, 10 sandboxes, shorter CPU windows")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", help="write the JSON here (default on a full run: "
                    "bench/results/standby.json)")
    ap.add_argument("--density", type=int, help="sandboxes for density (200; 10 with --quick)")
    ap.add_argument("--density-budget", type=float, default=300,
                    help="seconds allowed for creating them (300)")
    ap.add_argument("--unstick-after", type=float, default=15,
                    help="thaw a sandbox whose runsc checkpoint has waited this long on a "
                    "FROZEN cgroup (a server race, see the report); 0: never (15)")
    ap.add_argument("--fill", choices=["pages", "random"], default="pages",
                    help="the 256 MiB: one byte per page (default) or every byte, random")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else SECTIONS
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
    q = args.quick
    n = {"hot": 10 if q else 50, "hibernate": 3 if q else 10, "wake": 3 if q else 10,
         "cli": 5 if q else 15, "usage_s": 5 if q else 10,
         "density": args.density or (10 if q else 200),
         "idle_running_s": 10 if q else 20, "idle_standby_s": 15 if q else 60}

    stop_on_sigterm()

    report = {"bench": "standby",
              "machine": machine(RUNSC) | {"orphan_reap_ms": orphan_reap_ms()},
              "settings": {"sections": only, "quick": q, "iterations": n, "fill": args.fill,
                           "hold_mib": HOLD_MIB, "platform": PLATFORM, "network": "none",
                           "density_budget_s": args.density_budget,
                           "unstick_after_s": args.unstick_after,
                           "server_argv": ".venv/bin/python -c 'from torpor.cli.main import "
                                          "app; app()' serve --host 127.0.0.1 --port <free> "
                                          "--data-dir /tmp/tsb<pid>a --pool-size 0",
                           "sandboxes": "created with standby_after=0, hibernate_after=0 "
                                        "(no automatic timers), default resources"},
              "reproduce": reproduce_cmd("bench/standby.py"),
              "results": {}, "errors": {}}
    b = Bench(args)
    t_start = time.time()

    def run(name: str) -> dict:
        if name == "hot":
            return b.hot(n["hot"], n["usage_s"])
        if name == "hibernate":
            return b.hibernate(n["hibernate"])
        if name == "wake":
            return b.wake(n["wake"], n["cli"])
        return b.density(n["density"], 3, n["idle_running_s"], n["idle_standby_s"],
                         args.density_budget)

    run_sections(report, [s for s in SECTIONS if s in only], run,
                 lambda keep: b.close(keep_logs=keep))
    out = default_out(args, "standby")
    return finish(report, TARGETS, t_start, out, table)


if __name__ == "__main__":
    sys.exit(main())
