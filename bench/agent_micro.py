"""Micro-benchmark of the in-sandbox agent, through the real channel (driver -> holder ->
runsc -> agent), without the HTTP API.

Measures, as p50 and min over many runs:
  start          GVisorDriver.start() until the agent's HELLO (layer, holder, runsc, agent)
  first_output   start() plus `echo` until its first output frame (create-to-first-output)
  ping           a PING/PONG round trip on the channel
  exec_true_user `true` as `user`, found through the default PATH, until its CLOSE
  exec_true_root `/bin/true` as root, until its CLOSE
and checks that `ls -la /` works in the sandbox (the statx compat library).

Prints one JSON object (machine, settings, results) and a table.

    .venv/bin/python bench/agent_micro.py                  # this checkout's agent
    .venv/bin/python bench/agent_micro.py --agent-dir DIR  # another copy (e.g. the old one)

Needs root and runsc. The machine is shared by whatever else runs on it: compare runs made
close together, and look at min as well as p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torpor.runtime import gvisor
from torpor.runtime.base import SandboxSpec
from torpor.templates import TemplateStore


def stats(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    return {"p50": round(s[len(s) // 2], 2), "min": round(s[0], 2), "max": round(s[-1], 2),
            "n": len(s)}


async def run_cmd(chan, argv, user) -> tuple[float, float | None, bytes]:
    """(ms to CLOSE, ms to first output or None, output)"""
    t0 = time.perf_counter()
    first = None
    out = bytearray()
    st = chan.open("exec", argv=argv, user=user)
    async for ev in st:
        if ev.kind != "msg":
            if first is None:
                first = (time.perf_counter() - t0) * 1000
            out += ev.data
    await st.finish()
    return (time.perf_counter() - t0) * 1000, first, bytes(out)


async def bench(args) -> dict:
    data = Path(args.data_dir)
    template = TemplateStore(data).ensure_base()
    driver = gvisor.GVisorDriver(data)

    def spec(i: int) -> SandboxSpec:
        return SandboxSpec(id=f"agmicro{os.getpid()}x{i}", template=template, cpu=1,
                           memory_mb=512, disk_mb=1024)

    starts, firsts = [], []
    for i in range(args.starts):
        sp = spec(i)
        t0 = time.perf_counter()
        chan = await driver.start(sp)
        starts.append((time.perf_counter() - t0) * 1000)
        try:
            _, first, _ = await run_cmd(chan, ["echo", "hi"], "user")
            firsts.append(starts[-1] + first)
        finally:
            await chan.close()
            await driver.destroy(sp)

    sp = spec(args.starts)
    chan = await driver.start(sp)
    results = {"start": stats(starts), "first_output": stats(firsts)}
    try:
        for _ in range(args.warmup):
            await chan.ping()
            await run_cmd(chan, ["true"], "user")
            await run_cmd(chan, ["/bin/true"], "root")
        pings, users, roots = [], [], []
        for _ in range(args.n):  # interleaved, so a burst of load hits all three alike
            pings.append(await chan.ping() * 1000)
            users.append((await run_cmd(chan, ["true"], "user"))[0])
            roots.append((await run_cmd(chan, ["/bin/true"], "root"))[0])
        results["ping"] = stats(pings)
        results["exec_true_user"] = stats(users)
        results["exec_true_root"] = stats(roots)
        _, _, out = await run_cmd(chan, ["sh", "-c", "ls -la / >/dev/null 2>&1 && echo ok"],
                                  "user")
        results["ls_la_root_works"] = out.strip() == b"ok"
    finally:
        await chan.close()
        await driver.destroy(sp)
    return results


def machine() -> dict:
    def out(*argv) -> str:
        return subprocess.run(argv, check=False, capture_output=True, text=True).stdout.strip()

    runsc = out("runsc", "--version")
    return {"uname": out("uname", "-a"), "nproc": int(out("nproc") or os.cpu_count()),
            "runsc": runsc.splitlines()[0] if runsc else None,
            "loadavg": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="runs of each per-command measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--starts", type=int, default=10, help="sandboxes started for start time")
    ap.add_argument("--data-dir", default="/tmp/torpor-agent-micro")
    ap.add_argument("--agent-dir", help="run this copy of torpor/agent instead")
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args()
    if args.agent_dir:
        gvisor.AGENT_DIR = Path(args.agent_dir).resolve()
    t0 = time.time()
    results = asyncio.run(bench(args))
    report = {
        "bench": "agent_micro",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "agent_dir": str(gvisor.AGENT_DIR),
        "settings": {"n": args.n, "warmup": args.warmup, "starts": args.starts,
                     "platform": "ptrace"},
        "results": results,
        "seconds": round(time.time() - t0, 1),
        "reproduce": " ".join([".venv/bin/python", "bench/agent_micro.py"]
                              + [shlex.quote(a) for a in sys.argv[1:]]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print()
    print(f"{'measure':<16}{'p50 ms':>10}{'min ms':>10}{'max ms':>10}{'n':>6}")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:<16}{r['p50']:>10.2f}{r['min']:>10.2f}{r['max']:>10.2f}{r['n']:>6}")
    print(f"ls -la / in the sandbox: {'works' if results['ls_la_root_works'] else 'FAILS'}")
    m = report["machine"]
    print(f"machine: {m['uname']}; {m['nproc']} cpus; {m['runsc']}; load {m['loadavg']}")
    print(f"reproduce: {report['reproduce']}")


if __name__ == "__main__":
    main()
