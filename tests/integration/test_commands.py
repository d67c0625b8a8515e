"""Commands and background processes in real sandboxes."""

from __future__ import annotations

import json
import time

import httpx
from conftest import run


def test_exit_code_stdout_stderr(api, sandbox):
    out = run(api, sandbox, "echo out; echo err >&2; exit 3")
    assert (out["stdout"], out["stderr"], out["exit_code"]) == ("out\n", "err\n", 3)


def test_argv_env_cwd_user(api, sandbox):
    r = api.post(f"/v1/sandboxes/{sandbox}/commands",
                 json={"argv": ["sh", "-c", "echo $X $(pwd) $(id -un)"], "env": {"X": "y"},
                       "cwd": "/tmp"})
    assert r.json()["stdout"] == "y /tmp user\n"
    assert run(api, sandbox, "id -u", user="root")["stdout"] == "0\n"
    assert run(api, sandbox, "id -un")["stdout"] == "user\n"


def test_stdin_is_fed(api, sandbox):
    assert run(api, sandbox, "tr a-z A-Z", stdin="hello")["stdout"] == "HELLO"


def test_timeout_kills_the_command(api, sandbox):
    out = run(api, sandbox, "sleep 30", timeout=0.5)
    assert out["timed_out"] is True
    assert out["exit_code"] == 137


def test_streaming_ndjson(api, sandbox):
    body = {"cmd": "for i in 1 2 3; do echo $i; done; echo e >&2; exit 4", "stream": True}
    with api.stream("POST", f"/v1/sandboxes/{sandbox}/commands", json=body) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0]["type"] == "start"
    assert "".join(e["data"] for e in events if e["type"] == "stdout") == "1\n2\n3\n"
    assert "".join(e["data"] for e in events if e["type"] == "stderr") == "e\n"
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 4


def test_streaming_sse(api, sandbox):
    with api.stream("POST", f"/v1/sandboxes/{sandbox}/commands",
                    json={"cmd": "echo hi", "stream": True},
                    headers={"Accept": "text/event-stream"}) as r:
        text = r.read().decode()
    assert "event: stdout" in text and "event: exit" in text


def test_background_process_outlives_its_client(server, api, sandbox):
    r = api.post(f"/v1/sandboxes/{sandbox}/commands",
                 json={"cmd": "read line; echo got $line; sleep 0.2; echo done",
                       "background": True, "tag": "bg"})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    # a different client, later, finds it, feeds it and follows it to the end
    with server.client() as other:
        procs = other.get(f"/v1/sandboxes/{sandbox}/processes").json()
        assert any(p["pid"] == pid and p["running"] for p in procs)
        other.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/stdin",
                   json={"data": "ping\n", "eof": True})
        with other.stream("GET", f"/v1/sandboxes/{sandbox}/processes/{pid}/output",
                          params={"follow": True}) as resp:
            events = [json.loads(x) for x in resp.iter_lines() if x]
    out = "".join(e["data"] for e in events if e["type"] == "stdout")
    assert out == "got ping\ndone\n"
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0
    info = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/wait").json()
    assert info["running"] is False and info["exit_code"] == 0


def test_streaming_client_disconnect_keeps_process(server, api, sandbox):
    body = {"cmd": "echo start; sleep 1; echo end > /tmp/finished", "stream": True}
    with server.client() as c, c.stream("POST", f"/v1/sandboxes/{sandbox}/commands",
                                        json=body) as r:
        for line in r.iter_lines():
            if "start" in line:
                break  # leave before the command ends
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if run(api, sandbox, "cat /tmp/finished 2>/dev/null")["stdout"] == "end\n":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the command did not finish after its client left")


def test_signal_and_wait(api, sandbox):
    pid = api.post(f"/v1/sandboxes/{sandbox}/commands",
                   json={"cmd": "sleep 60", "background": True}).json()["pid"]
    r = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/signal", json={"signal": "SIGKILL"})
    assert r.status_code == 200, r.text
    info = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/wait").json()
    assert info["signal"] == "SIGKILL"
    r = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/signal", json={"signal": "SIGNOPE"})
    assert r.status_code == 422
    assert api.get(f"/v1/sandboxes/{sandbox}/processes/999999").status_code == 404


def test_flooding_command_does_not_exhaust_server_memory(server, api, sandbox):
    before = server.rss_bytes()
    out = run(api, sandbox, "head -c 400000000 /dev/zero | tr '\\0' x", timeout=300)
    assert out["exit_code"] == 0
    assert out["truncated"] is True
    assert len(out["stdout"]) == 16 << 20
    # a streaming reader that stops reading holds the sandbox back, not the server
    with server.client() as c, c.stream(
            "POST", f"/v1/sandboxes/{sandbox}/commands",
            json={"cmd": "head -c 300000000 /dev/zero", "stream": True}) as r:
        it = r.iter_bytes()
        next(it)
        time.sleep(2)
    grown = server.rss_bytes() - before
    assert grown < 200 << 20, f"server RSS grew by {grown >> 20} MiB"


def test_unknown_command_and_bad_cwd(api, sandbox):
    r = api.post(f"/v1/sandboxes/{sandbox}/commands", json={"argv": ["no-such-tool"]})
    assert r.status_code == 404
    r = api.post(f"/v1/sandboxes/{sandbox}/commands", json={"cmd": "true", "cwd": "/nope"})
    assert r.status_code == 422


def test_many_concurrent_commands(server, sandbox):
    import concurrent.futures

    def one(i):
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"X-API-Key": server.key}) as c:
            return c.post(f"/v1/sandboxes/{sandbox}/commands",
                          json={"cmd": f"echo {i}"}).json()["stdout"]

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(one, range(64)))
    assert outs == [f"{i}\n" for i in range(64)]
