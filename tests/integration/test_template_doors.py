"""Templates through the front doors, against a real server: REST (NDJSON events, 202 and
the build's status and logs), the SDK builder (on_log, errors), the CLI from a Dockerfile,
sandboxes started from what they built, list/show/rm, and builds that outlive the client
that started them."""

from __future__ import annotations

import base64
import io
import json
import tarfile

import httpx
import pytest
from conftest import Server, cli, make_data_dir, run, teardown_data_dir, wait_for

from torpor import Template, TemplateBuildError, wait_for_port
from torpor.sdk import ConflictError, InvalidRequestError

NDJSON = {"Accept": "application/x-ndjson"}
SERVE = ("python3 -c \"import http.server,os; os.chdir('{dir}'); http.server.test("
         "HandlerClass=http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')\"")
FETCH = ("python3 -c \"import urllib.request; print(urllib.request.urlopen("
         "'http://127.0.0.1:{port}/{path}', timeout=5).read().decode().strip())\"")


@pytest.fixture(scope="module")
def srv():
    # a server of its own: no warm pool (the templates with a boot snapshot would fill one)
    s = Server(make_data_dir(), pool_size=0).start()
    yield s
    teardown_data_dir(s)


@pytest.fixture(scope="module")
def http(srv):
    with srv.client(timeout=120) as c:
        yield c


@pytest.fixture
def conn(srv):
    return {"url": srv.url, "api_key": srv.key}


def context_of(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def build_events(http, body: dict) -> list[dict]:
    with http.stream("POST", "/v1/templates", json=body, headers=NDJSON) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def sandbox_of(http, template: str) -> str:
    r = http.post("/v1/sandboxes", json={"template": template})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_rest_build_streams_events_and_keeps_the_record(http):
    events = build_events(http, {
        "name": "rest-one", "tag": "v1",
        "steps": [{"type": "env", "env": {"GREETING": "hi"}},
                  {"type": "copy", "src": "app", "dst": "/home/user/app"},
                  {"type": "run", "cmd": "echo building $GREETING; cat app/a.txt"}],
        "context": context_of({"app/a.txt": b"from the context\n"})})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "build" and kinds[-1] == "done", events
    assert [e["index"] for e in events if e["type"] == "step"] == [0, 1, 2]
    logs = "".join(e["data"] for e in events if e["type"] == "log")
    assert "building hi" in logs and "from the context" in logs
    tpl = events[-1]["template"]
    assert tpl["name"] == "rest-one" and tpl["tag"] == "v1" and "path" not in tpl
    # the record: status, and the log of a finished build from any offset
    bid = events[0]["id"]
    rec = http.get(f"/v1/templates/builds/{bid}").json()
    assert rec["state"] == "succeeded" and rec["digest"] == tpl["digest"]
    assert [p["index"] for p in rec["progress"]] == [0, 1, 2]
    assert bid in [b["id"] for b in http.get("/v1/templates/builds").json()]
    r = http.get(f"/v1/templates/builds/{bid}/logs", params={"offset": 2})
    assert [json.loads(x) for x in r.text.splitlines()] == events[3:]  # (events[0]: ours)
    # show, by name:tag and by digest; listed with its digest
    shown = http.get("/v1/templates/rest-one:v1").json()
    assert shown["steps"][0] == {"type": "env", "env": {"GREETING": "hi"}}
    assert shown["env"] == {"GREETING": "hi"} and len(shown["layers"]) == 2
    assert http.get(f"/v1/templates/{tpl['digest']}").json()["digest"] == tpl["digest"]
    listed = {(t["name"], t["tag"]): t for t in http.get("/v1/templates").json()}
    assert listed[("rest-one", "v1")]["digest"] == tpl["digest"]
    assert http.get("/v1/templates/rest-one").status_code == 404  # (no :latest)


def test_rest_202_then_status_and_follow(http):
    r = http.post("/v1/templates", json={"name": "rest-bg", "steps": [
        {"type": "run", "cmd": "for i in 1 2 3; do echo tick $i; sleep 0.3; done"}]})
    assert r.status_code == 202, r.text
    rec = r.json()
    assert rec["state"] == "running" and r.headers["location"] == rec["url"]
    with http.stream("GET", rec["logs_url"], params={"follow": "true"}) as s:
        events = [json.loads(x) for x in s.iter_lines() if x]
    assert events[-1]["type"] == "done"
    assert "tick 3" in "".join(e.get("data", "") for e in events)
    assert http.get(rec["url"]).json()["state"] == "succeeded"


def test_rest_refuses_before_anything_runs(http):
    def err(body):
        r = http.post("/v1/templates", json=body, headers=NDJSON)
        return r.status_code, r.json()["error"]

    code, e = err({"name": "Not_A_Label", "steps": []})
    assert code == 422 and e["field"] == "name" and "DNS label" in e["message"]
    code, e = err({"name": "x", "steps": [{"type": "run", "cmd": "true"}],
                   "dockerfile": "FROM base\n"})
    assert code == 422
    code, e = err({"name": "x", "steps": [{"type": "teleport"}]})
    assert code == 422 and e["field"].startswith("steps.0")
    code, e = err({"name": "x", "steps": [{"type": "from_template", "template": "nope"}]})
    assert code == 404 and e["field"] == "steps.0"
    code, e = err({"name": "x", "dockerfile": "FROM base\nRUN true\nVOLUME /data\n"})
    assert code == 422 and e["field"] == "dockerfile" and e["line"] == 3
    assert e["instruction"] == "VOLUME"
    code, e = err({"name": "x", "dockerfile": "FROM base\nCOPY ../etc/passwd /x\n",
                   "context": context_of({"a": b"1"})})
    assert code == 422 and e["line"] == 2 and "outside the build context" in e["message"]
    code, e = err({"name": "x", "dockerfile": "FROM base\n", "context": "!!"})
    assert code == 422 and e["field"] == "context"
    assert http.get("/v1/templates/builds/bldnope").status_code == 404
    r = http.delete("/v1/templates/base")
    assert r.status_code == 409


def test_rest_dockerfile_with_context(http):
    dockerfile = ("FROM base\nARG WHO=nobody\nENV WHO=$WHO\nCOPY notes.txt /home/user/n.txt\n"
                  "RUN cat /home/user/n.txt && echo by $WHO\n")
    events = build_events(http, {"name": "rest-df", "dockerfile": dockerfile,
                                 "build_args": {"WHO": "rest"},
                                 "context": context_of({"notes.txt": b"renamed on copy\n"})})
    assert events[-1]["type"] == "done", events[-1]
    logs = "".join(e["data"] for e in events if e["type"] == "log")
    assert "renamed on copy" in logs and "by rest" in logs


def test_sdk_build_with_on_log_and_a_boot_snapshot(http, conn, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<p>sdk site</p>\n")
    lines, steps = [], []
    t = (Template("sdk-web")
         .from_template("base")
         .env({"MODE": "sdk"})
         .copy(tmp_path / "site", "/home/user/site/")
         .run("echo prepared $MODE; ls site")
         .start_cmd(SERVE.format(dir="/home/user/site", port=8000),
                    ready=wait_for_port(8000), timeout=30))
    assert [s["type"] for s in t.to_steps()] == ["from_template", "env", "copy", "run",
                                                 "start_cmd"]
    info = t.build(on_log=lines.append, on_step=steps.append, **conn)
    assert info.name == "sdk-web" and info.snapshot and info.digest.startswith("sha256:")
    assert "prepared sdk" in lines and "index.html" in lines
    assert [s["index"] for s in steps] == [0, 1, 2, 3, 4]
    # a sandbox of it: the files, the env, the start command already serving
    sid = sandbox_of(http, "sdk-web")
    try:
        assert run(http, sid, "echo $MODE")["stdout"] == "sdk\n"
        assert run(http, sid, FETCH.format(port=8000, path="index.html"))["stdout"] == \
            "<p>sdk site</p>\n"
        # in use: refused, naming the sandbox
        with pytest.raises(ConflictError) as e:
            Template.delete("sdk-web", **conn)
        assert sid in str(e.value)
    finally:
        http.delete(f"/v1/sandboxes/{sid}")
    # the same build again: every step that makes a layer or the snapshot is cached
    steps.clear()
    again = t.build(on_log=None, on_step=steps.append, **conn)
    assert again.digest == info.digest
    assert [s["cached"] for s in steps if s["step"]["type"] in ("copy", "run", "start_cmd")
            ] == [True, True, True]
    Template.delete("sdk-web", **conn)
    assert "sdk-web" not in [x.name for x in Template.list(**conn)]


def test_sdk_failing_step_raises_with_exit_code_and_tail(conn):
    t = Template("sdk-fails").run("echo first line; echo the reason >&2; exit 7")
    with pytest.raises(TemplateBuildError) as e:
        t.build(on_log=None, **conn)
    err = e.value
    assert err.exit_code == 7 and "the reason" in err.output_tail
    assert "exit code 7" in str(err) and err.build_id.startswith("bld")
    assert Template.get_build(err.build_id, **conn).state == "failed"
    with pytest.raises(InvalidRequestError) as e:
        Template("Bad Name").run("true").build(on_log=None, **conn)
    assert e.value.field == "name"


def test_cli_build_from_a_dockerfile(srv, http, tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "hello.txt").write_text("hello from the context\n")
    (tmp_path / "Dockerfile").write_text(
        "# torpor: ready port=8080\n"
        "FROM base\n"
        "ARG FLAVOUR=plain\n"
        "ENV FLAVOUR=$FLAVOUR\n"
        "WORKDIR /srv/web\n"
        "COPY --chown=root app/ ./\n"
        "RUN echo \"built $FLAVOUR\" > built.txt && echo run-step-output\n"
        "EXPOSE 8080\n"
        f"CMD {SERVE.format(dir='/srv/web', port=8080)}\n")
    p = cli(srv, "template", "build", "-t", "cli-web:v1", "--build-arg", "FLAVOUR=spicy",
            str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Step 1/" in p.stdout and "run-step-output" in p.stdout
    assert "built cli-web:v1" in p.stdout and "boot snapshot" in p.stdout
    sid = sandbox_of(http, "cli-web:v1")
    try:
        # a command that names no user runs as the template's, in its WORKDIR
        assert run(http, sid, "echo $FLAVOUR; pwd; cat built.txt hello.txt; "
                   "stat -c %U /srv/web")["stdout"] == \
            "spicy\n/srv/web\nbuilt spicy\nhello from the context\nuser\n"
        # one that names a user starts in that user's home
        assert run(http, sid, "pwd", user="root")["stdout"] == "/root\n"
        assert run(http, sid, FETCH.format(port=8080, path="hello.txt"))["stdout"] == \
            "hello from the context\n"
        p = cli(srv, "template", "rm", "cli-web:v1")
        assert p.returncode != 0 and sid in p.stderr
    finally:
        http.delete(f"/v1/sandboxes/{sid}")
    p = cli(srv, "template", "list")
    assert p.returncode == 0 and "cli-web" in p.stdout and "v1" in p.stdout
    p = cli(srv, "template", "show", "cli-web:v1", "--json")
    shown = json.loads(p.stdout)
    assert shown["start_cmd"].startswith("python3") and shown["ready"] == {"port": 8080}
    assert cli(srv, "template", "rm", "cli-web:v1").returncode == 0
    assert "cli-web" not in cli(srv, "template", "list").stdout


def test_cli_failures_exit_non_zero(srv, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN echo boom >&2; exit 3\n")
    p = cli(srv, "template", "build", "-t", "cli-fails", str(tmp_path))
    assert p.returncode == 1 and "exit code 3" in p.stderr and "boom" in p.stderr
    (tmp_path / "Dockerfile").write_text("FROM base\nVOLUME /x\n")
    p = cli(srv, "template", "build", "-t", "cli-fails", str(tmp_path))
    assert p.returncode == 1 and "line 2" in p.stderr and "VOLUME" in p.stderr
    # the steps of a JSON file, then its log by build id
    (tmp_path / "steps.json").write_text(json.dumps([{"type": "run", "cmd": "echo stepped"}]))
    p = cli(srv, "template", "build", "--steps", str(tmp_path / "steps.json"), "-t",
            "cli-steps", str(tmp_path))
    assert p.returncode == 0 and "stepped" in p.stdout, p.stderr
    builds = json.loads(cli(srv, "template", "builds", "--json").stdout)
    last = next(b for b in builds if b["name"] == "cli-steps")
    p = cli(srv, "template", "logs", last["id"])
    assert p.returncode == 0 and "stepped" in p.stdout
    failed = next(b for b in builds if b["name"] == "cli-fails" and b["state"] == "failed")
    assert cli(srv, "template", "logs", failed["id"]).returncode == 1


def test_client_disconnect_does_not_cancel_the_build(srv, http):
    body = {"name": "walkaway", "steps": [
        {"type": "run", "cmd": "echo started; sleep 2; echo finished"}]}
    headers = {"Authorization": f"Bearer {srv.key}", **NDJSON}
    with httpx.Client(base_url=srv.url, timeout=30, headers=headers) as c, \
            c.stream("POST", "/v1/templates", json=body) as r:
        first = json.loads(next(r.iter_lines()))
        assert first["type"] == "build"
    # the connection is closed here, mid-build
    bid = first["id"]
    assert http.get(f"/v1/templates/builds/{bid}").json()["state"] == "running"
    # a second build of the name meanwhile: refused, not corrupting
    r = http.post("/v1/templates", json=body)
    assert r.status_code == 409 and "being built" in r.json()["error"]["message"]
    rec = wait_for(lambda: (x := http.get(f"/v1/templates/builds/{bid}").json())["state"]
                   != "running" and x, timeout=60)
    assert rec["state"] == "succeeded", rec
    logs = http.get(f"/v1/templates/builds/{bid}/logs").text
    assert "finished" in logs
    assert http.get("/v1/templates/walkaway").status_code == 200
