"""The agent's import time under gVisor's ptrace platform: this checkout's agent beside
another copy of it (e.g. the agent of an earlier commit), in the same sandbox, interleaved.

Every run is `python3 -X importtime -s -B -c "import sys; sys.path.insert(0, DIR); import
agent"` inside one sandbox (agent.py starts nothing on import), and reads the cumulative
microseconds of `agent` (its own imports included) from importtime's report. Both copies
are written into the sandbox's /tmp with the SDK (their .py files) and imported once
without -B first, so both then read their own bytecode, as the real agent reads the
bytecode `make` compiled next to it.

    .venv/bin/python bench/agent_imports.py --other DIR   # e.g. an older torpor/agent

Prints one JSON object and a table; needs root and runsc (starts its own `torpor serve`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Server, git_state, machine, stats

from torpor.sdk import Sandbox

LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s+(\S.*)$")


def agent_import_us(sbx, agent_dir: str, write_bytecode: bool = False) -> int:
    code = f"import sys; sys.path.insert(0, {agent_dir!r}); import agent"
    flags = ["-s"] if write_bytecode else ["-s", "-B"]
    r = sbx.commands.run(["python3", "-X", "importtime", *flags, "-c", code], user="root")
    if r.exit_code != 0:
        raise RuntimeError(f"importing the agent from {agent_dir} failed: {r.stderr[-500:]}")
    for line in r.stderr.splitlines():
        m = LINE.match(line)
        if m and m.group(3).strip() == "agent":
            return int(m.group(2))
    raise RuntimeError(f"no importtime line for `agent` from {agent_dir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", required=True, help="another copy of torpor/agent")
    ap.add_argument("--n", type=int, default=30, help="imports of each, interleaved")
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args()
    other = Path(args.other)
    srv = Server(tempfile.mkdtemp(prefix="tpb-", dir="/tmp") + "/d", pool_size=0).start()
    try:
        with Sandbox.create(url=srv.url, api_key=srv.api_key) as sbx:
            for name, src in (("this", ROOT / "torpor" / "agent"), ("other", other)):
                for f in sorted(src.glob("*.py")):
                    sbx.files.write(f"/tmp/{name}-agent/{f.name}", f.read_bytes(),
                                    user="root")
                agent_import_us(sbx, f"/tmp/{name}-agent", write_bytecode=True)
            here, there = [], []
            for _ in range(2):  # warm the page cache of both
                agent_import_us(sbx, "/tmp/this-agent")
                agent_import_us(sbx, "/tmp/other-agent")
            for _ in range(args.n):
                here.append(agent_import_us(sbx, "/tmp/this-agent") / 1000)
                there.append(agent_import_us(sbx, "/tmp/other-agent") / 1000)
            sbx.delete()
    finally:
        srv.stop()
    report = {
        "bench": "agent_imports", "machine": machine(), "git": git_state(),
        "other": str(other), "n": args.n,
        "results": {"this_agent_ms": stats(here), "other_agent_ms": stats(there),
                    "ratio_p50": round(stats(here)["p50"] / stats(there)["p50"], 3)},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'import agent (ms)':<22}{'p50':>9}{'min':>9}{'max':>9}", file=sys.stderr)
    for name, s in (("this checkout", stats(here)), ("other", stats(there))):
        print(f"{name:<22}{s['p50']:>9.2f}{s['min']:>9.2f}{s['max']:>9.2f}", file=sys.stderr)
    print(f"ratio of p50s: {report['results']['ratio_p50']}", file=sys.stderr)


if __name__ == "__main__":
    main()
