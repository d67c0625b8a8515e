"""Drive benchmark: a write on a drive in one sandbox, seen in another (issue 13: p99 <= 1 s).

Starts its own `torpor serve --pool-size 0`, makes a drive and two sandboxes, attaches the
drive to both while they run (/drives/team), then:

  visibility  sandbox A writes a sequence number into /drives/team/seq N times (every
              `--every` s: write to a temporary name, rename over, as a careful writer
              does), noting the clock when each rename returned; sandbox B polls the file
              (open, read, close, every 0.5 ms) and notes when it first sees each number.
              Latency = seen - written (both clocks are the host's: gVisor's clock reads
              the host's). Beside it the same two scripts on the host on a plain directory
              (the floor: the kernel's own page cache).
  attach      time of POST /v1/sandboxes/{id}/drives on a running sandbox until the drive is
              usable in it.

Prints one JSON object to stdout (and writes bench/results/drive.json on a full run, or
--out FILE).

    .venv/bin/python bench/drive.py            # 50 writes, ~30 s
    .venv/bin/python bench/drive.py --writes 20

Needs root and runsc. Targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Server, machine, ms_since, pct, reproduce_cmd, say, stats

WRITER = r"""
import os, sys, time, json
d, n, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = []
time.sleep(0.5)
for i in range(1, n + 1):
    tmp = f"{d}/.seq.tmp"
    with open(tmp, "w") as f:
        f.write(str(i))
    os.rename(tmp, f"{d}/seq")
    out.append((i, time.time()))
    time.sleep(every)
print(json.dumps(out))
"""
READER = r"""
import sys, time, json
d, n = sys.argv[1], int(sys.argv[2])
seen, last, deadline = [], 0, time.time() + 5 + n * 2
while last < n and time.time() < deadline:
    try:
        with open(f"{d}/seq") as f:
            v = f.read()
    except OSError:
        v = ""
    if v.isdigit() and int(v) != last:
        last = int(v)
        seen.append((last, time.time()))
    time.sleep(0.0005)
print(json.dumps(seen))
"""


def latencies(written: list, seen: list) -> tuple[list[float], int]:
    """Milliseconds from each write to its first sighting; how many were never seen (a
    poll can miss a number overwritten before it looked: counted, not timed)."""
    at = dict(seen)
    out = [(at[i] - t) * 1000 for i, t in written if i in at]
    return out, len(written) - len(out)


def inside(c: httpx.Client, a: str, b: str, n: int, every: float) -> dict:
    for sid, name, code in ((a, "w.py", WRITER), (b, "r.py", READER)):
        r = c.put(f"/v1/sandboxes/{sid}/files", params={"path": f"/tmp/{name}"},
                  content=code.encode())
        r.raise_for_status()
    reader = c.post(f"/v1/sandboxes/{b}/commands", json={
        "cmd": f"python3 /tmp/r.py /drives/team {n} > /tmp/seen.json",
        "background": True}).json()["pid"]
    w = c.post(f"/v1/sandboxes/{a}/commands", json={
        "cmd": f"python3 /tmp/w.py /drives/team {n} {every}", "timeout": 600},
        timeout=700).json()
    written = json.loads(w["stdout"])
    c.post(f"/v1/sandboxes/{b}/processes/{reader}/wait", params={"timeout": 60})
    seen = json.loads(c.get(f"/v1/sandboxes/{b}/files",
                            params={"path": "/tmp/seen.json"}).text)
    ms, missed = latencies(written, seen)
    return {"latency_ms": stats(ms, 2), "p99_ms": round(pct(sorted(ms), 99), 2),
            "missed": missed, "writes": n}


def on_host(n: int, every: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        reader = subprocess.Popen([sys.executable, "-c", READER, d, str(n)],
                                  stdout=subprocess.PIPE, text=True)
        w = subprocess.run([sys.executable, "-c", WRITER, d, str(n), str(every)],
                           capture_output=True, text=True, check=True)
        seen = json.loads(reader.communicate(timeout=120)[0])
    ms, missed = latencies(json.loads(w.stdout), seen)
    return {"latency_ms": stats(ms, 3), "p99_ms": round(pct(sorted(ms), 99), 3),
            "missed": missed, "writes": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=50)
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("--out")
    args = ap.parse_args()
    report: dict = {"bench": "drive", "reproduce": reproduce_cmd("bench/drive.py"),
                    "machine": machine(), "target": {"visibility_p99_ms": 1000}}
    srv = Server(tempfile.mkdtemp(prefix="tbd-", dir="/tmp") + "/data", pool_size=0).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120,
                          headers={"Authorization": f"Bearer {srv.api_key}"}) as c:
            c.post("/v1/drives", json={"name": "team", "size_mb": 64}).raise_for_status()
            a, b = (c.post("/v1/sandboxes", json={}).json()["id"] for _ in range(2))
            attach = []
            for sid in (a, b):
                t0 = time.perf_counter()
                c.post(f"/v1/sandboxes/{sid}/drives", json={"drive": "team"}).raise_for_status()
                attach.append(ms_since(t0))
            report["attach_ms"] = [round(x, 1) for x in attach]
            say("visibility: inside, sandbox to sandbox")
            report["visibility"] = inside(c, a, b, args.writes, args.every)
            say("visibility: on the host, process to process (the floor)")
            report["host_floor"] = on_host(args.writes, args.every)
            report["met"] = report["visibility"]["p99_ms"] <= 1000
    finally:
        srv.stop()
    text = json.dumps(report, indent=2)
    print(text)
    out = args.out or (None if args.writes != 50 else
                       str(Path(__file__).resolve().parent / "results" / "drive.json"))
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
