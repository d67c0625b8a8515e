"""E2B's own Python SDK test suite (and the code interpreter SDK's) against a Torpor server.

    .venv/bin/python bench/e2b_suite.py [--e2b-repo GITDIR] [--ci-repo GITDIR]
                                        [--groups offline,api,...] [--workers 4]

What it does, each step repeatable:
1. a venv of its own (`--venv`, default /var/tmp/torpor-e2b-suite/venv, kept between runs)
   with the pinned SDKs (e2b 2.45.1, e2b-code-interpreter 2.10.0) and the test plugins
   E2B's suite uses;
2. the tests at the commit of the pinned SDK, taken from a clone of github.com/e2b-dev/E2B
   (`git archive`, so the clone may be bare) and of github.com/e2b-dev/code-interpreter;
3. a `torpor serve` of its own (fresh data dir, purged after), an E2B-form key made with
   `torpor keys create --e2b`;
4. the groups: `offline` (the SDK's own unit tests, no server), the live groups (api,
   commands, files, pty, sandbox, git, template) with E2B_API_URL = E2B_SANDBOX_URL = the
   server, and `code-interpreter` (the interpreter SDK's python tests on
   `code-interpreter-v1`); prints pass/fail/skip per group and writes the result (every
   failed or skipped test with its reason) to bench/results/e2b_suite.json.

Out of scope, deselected with the reason recorded: tests that need the internet (httpbin,
public hosts), E2B's hosted template builder and tag registry, and host-based https URLs
(`get_host` on :443 with a public certificate).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, VENV_BIN, Server, machine, say

E2B_COMMIT = "b8029973"  # packages/python-sdk at the e2b 2.45.1 wheel (the note's [sdk])
CI_COMMIT = "7df1757"  # e2b-dev/code-interpreter, python/ (e2b-code-interpreter 2.10.0 era)
PINS = ["e2b==2.45.1", "e2b-code-interpreter==2.10.0", "pytest>=9.0.3,<10",
        "pytest-xdist>=3.3.1,<4", "pytest-asyncio>=1.3.0,<2", "pytest-timeout>=2.4.0,<3",
        "pytest-dotenv>=0.5.2,<0.6", "matplotlib", "numpy"]

S, A = "tests/sync/sandbox_sync", "tests/async/sandbox_async"
OFFLINE = ["tests/test_*.py", "tests/shared/api", "tests/shared/sandbox",
           "tests/shared/template", "tests/shared/git/test_args.py",
           "tests/shared/git/test_parity.py", "tests/*/volume_*", "tests/*/secret_*",
           *(f"tests/*/template_*/{t}" for t in (
               "test_stacktrace.py", "test_bound_api_params.py", "test_upload_file.py",
               "methods/test_from_dockerfile.py", "methods/test_to_dockerfile.py"))]
LIVE = {
    "api": ["tests/sync/api_sync", "tests/async/api_async"],
    "commands": [f"{S}/commands", f"{A}/commands"],
    "files": [f"{S}/files", f"{A}/files"],
    "pty": [f"{S}/pty", f"{A}/pty"],
    "sandbox": [f"{S}/test_*.py", f"{A}/test_*.py"],
    "git": ["tests/shared/git"],
    "template": ["tests/sync/template_sync/test_exists.py",
                 "tests/async/template_async/test_exists.py"],
}
# deselected, with why (the out-of-scope list)
OUT_OF_SCOPE = {
    **{f"{d}/test_internet_access.py": "needs the internet (public hosts)" for d in (S, A)},
    **{f"{d}/test_network.py": "needs the internet (httpbin template, public hosts)"
       for d in (S, A)},
    **{f"{d}/test_host.py": "https get_host() URLs on :443 need wildcard DNS and a public "
       "certificate" for d in (S, A)},
    **{f"{d}/test_create.py::test_auto_resume_wakes_on_http_request":
       "fetches get_host() over https from the test machine" for d in (S, A)},
    **{f"{d}/test_config_propagation.py::test_connect_sets_stable_host_routing_headers":
       "assumes no E2B_SANDBOX_URL" for d in (S, A)},
    "tests/shared/git/test_args.py": "offline group (no server)",
    "tests/shared/git/test_parity.py": "offline group (no server)",
    "tests/shared/sandbox/test_egress_proxy.py::test_create_omits_none_credentials":
        "tests a fix made after 2.45.1",
}
NO_KERNEL = "the template has Python and bash kernels only (no {} kernel)"
CI_OUT_OF_SCOPE = {
    **{f"tests/{d}::test_list_contexts{s}": "expects a default javascript context (the "
       "template has no JavaScript kernel)" for d in ("sync/test_contexts.py",
                                                       "async/test_async_contexts.py")
       for s in ("", "_secure_traffic")},
    **{f"tests/{d}::test_create_context_with_options": "a context in /root: the kernels run "
       "as the sandbox's user, not root as E2B's (a clear 400 instead)"
       for d in ("sync/test_contexts.py", "async/test_async_contexts.py")},
    **{f"tests/{d}/env_vars/test_{lang}.py": NO_KERNEL.format(name)
       for d in ("sync", "async") for lang, name in (("java", "Java"), ("js", "JavaScript"),
                                                     ("r", "R"))},
    **{f"tests/{d}::test_cwd_{lang}": NO_KERNEL.format(name)
       for d in ("sync/test_cwd.py", "async/test_async_cwd.py")
       for lang, name in (("javascript", "JavaScript"), ("typescript", "TypeScript"),
                          ("r", "R"), ("java", "Java"))},
    **{f"tests/{d}::test_{t}": NO_KERNEL.format(name)
       for d in ("sync/test_default_kernels.py", "async/test_async_default_kernels.py")
       for t, name in (("js_kernel", "JavaScript"), ("js_esm_imports", "JavaScript"),
                       ("js_top_level_await", "JavaScript"), ("ts_kernel", "TypeScript"),
                       ("r_kernel", "R"), ("java_kernel", "Java"))},
    "tests/sync/test_systemd.py": "restarts the kernel server with systemd (E2B's image)",
    "tests/async/test_async_systemd.py": "restarts the kernel server with systemd",
}


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kw)


def make_venv(venv: Path) -> Path:
    stamp = venv / ".pins"
    if not (stamp.exists() and stamp.read_text() == "\n".join(PINS)):
        say(f"venv {venv}: installing {' '.join(PINS)}")
        shutil.rmtree(venv, ignore_errors=True)
        sh("python3.11" if shutil.which("python3.11") else sys.executable, "-m", "venv",
           str(venv))
        sh(str(venv / "bin/pip"), "install", "-q", *PINS)
        stamp.write_text("\n".join(PINS))
    return venv / "bin"


def extract(repo: str, commit: str, paths: list[str], into: Path) -> None:
    """The files of `paths` at `commit` of the git dir `repo` (bare or not) under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["git", "-C", repo, "archive", commit, *paths], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=arch, check=True)


def expand(cwd: Path, args: list[str]) -> list[str]:
    """Shell-style globs of test paths, relative to `cwd` (pytest does not expand them)."""
    out = []
    for a in args:
        if "*" in a and not a.startswith("-"):
            out += sorted(str(p.relative_to(cwd)) for p in cwd.glob(a))
        else:
            out.append(a)
    return out


def run_pytest(vbin: Path, cwd: Path, args: list[str], env: dict, junit: Path,
               workers: int, timeout: float) -> dict:
    args = expand(cwd, args)
    argv = [str(vbin / "pytest"), "-q", "-p", "no:cacheprovider", "-n", str(workers),
            f"--junitxml={junit}", "-o", "junit_family=xunit2", *args]
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
    out = {"seconds": round(time.monotonic() - t0, 1), "exit": p.returncode,
           **parse_junit(junit)}
    if not junit.exists():
        out["output_tail"] = (p.stdout + p.stderr)[-3000:]
    return out


def parse_junit(path: Path) -> dict:
    res = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    if not path.exists():
        return res
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            res["failed"] += 1
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            res["failures"].append({"test": name, "why": msg[0][:300] if msg else ""})
        elif skip is not None:
            res["skipped"] += 1
            res["skips"].append({"test": name, "why": (skip.get("message") or "")[:300]})
        else:
            res["passed"] += 1
    return res


def build_interpreter(server: Server) -> None:
    """The built-in template the interpreter tests start, built before they run (its
    first create builds it, about a minute), so no test's 30 s timeout holds the build."""
    import httpx
    with httpx.Client(base_url=server.url, timeout=900,
                      headers={"Authorization": f"Bearer {server.api_key}"}) as c:
        r = c.post("/v1/sandboxes", json={"template": "code-interpreter"})
        r.raise_for_status()
        c.delete(f"/v1/sandboxes/{r.json()['id']}")


def deselect(spec: dict[str, str]) -> list[str]:
    out = []
    for path in spec:
        out += ["--deselect", path]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--e2b-repo", default=os.environ.get(
        "E2B_REPO", "/work/.mirror/e2b-dev+E2B/repo"),
        help="a clone (bare is fine) of github.com/e2b-dev/E2B holding " + E2B_COMMIT)
    ap.add_argument("--ci-repo", default=os.environ.get(
        "E2B_CI_REPO", "/work/.mirror/e2b-dev+code-interpreter/repo"),
        help="a clone of github.com/e2b-dev/code-interpreter holding " + CI_COMMIT)
    ap.add_argument("--venv", default="/var/tmp/torpor-e2b-suite/venv")
    ap.add_argument("--groups", default="offline," + ",".join(LIVE) + ",code-interpreter")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench/results/e2b_suite.json"))
    args = ap.parse_args()
    groups = [g for g in args.groups.split(",") if g]

    vbin = make_venv(Path(args.venv))
    work = Path(tempfile.mkdtemp(prefix="torpor-e2b-suite-", dir="/var/tmp"))
    report: dict = {"bench": "e2b_suite", "machine": machine(), "e2b_commit": E2B_COMMIT,
                    "ci_commit": CI_COMMIT, "pins": PINS,
                    "out_of_scope": {**OUT_OF_SCOPE, **CI_OUT_OF_SCOPE}, "groups": {}}
    server = None
    try:
        extract(args.e2b_repo, E2B_COMMIT, ["packages/python-sdk/tests",
                                            "packages/python-sdk/pytest.ini"], work / "e2b")
        sdk_dir = work / "e2b/packages/python-sdk"  # no ./e2b here: the wheel is imported
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
        if "offline" in groups:
            env = {**base_env, "E2B_API_KEY": "e2b_00"}
            say("group offline")
            report["groups"]["offline"] = run_pytest(
                vbin, sdk_dir, [*OFFLINE, *deselect(
                    {k: v for k, v in OUT_OF_SCOPE.items() if "test_egress_proxy" in k})],
                env, work / "offline.xml", args.workers, 1800)
        live = [g for g in groups if g in LIVE or g == "code-interpreter"]
        if live:
            # the package index for the code-interpreter build (the registries resolve
            # to a documentation range here): see tests/conftest.py INDEX
            server = Server(str(work / "data"), pool_size=0, args=[
                "--egress-allow-cidr", "203.0.113.0/24",
                "--egress-upstream-ca", "/etc/ssl/certs/ca-certificates.crt"]).start()
            key = subprocess.run(
                [str(VENV_BIN / "torpor"), "keys", "create", "e2b-suite", "--e2b"],
                env={**os.environ, "TORPOR_URL": server.url,
                     "TORPOR_API_KEY": server.api_key},
                check=True, capture_output=True, text=True).stdout
            e2b_key = next(w for w in key.split() if w.startswith("e2b_"))
            env = {**base_env, "E2B_API_KEY": e2b_key, "E2B_API_URL": server.url,
                   "E2B_SANDBOX_URL": server.url, "E2B_DOMAIN": "localhost"}
            for g in live:
                say(f"group {g}")
                if g == "code-interpreter":
                    build_interpreter(server)
                    extract(args.ci_repo, CI_COMMIT, ["python/tests", "python/pytest.ini"],
                            work / "ci")
                    report["groups"][g] = run_pytest(
                        vbin, work / "ci/python", ["tests", *deselect(CI_OUT_OF_SCOPE)],
                        env, work / f"{g}.xml", args.workers, 3600)
                else:
                    report["groups"][g] = run_pytest(
                        vbin, sdk_dir, [*LIVE[g], *deselect(OUT_OF_SCOPE)], env,
                        work / f"{g}.xml", args.workers, 3600)
    finally:
        if server is not None:
            report["left_behind"] = server.stop(keep_log=True)
            log = Path(args.venv).parent / "server.log"
            shutil.move(f"{server.data_dir}.log", log)
            report["server_log"] = str(log)
        shutil.rmtree(work, ignore_errors=True)

    rows = [("group", "passed", "failed", "skipped", "seconds")]
    for g, r in report["groups"].items():
        rows.append((g, str(r["passed"]), str(r["failed"]), str(r["skipped"]),
                     str(r["seconds"])))
    total = {k: sum(r[k] for r in report["groups"].values())
             for k in ("passed", "failed", "skipped")}
    report["total"] = total
    rows.append(("total", str(total["passed"]), str(total["failed"]),
                 str(total["skipped"]), ""))
    print(json.dumps(report, indent=2))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if total["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
