"""The SDK's template builder without a server: the steps and the build context it makes,
and how it reads a build's events (an httpx mock transport plays the server)."""

from __future__ import annotations

import base64
import io
import json
import tarfile

import httpx
import pytest

from torpor import Template, TemplateBuildError, wait_for_cmd, wait_for_file, wait_for_port
from torpor.sdk import InvalidRequestError


def members(blob: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None)
                for m in tar.getmembers()}


def test_steps_and_the_context_they_read(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print(1)\n")
    (tmp_path / "conf.ini").write_text("[x]\n")
    t = (Template("web", "v2", memory_mb=256)
         .from_template("base").apt_install("git").pip_install(["flask", "gunicorn"])
         .copy(tmp_path / "app", "/srv/app/").copy(tmp_path / "conf.ini", "/etc/web.ini")
         .copy(tmp_path / "conf.ini", "/etc/keep/", user="root")
         .env({"A": "1"}, B="2").workdir("/srv").user("user").run("true", user="root")
         .start_cmd("serve", ready=wait_for_port(8000), timeout=9))
    assert t.to_steps() == [
        {"type": "from_template", "template": "base"},
        {"type": "apt_install", "packages": ["git"]},
        {"type": "pip_install", "packages": ["flask", "gunicorn"]},
        {"type": "copy", "src": "files/0", "dst": "/srv/app"},
        {"type": "copy", "src": "files/1/web.ini", "dst": "/etc"},  # renamed on the way
        {"type": "copy", "src": "files/2/conf.ini", "dst": "/etc/keep", "user": "root"},
        {"type": "env", "env": {"A": "1", "B": "2"}},
        {"type": "workdir", "path": "/srv"}, {"type": "user", "name": "user"},
        {"type": "run", "cmd": "true", "user": "root"},
        {"type": "start_cmd", "cmd": "serve", "ready": {"port": 8000}, "timeout": 9}]
    files = members(t.context())
    assert files["files/0/main.py"] == b"print(1)\n"
    assert files["files/1/web.ini"] == files["files/2/conf.ini"] == b"[x]\n"
    assert wait_for_file("/tmp/x") == {"file": "/tmp/x"}
    assert wait_for_cmd("true") == {"cmd": "true"}
    with pytest.raises(TypeError):
        t.run("after the start command")
    with pytest.raises(TypeError):
        Template("x").run("a").from_image("python:3.12")
    with pytest.raises(FileNotFoundError):
        Template("x").copy(tmp_path / "missing", "/x")


def test_from_dockerfile_sends_only_what_copy_names(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "req.txt").write_text("flask\n")
    (tmp_path / "Dockerfile").write_text("FROM base\nCOPY req.txt /srv/requirements.txt\n")
    t = Template.from_dockerfile(tmp_path / "Dockerfile", tmp_path, name="df")
    assert t.to_steps()[1] == {"type": "copy", "src": ".torpor-stage/0/requirements.txt",
                               "dst": "/srv", "user": "root"}
    assert set(members(t.context())) == {"req.txt", ".torpor-stage/0/requirements.txt"}
    (tmp_path / "Dockerfile").write_text("FROM base\n\nVOLUME /x\n")
    with pytest.raises(InvalidRequestError) as e:
        Template.from_dockerfile(tmp_path / "Dockerfile", tmp_path, name="df")
    assert e.value.field == "dockerfile" and e.value.details["line"] == 3


def _server(lines: list[dict], seen: list[httpx.Request], known=("base",)):
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "GET":
            ref = request.url.path.rsplit("/", 1)[1]
            if ref in known:
                return httpx.Response(200, json={"name": ref, "cpu": 1, "memory_mb": 512,
                                                 "disk_mb": 4096})
            return httpx.Response(404, json={"error": {"code": "not_found",
                                                       "message": "no template"}})
        body = "".join(json.dumps(x) + "\n" for x in lines)
        return httpx.Response(200, text=body, headers={"content-type": "application/x-ndjson"})
    return httpx.MockTransport(handle)


def test_build_streams_lines_and_returns_the_template(tmp_path):
    seen: list[httpx.Request] = []
    tpl = {"name": "web", "tag": "latest", "digest": "sha256:" + "a" * 64, "cpu": 1,
           "memory_mb": 512, "disk_mb": 4096, "snapshot": True}
    events = [{"type": "build", "id": "bld1"},
              {"type": "step", "index": 0, "total": 1, "step": {"type": "run"},
               "cached": False},
              {"type": "log", "stream": "stdout", "data": "one\ntw"},
              {"type": "log", "stream": "stdout", "data": "o\nthree"},
              {"type": "done", "template": tpl}]
    logs, steps = [], []
    (tmp_path / "f").write_text("x")
    info = Template("web").run("x").copy(tmp_path / "f", "/f").build(
        on_log=logs.append, on_step=steps.append, url="http://t",
        transport=_server(events, seen))
    assert info.digest == tpl["digest"] and info.snapshot
    assert logs == ["one", "two", "three"] and steps[0]["index"] == 0
    sent = json.loads(seen[0].content)
    assert seen[0].headers["accept"] == "application/x-ndjson"
    assert sent["name"] == "web" and members(base64.b64decode(sent["context"]))


def test_build_error_carries_exit_code_and_tail():
    events = [{"type": "build", "id": "bld2"},
              {"type": "log", "stream": "stderr", "data": "no such thing\n"},
              {"type": "error", "status": 422, "error": {
                  "code": "build_failed", "message": "the step failed with exit code 2",
                  "exit_code": 2, "output_tail": ["no such thing"]}}]
    with pytest.raises(TemplateBuildError) as e:
        Template("web").run("x").build(on_log=None, url="http://t",
                                       transport=_server(events, []))
    assert e.value.exit_code == 2 and e.value.output_tail == ["no such thing"]
    assert e.value.build_id == "bld2" and e.value.status == 422


def test_dockerfile_from_is_looked_up_on_the_server(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM mine:v1\nRUN true\n")
    seen: list[httpx.Request] = []
    done = {"type": "done", "template": {"name": "d", "cpu": 1, "memory_mb": 1,
                                         "disk_mb": 1}}
    t = Template.from_dockerfile(tmp_path / "Dockerfile", tmp_path, name="d")
    assert t.to_steps()[0] == {"type": "from_image", "image": "mine:v1"}  # (offline guess)
    t.build(on_log=None, url="http://t", transport=_server([done], seen, known=("mine:v1",)))
    assert json.loads(seen[-1].content)["steps"][0] == {"type": "from_template",
                                                       "template": "mine:v1"}
