"""Hostile input gets a 4xx in the error envelope, never a 500, and the OpenAPI document
says what the server does (hardening defects 2, 5 and 6)."""

from __future__ import annotations

import httpx
import pytest
from conftest import run

JSON = {"content-type": "application/json"}


def _invalid(r: httpx.Response, field: str | None) -> dict:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid" and err.get("field") == field, r.text
    return err


def test_nul_bytes_and_bad_env_names_are_422_naming_the_field(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}/commands"
    for body, field in [({"cmd": "echo a\0b"}, "cmd"), ({"argv": ["echo", "a\0b"]}, "argv.1"),
                        ({"cmd": "true", "env": {"A": "x\0y"}}, "env.A"),
                        ({"cmd": "true", "cwd": "/tmp\0"}, "cwd"),
                        ({"cmd": "true", "user": "us\0er"}, "user")]:
        err = _invalid(api.post(base, json=body), field)
        assert "NUL" in err["message"] or "user name" in err["message"], err
    for name in ("A=B", "A\0B", ""):
        err = _invalid(api.post(base, json={"cmd": "true", "env": {name: "x"}}),
                       f"env.{name}.[key]")
    assert "'='" in _invalid(api.post(base, json={"cmd": "true", "env": {"A=B": "x"}}),
                             "env.A=B.[key]")["message"]
    # the files API's `user` (a relative path is resolved in that user's home)
    r = api.get(f"/v1/sandboxes/{sandbox}/files/stat", params={"path": "x", "user": "a\0b"})
    _invalid(r, "user")
    r = api.get(f"/v1/sandboxes/{sandbox}/files/stat",
                params={"path": "x", "user": "99999999999999999999"})
    _invalid(r, "user")
    r = api.post(f"/v1/sandboxes/{sandbox}/files/mkdir", json={"path": "/tmp/a\0b"})
    _invalid(r, "path")
    assert run(api, sandbox, "echo alive")["stdout"] == "alive\n"


@pytest.mark.parametrize("body, field", [
    ('{"cmd": "cat", "stdin": "\\ud800"}', "stdin"),
    ('{"argv": ["echo", "\\ud800"]}', "argv.1"),
    ('{"cmd": "true", "env": {"A": "\\udc00"}}', "env.A"),
    ('{"cmd": "echo \\udfff"}', "cmd"),
])
def test_lone_surrogates_are_422(api, sandbox, body, field):
    r = api.post(f"/v1/sandboxes/{sandbox}/commands", content=body, headers=JSON)
    assert "surrogate" in _invalid(r, field)["message"]


def test_lone_surrogate_in_process_stdin_is_422(api, sandbox):
    r = api.post(f"/v1/sandboxes/{sandbox}/commands",
                 json={"cmd": "cat", "background": True})
    pid = r.json()["pid"]
    r = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/stdin",
                 content='{"data": "x\\ud800"}', headers=JSON)
    _invalid(r, "data")
    # the process still takes good input
    r = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/stdin",
                 json={"data": "ok\n", "eof": True})
    assert r.status_code == 200, r.text
    done = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/wait", params={"timeout": 30})
    assert done.status_code == 200 and done.json()["exit_code"] == 0, done.text


def test_numbers_a_client_sends_are_bounded(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}"
    # a command timeout of at most 30 days; the one that killed the agent still runs
    _invalid(api.post(base + "/commands", json={"cmd": "true", "timeout": 30 * 86400 + 1}),
             "timeout")
    _invalid(api.post(base + "/commands", json={"cmd": "true", "timeout": 0}), "timeout")
    assert run(api, sandbox, "echo ok", timeout=2147484)["stdout"] == "ok\n"
    for q, field in [({"timeout": -1}, "timeout"), ({"timeout": 30 * 86400 + 1}, "timeout")]:
        _invalid(api.post(base + "/processes/1/wait", params=q), field)
    _invalid(api.post(base + "/processes/0/wait"), "pid")
    _invalid(api.get(base + "/processes/1/output", params={"offset": -1}), "offset")
    # a number past SQLite's 64-bit integers was a plain-text 500
    _invalid(api.get(base + "/egress", params={"before": 10**30}), "before")
    for port in (0, 65536):
        _invalid(api.put(f"{base}/ports/{port}", json={"public": True}), "port")
    _invalid(api.patch(base, json={"ttl": 1e300}), "ttl")
    _invalid(api.patch(base, json={"idle_ttl": -1}), "idle_ttl")
    _invalid(api.get(base + "/files/list", params={"path": "/", "depth": 0}), "depth")
    for body, field in [({"cpu": 0.01}, "cpu"), ({"memory_mb": 32}, "memory_mb"),
                        ({"disk_mb": 1 << 21}, "disk_mb"), ({"standby_after": 1e300},
                                                            "standby_after")]:
        _invalid(api.post("/v1/sandboxes", json=body), field)


def test_strict_types_no_coercion(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}"
    _invalid(api.patch(base, json={"idle_ttl": False}), "idle_ttl")
    _invalid(api.patch(base, json={"standby_after": "30"}), "standby_after")
    _invalid(api.post(base + "/processes/1/stdin", json={"data": "", "eof": 0}), "eof")
    _invalid(api.post(base + "/commands", json={"cmd": "true", "background": 1}),
             "background")
    _invalid(api.post("/v1/sandboxes", json={"cpu": "1"}), "cpu")
    # integers where a number is meant stay fine
    assert api.patch(base, json={"idle_ttl": 3600}).json()["idle_ttl"] == 3600


def test_background_command_with_a_tiny_timeout_starts(api, sandbox):
    # the command's timeout was used as the wait for the start: 500, yet the process ran
    r = api.post(f"/v1/sandboxes/{sandbox}/commands",
                 json={"cmd": "echo started", "background": True, "timeout": 1e-9})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    done = api.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/wait", params={"timeout": 30})
    assert done.status_code == 200 and done.json()["exit_code"] == 0, done.text


def test_wait_with_timeout_zero(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}/processes"
    # an unknown pid is 404 whatever the timeout (it was 504 "still running" with 0)
    for q in ({}, {"timeout": 0}):
        r = api.post(f"{base}/99999/wait", params=q)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    sleeper = api.post(f"/v1/sandboxes/{sandbox}/commands",
                       json={"cmd": "sleep 30", "background": True}).json()["pid"]
    r = api.post(f"{base}/{sleeper}/wait", params={"timeout": 0})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    api.post(f"{base}/{sleeper}/signal", json={"signal": "SIGKILL"})
    quick = api.post(f"/v1/sandboxes/{sandbox}/commands",
                     json={"cmd": "true", "background": True}).json()["pid"]
    assert api.post(f"{base}/{quick}/wait", params={"timeout": 30}).status_code == 200
    r = api.post(f"{base}/{quick}/wait", params={"timeout": 0})  # exited: its info
    assert r.status_code == 200 and r.json()["running"] is False, r.text


def test_long_names_are_422_and_a_255_byte_name_works(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}"
    long = "/tmp/" + "a" * 256
    for r in (api.post(base + "/files/mkdir", json={"path": long}),
              api.put(base + "/files", params={"path": long}, content=b"x"),
              api.get(base + "/files/stat", params={"path": long}),
              api.post(base + "/files/rename", json={"src": "/tmp", "dst": long})):
        err = _invalid(r, None)
        assert "255 bytes" in err["message"] and sandbox in err["message"], r.text
    # the longest name a file may have: the upload's temporary name used to be longer
    name = "/tmp/" + "é" * 127  # 254 bytes of UTF-8
    r = api.put(base + "/files", params={"path": name}, content=b"data")
    assert r.status_code == 200, r.text
    assert api.get(base + "/files", params={"path": name}).content == b"data"


def test_read_only_agent_directory_is_409(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}"
    for r in (api.put(base + "/files", params={"path": "/.torpor/agent/x"}, content=b"x"),
              api.post(base + "/files/mkdir", json={"path": "/.torpor/agent/d"})):
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["agent_code"] == "read_only" and "read-only" in err["message"], r.text
    assert api.get(base + "/files/exists",
                   params={"path": "/.torpor/agent/x"}).json()["exists"] is False


def test_every_error_is_in_the_envelope(server, api, sandbox):
    base = f"/v1/sandboxes/{sandbox}"
    r = api.post(base + "/files/mkdir", content=b'{"path": "\xff"}', headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
    r = api.put("/v1/sandboxes")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", r.text
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}, r.headers
    r = api.get("/v1/nothing/here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert httpx.get(server.url + "/nothing").json()["error"]["code"] == "not_found"
    # a JSON syntax error says so, with line and column (it was field "8", a byte offset)
    for path in (base + "/commands", base + "/files/mkdir"):
        r = api.post(path, content=b'{\n  "cmd": "true",\n  "env": {,}\n}', headers=JSON)
        err = _invalid(r, None)
        assert "not valid JSON" in err["message"], err
        assert (err["line"], err["column"]) == (3, 11), err


def test_openapi_tells_the_truth(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    paths = doc["paths"]
    envelope = "#/components/schemas/ErrorOut"
    for path, ops in paths.items():
        if not path.startswith("/v1/"):
            continue
        for method, op in ops.items():
            for status in ("400", "401", "413", "422"):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref == envelope, (method, path, status)
            if "{sid}" in path:
                assert {"404", "409", "503", "504"} <= set(op["responses"]), (method, path)
    run = paths["/v1/sandboxes/{sid}/commands"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "application/x-ndjson", "text/event-stream"} <= set(run)
    out = paths["/v1/sandboxes/{sid}/processes/{pid}/output"]["get"]["responses"]["200"]
    assert {"application/x-ndjson", "text/event-stream"} <= set(out["content"])
    put = paths["/v1/sandboxes/{sid}/files"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    schemas = doc["components"]["schemas"]
    create = schemas["CreateSandbox"]["properties"]
    cpu = create["cpu"]["anyOf"][0]
    assert cpu["minimum"] == 0.1 and cpu["maximum"] >= 1
    assert create["disk_mb"]["anyOf"][0]["maximum"] == 1 << 20
    assert create["env"]["propertyNames"]["pattern"] == "^[^\\x00=]+$"
    assert "patternProperties" not in create["env"]
    command = schemas["RunCommand"]
    assert len(command["oneOf"]) == 2  # cmd or argv, not both
    assert command["properties"]["timeout"]["anyOf"][0]["maximum"] == 30 * 86400
    ports = paths["/v1/sandboxes/{sid}/ports/{port}"]["put"]["parameters"]
    port = next(p for p in ports if p["name"] == "port")["schema"]
    assert (port["minimum"], port["maximum"]) == (1, 65535)
    secret = schemas["CreateSecret"]["properties"]
    assert secret["value"]["maxLength"] == 65536
    assert secret["allowed_hosts"]["maxItems"] == 64
