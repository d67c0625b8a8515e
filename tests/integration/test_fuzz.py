"""A bounded schemathesis run against a live server, built from the server's own OpenAPI
document: it passes with no 5xx and no answer the document does not describe (status,
content type, body schema), and with every schema-invalid request refused.

Its own server (the run creates secrets, domains and keys), with one sandbox every
`{sid}` route is pinned to. Left out: DELETE /v1/keys/{key_id} (the run would revoke its
own key) and DELETE /v1/sandboxes/{sid} (it would delete the pinned sandbox). Sandbox
creation, PATCH and template builds get schema-invalid bodies only: valid ones would
start a sandbox (or a build) per example, or expire the pinned one (the rest of the suite covers them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Server, make_data_dir, teardown_data_dir

ST = Path(sys.executable).with_name("st")  # schemathesis's command line, in the venv
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection")
EXAMPLES = 10  # per operation in the fuzzing phase
SEED = 20261203  # the same requests every run; change it to explore others


@pytest.fixture(scope="module")
def fuzz_server():
    srv = Server(make_data_dir(), pool_size=1).start()
    yield srv
    teardown_data_dir(srv)


def test_schemathesis_finds_no_5xx_and_no_schema_violation(fuzz_server, tmp_path):
    api = fuzz_server.client()
    r = api.post("/v1/sandboxes", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'''[parameters]
"path.sid" = "{sid}"

[[operations]]
include-path = "/v1/sandboxes"
include-method = "POST"
generation.mode = "negative"

[[operations]]
include-path = "/v1/sandboxes/{{sid}}"
include-method = "PATCH"
generation.mode = "negative"

[[operations]]
include-path = "/v1/templates"
include-method = "POST"
generation.mode = "negative"
''')
    # one worker: with two threads, CPython 3.11.7's AST constructor (which hypothesis uses
    # to describe its strategies) now and then failed with "recursion depth mismatch"
    cmd = [str(ST), "--config-file", str(config), "run", f"{fuzz_server.url}/openapi.json",
           "-H", f"Authorization: Bearer {fuzz_server.key}", "--checks", CHECKS,
           "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
           "--phases", "coverage,fuzzing", "--request-timeout", "60", "--no-shrink",
           "--exclude-name", "DELETE /v1/keys/{key_id}",
           "--exclude-name", "DELETE /v1/sandboxes/{sid}"]
    try:
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             check=False)
        # the key the run used is still valid
        assert api.get("/v1/sandboxes").status_code == 200
    finally:
        for sbx in api.get("/v1/sandboxes").json():
            api.delete(f"/v1/sandboxes/{sbx['id']}")
        api.close()
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-30000:]
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= 1000, out[-5000:]
