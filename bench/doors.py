"""The agent-framework doors against the REST door (issue 16), one `torpor serve` of its own.

  mcp   the MCP tool call run_command(command="true") over streamable HTTP (`/mcp`, the
        `mcp` library's own client, one session: initialized once, every call on it)
        against the REST call POST /v1/sandboxes/{id}/commands {"cmd": "true"} (one
        keep-alive httpx client), both on the same sandbox, alternating call by call in
        one event loop so drift hits both alike. Target: MCP p50 <= 1.5x REST p50.

    .venv/bin/python bench/doors.py [--n 200] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    Server,
    finish,
    machine,
    ms_since,
    reproduce_cmd,
    say,
    stats,
    stop_on_sigterm,
)

OUT = ROOT / "bench" / "results" / "doors.json"
TARGETS = {"mcp.ratio_p50": ("<=", 1.5)}
WARMUP = 10


async def bench_mcp(server: Server, n: int) -> dict:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as rest:
        r = await rest.post("/v1/sandboxes", json={})
        r.raise_for_status()
        sid = r.json()["id"]
        http = create_mcp_http_client(headers=headers)
        try:
            async with http, Client(streamable_http_client(server.url + "/mcp",
                                                           http_client=http)) as mcp:
                ours, raw = [], []
                for i in range(n + WARMUP):
                    t0 = time.perf_counter()
                    res = await mcp.call_tool("run_command", {"sandbox_id": sid,
                                                              "command": "true"})
                    t_mcp = ms_since(t0)
                    assert not res.is_error, res
                    assert json.loads(res.content[0].text)["exit_code"] == 0, res
                    t0 = time.perf_counter()
                    r = await rest.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "true"})
                    t_rest = ms_since(t0)
                    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
                    if i >= WARMUP:
                        ours.append(t_mcp)
                        raw.append(t_rest)
        finally:
            await rest.delete(f"/v1/sandboxes/{sid}")
    s_mcp, s_rest = stats(ours), stats(raw)
    return {"mcp_ms": s_mcp, "rest_ms": s_rest,
            "ratio_p50": round(s_mcp["p50"] / s_rest["p50"], 3),
            "ratio_p90": round(s_mcp["p90"] / s_rest["p90"], 3)}


def table(report: dict) -> str:
    rows = [("measure", "MCP p50 / p90", "REST p50 / p90", "ratio p50", "target")]
    r = report["results"].get("mcp")
    if r:
        t = report["targets"].get("mcp.ratio_p50", {})
        rows.append(("run_command true", f"{r['mcp_ms']['p50']} / {r['mcp_ms']['p90']} ms",
                     f"{r['rest_ms']['p50']} / {r['rest_ms']['p90']} ms",
                     f"{r['ratio_p50']}x",
                     f"<= 1.5x {'met' if t.get('met') else 'NOT met'}"))
    for k, e in report.get("errors", {}).items():
        rows.append((f"ERROR {k}", e, "", "", ""))
    w = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.append(f"reproduce: {report['reproduce']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="n=20, writes nothing unless --out")
    ap.add_argument("--out")
    args = ap.parse_args()
    n = 20 if args.quick else args.n
    stop_on_sigterm()
    t_start = time.time()
    report = {"bench": "doors", "reproduce": reproduce_cmd("bench/doors.py"),
              "machine": machine(), "n": n, "warmup": WARMUP,
              "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
              "results": {}, "errors": {}}
    server = Server(tempfile.mkdtemp(prefix="doors-", dir="/tmp"), pool_size=1).start()
    try:
        say("section mcp")
        try:
            report["results"]["mcp"] = asyncio.run(bench_mcp(server, n))
        except Exception as e:  # noqa: BLE001 - recorded in the report
            report["errors"]["mcp"] = f"{type(e).__name__}: {e}"
    finally:
        report["left_behind"] = server.stop()
    out = args.out or (None if args.quick else str(OUT))
    return finish(report, TARGETS, t_start, out, table)


if __name__ == "__main__":
    sys.exit(main())
