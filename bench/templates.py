"""Templates benchmark: builds, caching, shared layers, and sandboxes started from a boot
snapshot, each beside what plain `runsc` does with the same image in the same run.

Starts its own `torpor serve` (fresh data dir under /tmp, --pool-size 0; the `warm` section
a second server with --pool-size 2) and drives it over HTTP on one long-lived httpx client
(the server's share; the SDK adds its client's construction on top). Sections (`--only`):

  build     a 6-step template (env, four `run` steps, a start command with a port ready
            check and its boot snapshot) built from `base`: the first build; the same
            build again, nothing changed (every step cached); the last `run` step changed
            (the steps that ran).
  snapshot  create from that template to the first output of `echo ok` (a restore of its
            boot snapshot: the HTTP server of its start command is up at once); raw:
            `runsc restore --detach` of a copy of the same image into a bundle made the
            same way (the same disk copy, layers and OCI spec; set up untimed), to the first
            answer of the restored agent (a PING frame on its stdin, its PONG): the target's
            raw figure. Beside it, the same restore on to the first output of `echo ok` run
            by the restored agent (an exec OPEN frame right after the PONG): raw doing the
            exec ours does. The driver's spans of each create (start.json) give
            `breakdown_ms`. Interleaved, each run after the server's disk stock made
            what the last create asked for (its work lands in neither).
  warm      the same create, handed out by the warm pool (a second server, --pool-size 2;
            waits for a refill before each).
  disk      ten templates from one OCI image (made here with umoci: busybox and a copy of
            the host's Python standard library; `from_archive` of it in the build context),
            one small `run` step each: the bytes of the image's stored root fs, of the
            layer store and of the templates, as `du` counts them (hard links once), beside
            the image's root fs stored once per template.

Prints one JSON object (and writes bench/results/templates.json on a full run) and a table.
Needs root and runsc.

    .venv/bin/python bench/templates.py [--quick] [--only build,snapshot,warm,disk]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
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

from torpor.agent import protocol as P
from torpor.runtime.layers import Layer
from torpor.templates import TemplateStore

SECTIONS = ["build", "snapshot", "warm", "disk"]
TARGETS = {  # reported beside the figures, never asserted
    "snapshot.first_output_ms.p50": ("<=", 400),
    "snapshot.ratio_p50": ("<=", 1.15),
    "warm.first_output_ms.p50": ("<=", 50),
    "build.cached_rebuild_s": ("<", 2),
    "build.changed_steps_ran": ("<=", 1),
}
RUNSC = shutil.which("runsc") or "/usr/bin/runsc"
SERVER_CMD = ("python3 -c \"import http.server,os; os.chdir('/home/user'); "
              "http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, "
              "port=8000, bind='127.0.0.1')\"")
STEPS = [
    {"type": "env", "env": {"BENCH": "1"}},
    {"type": "run", "cmd": "echo one > /home/user/one"},
    {"type": "run", "cmd": "echo two > /home/user/two"},
    {"type": "run", "cmd": "echo three > /home/user/three"},
    {"type": "run", "cmd": "echo '<p>served</p>' > /home/user/index.html"},
    {"type": "start_cmd", "cmd": SERVER_CMD, "ready": {"port": 8000}},
]


def http_of(srv: Server) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=600,
                        headers={"Authorization": f"Bearer {srv.api_key}"})


def build(http: httpx.Client, name: str, steps: list[dict],
          context: bytes | None = None) -> tuple[float, list[dict]]:
    """POST /v1/templates; the seconds to its last event, and its events."""
    t0 = time.perf_counter()
    events = []
    body = {"name": name, "steps": steps}
    if context is not None:
        body["context"] = base64.b64encode(context).decode()
    with http.stream("POST", "/v1/templates", json=body,
                     headers={"Accept": "application/x-ndjson"}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line:
                events.append(json.loads(line))
    seconds = time.perf_counter() - t0
    if events[-1]["type"] != "done":
        raise RuntimeError(f"build of {name} failed: {events[-1]}")
    return seconds, events


def create_to_first_output(http: httpx.Client, template: str,
                           data_dir: Path | None = None, snapshot: bool = False) -> dict:
    """Create, then `echo ok` to its first output; with `data_dir`, the driver's spans of
    the start (its start.json) as `spans`. With `snapshot`, `template` is a snapshot's id
    (bench/snapshots.py), whose source runs no web server to check."""
    out = {}
    t0 = time.perf_counter()
    resp = http.post("/v1/sandboxes", json={"snapshot" if snapshot else "template": template})
    resp.raise_for_status()
    sid = resp.json()["id"]
    out["create_ms"] = ms_since(t0)
    try:
        first = None
        with http.stream("POST", f"/v1/sandboxes/{sid}/commands",
                         json={"cmd": "echo ok", "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                ev = json.loads(line) if line else {}
                if ev.get("type") == "stdout" and first is None:
                    first = ms_since(t0)
        out["first_output_ms"] = first if first is not None else float("nan")
        events = http.get(f"/v1/sandboxes/{sid}/events").json()
        out["handed_out"] = any(e["kind"] == "handed_out" for e in events)
        out["from_snapshot"] = any(e["kind"] == "state" and (e.get("detail") or {}).get(
            "boot_snapshot") for e in events)
        if not snapshot:  # the start command's server answers (it ran in the snapshot)
            r = http.post(f"/v1/sandboxes/{sid}/commands", json={
                "cmd": "python3 -c \"import urllib.request; print(urllib.request.urlopen("
                       "'http://127.0.0.1:8000/index.html').read().decode().strip())\""})
            out["served"] = r.json().get("stdout") == "<p>served</p>\n"
        if data_dir is not None:
            try:
                out["spans"] = json.loads(
                    (data_dir / "sandboxes" / sid / "start.json").read_text())
            except (OSError, ValueError):
                out["spans"] = {}
    finally:
        http.delete(f"/v1/sandboxes/{sid}").raise_for_status()
    return out


class Raw:
    """`runsc restore` of a template's boot snapshot without Torpor: the same disk copy,
    layers and OCI spec (set up untimed), the restore and the agent's first answer timed."""

    def __init__(self, data_dir: Path, template: str, work: Path):
        self.store = TemplateStore(data_dir)
        self.tpl = self.store.get(template)
        self.snap = self.tpl.snapshot_dir
        self.old = json.loads((self.snap / "snapshot.json").read_text())["id"]
        self.old_dir = str(data_dir / "sandboxes" / self.old)
        self.work = work
        self.n = 0

    def runsc(self, *a: str) -> list[str]:
        return [RUNSC, "--root", str(self.work / "state"), "--platform", "ptrace",
                "--network", "none", *a]

    def once(self) -> dict:
        self.n += 1
        cid = f"rawtpl{os.getpid()}x{self.n}"
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
        for m in json.loads(config)["mounts"]:  # bind sources of the bundle's own (/drives)
            if m.get("type") == "bind" and m["source"].startswith(f"{d}/"):
                os.makedirs(m["source"], exist_ok=True)
        layer = Layer(d, self.tpl, self.tpl.disk_mb)
        layer.mount()
        flags = ["--overlay2=none"] if "dev.torpor.root-overlay" in config else []
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            # stderr to a file, not a pipe: the detached sandbox inherits it, and a pipe
            # would keep subprocess.run waiting for its end as long as the sandbox lives
            with open(d / "restore.log", "wb") as errlog:
                t0 = time.perf_counter()
                p = subprocess.run(self.runsc(*flags, "restore", "--detach", "--image-path",
                                              str(d / "image"), "--bundle", str(d), cid),
                                   stdin=in_r, stdout=out_w, stderr=errlog, check=False)
                detach = ms_since(t0)
            if p.returncode != 0:
                raise RuntimeError(f"runsc restore: {(d / 'restore.log').read_text()[-500:]}")
            os.close(in_r)
            os.close(out_w)
            in_r = out_w = -1
            os.write(in_w, P.frame(P.PING, 0, b"bench"))
            reader = P.FrameReader()
            answered = first = None
            deadline = time.monotonic() + 30
            while first is None:
                if not select.select([out_r], [], [], max(deadline - time.monotonic(), 0))[0]:
                    raise RuntimeError("the restored agent did not answer in 30 s")
                chunk = os.read(out_r, 65536)
                if not chunk:
                    raise RuntimeError("the restored agent closed its stdout")
                reader.feed(chunk)
                for kind, sid, payload in reader.frames():
                    if kind == P.PONG and payload == b"bench":
                        answered = ms_since(t0)
                        # then what a create to first output does at the least: the agent
                        # runs `echo ok` (its own frames, no holder, no server)
                        os.write(in_w, P.jframe(P.OPEN, 1, {
                            "op": "exec", "argv": ["sh", "-c", "echo ok"]}))
                    elif kind == P.OUT and sid == 1 and first is None:
                        first = ms_since(t0)
            return {"restore_detach_ms": detach, "first_answer_ms": answered,
                    "first_output_ms": first}
        finally:
            subprocess.run(self.runsc("delete", "--force", cid), capture_output=True,
                           check=False)
            for fd in (in_r, in_w, out_r, out_w):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            layer.destroy()

    def close(self) -> None:
        listed = subprocess.run(self.runsc("list", "-q"), capture_output=True, text=True,
                                check=False).stdout.split()
        for cid in listed:  # what an interrupted run left
            subprocess.run(self.runsc("delete", "--force", cid), capture_output=True,
                           check=False)
        shutil.rmtree(self.work, ignore_errors=True)


IMAGE = ("busybox (static) and a copy of the host's /usr/lib/python3.11, one layer, made "
         "here with umoci")


def make_image(work: Path) -> Path:
    """An OCI layout `work/oci` (`img:1`): a real root file system of some size, so that
    storing it once or ten times shows (nothing fetched from outside)."""
    root = work / "root"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "echo", "cat", "ls", "wc", "id"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    shutil.copytree("/usr/lib/python3.11", root / "usr/lib/python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    img = f"{work / 'oci'}:1"
    for argv in (["umoci", "init", "--layout", str(work / "oci")],
                 ["umoci", "new", "--image", img],
                 ["umoci", "insert", "--image", img, str(root), "/"],
                 ["umoci", "config", "--image", img, "--config.env", "PATH=/bin"]):
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    shutil.rmtree(root)
    return work / "oci"


def image_context(layout: Path) -> bytes:
    """The build context: the layout as `layout/` in a tar (gzip'd layers inside)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(layout, arcname="layout")
    return buf.getvalue()


def settle(srv: Server) -> None:
    """Let the server's disk stock make what the last create asked for (it waits 0.25 s
    after a start, then copies and syncs a snapshot's disk) before the next timed run, so
    that its work lands in neither ours nor raw's."""
    time.sleep(0.35)
    deadline = time.monotonic() + 5
    while any((srv.data_dir / "disks").glob("*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.02)


def du(path: Path) -> int:
    """Bytes on disk under `path`, each hard-linked file once (du -s -B1)."""
    if not path.exists():
        return 0
    p = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                       check=False)
    return int(p.stdout.split()[0]) if p.stdout else 0


class Bench:
    def __init__(self, args):
        self.args = args
        self.base = f"/tmp/ttb{os.getpid()}"
        self.a: Server | None = None
        self.b: Server | None = None
        self.raw: Raw | None = None

    def server_a(self) -> Server:
        if self.a is None:
            say("starting torpor serve --pool-size 0")
            self.a = Server(self.base + "a", 0).start()
        return self.a

    def ensure_built(self, srv: Server) -> None:
        with http_of(srv) as http:
            if http.get("/v1/templates/bench-web").status_code != 200:
                build(http, "bench-web", STEPS)

    def build(self) -> dict:
        srv = self.server_a()
        with http_of(srv) as http:
            first, events = build(http, "bench-web", STEPS)
            again, events2 = build(http, "bench-web", STEPS)
            last = "echo '<p>served</p>' > /home/user/index.html; echo v2 > /home/user/v"
            changed = [*STEPS[:4], {"type": "run", "cmd": last}, STEPS[5]]
            third, events3 = build(http, "bench-web-2", changed)

        def ran(evs):
            return [e["step"]["type"] for e in evs if e["type"] == "step" and not e["cached"]
                    and e["step"]["type"] != "env"]

        return {"steps": len(STEPS), "first_build_s": round(first, 2),
                "cached_rebuild_s": round(again, 3), "cached_rebuild_steps_ran": ran(events2),
                "changed_build_s": round(third, 2), "changed_steps": ran(events3),
                "changed_steps_ran": len([x for x in ran(events3) if x == "run"]),
                "first_build_steps_ran": ran(events)}

    def snapshot(self, n: int) -> dict:
        srv = self.server_a()
        self.ensure_built(srv)
        self.raw = Raw(srv.data_dir, "bench-web", Path(self.base + "raw"))
        ours, raws = [], []
        with http_of(srv) as http:
            create_to_first_output(http, "bench-web")  # warm-up: page cache, imports
            self.raw.once()
            for _ in range(n):
                settle(srv)
                ours.append(create_to_first_output(http, "bench-web", srv.data_dir))
                settle(srv)
                raws.append(self.raw.once())
        p50 = stats([r["first_output_ms"] for r in ours])["p50"]
        raw50 = stats([r["first_answer_ms"] for r in raws])["p50"]
        return {
            "first_output_ms": stats([r["first_output_ms"] for r in ours]),
            "create_ms": stats([r["create_ms"] for r in ours]),
            "all_from_snapshot": all(r["from_snapshot"] for r in ours),
            "all_served": all(r["served"] for r in ours),
            "raw_runsc_restore": {
                "first_answer_ms": stats([r["first_answer_ms"] for r in raws]),
                "restore_detach_ms": stats([r["restore_detach_ms"] for r in raws]),
                "first_output_ms": stats([r["first_output_ms"] for r in raws])},
            "ratio_p50": round(p50 / raw50, 2),
            # beside the target's ratio: raw doing the exec too (restore, PONG, `echo ok`
            # through the restored agent's own frames to its first output)
            "ratio_to_raw_first_output_p50": round(
                p50 / stats([r["first_output_ms"] for r in raws])["p50"], 2),
            "breakdown_ms": breakdown(ours),
        }

    def warm(self, n: int) -> dict:
        if self.a is not None:  # the pool server runs alone
            self.a.stop()
            self.a = None
        say("starting torpor serve --pool-size 2")
        self.b = Server(self.base + "b", 2).start()
        self.ensure_built(self.b)
        runs = []
        with http_of(self.b) as http:
            for _ in range(n + 1):
                self.wait_pool(http)
                runs.append(create_to_first_output(http, "bench-web"))
        runs = runs[1:]  # the first: warm-up
        return {"first_output_ms": stats([r["first_output_ms"] for r in runs]),
                "create_ms": stats([r["create_ms"] for r in runs]),
                "handed_out_from_pool": sum(r["handed_out"] for r in runs),
                "all_served": all(r["served"] for r in runs)}

    def wait_pool(self, http: httpx.Client) -> None:
        import sqlite3
        deadline = time.monotonic() + 60
        digest = http.get("/v1/templates/bench-web").json()["digest"]
        while time.monotonic() < deadline:
            db = sqlite3.connect(f"file:{self.b.data_dir / 'torpor.db'}?mode=ro", uri=True)
            try:
                k = db.execute("SELECT count(*) FROM sandboxes WHERE pooled = 1 AND state = "
                               "'running' AND template_digest = ?", (digest,)).fetchone()[0]
            finally:
                db.close()
            if k >= 2:
                return
            time.sleep(0.05)
        raise RuntimeError("the warm pool did not fill in 60 s")

    def disk(self, k: int) -> dict:
        """Ten templates from one OCI image (an archive in the build context), a `run` step
        each: the image is stored once (images/sources), each template adds its layer."""
        srv = self.b or self.server_a()
        work = Path(self.base + "img")
        layout = make_image(work)
        context = image_context(layout)
        data = srv.data_dir
        # what the server held before (the other sections' templates): not these ten's
        layers0 = du(data / "images" / "layers")
        configs0 = du(data / "images" / "templates")
        times = []
        with http_of(srv) as http:
            for i in range(k):
                seconds, _ = build(http, f"disk-{i}", [
                    {"type": "from_archive", "src": "layout"},
                    {"type": "run", "cmd": f"echo {i} > /home/user/{i}"}], context)
                times.append(seconds)
            tpl = http.get("/v1/templates/disk-0").json()
            r = http.post("/v1/sandboxes", json={"template": "disk-9"})
            r.raise_for_status()
            sid = r.json()["id"]
            try:
                out = http.post(f"/v1/sandboxes/{sid}/commands", json={
                    "cmd": "cat /home/user/9; ls /usr/lib/python3.11 | wc -l"}).json()
            finally:
                http.delete(f"/v1/sandboxes/{sid}").raise_for_status()
        shutil.rmtree(work, ignore_errors=True)
        sources = du(data / "images" / "sources")
        layers = du(data / "images" / "layers") - layers0
        configs = du(data / "images" / "templates") - configs0
        one = du(next((data / "images" / "sources").iterdir()))
        return {"templates": k, "source": f"OCI image layout in the build context: {IMAGE}",
                "context_bytes": len(context),
                "source_stored_bytes": one,
                "sources_store_bytes": sources,
                "sources_stored": len(list((data / "images" / "sources").iterdir())),
                "layer_store_bytes": layers, "template_configs_bytes": configs,
                "total_bytes": sources + layers + configs,
                "if_each_copied_bytes": one * k + layers + configs,
                "build_s": stats(times), "template_env": tpl.get("env"),
                "a_template_runs": {"stdout": out.get("stdout", "").split(),
                                    "stderr": out.get("stderr", ""),
                                    "exit_code": out.get("exit_code")}}

    def close(self, keep_logs: bool) -> list[str]:
        gone = []
        if self.raw is not None:
            self.raw.close()
        for srv in (self.a, self.b):
            if srv is not None:
                gone += srv.stop(keep_log=keep_logs)
        return gone


def breakdown(runs: list[dict]) -> dict:
    """p50 of each span of a create from a boot snapshot, in order: the driver's (start.json:
    disk, image, mount, holder, runsc, agent, cpu_limit; their sum `driver`), `engine_http`
    (the create call's time outside the driver: HTTP, records, the agent's `resumed`) and
    `first_exec` (create answered -> first stdout of `echo ok`)."""
    with_spans = [r for r in runs if r.get("spans")]
    if not with_spans:
        return {}
    out = {k: stats([r["spans"].get(k, float("nan")) for r in with_spans])["p50"]
           for k in with_spans[0]["spans"] if k != "total"}
    out["driver"] = stats([r["spans"]["total"] for r in with_spans])["p50"]
    out["engine_http"] = stats([r["create_ms"] - r["spans"]["total"]
                                for r in with_spans])["p50"]
    out["first_exec"] = stats([r["first_output_ms"] - r["create_ms"] for r in runs])["p50"]
    return out


def table(report: dict) -> str:
    r = report["results"]
    rows = []
    if "build" in r:
        b = r["build"]
        rows += [("first build, 6 steps (s)", f"{b['first_build_s']}", "", ""),
                 ("rebuild, nothing changed (s)", f"{b['cached_rebuild_s']}", "", "< 2"),
                 ("rebuild, last run changed: steps run", f"{b['changed_steps_ran']}", "",
                  "1")]
    if "snapshot" in r:
        s = r["snapshot"]
        rows += [("create from snapshot -> first output p50 (ms)",
                  f"{s['first_output_ms']['p50']}",
                  f"{s['raw_runsc_restore']['first_answer_ms']['p50']}", "<= 400"),
                 ("  ratio to raw restore", f"{s['ratio_p50']}", "", "<= 1.15")]
        raw = s["raw_runsc_restore"]
        rows.append(("  raw: runsc restore --detach p50 (ms)", "",
                     f"{raw['restore_detach_ms']['p50']}", ""))
        if "first_output_ms" in raw:
            rows.append(("  raw restore + the agent's `echo ok`, first output p50 (ms)", "",
                         f"{raw['first_output_ms']['p50']}", ""))
            rows.append(("  ratio to that", f"{s['ratio_to_raw_first_output_p50']}", "", ""))
        for k, v in (s.get("breakdown_ms") or {}).items():
            rows.append((f"  span {k} p50 (ms)", f"{v:.1f}", "", ""))
    if "warm" in r:
        rows.append(("from the warm pool -> first output p50 (ms)",
                     f"{r['warm']['first_output_ms']['p50']}", "", "<= 50"))
    if "disk" in r:
        d = r["disk"]
        rows.append((f"disk, 1 image + {d['templates']} templates on it (MiB)",
                     f"{d['total_bytes'] / 2**20:.1f}",
                     f"{d['if_each_copied_bytes'] / 2**20:.1f}", "image once"))
        rows.append(("  the image's root fs, stored (MiB) / times stored",
                     f"{d['source_stored_bytes'] / 2**20:.1f} / {d['sources_stored']}", "", "1"))
    m = report["machine"]
    return render_rows(rows, report, "raw runsc", (10, 10), [
        f"machine: {m['cpu_model']}, {m['nproc']} cpus; runsc {m['runsc']}; {m['uname']}",
        ("raw runsc: restore of the same image to the agent's PONG (no exec); ours: create "
         "+ `echo ok` to its first output; disk raw column: the image's root fs copied per "
         "template")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", help="write the JSON here (default on a full run: "
                    "bench/results/templates.json)")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else SECTIONS
    if set(only) - set(SECTIONS):
        ap.error(f"unknown sections; known: {SECTIONS}")
    n = 5 if args.quick else 20
    stop_on_sigterm()
    report = {"bench": "templates", "machine": machine(RUNSC),
              "settings": {"sections": only, "quick": args.quick, "iterations": n,
                           "steps": STEPS},
              "reproduce": reproduce_cmd("bench/templates.py"), "results": {}, "errors": {}}
    b = Bench(args)
    t_start = time.time()

    def run(name: str) -> dict:
        if name == "build":
            return b.build()
        if name == "snapshot":
            return b.snapshot(n)
        if name == "warm":
            return b.warm(n)
        return b.disk(10)

    run_sections(report, [s for s in SECTIONS if s in only], run, b.close)
    return finish(report, TARGETS, t_start, default_out(args, "templates"), table)


if __name__ == "__main__":
    sys.exit(main())
