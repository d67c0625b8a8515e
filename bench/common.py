"""Helpers shared by the bench scripts: statistics, machine facts, a `torpor serve` of the
bench's own, and host memory readings (/proc). Stdlib only (plus torpor for purge)."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


# --- numbers ----------------------------------------------------------------------------
def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def stats(samples: list[float], nd: int = 2) -> dict:
    s = sorted(samples)
    if not s:
        return {"n": 0}
    return {"p50": round(pct(s, 50), nd), "p90": round(pct(s, 90), nd),
            "min": round(s[0], nd), "max": round(s[-1], nd),
            "mean": round(sum(s) / len(s), nd), "n": len(s)}


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


# --- the machine ------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str | None:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts:
            out[k] = int(parts[0])
    return out


def git_state() -> dict:
    def g(*a: str) -> str:
        p = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                           check=False)
        return p.stdout.rstrip()
    status = g("status", "--porcelain", "--untracked-files=no")
    dirty = [line[3:] for line in status.splitlines()]
    return {"commit": g("rev-parse", "HEAD"), "dirty_files": dirty}


def machine(runsc: str = "runsc") -> dict:
    p = subprocess.run([runsc, "--version"], capture_output=True, text=True, check=False)
    mi = meminfo()
    return {
        "uname": subprocess.run(["uname", "-a"], capture_output=True, text=True,
                                check=False).stdout.strip(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_mib": mi.get("MemTotal", 0) // 1024,
        "mem_available_mib_at_start": mi.get("MemAvailable", 0) // 1024,
        "runsc": p.stdout.splitlines()[0].replace("runsc version ", "") if p.stdout else None,
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_state(),
    }


def orphan_reap_ms(n: int = 3) -> list[float]:
    """How long until an orphan that was SIGKILLed disappears from /proc, i.e. until init
    (or the nearest subreaper) reaps it. `runsc delete` waits for exactly that (it polls
    kill(pid, 0), which succeeds on a zombie), so it bounds every sandbox delete."""
    out = []
    for _ in range(n):
        p = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                           capture_output=True, text=True, check=False)
        pid = int(p.stdout.strip())
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}") and time.perf_counter() - t0 < 10:
            time.sleep(0.002)
        out.append(round((time.perf_counter() - t0) * 1000, 1))
    return out


def reproduce_cmd(script: str) -> str:
    return " ".join([".venv/bin/python", script] + [shlex.quote(a) for a in sys.argv[1:]])


# --- processes and memory ---------------------------------------------------------------
def vm_rss_kib(pid: int) -> int | None:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def rollup_kib(pid: int) -> dict[str, int]:
    """Rss/Pss/... of a process from smaps_rollup, in KiB ({} if it is gone)."""
    out = {}
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines()[1:]:
        k, _, v = line.partition(":")
        parts = v.split()
        if parts and parts[0].isdigit():
            out[k] = int(parts[0])
    return out


def processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (ppid, cmdline) of every process we can see."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        out[pid] = (ppid, cmd)
    return out


def classify(cmd: bytes) -> str:
    argv0 = cmd.split(b"\0", 1)[0]
    if argv0.startswith(b"runsc-sandbox"):
        return "sentry"
    if argv0.startswith(b"runsc-gofer"):
        return "gofer"
    if b"holder.py" in cmd:
        return "holder"
    if b"runsc" in argv0:
        return "runsc"
    return "other"


def sandbox_processes(sid: str, procs: dict[int, tuple[int, bytes]]) -> dict[int, str]:
    """The host processes of one sandbox: those whose cmdline names it (sentry, gofer,
    holder) and all their descendants (ptrace stubs), pid -> kind."""
    roots = {pid: classify(cmd) for pid, (_, cmd) in procs.items() if sid.encode() in cmd}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out = dict(roots)
    todo = list(roots)
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            if c not in out:
                out[c] = "stub" if out[p] in ("sentry", "stub") else classify(procs[c][1])
                todo.append(c)
    return out


class Sampler:
    """Samples VmRSS of some pids every `interval` s in a thread; max growth per pid."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.base = {k: vm_rss_kib(p) or 0 for k, p in pids.items()}
        self.peak = dict(self.base)
        self.n = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, p in self.pids.items():
                v = vm_rss_kib(p)
                if v is not None and v > self.peak[k]:
                    self.peak[k] = v
            self.n += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def result(self) -> dict:
        return {k: {"rss_before_mib": round(self.base[k] / 1024, 1),
                    "rss_peak_mib": round(self.peak[k] / 1024, 1),
                    "max_growth_mib": round((self.peak[k] - self.base[k]) / 1024, 1)}
                for k in self.pids} | {"samples": self.n, "interval_s": self.interval}


# --- a server of our own ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`torpor serve` as a subprocess with a fresh data dir; `stop()` deletes nothing
    through the API but purges every sandbox left under the data dir and removes it."""

    def __init__(self, data_dir: str, pool_size: int, log=sys.stderr,
                 args: list[str] | None = None):
        self.data_dir = Path(data_dir)
        self.pool_size = pool_size
        self.port = free_port()
        self.preview_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.api_key = ""
        self.log = log
        self.argv = [str(VENV_BIN / "torpor"), "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), "--data-dir", str(self.data_dir),
                     "--pool-size", str(pool_size), "--preview-port", str(self.preview_port),
                     *(args or [])]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def runsc_root(self) -> str:
        return str(self.data_dir / "runsc")

    def start(self, timeout: float = 60) -> Self:
        if self.data_dir.exists():
            self.cleanup_dir()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.logfile = open(f"{self.data_dir}.log", "wb")  # noqa: SIM115 - the server's life
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        key_file = self.data_dir / "api-key"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"torpor serve exited with {self.proc.returncode}; see "
                                   f"{self.logfile.name}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    self.health = json.loads(r.read())
                if key_file.exists():
                    self.api_key = key_file.read_text().strip()
                    if self.api_key:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"torpor serve did not answer in {timeout}s")
            time.sleep(0.05)
        return self

    def pooled_running(self) -> int:
        """Booted pool sandboxes, read from the server's database (read-only)."""
        import sqlite3
        try:
            db = sqlite3.connect(f"file:{self.data_dir / 'torpor.db'}?mode=ro", uri=True,
                                 timeout=1)
            try:
                return db.execute("SELECT count(*) FROM sandboxes WHERE pooled = 1 AND "
                                  "state = 'running'").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            return -1

    def stop(self, keep_log: bool = False) -> list[str]:
        """Stop the server (SIGTERM, then SIGKILL), purge what is left, remove the dir (and
        the server's log, unless keep_log)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "logfile", None):
            self.logfile.close()
            if not keep_log:
                Path(self.logfile.name).unlink(missing_ok=True)
        return self.cleanup_dir()

    def cleanup_dir(self) -> list[str]:
        """Delete every container under the data dir (and wait for it), then purge (holders,
        mounts, cgroups), then remove the dir. gvisor.purge alone asks `runsc list -q`,
        which runsc does not know (the flag is -quiet): it then deletes no container, and
        removes the cgroups while the sandboxes are still exiting, so they stay behind."""
        from torpor.runtime import gvisor
        from torpor.runtime.cgroups import Cgroup
        left: list[str] = []
        if not self.data_dir.exists():
            return left
        state = self.data_dir / "runsc"
        if state.is_dir():
            p = subprocess.run(["runsc", "--root", str(state), "list", "--quiet"],
                               capture_output=True, text=True, check=False)
            for cid in p.stdout.split():
                subprocess.run(["runsc", "--root", str(state), "delete", "--force", cid],
                               capture_output=True, check=False)
                left.append(f"container {cid}")
        sids = [d.name for d in self.data_dir.glob("sandboxes/*")]
        left += gvisor.purge(self.data_dir)
        deadline = time.monotonic() + 5
        for sid in sids:
            cg = Cgroup(f"/torpor/{sid}")
            while cg.leftovers() and time.monotonic() < deadline:
                cg.remove()
                if cg.leftovers():
                    time.sleep(0.1)
            if cg.leftovers():
                left.append(f"cgroup /torpor/{sid} could not be removed")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return left


def say(*a) -> None:
    """Progress, to stderr with the time."""
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def avail_mib() -> int:
    """MemAvailable in MiB, the median of three reads 0.2 s apart."""
    vals = []
    for _ in range(3):
        vals.append(meminfo()["MemAvailable"] // 1024)
        time.sleep(0.2)
    return sorted(vals)[1]


def lookup(results: dict, dotted: str):
    cur = results
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def check_targets(results: dict, spec: dict[str, tuple[str, float]]) -> dict:
    """{dotted key: (op, limit)} -> {key: {value, target, met}} for the keys measured."""
    out = {}
    for key, (op, limit) in spec.items():
        v = lookup(results, key)
        if v is None:
            continue
        met = {"<=": v <= limit, "<": v < limit, ">=": v >= limit}[op]
        out[key] = {"value": v, "target": f"{op} {limit}", "met": met}
    return out


def stop_on_sigterm() -> None:
    """A SIGTERM ends a bench as Ctrl-C does: the sections stop, the cleanup still runs."""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)


def run_sections(report: dict, sections: list[str], run: Callable[[str], dict],
                 close: Callable[[bool], list[str]]) -> None:
    """`run(name)` for each section, its result (with `section_seconds`) into
    report["results"]. A section that fails goes to report["errors"] and the next one runs;
    an interrupt stops them all. `close(keep_logs)` runs last, whatever happened, and what
    it purged goes to report["leftovers_purged"]."""
    try:
        for name in sections:
            t0 = time.time()
            try:
                res = run(name)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - report it and go on with the next
                traceback.print_exc()
                report["errors"][name] = f"{type(e).__name__}: {e}"
                continue
            res["section_seconds"] = round(time.time() - t0, 1)
            report["results"][name] = res
            say(f"{name}: done in {res['section_seconds']} s")
    except KeyboardInterrupt as e:
        report["errors"]["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        say("cleaning up")
        report["leftovers_purged"] = close(bool(report["errors"]))


def default_out(args, bench: str) -> str | None:
    """Where the JSON goes: --out, else bench/results/<bench>.json on a full run only."""
    if args.out:
        return args.out
    return None if (args.only or args.quick) else str(ROOT / f"bench/results/{bench}.json")


def render_rows(rows: list[tuple[str, str, str, str]], report: dict, raw_label: str,
                widths: tuple[int, int], notes: list[str]) -> str:
    """A bench's table: (what, ours, raw, target) rows aligned under a header, then each
    target met or not, each section's error, `notes` (the machine...) and how to
    reproduce the run."""
    w0 = max(len(x[0]) for x in rows) if rows else 10
    wb, wc = widths
    lines = [f"{'measure':<{w0}}  {'torpor':>{wb}}  {raw_label:>{wc}}  target",
             "-" * (w0 + wb + wc + 18)]
    for a, b, c, d in rows:
        lines.append(f"{a:<{w0}}  {b:>{wb}}  {c:>{wc}}  {d}")
    for k, t in report.get("targets", {}).items():
        lines.append(f"target {k}: {t['value']} {t['target']}: {'met' if t['met'] else 'NOT MET'}")
    for k, e in report.get("errors", {}).items():
        lines.append(f"ERROR in {k}: {e}")
    lines.extend(notes)
    lines.append(f"reproduce: {report['reproduce']}")
    return "\n".join(lines)


def finish(report: dict, spec: dict[str, tuple[str, float]], t_start: float,
           out: str | None, table) -> int:
    """Close a report: targets, duration, load; the JSON to stdout (and to `out`), the
    table to stderr. Returns the exit code: 1 if any section failed."""
    report["targets"] = check_targets(report["results"], spec)
    report["seconds"] = round(time.time() - t_start, 1)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        say(f"wrote {out}")
    print(table(report), file=sys.stderr)
    return 1 if report["errors"] else 0

