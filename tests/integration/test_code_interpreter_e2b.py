"""The code interpreter as E2B's code interpreter SDK expects it (issue 15 item 3), checked
natively with real kernels: the sandbox's env seen by kernels started before it (the boot
snapshot's), a DataFrame's `data`, a PIL image saved or shown as a result, a matplotlib
figure's `chart`, E2B's unquoted text on port 49999 (Torpor's engine keeps the repr), and
a cwd the kernels' user cannot enter refused clearly. One sandbox for the module, on the
session's `ci_server` (E2B's own SDK tests: bench/e2b_suite.py --groups
code-interpreter)."""

from __future__ import annotations

import base64
import json

import pytest

from torpor.sdk import Sandbox
from torpor.sdk.errors import InvalidRequestError

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a client inside the sandbox speaking E2B's protocol straight to the server
E2B_CLIENT = r"""
import json, sys, urllib.request
req = urllib.request.Request("http://127.0.0.1:49999/execute", method="POST",
                             data=json.dumps(json.loads(sys.argv[1])).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    print(json.dumps([json.loads(line) for line in r.read().splitlines()]))
"""


@pytest.fixture(scope="module")
def sbx(ci_server):
    s = Sandbox.create("code-interpreter", url=ci_server.url, api_key=ci_server.key,
                       env={"TEST_ENV_VAR": "supertest", "GREETING": "it's \"quoted\" $x"})
    try:
        yield s
    finally:
        s.delete()
        s.close()


def test_the_sandbox_env_reaches_kernels_older_than_it(sbx):
    # the default Python kernel started in the template's build (the boot snapshot)
    assert sbx.run_code("import os; os.getenv('TEST_ENV_VAR')").text == "'supertest'"
    assert sbx.run_code("os.environ['GREETING']").text == repr("it's \"quoted\" $x")
    # a process the kernel starts inherits it
    ex = sbx.run_code("import subprocess; print(subprocess.check_output("
                      "['sh', '-c', 'echo $TEST_ENV_VAR'], text=True), end='')")
    assert ex.logs.stdout == ["supertest\n"]
    # per execution: on top, then back to the sandbox's value (and gone when it had none)
    ex = sbx.run_code("os.getenv('TEST_ENV_VAR'), os.getenv('FOO')",
                      env={"TEST_ENV_VAR": "overwrite", "FOO": "bar"})
    assert ex.text == "('overwrite', 'bar')"
    assert sbx.run_code("os.getenv('TEST_ENV_VAR'), os.getenv('FOO')").text == \
        "('supertest', None)"
    # the template's own env is left as the kernels have it: figures stay inline
    assert "inline" in sbx.run_code("import matplotlib; matplotlib.get_backend()").text
    # bash, and a context made now
    ex = sbx.run_code('echo "$TEST_ENV_VAR|$GREETING"', language="bash")
    assert ex.logs.stdout == ["supertest|it's \"quoted\" $x\n"]
    ex = sbx.run_code("echo $TEST_ENV_VAR", language="bash", env={"TEST_ENV_VAR": "o"})
    assert ex.logs.stdout == ["o\n"]
    assert sbx.run_code("echo $TEST_ENV_VAR", language="bash").logs.stdout == ["supertest\n"]
    ctx = sbx.create_code_context(language="python")
    assert sbx.run_code("import os; os.getenv('TEST_ENV_VAR')", context=ctx).text == \
        "'supertest'"
    # the file it comes from is root's: the kernels' user can read it, not change it
    ex = sbx.run_code("import os; st = os.stat('/run/torpor/env.json'); "
                      "st.st_uid, oct(st.st_mode & 0o777), os.access('/run/torpor', os.W_OK),"
                      " os.getuid() != 0")
    assert ex.text == "(0, '0o644', False, True)"


def test_e2b_protocol_text_loses_its_quotes_torpor_keeps_the_repr(sbx):
    body = {"code": "import os; os.getenv('FOO')", "env_vars": {"FOO": "bar"}}
    for raw, text in ((False, "bar"), (True, "'bar'")):
        out = sbx.commands.run(["python3", "-c", E2B_CLIENT,
                                json.dumps({**body, "raw_text": raw})]).stdout
        results = [x for x in json.loads(out) if x["type"] == "result"]
        assert [(r["text"], r["is_main_result"]) for r in results] == [(text, True)]
    assert sbx.run_code("'bar'").text == "'bar'"  # the engine asks for the repr


def test_a_dataframe_carries_its_data(sbx):
    ex = sbx.run_code("import pandas as pd\n"
                      "pd.DataFrame({'a': [1, 2, 3], 'b': ['x', None, 'z'],"
                      " 't': pd.to_datetime(['2024-01-02', None, '2024-03-04']),"
                      " 'f': [0.5, float('nan'), 2.0]})")
    main = ex.results[0]
    assert main.is_main_result and "<table" in main.html
    assert main.data == {"a": [1, 2, 3], "b": ["x", None, "z"],
                         "t": ["2024-01-02T00:00:00", None, "2024-03-04T00:00:00"],
                         "f": [0.5, None, 2.0]}
    assert sbx.run_code("[1, 2]").results[0].data is None  # only frames


def test_a_saved_or_shown_pil_image_is_a_result(sbx):
    ex = sbx.run_code("import numpy, os\nfrom PIL import Image\n"
                      "image = Image.fromarray((numpy.random.rand(16, 16, 3) * 255)"
                      ".astype('uint8')).convert('RGBA')\n"
                      "image.save('test.png')\nprint(os.path.getsize('test.png') > 0)")
    assert ex.error is None and ex.logs.stdout == ["True\n"]
    assert [base64.b64decode(r.png)[:8] for r in ex.results] == [PNG_MAGIC]
    # show: displayed, and no viewer program tried even where one exists
    ex = sbx.run_code("import shutil; shutil.which('display'), shutil.which('xdg-open')")
    assert ex.text == "(None, None)"
    ex = sbx.run_code("from PIL import ImageShow\n"
                      "ImageShow.register(ImageShow.XDGViewer(), 0)\n"  # as if installed
                      "image.show(); print('shown')")
    assert ex.error is None and ex.logs.stdout == ["shown\n"]
    assert [base64.b64decode(r.png)[:8] for r in ex.results] == [PNG_MAGIC]
    # a save to a file object writes and shows nothing
    ex = sbx.run_code("import io; image.save(io.BytesIO(), format='PNG')")
    assert ex.error is None and ex.results == []


def test_a_matplotlib_figure_carries_its_chart(sbx):
    ex = sbx.run_code("import matplotlib.pyplot as plt\n"
                      "plt.plot([1, 2, 3], [1, 4, 9], label='squares')\n"
                      "plt.title('growth'); plt.xlabel('n'); plt.ylabel('n^2'); plt.show()")
    assert ex.error is None and len(ex.results) == 1
    result = ex.results[0]
    assert base64.b64decode(result.png)[:8] == PNG_MAGIC
    chart = result.chart
    assert chart["type"] == "line" and chart["title"] == "growth"
    assert (chart["x_label"], chart["y_label"]) == ("n", "n^2")
    assert [(e["label"], [float(p[1]) for p in e["points"]]) for e in chart["elements"]] == \
        [("squares", [1, 4, 9])]


def test_a_cwd_the_kernels_user_cannot_enter_is_refused_clearly(sbx):
    with pytest.raises(InvalidRequestError) as e:
        sbx.create_code_context(language="python", cwd="/root")
    assert "'/root'" in str(e.value) and "'user'" in str(e.value) and "root" in str(e.value)
