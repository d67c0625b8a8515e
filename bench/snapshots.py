"""Snapshots benchmark (issue 13): the pause a snapshot costs a running sandbox, a sandbox
created from the snapshot, and a fork of ten, each beside what plain `runsc` does with the
same sandbox or image in the same run.

Starts its own `torpor serve --pool-size 0` (fresh data dir under /tmp) and drives it over
HTTP. The source sandbox has memory_mb 1024, cpu 2 (the host's cores: no quota, so the raw
runsc calls on it run as the driver's do, which lifts the quota while it checkpoints) and a
Python process holding 256 MiB (written, not zero pages). Sections (`--only`):

  pause   POST /v1/sandboxes/{id}/snapshots (memory) N times: the pause the driver
          measured (`pause_ms`: runsc pause .. resume), its parts (checkpoint, disk copy)
          and the whole call; each snapshot deleted after. Raw, on the same sandbox,
          interleaved: `runsc checkpoint --leave-running` alone, and `runsc pause` +
          `checkpoint --leave-running` + `resume`; and the checkpoint flags this runsc has
          (`--direct`, `--exclude-committed-zero-pages`) and an image written to tmpfs, for
          the choice of the driver's (see docs/snapshots.md).
  create  POST /v1/sandboxes {snapshot} to the first output of `echo ok`, beside raw
          `runsc restore --detach` of a copy of the same image in a bundle made the same
          way (set up untimed) to the restored agent's first answer (bench/templates.py's
          Raw). Interleaved.
  fork    POST /v1/sandboxes/{id}/fork {count: 10}, to all ten answering `echo ok` (asked
          in parallel once the fork answered); the extra disk of the ten while unchanged
          (`du -x`, hard links once: the capture with the ten, less the capture alone).
          Raw: ten `runsc restore --detach` of the same image started at once, to the last
          agent's first answer.

Prints one JSON object (and writes bench/results/snapshots.json on a full run) and a table.
Needs root and runsc.

    .venv/bin/python bench/snapshots.py [--quick] [--only pause,create,fork]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import httpx
from common import (
    Server,
    default_out,
    finish,
    machine,
    ms_since,
    render_rows,
    reproduce_cmd,
    run_sections,
    say,
    stats,
    stop_on_sigterm,
)
from templates import Raw, create_to_first_output

from torpor.agent import protocol as P
from torpor.runtime.layers import Layer

SECTIONS = ["pause", "create", "fork"]
TARGETS = {  # reported beside the figures, never asserted
    "pause.pause_ms.p50": ("<=", 400),
    "create.ratio_p50": ("<=", 1.15),
    "fork.all_answering_ms": ("<=", 3000),
    "fork.extra_disk_mib": ("<", 50),
}
RUNSC = shutil.which("runsc") or "/usr/bin/runsc"
HOLD_MIB = 256
# room for the raw checkpoints' images too: written by the sentry, they are charged to the
# sandbox (page cache, or shmem on the tmpfs), and with 512 MiB the watchdog stopped the
# holder during the raw tmpfs variant (the driver leaves its own staged image out)
MEMORY_MB = 1024
FORKS = 10
# 256 MiB of ones (not zero pages, which a checkpoint may leave out), held for ever
HOLDER = (f"import time; b = b'\\x01' * ({HOLD_MIB} << 20); open('/tmp/held', 'w').close(); "
          "time.sleep(1e9)")


def http_of(srv: Server) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=600,
                        headers={"Authorization": f"Bearer {srv.api_key}"})


def db_rows(srv: Server, sql: str, *args) -> list[tuple]:
    db = sqlite3.connect(f"file:{srv.data_dir / 'torpor.db'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def du_x(*paths: Path) -> int:
    """Bytes on disk under `paths` together (du -x: no other file system, i.e. not the
    mounted disk; a file hard-linked from several paths counted once)."""
    paths = [str(p) for p in paths if p.exists()]
    if not paths:
        return 0
    p = subprocess.run(["du", "-x", "-s", "-c", "-B1", *paths], capture_output=True,
                       text=True, check=False)
    return int(p.stdout.splitlines()[-1].split()[0])


def ok(http: httpx.Client, sid: str) -> str:
    r = http.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "echo ok"})
    r.raise_for_status()
    return r.json()["stdout"]


def wait_pong(out_r: int, t0: float, deadline: float) -> float:
    """The ms from t0 to the restored agent's PONG to the PING sent on its stdin."""
    reader = P.FrameReader()
    while True:
        if not select.select([out_r], [], [], max(deadline - time.monotonic(), 0))[0]:
            raise RuntimeError("the restored agent did not answer in time")
        chunk = os.read(out_r, 65536)
        if not chunk:
            raise RuntimeError("the restored agent closed its stdout")
        reader.feed(chunk)
        for kind, _sid, payload in reader.frames():
            if kind == P.PONG and payload == b"bench":
                return ms_since(t0)


class RawFork(Raw):
    """Ten `runsc restore --detach` of one image, started at once: the bundles (a disk
    copy each, the image hard-linked, the layers mounted) made untimed first."""

    def many(self, k: int) -> dict:
        bundles = []
        try:
            for _ in range(k):
                self.n += 1
                cid = f"rawfork{os.getpid()}x{self.n}"
                d = self.work / cid
                d.mkdir(parents=True)
                subprocess.run(["cp", "--sparse=always", str(self.snap / "disk.img"),
                                str(d / "disk.img")], check=True)
                (d / "image").mkdir()
                for f in (self.snap / "image").iterdir():
                    os.link(f, d / "image" / f.name)
                config = (self.snap / "config.json").read_text()
                config = config.replace(self.old_dir, str(d)).replace(self.old, cid)
                (d / "config.json").write_text(config)
                for m in json.loads(config)["mounts"]:
                    if m.get("type") == "bind" and m["source"].startswith(f"{d}/"):
                        os.makedirs(m["source"], exist_ok=True)
                layer = Layer(d, self.tpl, self.tpl.disk_mb)
                layer.mount()
                bundles.append({"cid": cid, "d": d, "layer": layer,
                                "flags": ["--overlay2=none"]
                                if "dev.torpor.root-overlay" in config else []})
            times: dict[str, float] = {}

            def one(b: dict) -> None:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                b["fds"] = [in_w, out_r]
                with open(b["d"] / "restore.log", "wb") as errlog:
                    p = subprocess.run(self.runsc(*b["flags"], "restore", "--detach",
                                                  "--image-path", str(b["d"] / "image"),
                                                  "--bundle", str(b["d"]), b["cid"]),
                                       stdin=in_r, stdout=out_w, stderr=errlog, check=False)
                os.close(in_r)
                os.close(out_w)
                if p.returncode != 0:
                    raise RuntimeError("runsc restore: "
                                       + (b["d"] / "restore.log").read_text()[-500:])
                os.write(in_w, P.frame(P.PING, 0, b"bench"))
                times[b["cid"]] = wait_pong(out_r, t0, time.monotonic() + 60)

            errors: list[BaseException] = []

            def guarded(b: dict) -> None:
                try:
                    one(b)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
            threads = [threading.Thread(target=guarded, args=(b,)) for b in bundles]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return {"all_answering_ms": round(max(times.values()), 1),
                    "first_answering_ms": round(min(times.values()), 1)}
        finally:
            for b in bundles:
                subprocess.run(self.runsc("delete", "--force", b["cid"]),
                               capture_output=True, check=False)
                for fd in b.get("fds", []):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                b["layer"].destroy()


class Bench:
    def __init__(self, args):
        self.args = args
        self.base = f"/tmp/tsb{os.getpid()}"
        self.srv: Server | None = None
        self.http: httpx.Client | None = None
        self.src: str | None = None
        self.snap: dict | None = None  # the snapshot `create` and raw restores start from
        self.raw: RawFork | None = None
        self.tmp = Path(self.base + "tmp")

    # --- the source sandbox -----------------------------------------------------------
    def source(self) -> str:
        if self.src is not None:
            return self.src
        say("starting torpor serve --pool-size 0")
        self.srv = Server(self.base + "a", 0).start()
        self.http = http_of(self.srv)
        r = self.http.post("/v1/sandboxes", json={"memory_mb": MEMORY_MB, "cpu": 2,
                                                 "standby_after": 0, "hibernate_after": 0})
        r.raise_for_status()
        self.src = r.json()["id"]
        self.http.post(f"/v1/sandboxes/{self.src}/commands", json={
            "cmd": f"python3 -c \"{HOLDER}\"", "background": True}).raise_for_status()
        deadline = time.monotonic() + 60
        while "held" not in self.http.post(f"/v1/sandboxes/{self.src}/commands", json={
                "cmd": "ls /tmp"}).json()["stdout"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the 256 MiB holder did not start in 60 s")
            time.sleep(0.2)
        return self.src

    def check_holder(self) -> None:
        """The 256 MiB are still held (else every figure after is of a small image)."""
        out = self.http.post(f"/v1/sandboxes/{self.src}/commands", json={
            "cmd": "pgrep -f 'slee[p].1e9' >/dev/null && echo alive"}).json()["stdout"]
        if out != "alive\n":
            events = self.http.get(f"/v1/sandboxes/{self.src}/events").json()
            raise RuntimeError(f"the {HOLD_MIB} MiB holder is gone: {events[-3:]}")

    def runsc(self, *a: str) -> list[str]:
        return [RUNSC, "--root", self.srv.runsc_root, "--platform", "ptrace",
                "--network", "none", *a]

    def raw_checkpoint(self, flags: list[str], pause: bool, where: Path) -> dict:
        """runsc checkpoint --leave-running of the source (with pause/resume around it if
        `pause`) into `where`, removed after; the ms of the whole and of the checkpoint."""
        img = where / f"img{time.monotonic_ns()}"
        img.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            if pause:
                subprocess.run(self.runsc("pause", self.src), check=True, capture_output=True)
            t1 = time.perf_counter()
            subprocess.run(self.runsc("--overlay2=none", "checkpoint", "--compression=none",
                                      *flags, "--leave-running", "--image-path", str(img),
                                      self.src), check=True, capture_output=True)
            ck = ms_since(t1)
            if pause:
                subprocess.run(self.runsc("resume", self.src), check=True,
                               capture_output=True)
            return {"ms": ms_since(t0), "checkpoint_ms": ck,
                    "image_bytes": sum(f.stat().st_size for f in img.iterdir())}
        finally:
            shutil.rmtree(img, ignore_errors=True)

    # --- sections ---------------------------------------------------------------------
    def pause(self, n: int) -> dict:
        sid = self.source()
        http = self.http
        disk = self.tmp / "ck"
        shm = Path("/dev/shm") / f"tsb{os.getpid()}"
        variants = {"leave_running": ([], False, disk),
                    "pause_checkpoint_resume": ([], True, disk),
                    "direct": (["--direct"], False, disk),
                    "exclude_zero_pages": (["--exclude-committed-zero-pages"], False, disk),
                    "to_tmpfs": ([], False, shm)}
        ours, calls, parts = [], [], []
        raws: dict[str, list[dict]] = {k: [] for k in variants}
        try:
            # warm-up: the first snapshot of a sandbox, and the page cache
            r = http.post(f"/v1/sandboxes/{sid}/snapshots", json={"memory": True})
            r.raise_for_status()
            http.delete(f"/v1/snapshots/{r.json()['id']}").raise_for_status()
            for _ in range(n):
                t0 = time.perf_counter()
                r = http.post(f"/v1/sandboxes/{sid}/snapshots", json={"memory": True})
                r.raise_for_status()
                calls.append(ms_since(t0))
                snap = r.json()
                ours.append(snap["pause_ms"])
                detail = json.loads(db_rows(self.srv, "SELECT detail FROM snapshots WHERE "
                                            "id = ?", snap["id"])[0][0])
                parts.append(detail)
                http.delete(f"/v1/snapshots/{snap['id']}").raise_for_status()
                for k, (flags, pause, where) in variants.items():
                    raws[k].append(self.raw_checkpoint(flags, pause, where))
            assert ok(http, sid) == "ok\n"  # it ran on
            self.check_holder()
        finally:
            shutil.rmtree(shm, ignore_errors=True)
        return {
            "hold_mib": HOLD_MIB,
            "pause_ms": stats(ours),
            "call_ms": stats(calls),
            "checkpoint_ms": stats([p["checkpoint_ms"] for p in parts]),
            "disk_ms": stats([p["disk_ms"] for p in parts]),
            # after the resume: the image from the tmpfs to the store (when staged there)
            "copy_out_ms": stats([p["copy_ms"] for p in parts if p.get("copy_ms")]),
            "staged_on_tmpfs": sum(bool(p.get("staged")) for p in parts),
            "raw_runsc": {k: {"ms": stats([x["ms"] for x in v]),
                              "checkpoint_ms": stats([x["checkpoint_ms"] for x in v]),
                              "image_mib": round(v[-1]["image_bytes"] / 2**20, 1)}
                          for k, v in raws.items()},
            "ratio_to_raw_leave_running_p50": round(
                stats(ours)["p50"] / stats([x["ms"] for x in raws["leave_running"]])["p50"],
                2),
        }

    def snapshot_of_source(self) -> dict:
        if self.snap is None:
            sid = self.source()
            self.check_holder()
            r = self.http.post(f"/v1/sandboxes/{sid}/snapshots",
                               json={"memory": True, "name": "bench"})
            r.raise_for_status()
            self.snap = r.json()
            self.raw = RawFork(self.srv.data_dir, self.snap["template"], self.tmp / "raw")
        return self.snap

    def create(self, n: int) -> dict:
        snap = self.snapshot_of_source()
        ours, raws = [], []
        def ours_once() -> dict:
            return create_to_first_output(self.http, snap["id"], self.srv.data_dir,
                                          snapshot=True)

        ours_once()  # warm-up
        self.raw.once()
        for _ in range(n):
            ours.append(ours_once())
            raws.append(self.raw.once())
        p50 = stats([r["first_output_ms"] for r in ours])["p50"]
        raw50 = stats([r["first_answer_ms"] for r in raws])["p50"]
        spans = [r["spans"] for r in ours if r.get("spans")]
        return {
            "first_output_ms": stats([r["first_output_ms"] for r in ours]),
            "create_ms": stats([r["create_ms"] for r in ours]),
            "all_from_snapshot": all(r["from_snapshot"] for r in ours),
            "raw_runsc_restore": {
                "first_answer_ms": stats([r["first_answer_ms"] for r in raws]),
                "restore_detach_ms": stats([r["restore_detach_ms"] for r in raws])},
            "ratio_p50": round(p50 / raw50, 2),
            # raw also running `echo ok` through the restored agent (where Raw does it)
            **({"raw_first_output_ms": stats([r["first_output_ms"] for r in raws]),
                "ratio_to_raw_first_output_p50": round(
                    p50 / stats([r["first_output_ms"] for r in raws])["p50"], 2)}
               if all(r.get("first_output_ms") for r in raws) else {}),
            "spans_p50_ms": {k: stats([s.get(k, float("nan")) for s in spans])["p50"]
                             for k in (spans[0] if spans else {})},
        }

    def fork(self, rounds: int) -> dict:
        sid = self.source()
        snap = self.snapshot_of_source()
        runs = []
        for _ in range(rounds):
            runs.append(self.fork_once(sid))
        self.check_holder()
        raws = [self.raw.many(FORKS) for _ in range(rounds)]
        best = min(runs, key=lambda r: r["all_answering_ms"])
        last = runs[-1]
        return {
            "count": FORKS,
            "rounds": rounds,
            "all_answering_ms": stats([r["all_answering_ms"] for r in runs])["p50"],
            "all_answering_ms_each": [r["all_answering_ms"] for r in runs],
            "fork_call_ms": stats([r["fork_call_ms"] for r in runs]),
            "pause_ms": stats([r["pause_ms"] for r in runs if r["pause_ms"] is not None]),
            # the fork call's parts: the capture (pause, image written out, stored), then
            # the ten starts; and the slowest of the ten starts' spans (start.json)
            "capture_ms": stats([r["capture_ms"] for r in runs if r["capture_ms"]]),
            "start_ms": stats([r["start_ms"] for r in runs if r["start_ms"]]),
            "spans_max_ms": last["spans_max_ms"],
            "best": best["all_answering_ms"],
            "extra_disk_mib": last["extra_disk_mib"],
            "capture_mib": last["capture_mib"],
            "snapshot_image_mib": round(snap["bytes"] / 2**20, 1),
            "raw_runsc_restore_x10": {
                "all_answering_ms": stats([r["all_answering_ms"] for r in raws]),
                "first_answering_ms": stats([r["first_answering_ms"] for r in raws])},
        }

    def fork_once(self, sid: str) -> dict:
        http = self.http
        t0 = time.perf_counter()
        r = http.post(f"/v1/sandboxes/{sid}/fork", json={"count": FORKS})
        r.raise_for_status()
        call = ms_since(t0)
        ids = [f["id"] for f in r.json()]
        answered: dict[str, float] = {}
        errors: list[BaseException] = []

        def ask(fid: str) -> None:
            try:
                with http_of(self.srv) as h:
                    if ok(h, fid) == "ok\n":
                        answered[fid] = ms_since(t0)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=ask, args=(f,)) for f in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if errors or len(answered) != FORKS:
                raise RuntimeError(f"{len(answered)} of {FORKS} forks answered: {errors[:1]}")
            events = http.get(f"/v1/sandboxes/{sid}/events").json()
            forked = [e for e in events if e["kind"] == "forked"][-1]
            digest = db_rows(self.srv, "SELECT template_digest FROM sandboxes WHERE id = ?",
                             ids[0])[0][0]
            capture = (self.srv.data_dir / "images" / "templates"
                       / digest.removeprefix("sha256:"))
            dirs = [self.srv.data_dir / "sandboxes" / f for f in ids]
            alone = du_x(capture)
            together = du_x(capture, *dirs)
            spans = []
            for d in dirs:
                try:
                    spans.append(json.loads((d / "start.json").read_text()))
                except (OSError, ValueError):
                    pass
            detail = forked.get("detail") or {}
            return {"all_answering_ms": round(max(answered.values()), 1),
                    "fork_call_ms": round(call, 1),
                    "pause_ms": detail.get("pause_ms"),
                    "capture_ms": detail.get("capture_ms"),
                    "start_ms": detail.get("start_ms"),
                    "spans_max_ms": {k: max(x.get(k, 0) for x in spans)
                                     for k in (spans[0] if spans else {})},
                    "capture_mib": round(alone / 2**20, 1),
                    "extra_disk_mib": round((together - alone) / 2**20, 1)}
        finally:
            for fid in ids:
                http.delete(f"/v1/sandboxes/{fid}")

    def close(self, keep_logs: bool) -> list[str]:
        gone = []
        if self.raw is not None:
            self.raw.close()
        if self.http is not None:
            self.http.close()
        if self.srv is not None:
            gone += self.srv.stop(keep_log=keep_logs)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return gone


def table(report: dict) -> str:
    r = report["results"]
    rows = []
    if "pause" in r:
        p = r["pause"]
        raw = p["raw_runsc"]
        rows += [(f"snapshot, {p['hold_mib']} MiB held: pause p50 (ms)",
                  f"{p['pause_ms']['p50']}", f"{raw['leave_running']['ms']['p50']}", "<= 400"),
                 ("  its checkpoint p50 (ms)", f"{p['checkpoint_ms']['p50']}", "", ""),
                 ("  its disk sync + copy p50 (ms)", f"{p['disk_ms']['p50']}", "", ""),
                 ("  the whole call p50 (ms)", f"{p['call_ms']['p50']}", "", ""),
                 ("  image tmpfs -> store, after the resume p50 (ms)",
                  f"{p['copy_out_ms'].get('p50')}", "", ""),
                 ("  raw pause + checkpoint + resume p50 (ms)", "",
                  f"{raw['pause_checkpoint_resume']['ms']['p50']}", "")]
        for k in ("direct", "exclude_zero_pages", "to_tmpfs"):
            rows.append((f"  raw checkpoint --leave-running, {k} p50 (ms)", "",
                         f"{raw[k]['ms']['p50']}", ""))
    if "create" in r:
        c = r["create"]
        rows += [("create from it -> first output p50 (ms)", f"{c['first_output_ms']['p50']}",
                  f"{c['raw_runsc_restore']['first_answer_ms']['p50']}", ""),
                 ("  ratio to raw restore", f"{c['ratio_p50']}", "", "<= 1.15")]
        if "raw_first_output_ms" in c:
            rows += [("  raw restore + the agent's `echo ok` p50 (ms)", "",
                      f"{c['raw_first_output_ms']['p50']}", ""),
                     ("  ratio to that", f"{c['ratio_to_raw_first_output_p50']}", "", "")]
        for k, v in (c.get("spans_p50_ms") or {}).items():
            rows.append((f"  span {k} p50 (ms)", f"{v}", "", ""))
    if "fork" in r:
        f = r["fork"]
        rows += [(f"fork {f['count']}: all answering p50 (ms)", f"{f['all_answering_ms']}",
                  f"{f['raw_runsc_restore_x10']['all_answering_ms']['p50']}", "<= 3000"),
                 ("  the fork call p50 (ms)", f"{f['fork_call_ms']['p50']}", "", ""),
                 ("  the source's pause p50 (ms)", f"{f['pause_ms'].get('p50')}", "", ""),
                 ("  the capture p50 (ms)", f"{f['capture_ms'].get('p50')}", "", ""),
                 ("  the ten starts p50 (ms)", f"{f['start_ms'].get('p50')}", "", ""),
                 (f"  extra disk of the {f['count']} (MiB)", f"{f['extra_disk_mib']}", "",
                  "< 50"),
                 ("  the capture they share (MiB)", f"{f['capture_mib']}", "", "")]
    m = report["machine"]
    return render_rows(rows, report, "raw runsc", (10, 10), [
        f"machine: {m['cpu_model']}, {m['nproc']} cpus; runsc {m['runsc']}; {m['uname']}",
        ("raw runsc: the same sandbox (pause) or a copy of the same image (create, fork: "
         "ten restores at once) to the agent's PONG; ours: HTTP to `echo ok`'s output")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", help="write the JSON here (default on a full run: "
                    "bench/results/snapshots.json)")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else SECTIONS
    if set(only) - set(SECTIONS):
        ap.error(f"unknown sections; known: {SECTIONS}")
    n = 3 if args.quick else 9
    rounds = 1 if args.quick else 3
    stop_on_sigterm()
    report = {"bench": "snapshots", "machine": machine(RUNSC),
              "settings": {"sections": only, "quick": args.quick, "iterations": n,
                           "fork_rounds": rounds, "hold_mib": HOLD_MIB, "memory_mb": MEMORY_MB,
                           "cpu": 2},
              "reproduce": reproduce_cmd("bench/snapshots.py"), "results": {}, "errors": {}}
    b = Bench(args)
    t_start = time.time()

    def run(name: str) -> dict:
        if name == "pause":
            return b.pause(n)
        if name == "create":
            return b.create(n)
        return b.fork(rounds)

    run_sections(report, [s for s in SECTIONS if s in only], run, b.close)
    return finish(report, TARGETS, t_start, default_out(args, "snapshots"), table)


if __name__ == "__main__":
    sys.exit(main())
