"""OpenAI Agents SDK provider benchmark (issue 16): what the provider adds over the Torpor
SDK it is built on, each figure beside the raw one measured in the same run, against a
`torpor serve` of its own. No target in the issue: these say where the time goes.

  exec       session.exec("true", shell=False) on a started session, against
             AsyncSandbox.commands.run(["true"]) on the same sandbox; and the SDK's
             default shell=True (`sh -lc true`, a login shell)
  read       session.read() of a 4 KiB file (the SDK's path check runs a helper in the
             sandbox first) against sbx.files.read(..., "bytes")
  create     client.create() + session.start() + a first exec, against
             AsyncSandbox.create() + a first command; each from the warm pool (the
             server's pool of one is refilled before each)
  resume     a hibernated sandbox: client.resume(state) + session.start() + a first exec,
             against a first command on it through AsyncSandbox (which wakes it)

    .venv/bin/python bench/openai_agents.py            # writes bench/results/openai-agents.json
    .venv/bin/python bench/openai_agents.py --quick    # fewer rounds, no file written
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Server,
    default_out,
    finish,
    machine,
    ms_since,
    render_rows,
    reproduce_cmd,
    say,
    stats,
    stop_on_sigterm,
)

from torpor.integrations.openai_agents import (
    TorporSandboxClient,
    TorporSandboxClientOptions,
    torpor_sandbox,
)
from torpor.sdk import AsyncSandbox


async def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(ms_since(t0))
    return out


async def bench(srv: Server, rounds: int, lifecycle_rounds: int) -> dict:
    kw = {"url": srv.url, "api_key": srv.api_key}
    client = TorporSandboxClient(**kw)
    res: dict = {}

    session = await client.create(options=TorporSandboxClientOptions(on_exit="delete"))
    async with session:
        raw = torpor_sandbox(session)
        await session.write("blob.bin", io.BytesIO(b"x" * 4096))
        path = f"{session.state.manifest.root}/blob.bin"
        for _ in range(5):  # warm both paths (the path helper's install, connections)
            await session.exec("true", shell=False)
            await raw.commands.run(["true"])
            await session.read("blob.bin")
        say("exec")
        ours, bare, shell = [], [], []
        for _ in range(rounds):  # interleaved, so load drifts hit both alike
            ours += await timed(lambda: session.exec("true", shell=False), 1)
            bare += await timed(lambda: raw.commands.run(["true"]), 1)
            shell += await timed(lambda: session.exec("true"), 1)
        res["exec"] = {"provider": stats(ours), "raw": stats(bare), "provider_shell": stats(shell)}
        say("read")
        ours, bare = [], []
        for _ in range(rounds):
            ours += await timed(lambda: session.read("blob.bin"), 1)
            bare += await timed(lambda: raw.files.read(path, "bytes"), 1)
        res["read"] = {"provider": stats(ours), "raw": stats(bare)}

    async def pool_refilled() -> None:  # each create takes the warm pool's sandbox
        deadline = time.monotonic() + 60
        while srv.pooled_running() < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    say("create")
    ours, bare = [], []
    for _ in range(lifecycle_rounds):
        await pool_refilled()
        t0 = time.perf_counter()
        s = await client.create(options=TorporSandboxClientOptions(on_exit="delete"))
        await s.start()
        await s.exec("true", shell=False)
        ours.append(ms_since(t0))
        await client.delete_sandbox(s)
        await pool_refilled()
        t0 = time.perf_counter()
        sbx = await AsyncSandbox.create(**kw)
        await sbx.commands.run(["true"])
        bare.append(ms_since(t0))
        await sbx.delete()
        await sbx.close()
    res["create"] = {"provider": stats(ours), "raw": stats(bare)}

    say("resume")
    ours, bare = [], []
    session = await client.create(options=TorporSandboxClientOptions())
    await session.start()
    state = client.serialize_session_state(session.state)
    raw = torpor_sandbox(session)
    for _ in range(lifecycle_rounds):
        await raw.hibernate()
        t0 = time.perf_counter()
        s = await client.resume(client.deserialize_session_state(dict(state)))
        await s.start()
        await s.exec("true", shell=False)
        ours.append(ms_since(t0))
        await client.delete(s)  # on_exit keep: releases the session only
        await raw.hibernate()
        t0 = time.perf_counter()
        await raw.commands.run(["true"])
        bare.append(ms_since(t0))
    await client.delete_sandbox(session)
    res["resume"] = {"provider": stats(ours), "raw": stats(bare)}
    return res


def table(report: dict) -> str:
    r = report["results"]
    rows = []
    for key, what in (("exec", "exec true (shell=False)"), ("read", "read 4 KiB"),
                      ("create", "create+start+exec"), ("resume", "resume hibernated+exec")):
        if key in r:
            rows.append((what, f"{r[key]['provider']['p50']} ms",
                         f"{r[key]['raw']['p50']} ms", ""))
    if "exec" in r:
        rows.append(("exec true (sh -lc, default)", f"{r['exec']['provider_shell']['p50']} ms",
                     "", ""))
    m = report["machine"]
    load = f"load at start {m['loadavg_at_start']}, at end {report['loadavg_at_end']}"
    notes = [f"machine: {m['nproc']} cores, {load}"]
    return render_rows(rows, report, "raw SDK", (12, 12), notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--only")  # for default_out: this bench has one section
    args = ap.parse_args()
    stop_on_sigterm()
    t_start = time.time()
    report: dict = {"bench": "openai-agents", "machine": machine(),
                    "reproduce": reproduce_cmd("bench/openai_agents.py"), "results": {},
                    "errors": {}}
    srv = Server(tempfile.mkdtemp(prefix="tpb-oai-", dir="/tmp"), pool_size=1).start()
    try:
        rounds, lifecycle = (10, 2) if args.quick else (50, 5)
        report["results"] = asyncio.run(bench(srv, rounds, lifecycle))
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the table
        report["errors"]["bench"] = repr(e)
    finally:
        left = srv.stop()
        if left:
            report["leftovers"] = left
    return finish(report, {}, t_start, default_out(args, "openai-agents"), table)


if __name__ == "__main__":
    sys.exit(main())
