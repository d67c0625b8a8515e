"""File watch and reattach benchmark (issue 14 items 3-4).

  watch     a file created inside the sandbox to its event at the client: a process in the
            sandbox creates files named after its clock (time.time_ns(), the host's clock
            under gVisor) every 20 ms; the client's sbx.files.watch callback takes its own
            clock at the event. p50 target <= 50 ms.
  reattach  100 MiB of output read through a reattach (a finished background process, from
            offset 0: GET .../output?encoding=base64, the agent reading its spill on the
            sandbox's disk; SDK commands.connect(pid, from_offset=0).chunks()) against the
            same output streamed directly as it is made (POST .../commands, stream: true,
            NDJSON text, read with httpx). Target: the reattach's throughput within 20% of
            the direct stream's (ratio >= 0.8).

Starts its own `torpor serve --pool-size 0`. bench/toolkit.py's sections `watch` and
`reattach` call `measure_watch` and `measure_reattach` from here.

    .venv/bin/python bench/streams.py                  # ~1 min
    .venv/bin/python bench/streams.py --quick --out /tmp/s.json

Writes bench/results/streams.json on a full run. Needs root and runsc.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Server, machine, reproduce_cmd, say, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from torpor import Sandbox

OUT = ROOT / "bench" / "results" / "streams.json"
TARGETS = {"watch.event_ms.p50": ("<=", 50.0), "reattach.ratio": (">=", 0.8)}
MIB = 1 << 20

MAKER = """
import os, sys, time
n = int(sys.argv[1])
os.makedirs("/home/user/wb", exist_ok=True)
time.sleep(0.5)
for i in range(n):
    open(f"/home/user/wb/{time.time_ns()}", "w").close()
    time.sleep(0.02)
open("/home/user/wb/end", "w").close()
"""


def measure_watch(sbx: Sandbox, n: int) -> dict:
    lat: list[float] = []
    done = threading.Event()
    sbx.commands.run("mkdir -p /home/user/wb", check=True)
    sbx.files.write("/tmp/maker.py", MAKER)

    def on_event(ev) -> None:
        now = time.time_ns()
        if ev.type == "create" and ev.path.isdigit():
            lat.append((now - int(ev.path)) / 1e6)
        elif ev.path == "end":
            done.set()

    with sbx.files.watch("/home/user/wb", on_event=on_event):
        sbx.commands.run(f"python3 /tmp/maker.py {n}", background=True)
        if not done.wait(60 + n * 0.1):
            raise TimeoutError(f"the watch saw {len(lat)} of {n} files")
    return {"event_ms": stats(lat), "events": len(lat)}


def measure_reattach(api: httpx.Client, sbx: Sandbox, mib: int) -> dict:
    cmd = f"head -c {mib * MIB} /dev/zero | tr '\\0' x"
    # direct: the command's output streamed as it is made (NDJSON text)
    t = time.perf_counter()
    got = 0
    with api.stream("POST", f"/v1/sandboxes/{sbx.id}/commands",
                    json={"cmd": cmd, "stream": True, "timeout": 600}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:
                ev = json.loads(line)
                if ev["type"] == "stdout":
                    got += len(ev["data"])
    direct_s = time.perf_counter() - t
    assert got == mib * MIB, got
    # reattach: the same output from a finished background process, from offset 0
    h = sbx.commands.run(cmd, background=True)
    assert h.wait(600).exit_code == 0
    info = h.info()
    assert info.output_start == 0 and info.output_bytes == mib * MIB, info
    t = time.perf_counter()
    c = sbx.commands.connect(h.pid, from_offset=0)
    got = sum(len(ch.data) for ch in c.chunks())
    attach_s = time.perf_counter() - t
    assert got == mib * MIB, got
    direct = mib / direct_s
    attach = mib / attach_s
    return {"mib": mib, "direct_mib_s": round(direct, 1), "reattach_mib_s": round(attach, 1),
            "direct_s": round(direct_s, 2), "reattach_s": round(attach_s, 2),
            "ratio": round(attach / direct, 3)}


def _targets(results: dict) -> dict:
    out = {}
    for key, (op, limit) in TARGETS.items():
        v = results
        for k in key.split("."):
            v = v[k]
        out[key] = {"value": v, "target": f"{op} {limit}",
                    "met": v <= limit if op == "<=" else v >= limit}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="50 files, 20 MiB")
    ap.add_argument("--out", help=f"default: {OUT.relative_to(ROOT)} (full runs)")
    args = ap.parse_args()
    n, mib = (50, 20) if args.quick else (300, 100)
    srv = Server(tempfile.mkdtemp(prefix="strb-", dir="/tmp"), pool_size=0).start()
    report = {"bench": "streams", "reproduce": reproduce_cmd("bench/streams.py"),
              "machine": machine(), "results": {}}
    try:
        with httpx.Client(base_url=srv.url, timeout=900,
                          headers={"Authorization": f"Bearer {srv.api_key}"}) as api, \
                Sandbox.create(url=srv.url, api_key=srv.api_key) as sbx:
            say(f"watch: {n} files")
            report["results"]["watch"] = measure_watch(sbx, n)
            say(f"reattach: {mib} MiB")
            report["results"]["reattach"] = measure_reattach(api, sbx, mib)
    finally:
        srv.stop()
    report["targets"] = _targets(report["results"])
    print(json.dumps(report, indent=2))
    out = args.out or (None if args.quick else str(OUT))
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
