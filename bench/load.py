"""Commands under load: throughput and latency of `commands.run` across 30 sandboxes.

For each number of commands in flight (1, 10, 50, 150; spread round-robin over the
sandboxes) the bench runs `echo <marker>` through POST /v1/sandboxes/{id}/commands (waited,
as `commands.run` does) and reports commands per second, p50/p99/max latency, and how many
commands came back without their own marker in stdout ("lost", which must be 0).

Beside each level, in the same run, the host's own floor: the same `sh -c 'echo <marker>'`
spawned on the host with as many in flight (threads running subprocess), no sandbox, no
server. The machine drifts ~20% from run to run; judge Torpor by its ratio to that figure.

    .venv/bin/python bench/load.py                 # full run, writes bench/results/load.json
    .venv/bin/python bench/load.py --quick         # fewer commands, no file written
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Server,
    default_out,
    finish,
    machine,
    render_rows,
    reproduce_cmd,
    run_sections,
    say,
    stats,
    stop_on_sigterm,
)

SANDBOXES = 30
LEVELS = [1, 10, 50, 150]
SECTIONS = ["load"]
TARGETS = {  # reported beside the figures, never asserted
    "load.c150.lost": ("<=", 0),
    "load.c50.lost": ("<=", 0),
}


def commands_for(level: int, quick: bool) -> int:
    """How many commands one level runs: enough that p99 is not the maximum."""
    n = max(200, level * 20)
    return n // 4 if quick else n


async def _torpor_level(c: httpx.AsyncClient, sids: list[str], level: int, n: int) -> dict:
    lat: list[float] = []
    lost: list[str] = []
    errors: list[str] = []
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            sid = sids[i % len(sids)]
            t0 = time.perf_counter()
            r = await c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": f"echo m{i}"})
            lat.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
            elif r.json().get("stdout") != f"m{i}\n":
                lost.append(f"{sid} #{i}: {r.json()}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(level)))
    wall = time.perf_counter() - t0
    return {"in_flight": level, "commands": n, "per_second": round(n / wall, 1),
            "latency_ms": stats(lat, 1) | {"p99": round(sorted(lat)[int(0.99 * (n - 1))], 1)},
            "lost": len(lost), "errors": len(errors),
            "lost_examples": lost[:5], "error_examples": errors[:5]}


def _host_level(level: int, n: int) -> dict:
    """The same command spawned on the host, `level` at a time."""
    lat: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", f"echo m{i}"], capture_output=True, check=True)
        lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(level) as ex:
        list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"per_second": round(n / wall, 1),
            "latency_ms": stats(lat, 2) | {"p99": round(sorted(lat)[int(0.99 * (n - 1))], 2)}}


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.srv: Server | None = None

    def load(self) -> dict:
        self.srv = Server(f"/tmp/tlb{os.getpid()}", pool_size=0).start()
        say(f"server on {self.srv.url}; creating {SANDBOXES} sandboxes")
        return asyncio.run(self._load())

    async def _load(self) -> dict:
        assert self.srv is not None
        limits = httpx.Limits(max_connections=max(LEVELS) + 10,
                              max_keepalive_connections=max(LEVELS) + 10)
        async with httpx.AsyncClient(base_url=self.srv.url, timeout=300, limits=limits,
                                     headers={"Authorization": f"Bearer {self.srv.api_key}"}
                                     ) as c:
            sem = asyncio.Semaphore(10)

            async def create() -> str:
                async with sem:
                    r = await c.post("/v1/sandboxes", json={"standby_after": 0})
                    r.raise_for_status()
                    return r.json()["id"]

            sids = await asyncio.gather(*(create() for _ in range(SANDBOXES)))
            for sid in sids:  # the first command of a sandbox is slower: not measured
                await c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "true"})
            out: dict = {"sandboxes": SANDBOXES}
            for level in LEVELS:
                n = commands_for(level, self.quick)
                say(f"{level} in flight: {n} commands")
                res = await _torpor_level(c, sids, level, n)
                res["host"] = await asyncio.to_thread(_host_level, level, n)
                res["ratio_per_second"] = round(res["per_second"]
                                                / res["host"]["per_second"], 3)
                out[f"c{level}"] = res
            return out

    def close(self, keep_logs: bool = False) -> list[str]:
        return self.srv.stop(keep_log=keep_logs) if self.srv else []


def table(report: dict) -> str:
    res = report["results"].get("load", {})
    rows = []
    for level in LEVELS:
        r = res.get(f"c{level}")
        if not r:
            continue
        h = r["host"]
        rows.append((f"{level:>3} in flight: commands/s", f"{r['per_second']}",
                     f"{h['per_second']}", ""))
        rows.append(("      latency p50 / p99 ms",
                     f"{r['latency_ms']['p50']} / {r['latency_ms']['p99']}",
                     f"{h['latency_ms']['p50']} / {h['latency_ms']['p99']}", ""))
        rows.append(("      lost / errors", f"{r['lost']} / {r['errors']}", "",
                     "0 lost" if level >= 50 else ""))
    m = report["machine"]
    return render_rows(rows, report, "host sh -c", (16, 16), [
        (f"{SANDBOXES} sandboxes; machine: {m['cpu_model']}, {m['nproc']} cpus; "
         f"runsc {m['runsc']}")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the commands")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", help="write the JSON here (default on a full run: "
                    "bench/results/load.json)")
    args = ap.parse_args()
    stop_on_sigterm()
    report = {"bench": "load", "machine": machine(),
              "settings": {"sandboxes": SANDBOXES, "levels": LEVELS, "quick": args.quick,
                           "command": "echo m<i>, waited (POST .../commands)",
                           "server_argv": "torpor serve --pool-size 0 --data-dir /tmp/tlb<pid>"},
              "reproduce": reproduce_cmd("bench/load.py"), "results": {}, "errors": {}}
    b = Bench(args.quick)
    t_start = time.time()
    run_sections(report, SECTIONS, lambda _name: b.load(), b.close)
    return finish(report, TARGETS, t_start, default_out(args, "load"), table)


if __name__ == "__main__":
    sys.exit(main())
