"""Foundation benchmark: the numbers a sandbox platform is judged by, each beside what
plain `runsc` does on the same machine in the same run.

Starts its own `torpor serve` (fresh data dir under /tmp; --pool-size 0 for everything but
the warm-pool section, which gets a second server with --pool-size 2) and drives it with
the SDK. Sections (`--only a,b`):

  cold     create-to-first-output of `echo ok` with no pool (SDK create, then the command's
           first stdout chunk); raw: `runsc run` of `echo ok` in a minimal bundle (a root
           directory with the host /usr bind-mounted read-only), process start to first
           stdout byte; beside it the same of `python3 -c print` and of a Python init that
           spawns `sh -c 'echo ok'` (what a sandbox whose agent starts commands does at the
           least). Interleaved, one of each per iteration. The driver's spans of each
           start (start.json) give `cold_breakdown_ms`.
  warm     the same, served from the warm pool (waits until the pool is full again before
           each iteration; checks the sandbox's events say `handed_out`), alternately
           through the SDK (a new httpx client per Sandbox.create, as users write it) and on
           one reused httpx client (the server's share alone; plus a second `echo ok`).
  exec     `commands.run("true")` on a running sandbox; raw: `runsc exec <id> true` into
           the same sandbox through the server's runsc state dir. Also GET /v1/sandboxes/{id}
           (the HTTP + auth + database path alone).
  files    1 MiB of random bytes written then read back (`files.write`, `files.read`),
           compared.
  upload   1 GiB streamed from a generator; duration, MiB/s, and the VmRSS growth of the
           server and of the sandbox's holder (sampled every 50 ms); size checked in the
           sandbox with `stat -c %s`, file deleted after.
  density  N sandboxes (default resources) each running `sleep infinity` in the background,
           all answering `echo ok`; host memory per sandbox as the PSS (and RSS) of each
           sandbox's sentry (+ its ptrace stubs), gofer and holder processes, as the drop of
           MemAvailable, and as its memory cgroup usage; then all deleted and MemAvailable
           read again.

Prints one JSON object to stdout (and writes bench/results/foundation.json on a full run,
or --out FILE), then a table to stderr. Progress goes to stderr.

    .venv/bin/python bench/foundation.py            # full run, ~3-4 minutes (`make bench`)
    .venv/bin/python bench/foundation.py --quick    # fewer iterations, 10 sandboxes
    .venv/bin/python bench/foundation.py --only exec,files

Needs root and runsc (ptrace platform). No timed assertions: targets are reported, not
enforced. Everything it starts is deleted at the end, also on failure (purge of its data
dirs).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import httpx
from common import (
    Sampler,
    Server,
    avail_mib,
    default_out,
    finish,
    machine,
    ms_since,
    orphan_reap_ms,
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

from torpor import Sandbox

SECTIONS = ["cold", "exec", "files", "upload", "density", "warm"]
TARGETS = {  # reported beside the figures, never asserted
    "cold.ratio_to_raw_p50": ("<=", 1.5),
    "warm.first_output_ms.p50": ("<=", 50),
    "exec.true_ms.p50": ("<=", 10),
    "files.write_read_1mib_ms.p50": ("<=", 30),
    "upload.server_rss_growth_mib": ("<", 64),
}
RUNSC = shutil.which("runsc") or "/usr/bin/runsc"
PLATFORM = "ptrace"


# --- our side ---------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.base = f"/tmp/tfb{os.getpid()}"
        self.a: Server | None = None  # --pool-size 0
        self.b: Server | None = None  # --pool-size 2
        self.work: Sandbox | None = None
        self.live: set[str] = set()  # sandboxes we created and have not deleted
        self.raw_dir = Path(self.base + "raw")

    # servers
    def server_a(self) -> Server:
        if self.a is None:
            say("starting torpor serve --pool-size 0")
            self.a = Server(self.base + "a", 0).start()
        return self.a

    def sdk(self, srv: Server) -> dict:
        return {"url": srv.url, "api_key": srv.api_key}

    def create(self, srv: Server) -> Sandbox:
        sbx = Sandbox.create(**self.sdk(srv))
        self.live.add(sbx.id)
        return sbx

    def delete(self, sbx: Sandbox) -> None:
        try:
            sbx.delete()
        finally:
            self.live.discard(sbx.id)
            sbx.close()

    def work_sandbox(self) -> Sandbox:
        if self.work is None:
            self.work = self.create(self.server_a())
        return self.work

    def drop_work(self) -> None:
        if self.work is not None:
            self.delete(self.work)
            self.work = None

    def holder_status(self, srv: Server, sid: str) -> dict:
        try:
            return json.loads((srv.data_dir / "sandboxes" / sid / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def first_output(self, srv: Server, http: httpx.Client | None = None,
                     via: str = "sdk") -> dict:
        """Create, then `echo ok` streamed: ms to the create answer and to the first stdout.
        via="sdk": `Sandbox.create` + `commands.run(on_stdout=...)`, as a user writes it (a
        new SDK session, so a new httpx client, per sandbox). via="http": the same two
        requests on one long-lived httpx client (`http`), i.e. the server's share alone.
        With `http`, also reads the events (handed out from the pool?)."""
        first: list[float] = []
        out = {}
        t0 = time.perf_counter()
        if via == "sdk":
            sbx = Sandbox.create(**self.sdk(srv))
            sid = sbx.id
        else:
            assert http is not None
            resp = http.post("/v1/sandboxes", json={"template": "base"})
            resp.raise_for_status()
            sid = resp.json()["id"]
        out["create_ms"] = ms_since(t0)
        self.live.add(sid)
        try:
            if via == "sdk":
                r = sbx.commands.run("echo ok", on_stdout=lambda s: first or first.append(
                    ms_since(t0)))
                out["exit_ms"] = ms_since(t0)
                out["ok"] = r.stdout == "ok\n" and r.exit_code == 0
            else:
                text, code = self.http_run(http, sid, "echo ok", first, t0)
                out["exit_ms"] = ms_since(t0)
                out["ok"] = text == "ok\n" and code == 0
                again: list[float] = []
                t2 = time.perf_counter()
                self.http_run(http, sid, "echo ok", again, t2)
                out["second_echo_first_output_ms"] = again[0] if again else float("nan")
            out["first_output_ms"] = first[0] if first else float("nan")
            st = self.holder_status(srv, sid)
            out["runsc_run_detach_ms"] = (st.get("start_seconds") or float("nan")) * 1000
            out["spans"] = self.start_spans(srv, sid)
            if http is not None:
                evs = http.get(f"/v1/sandboxes/{sid}/events").json()
                out["handed_out"] = any(e.get("kind") == "handed_out" for e in evs)
        finally:
            t1 = time.perf_counter()
            if via == "sdk":
                self.delete(sbx)
            else:
                http.delete(f"/v1/sandboxes/{sid}").raise_for_status()
                self.live.discard(sid)
            out["delete_ms"] = ms_since(t1)
        return out

    @staticmethod
    def start_spans(srv: Server, sid: str) -> dict:
        """The driver's account of the start (`start.json`: ms per span), {} for a sandbox
        that did not boot here (the pool's)."""
        try:
            return json.loads((srv.data_dir / "sandboxes" / sid / "start.json").read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def http_run(http: httpx.Client, sid: str, cmd: str, first: list[float],
                 t0: float) -> tuple[str, int | None]:
        text, code = "", None
        with http.stream("POST", f"/v1/sandboxes/{sid}/commands",
                         json={"cmd": cmd, "stream": True}) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line:
                    continue
                ev = json.loads(line)
                if ev["type"] == "stdout":
                    if not first:
                        first.append(ms_since(t0))
                    text += ev["data"]
                elif ev["type"] == "exit":
                    code = ev["exit_code"]
        return text, code

    RAW_ARGS: ClassVar[dict[str, list[str]]] = {
        "echo": ["/bin/echo", "ok"],
        # the interpreter start the agent pays (it runs with -s -B, plus its own imports)
        "python": ["/usr/bin/python3", "-s", "-B", "-c", "print('ok')"],
        # what every sandbox of ours does at the least: an init in Python (started as the
        # agent is, -S -s -B) that starts the user's command, `sh -c 'echo ok'`
        "python_spawn": ["/usr/bin/python3", "-S", "-s", "-B", "-c",
                         ("import os; os.waitpid(os.posix_spawn('/bin/sh', "
                          "['sh', '-c', 'echo ok'], {}), 0)")],
    }

    def raw_bundle(self, kind: str = "echo") -> Path:
        """A minimal bundle: root is a directory of mount points and merged-/usr symlinks,
        the host /usr bind-mounted read-only over its /usr."""
        rootfs = self.raw_dir / "rootfs"
        if not rootfs.exists():
            for d in ("usr", "proc", "dev", "sys", "tmp", "etc"):
                (rootfs / d).mkdir(parents=True, exist_ok=True)
            for name in ("bin", "lib", "lib64", "sbin"):
                os.symlink(f"usr/{name}", rootfs / name)
        b = self.raw_dir / f"bundle-{kind}"
        if b.exists():
            return b
        b.mkdir(parents=True)
        spec = {
            "ociVersion": "1.0.2",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                        "args": self.RAW_ARGS[kind], "env": ["PATH=/usr/bin:/bin"],
                        "cwd": "/"},
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
        (b / "config.json").write_text(json.dumps(spec))
        return b

    def raw_run_argv(self, cid: str, kind: str = "echo") -> list[str]:
        return [RUNSC, "--root", str(self.raw_dir / "state"), "--platform", PLATFORM,
                "--network", "none", "run", "--bundle", str(self.raw_bundle(kind)), cid]

    def raw_run(self, kind: str = "echo") -> dict:
        cid = "raw" + secrets.token_hex(4)
        argv = self.raw_run_argv(cid, kind)
        with open(self.raw_dir / "runsc.log", "ab") as log:
            t0 = time.perf_counter()
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=log)
            b = p.stdout.read(1)
            first = ms_since(t0)
            rest = p.stdout.read()
            p.wait()
            done = ms_since(t0)
        return {"first_output_ms": first, "exit_ms": done,
                "ok": (b + rest) == b"ok\n" and p.returncode == 0}

    # --- sections -----------------------------------------------------------------------
    def cold(self, n: int) -> dict:
        srv = self.server_a()
        self.raw_bundle()
        say(f"cold: {n} creates to first output, interleaved with raw runsc run")
        self.first_output(srv)  # warm-up: imports, first template use, page cache
        self.raw_run()
        self.raw_run("python")
        self.raw_run("python_spawn")
        ours, raw, raw_py, raw_spawn = [], [], [], []
        for _ in range(n):
            ours.append(self.first_output(srv))
            raw.append(self.raw_run())
            raw_py.append(self.raw_run("python"))
            raw_spawn.append(self.raw_run("python_spawn"))
        return {
            "ours": {k: stats([r[k] for r in ours]) for k in
                     ("first_output_ms", "create_ms", "exit_ms", "delete_ms",
                      "runsc_run_detach_ms")},
            "ours_all_ok": all(r["ok"] for r in ours),
            "raw_runsc_run": {k: stats([r[k] for r in raw]) for k in
                              ("first_output_ms", "exit_ms")},
            "raw_all_ok": all(r["ok"] for r in raw),
            "raw_command": " ".join(self.raw_run_argv("ID")) + "   (process: /bin/echo ok)",
            "raw_runsc_run_python": {k: stats([r[k] for r in raw_py]) for k in
                                     ("first_output_ms", "exit_ms")},
            "raw_python_all_ok": all(r["ok"] for r in raw_py),
            "raw_python_process": " ".join(self.RAW_ARGS["python"]),
            # a better-matched floor than echo for a sandbox whose init starts commands:
            # reported beside it, the target stays the ratio to echo
            "raw_runsc_run_python_spawn": {k: stats([r[k] for r in raw_spawn]) for k in
                                           ("first_output_ms", "exit_ms")},
            "raw_python_spawn_all_ok": all(r["ok"] for r in raw_spawn),
            "raw_python_spawn_process": " ".join(self.RAW_ARGS["python_spawn"]),
            "ratio_to_raw_python_spawn_p50": round(
                stats([r["first_output_ms"] for r in ours])["p50"]
                / stats([r["first_output_ms"] for r in raw_spawn])["p50"], 2),
            "first_output_ms": stats([r["first_output_ms"] for r in ours]),
            "ratio_to_raw_p50": round(stats([r["first_output_ms"] for r in ours])["p50"]
                                      / stats([r["first_output_ms"] for r in raw])["p50"], 2),
            "cold_breakdown_ms": breakdown(ours),
        }

    def warm(self, n: int, pool: int = 2) -> dict:
        say(f"warm: starting torpor serve --pool-size {pool}")
        self.b = srv = Server(self.base + "b", pool).start()
        http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.api_key}"})
        try:
            t0 = time.perf_counter()
            self.wait_pool(srv, pool, 120)
            fill_ms = ms_since(t0)
            say(f"warm: pool of {pool} full after {fill_ms:.0f} ms; {n} creates through the "
                f"SDK and {n} on one httpx client, alternating")
            self.wait_pool(srv, pool, 60)
            self.first_output(srv, http)  # warm-up
            self.wait_pool(srv, pool, 60)
            self.first_output(srv, http, "http")
            runs: dict[str, list[dict]] = {"sdk": [], "http": []}
            waits = []
            for _ in range(n):
                for via in ("sdk", "http"):
                    t1 = time.perf_counter()
                    self.wait_pool(srv, pool, 60)
                    time.sleep(0.2)  # let the last boot's tail (agent start, DB) settle
                    waits.append(ms_since(t1))
                    runs[via].append(self.first_output(srv, http, via))
            client_ms = []
            for _ in range(10):
                t1 = time.perf_counter()
                httpx.Client(base_url=srv.url).close()
                client_ms.append(ms_since(t1))
            res = {"pool_size": pool, "pool_fill_ms_after_start": round(fill_ms, 1)}
            for via, rs in runs.items():
                keys = ["first_output_ms", "create_ms", "exit_ms", "delete_ms"]
                if via == "http":
                    keys.append("second_echo_first_output_ms")
                res[via] = {k: stats([r[k] for r in rs]) for k in keys}
                res[via]["handed_out_from_pool"] = sum(r["handed_out"] for r in rs)
                res[via]["all_ok"] = all(r["ok"] for r in rs)
            res["first_output_ms"] = res["sdk"]["first_output_ms"]
            res["httpx_client_construct_ms"] = stats(client_ms)
            res["wait_for_refill_ms"] = stats(waits)
            res["notes"] = [
                ("sdk: Sandbox.create + commands.run(on_stdout=) as users write it; each "
                 "Sandbox.create builds a new httpx client (see httpx_client_construct_ms)"),
                "http: the same requests on one long-lived httpx client (the server's share)",
                ("the server starts booting a replacement the moment it hands one out, so "
                 "`echo ok` runs while that boot uses the 2 cores"),
            ]
            return res
        finally:
            http.close()
            say("warm: stopping the pool server")
            left = srv.stop(keep_log=sys.exc_info()[0] is not None)
            self.b = None
            if left:
                say(f"warm: purged {len(left)} leftovers (pool sandboxes): {left[:4]}...")

    def wait_pool(self, srv: Server, want: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while srv.pooled_running() < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm pool did not reach {want} in {timeout}s")
            if srv.proc.poll() is not None:
                raise RuntimeError("the pool server exited")
            time.sleep(0.02)

    def exec_(self, n: int, n_raw: int) -> dict:
        sbx = self.work_sandbox()
        srv = self.a
        say(f"exec: {n} x commands.run('true'), {n_raw} x runsc exec, {n} x GET sandbox")
        for _ in range(10):
            sbx.commands.run("true")
            sbx.info()
        ours, infos, bad = [], [], 0
        for _ in range(n):
            t0 = time.perf_counter()
            r = sbx.commands.run("true")
            ours.append(ms_since(t0))
            bad += r.exit_code != 0
            t0 = time.perf_counter()
            sbx.info()
            infos.append(ms_since(t0))
        argv = [RUNSC, "--root", srv.runsc_root, "--platform", PLATFORM, "--network", "none",
                "exec", sbx.id, "true"]
        raw, raw_bad = [], 0
        subprocess.run(argv, capture_output=True, check=False)
        for _ in range(n_raw):
            t0 = time.perf_counter()
            p = subprocess.run(argv, capture_output=True, check=False)
            raw.append(ms_since(t0))
            raw_bad += p.returncode != 0
        return {"true_ms": stats(ours), "nonzero_exits": bad,
                "get_sandbox_ms": stats(infos),
                "raw_runsc_exec_ms": stats(raw), "raw_nonzero_exits": raw_bad,
                "raw_command": " ".join(argv[:-2] + ["ID", "true"])}

    def files(self, n: int) -> dict:
        sbx = self.work_sandbox()
        say(f"files: {n} x 1 MiB write + read")
        data = [os.urandom(1 << 20) for _ in range(4)]
        sbx.files.write("warm.bin", data[0])
        sbx.files.read("warm.bin", "bytes")
        tot, wr, rd, mismatches = [], [], [], 0
        for i in range(n):
            d = data[i % len(data)]
            t0 = time.perf_counter()
            sbx.files.write("f1m.bin", d)
            t1 = time.perf_counter()
            back = sbx.files.read("f1m.bin", "bytes")
            t2 = time.perf_counter()
            tot.append((t2 - t0) * 1000)
            wr.append((t1 - t0) * 1000)
            rd.append((t2 - t1) * 1000)
            mismatches += back != d
        sbx.files.remove("f1m.bin")
        sbx.files.remove("warm.bin")
        return {"write_read_1mib_ms": stats(tot), "write_ms": stats(wr), "read_ms": stats(rd),
                "mismatches": mismatches}

    def upload(self, mib: int) -> dict:
        sbx = self.work_sandbox()
        srv = self.a
        holder = self.holder_status(srv, sbx.id).get("holder_pid")
        say(f"upload: {mib} MiB streamed from a generator")
        blocks = [os.urandom(1 << 20) for _ in range(8)]

        def gen():
            for i in range(mib):
                yield blocks[i % len(blocks)]

        pids = {"server": srv.pid}
        if holder:
            pids["holder"] = holder
        with Sampler(pids, 0.05) as smp:
            t0 = time.perf_counter()
            info = sbx.files.write("big.bin", gen())
            secs = time.perf_counter() - t0
        r = sbx.commands.run("stat -c %s big.bin")
        size = int(r.stdout.strip()) if r.stdout.strip().isdigit() else None
        sbx.files.remove("big.bin")
        rss = smp.result()
        return {"mib": mib, "seconds": round(secs, 2), "mib_per_s": round(mib / secs, 1),
                "size_reported": info.size, "size_in_sandbox": size,
                "size_ok": size == mib << 20,
                "server_rss_growth_mib": rss["server"]["max_growth_mib"], "rss": rss}

    def density(self, n: int, conc: int) -> dict:
        self.drop_work()
        srv = self.server_a()
        say(f"density: settling, then {n} sandboxes at concurrency {conc}")
        time.sleep(3)
        foreign_before = self.foreign_sentries()
        before = avail_mib()
        sbxs: list[Sandbox] = []
        create_ms: list[float] = []

        def make(_):
            t0 = time.perf_counter()
            s = self.create(srv)
            ms = ms_since(t0)
            s.commands.run("sleep infinity", background=True)
            return s, ms

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(conc) as ex:
            for s, ms in ex.map(make, range(n)):
                sbxs.append(s)
                create_ms.append(ms)
        create_wall = time.perf_counter() - t0

        def check(s: Sandbox) -> bool:
            r = s.commands.run("echo ok")
            return r.stdout == "ok\n" and len(s.commands.list()) >= 1

        with cf.ThreadPoolExecutor(conc) as ex:
            answered = sum(ex.map(check, sbxs))
        say(f"density: {len(sbxs)} created in {create_wall:.1f}s, {answered} answer; "
            "settling 5 s")
        time.sleep(5)
        after = avail_mib()
        foreign_with = self.foreign_sentries()
        procs = processes()
        kinds: dict[str, dict[str, float]] = {}
        per_sbx_pss = []
        cg_total = 0
        from torpor.runtime.cgroups import Cgroup
        for s in sbxs:
            mine = sandbox_processes(s.id, procs)
            pss = 0
            for pid, kind in mine.items():
                ru = rollup_kib(pid)
                k = kinds.setdefault(kind, {"procs": 0, "rss_kib": 0, "pss_kib": 0})
                k["procs"] += 1
                k["rss_kib"] += ru.get("Rss", 0)
                k["pss_kib"] += ru.get("Pss", 0)
                pss += ru.get("Pss", 0)
            per_sbx_pss.append(pss / 1024)
            cg_total += Cgroup(f"/torpor/{s.id}").memory_bytes() or 0
        tot_pss = sum(k["pss_kib"] for k in kinds.values()) / 1024
        tot_rss = sum(k["rss_kib"] for k in kinds.values()) / 1024
        say("density: deleting all")
        del_ms: list[float] = []

        def drop(s: Sandbox) -> float:
            t = time.perf_counter()
            self.delete(s)
            return ms_since(t)

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(conc) as ex:
            del_ms = list(ex.map(drop, sbxs))
        delete_wall = time.perf_counter() - t0
        time.sleep(5)
        end = avail_mib()
        foreign_end = self.foreign_sentries()
        n_ok = len(sbxs)
        return {
            "sandboxes": n_ok, "concurrency": conc, "answered_echo_ok": answered,
            "create_ms": stats(create_ms), "create_wall_s": round(create_wall, 1),
            "pss_per_sandbox_mib": round(tot_pss / n_ok, 1),
            "rss_sum_per_sandbox_mib": round(tot_rss / n_ok, 1),
            "pss_per_sandbox_spread_mib": stats(per_sbx_pss, 1),
            "by_process_kind_per_sandbox_mib": {
                k: {"procs": round(v["procs"] / n_ok, 2),
                    "pss": round(v["pss_kib"] / 1024 / n_ok, 1),
                    "rss": round(v["rss_kib"] / 1024 / n_ok, 1)} for k, v in kinds.items()},
            "cgroup_usage_per_sandbox_mib": round(cg_total / n_ok / (1 << 20), 1),
            "mem_available_mib": {"before": before, "with_all": after,
                                  "after_delete": end},
            "mem_available_drop_per_sandbox_mib": round((before - after) / n_ok, 1),
            "mem_available_not_back_mib": before - end,
            "other_sandboxes_on_host": {"before": foreign_before, "with_all": foreign_with,
                                        "after_delete": foreign_end,
                                        "note": "runsc sandboxes not ours (other users of "
                                                "the machine): they move MemAvailable too"},
            "delete_ms": stats(del_ms), "delete_wall_s": round(delete_wall, 1),
            "server_rss_mib_after": round((vm_rss_kib(srv.pid) or 0) / 1024, 1),
        }

    def foreign_sentries(self) -> int:
        return sum(1 for _, cmd in processes().values()
                   if cmd.startswith(b"runsc-sandbox") and self.base.encode() not in cmd)

    # --- cleanup ------------------------------------------------------------------------
    def close(self, keep_logs: bool = False) -> list[str]:
        left = []
        for srv in (self.a, self.b):
            if srv is None:
                continue
            if srv.proc is not None and srv.proc.poll() is None:
                for sid in list(self.live):
                    try:
                        Sandbox(sid, **self.sdk(srv)).delete()
                        self.live.discard(sid)
                    except Exception as e:  # noqa: BLE001 - purge below takes care of it
                        say(f"cleanup: delete {sid}: {e}")
            left += srv.stop(keep_log=keep_logs)
            if keep_logs:
                say(f"server log kept: {srv.data_dir}.log")
        self.a = self.b = None
        state = self.raw_dir / "state"
        if state.is_dir():
            p = subprocess.run([RUNSC, "--root", str(state), "list", "--quiet"],
                               capture_output=True, text=True, check=False)
            for cid in p.stdout.split():
                subprocess.run([RUNSC, "--root", str(state), "delete", "--force", cid],
                               capture_output=True, check=False)
                left.append(f"raw container {cid}")
        shutil.rmtree(self.raw_dir, ignore_errors=True)
        return left


def breakdown(runs: list[dict]) -> dict:
    """p50 of each span of a cold create, in order: the driver's spans (start.json: layer,
    spec, holder, runsc, agent, cpu_limit; their sum `driver`), `engine_http` (the create
    call's time outside the driver: HTTP, SDK, records, configuring the agent) and
    `first_exec` (create answered -> first stdout of `echo ok`)."""
    out: dict[str, float] = {}
    spans = [r["spans"] for r in runs if r.get("spans")]
    if not spans:
        return out
    for k in spans[0]:
        if k != "total":
            out[k] = stats([s.get(k, float("nan")) for s in spans])["p50"]
    out["driver"] = stats([s["total"] for s in spans])["p50"]
    out["engine_http"] = stats([r["create_ms"] - r["spans"]["total"] for r in runs
                                if r.get("spans")])["p50"]
    out["first_exec"] = stats([r["first_output_ms"] - r["create_ms"] for r in runs])["p50"]
    return out


# --- report -----------------------------------------------------------------------------
def table(report: dict) -> str:
    r = report["results"]
    rows: list[tuple[str, str, str, str]] = []  # what, ours, raw runsc, target

    def f(d, k="p50"):
        return "-" if not d or k not in d else f"{d[k]:.1f}"

    if "cold" in r:
        c = r["cold"]
        o, w = c["ours"]["first_output_ms"], c["raw_runsc_run"]["first_output_ms"]
        rows.append(("cold create->first output p50/p90/min ms",
                     f"{f(o)}/{f(o, 'p90')}/{f(o, 'min')}", f"{f(w)}/{f(w, 'p90')}/{f(w, 'min')}",
                     ""))
        p = c["raw_runsc_run_python"]["first_output_ms"]
        rows.append(("  raw runsc run of python3 -s -B -c print p50/min ms", "",
                     f"{f(p)}/{f(p, 'min')}", ""))
        if "raw_runsc_run_python_spawn" in c:
            p = c["raw_runsc_run_python_spawn"]["first_output_ms"]
            rows.append(("  raw runsc run of python3 -S spawning sh -c echo p50/min ms", "",
                         f"{f(p)}/{f(p, 'min')}", ""))
            rows.append(("  ours / raw python3 spawning sh, p50s",
                         f"{c['ratio_to_raw_python_spawn_p50']:.2f}", "", ""))
        rows.append(("  of which create call p50 ms", f(c["ours"]["create_ms"]), "", ""))
        rows.append(("  of which runsc run --detach p50 ms", f(c["ours"]["runsc_run_detach_ms"]),
                     "", ""))
        rows.append(("  ours / raw runsc run (echo), p50s", f"{c['ratio_to_raw_p50']:.2f}",
                     "", "<= 1.5"))
        for k, v in (c.get("cold_breakdown_ms") or {}).items():
            rows.append((f"  span {k} p50 ms", f"{v:.1f}", "", ""))
        rows.append(("  delete p50 ms", f(c["ours"]["delete_ms"]), "", ""))
    if "warm" in r:
        w = r["warm"]
        rows.append(("warm create->first output p50/p90/min ms",
                     (f"{f(w['first_output_ms'])}/{f(w['first_output_ms'], 'p90')}/"
                      f"{f(w['first_output_ms'], 'min')}"), "(cold raw above)", "p50 <= 50"))
        rows.append(("  of which create call p50 ms", f(w["sdk"]["create_ms"]), "", ""))
        h = w["http"]
        rows.append(("warm, one reused httpx client: first output p50/p90/min ms",
                     (f"{f(h['first_output_ms'])}/{f(h['first_output_ms'], 'p90')}/"
                      f"{f(h['first_output_ms'], 'min')}"), "", ""))
        rows.append(("  of which create call p50 ms", f(h["create_ms"]), "", ""))
        rows.append(("  second echo in it, first output p50 ms",
                     f(h["second_echo_first_output_ms"]), "", ""))
        rows.append(("  new httpx.Client() p50 ms (paid per Sandbox.create)",
                     f(w["httpx_client_construct_ms"]), "", ""))
    if "exec" in r:
        e = r["exec"]
        rows.append(("commands.run('true') p50/p90 ms",
                     f"{f(e['true_ms'])}/{f(e['true_ms'], 'p90')}",
                     f"{f(e['raw_runsc_exec_ms'])}/{f(e['raw_runsc_exec_ms'], 'p90')}",
                     "p50 <= 10"))
        rows.append(("  GET /v1/sandboxes/{id} p50 ms", f(e["get_sandbox_ms"]), "", ""))
    if "files" in r:
        fl = r["files"]
        rows.append(("1 MiB write+read p50/p90 ms",
                     f"{f(fl['write_read_1mib_ms'])}/{f(fl['write_read_1mib_ms'], 'p90')}",
                     "", "p50 <= 30"))
        rows.append(("  write / read p50 ms", f"{f(fl['write_ms'])} / {f(fl['read_ms'])}", "",
                     ""))
    if "upload" in r:
        u = r["upload"]
        rows.append((f"{u['mib']} MiB upload s / MiB/s", f"{u['seconds']} / {u['mib_per_s']}",
                     "~180 MiB/s (stdio, notes)", ""))
        rows.append(("  server RSS growth MiB", f"{u['server_rss_growth_mib']}", "", "< 64"))
        if "holder" in u["rss"]:
            rows.append(("  holder RSS growth MiB", f"{u['rss']['holder']['max_growth_mib']}",
                         "", ""))
    if "density" in r:
        d = r["density"]
        rows.append((f"density: {d['sandboxes']} sandboxes, answered",
                     str(d["answered_echo_ok"]), "", ""))
        rows.append(("  PSS per sandbox MiB (sentry+stubs+gofer+holder)",
                     str(d["pss_per_sandbox_mib"]), "", ""))
        rows.append(("  RSS sum per sandbox MiB", str(d["rss_sum_per_sandbox_mib"]), "", ""))
        rows.append(("  MemAvailable drop per sandbox MiB",
                     str(d["mem_available_drop_per_sandbox_mib"]), "", ""))
        rows.append(("  memory cgroup usage per sandbox MiB",
                     str(d["cgroup_usage_per_sandbox_mib"]), "", ""))
        rows.append(("  MemAvailable not back after delete MiB",
                     str(d["mem_available_not_back_mib"]), "", ""))
        rows.append(("  create p50 ms at concurrency " + str(d["concurrency"]),
                     f(d["create_ms"]), "", ""))
    m = report["machine"]
    return render_rows(rows, report, "raw runsc", (20, 26), [
        (f"machine: {m['cpu_model']}, {m['nproc']} cpus, {m['mem_total_mib']} MiB; "
        f"runsc {m['runsc']}; {m['uname']}"),
        (f"orphans are reaped by PID 1 after {m['orphan_reap_ms']} ms here; "
        "`runsc delete` waits for that, so it bounds every delete")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations, 10 sandboxes")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", help="write the JSON here (default on a full run: "
                    "bench/results/foundation.json)")
    ap.add_argument("--density", type=int, help="sandboxes for density (50; 10 with --quick)")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else SECTIONS
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
    q = args.quick
    n = {"cold": 5 if q else 15, "warm": 5 if q else 15, "exec": 50 if q else 200,
         "exec_raw": 10 if q else 30, "files": 15 if q else 50, "upload": 256 if q else 1024,
         "density": args.density or (10 if q else 50)}

    stop_on_sigterm()

    report = {"bench": "foundation",
              "machine": machine(RUNSC) | {"orphan_reap_ms": orphan_reap_ms()},
              "settings": {"sections": only, "quick": q, "iterations": n,
                           "platform": PLATFORM, "network": "none",
                           "server_argv": "torpor serve --host 127.0.0.1 --port <free> "
                                          "--data-dir /tmp/tfb<pid>{a,b} --pool-size {0,2}"},
              "reproduce": reproduce_cmd("bench/foundation.py"),
              "results": {}, "errors": {}}
    b = Bench(args)
    t_start = time.time()

    def run(name: str) -> dict:
        if name == "cold":
            return b.cold(n["cold"])
        if name == "warm":
            b.drop_work()
            if b.a is not None:  # the pool server runs alone
                b.a.stop()
                b.a = None
            return b.warm(n["warm"])
        if name == "exec":
            return b.exec_(n["exec"], n["exec_raw"])
        if name == "files":
            return b.files(n["files"])
        if name == "upload":
            return b.upload(n["upload"])
        return b.density(n["density"], 3)

    run_sections(report, [s for s in SECTIONS if s in only], run,
                 lambda keep: b.close(keep_logs=keep))
    out = default_out(args, "foundation")
    return finish(report, TARGETS, t_start, out, table)


if __name__ == "__main__":
    sys.exit(main())
