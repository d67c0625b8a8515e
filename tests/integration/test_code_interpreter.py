"""The code interpreter (issue 14 item 1) with real kernels: the `code-interpreter` template
built from the package index once for the module (about a minute; the registries resolve
to a documentation range here, so the server allows it and trusts the system CA bundle
upstream, as tests/integration/test_builtin_templates.py explains), its server on port
49999 in the boot snapshot, reached through REST, the SDK and the CLI."""

from __future__ import annotations

import base64
import json
import re
import time
from ast import literal_eval

import httpx
import pytest
from conftest import cli

from torpor.sdk import Sandbox
from torpor.sdk.errors import ConflictError, InvalidRequestError, NotFoundError

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ci_api(ci_server):
    with ci_server.client(timeout=120) as c:
        yield c


@pytest.fixture
def sbx(ci_server):
    s = Sandbox.create("code-interpreter", url=ci_server.url, api_key=ci_server.key)
    try:
        yield s
    finally:
        s.delete()
        s.close()


def test_the_issues_example(sbx):
    sbx.run_code("import pandas as pd; df = pd.DataFrame({'x': [1, 2, 3]})")
    ex = sbx.run_code("df.describe()")
    assert ex.error is None and len(ex.results) == 1
    main = ex.results[0]
    assert main.is_main_result and "<table" in main.html and "mean" in main.text
    assert "2.0" in main.text  # the mean of 1, 2, 3
    ex = sbx.run_code("import matplotlib.pyplot as plt; plt.plot(df.x); plt.show()")
    assert ex.error is None
    [fig] = [r for r in ex.results if r.png]
    assert base64.b64decode(fig.png).startswith(PNG_MAGIC)
    assert "png" in fig.formats()
    ex = sbx.run_code("1/0")
    assert ex.error.name == "ZeroDivisionError" and ex.error.value == "division by zero"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", ex.error.traceback)  # IPython colours it
    assert "ZeroDivisionError" in plain and "1/0" in plain
    assert ex.results == []
    ctx = sbx.create_code_context(language="python", cwd="/home/user/proj")
    assert ctx.language == "python" and ctx.cwd == "/home/user/proj"
    seen: list[str] = []
    ex = sbx.run_code("import os\nx = 1\nprint(os.getcwd())\nprint('two')", context=ctx,
                      on_stdout=seen.append, timeout=30)
    assert "".join(seen) == "/home/user/proj\ntwo\n" == "".join(ex.logs.stdout)
    # the default context did not see that x, the new one keeps it
    assert sbx.run_code("x", context=ctx).text == "1"
    assert sbx.run_code("x").error.name == "NameError"
    assert ctx.id in {c.id for c in sbx.list_code_contexts()}


def test_streaming_callbacks_come_as_the_code_runs(sbx):
    stamps: list[tuple[float, str]] = []
    errs, results = [], []
    code = ("import sys, time\nfor i in range(3):\n    print(i, flush=True)\n"
            "    time.sleep(0.4)\nprint('oops', file=sys.stderr)\n"
            "from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))\n42")
    ex = sbx.run_code(code, on_stdout=lambda t: stamps.append((time.monotonic(), t)),
                      on_stderr=errs.append, on_result=results.append)
    assert "".join(t for _, t in stamps) == "0\n1\n2\n"
    assert stamps[-1][0] - stamps[0][0] > 0.6  # as printed, not all at the end
    assert "".join(errs) == "oops\n"
    assert [r.html for r in results] == ["<b>hi</b>", None]
    assert ex.text == "42" and ex.execution_count >= 1
    errors = []
    sbx.run_code("raise ValueError('bad')", on_error=errors.append)
    assert [(e.name, e.value) for e in errors] == [("ValueError", "bad")]


def test_a_timeout_interrupts_and_the_kernel_stays_usable(sbx):
    sbx.run_code("kept = 'yes'")
    t0 = time.monotonic()
    ex = sbx.run_code("import time\nwhile True: time.sleep(0.1)", timeout=1.5)
    assert time.monotonic() - t0 < 8
    assert ex.error.name == "TimeoutError" and "interrupted" in ex.error.value
    assert sbx.run_code("kept").text == "'yes'"
    # a cell that never falls silent meets its deadline too
    t0 = time.monotonic()
    ex = sbx.run_code("while True: print('x', flush=True); time.sleep(0.05)", timeout=1.5)
    assert time.monotonic() - t0 < 8
    assert ex.error.name == "TimeoutError" and "x\n" in "".join(ex.logs.stdout)
    assert sbx.run_code("kept").text == "'yes'"


def test_a_dead_kernel_says_so_and_restarts(sbx):
    sbx.run_code("a = 1")
    ex = sbx.run_code("import os; os._exit(1)")
    assert ex.error.name == "KernelDied" and "exit code 1" in ex.error.value
    assert "restart" in ex.error.value
    again = sbx.run_code("a")  # still dead: the same clear error, not a hang
    assert again.error.name == "KernelDied"
    [default] = [c for c in sbx.list_code_contexts() if c.language == "python"]
    sbx.restart_code_context(default)
    ex = sbx.run_code("a")
    assert ex.error.name == "NameError"  # a new kernel: the old state is gone
    assert sbx.run_code("1+1").text == "2"


def test_bash_contexts_keep_their_shell_state(sbx):
    ctx = sbx.create_code_context(language="bash", cwd="/tmp/b")
    ex = sbx.run_code("cd /tmp; export V=kept; echo out; echo err >&2", context=ctx)
    assert ex.logs.stdout == ["out\n"] and ex.logs.stderr == ["err\n"] and ex.error is None
    ex = sbx.run_code("echo $V; pwd; false", context=ctx)
    assert "".join(ex.logs.stdout) == "kept\n/tmp\n"
    assert ex.error.name == "ExitCodeError" and "1" in ex.error.value
    ex = sbx.run_code("while true; do sleep 1; done; echo never", context=ctx, timeout=1)
    assert ex.error.name == "TimeoutError" and ex.logs.stdout == []  # the cell stopped
    assert sbx.run_code("echo $V", context=ctx).logs.stdout == ["kept\n"]
    assert sbx.run_code("echo hi", language="bash").logs.stdout == ["hi\n"]
    sbx.delete_code_context(ctx)
    with pytest.raises(NotFoundError):
        sbx.run_code("echo gone", context=ctx)


def test_bad_input_gets_clear_errors_and_output_is_bounded(sbx, ci_api):
    with pytest.raises(InvalidRequestError, match="language 'cobol' is not available"):
        sbx.run_code("x", language="cobol")
    with pytest.raises(InvalidRequestError, match="language 'js' is not available"):
        sbx.create_code_context(language="js")
    with pytest.raises(NotFoundError, match="no context"):
        sbx.run_code("1", context="0123456789abcdef")
    # 3 MiB printed: 1 Mi characters kept, marked truncated, the kernel alive
    ex = sbx.run_code("print('y' * (3 << 20))")
    assert sum(map(len, ex.logs.stdout)) == 1 << 20 and ex.truncated == ["stdout"]
    assert sbx.run_code("2+2").text == "4"
    # a context of another sandbox is not found here
    ctx = sbx.create_code_context()
    r = ci_api.post("/v1/sandboxes", json={"template": "code-interpreter"})
    assert r.status_code == 201, r.text
    other = r.json()["id"]
    try:
        r = ci_api.post(f"/v1/sandboxes/{other}/code", json={"code": "1", "context": ctx.id})
        assert r.status_code == 404 and ctx.id in r.json()["error"]["message"]
        r = ci_api.post(f"/v1/sandboxes/{other}/code/contexts/{ctx.id}/restart")
        assert r.status_code == 404
    finally:
        ci_api.delete(f"/v1/sandboxes/{other}")
    r = ci_api.post(f"/v1/sandboxes/{sbx.id}/code", json={"code": "1", "language": "python",
                                                          "context": ctx.id})
    assert r.status_code == 422 and r.json()["error"]["field"] == "language"


def test_rest_streams_ndjson_and_a_client_that_leaves_interrupts(sbx, ci_api):
    url = f"/v1/sandboxes/{sbx.id}/code"
    with ci_api.stream("POST", url, json={"code": "print('a'); 1+2", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert [x["type"] for x in lines] == ["stdout", "result", "end"]
    assert lines[1]["text"] == "3" and lines[1]["is_main_result"] is True
    r = ci_api.post(url, json={"code": "print('a'); 1+2"})
    body = r.json()
    assert body["logs"]["stdout"] == ["a\n"] and body["results"][0]["text"] == "3"
    assert body["error"] is None and body["execution_count"] >= 1
    # leave mid-run: the kernel is interrupted, not left busy for a minute
    sbx.run_code("import time; state = 'before'")
    with pytest.raises(httpx.ReadTimeout):
        ci_api.post(url, json={"code": "time.sleep(60); state = 'after'"}, timeout=1.5)
    t0 = time.monotonic()
    assert sbx.run_code("state").text == "'before'"
    assert time.monotonic() - t0 < 10


def test_state_survives_standby_hibernation_and_a_server_restart(ci_server):
    with Sandbox.create("code-interpreter", url=ci_server.url, api_key=ci_server.key) as s:
        s.run_code("import numpy as np\nv = np.arange(5)\nf = open('/tmp/held', 'w')")
        s.standby()
        assert s.info().state == "standby"
        assert s.run_code("int(v.sum())").text == "10"
        s.hibernate()
        assert s.info().state == "hibernated"
        assert s.run_code("f.write('x'); f.flush(); int(v.sum())").text == "10"
        ci_server.stop()
        ci_server.start()
        assert s.run_code("f.closed, int(v[-1])").text == "(False, 4)"


def test_cli_run_code_prints_text_and_saves_images(ci_server, sbx, tmp_path):
    out = cli(ci_server, "run-code", sbx.id, "print('hello'); 6*7")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\n42\n"
    png = tmp_path / "fig.png"
    out = cli(ci_server, "run-code", sbx.id, "--png", str(png),
              "import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()")
    assert out.returncode == 0, out.stderr
    assert png.read_bytes().startswith(PNG_MAGIC)
    out = cli(ci_server, "run-code", sbx.id, "1/0")
    assert out.returncode == 1 and "ZeroDivisionError" in out.stderr


def test_a_sandbox_without_the_interpreter_is_a_409_saying_what_to_do(ci_server):
    with Sandbox.create(url=ci_server.url, api_key=ci_server.key) as s:
        with pytest.raises(ConflictError, match="runs no code interpreter.*code-interpreter"):
            s.run_code("1")
        with pytest.raises(ConflictError):
            s.list_code_contexts()


# the interpreter's connections as the kernel sees them: the remote ports of the
# established TCP connections to port 49999 (0xC34F), from the sandbox's /proc/net/tcp
TUNNELS = ("sorted(int(f[2].split(':')[1], 16) for f in (ln.split() for ln in "
           "open('/proc/net/tcp').readlines()[1:]) if f[1].endswith(':C34F') and f[3] == '01')")


def test_runs_share_one_kept_connection_that_neither_holds_standby_nor_outlives_a_restore(
        ci_server):
    with Sandbox.create("code-interpreter", url=ci_server.url, api_key=ci_server.key) as s:
        first = s.run_code(TUNNELS).text
        assert s.run_code(TUNNELS).text == first and len(literal_eval(first)) == 1
        s.standby()  # the idle connection is not activity: no 409
        assert s.run_code(TUNNELS).text == first  # frozen and thawed, still the same
        s.hibernate()
        after = literal_eval(s.run_code(TUNNELS).text)  # a new connection, the old one closed
        assert len(after) == 1 and after != literal_eval(first)
