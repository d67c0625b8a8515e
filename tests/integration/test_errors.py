"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import httpx


def test_auth_required_wrong_and_revoked_keys(server, api):
    assert httpx.get(server.url + "/v1/sandboxes").status_code == 401
    with server.client(key="tpr_wrong") as c:
        r = c.get("/v1/sandboxes")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    created = api.post("/v1/keys", json={"name": "temp"}).json()
    key = created["key"]
    assert httpx.get(server.url + "/v1/templates",
                     headers={"X-API-Key": key}).status_code == 200
    listed = api.get("/v1/keys").json()
    assert any(k["id"] == created["id"] and "key" not in (k.get("key") or "") for k in listed)
    assert api.delete(f"/v1/keys/{created['id']}").status_code == 204
    assert httpx.get(server.url + "/v1/templates",
                     headers={"X-API-Key": key}).status_code == 401
    assert api.delete("/v1/keys/key_nope").status_code == 404


def test_only_hashes_of_keys_are_stored(server, api):
    key = api.post("/v1/keys", json={"name": "hashcheck"}).json()["key"]
    db = (server.data_dir / "torpor.db").read_bytes()
    wal = server.data_dir / "torpor.db-wal"
    blob = db + (wal.read_bytes() if wal.exists() else b"")
    assert key.encode() not in blob
    assert oct((server.data_dir / "api-key").stat().st_mode & 0o777) == "0o600"


def test_unknown_template_lists_templates(api):
    r = api.post("/v1/sandboxes", json={"template": "nope"})
    assert r.status_code == 404
    assert "base" in r.json()["error"]["templates"]


def test_bad_fields_name_the_field(api):
    for body, field in [({"memory_mb": -1}, "memory_mb"), ({"cpu": 1000}, "cpu"),
                        ({"disk_mb": 10}, "disk_mb"), ({"env": {"A": 1}}, "env.A"),
                        ({"bogus": 1}, "bogus"), ({"memory_mb": 1 << 40}, "memory_mb")]:
        r = api.post("/v1/sandboxes", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["field"] == field, (body, r.text)


def test_command_needs_exactly_one_of_cmd_and_argv(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}/commands"
    assert api.post(base, json={}).status_code == 422
    assert api.post(base, json={"cmd": "true", "argv": ["true"]}).status_code == 422


def test_oversized_body_413(api, sandbox):
    r = api.post(f"/v1/sandboxes/{sandbox}/commands",
                 json={"cmd": "true", "stdin": "x" * (2 << 20)})
    assert r.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b"x" * (1 << 20)

    r = api.post("/v1/sandboxes", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_deleted_sandbox_is_404_everywhere(api):
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    api.delete(f"/v1/sandboxes/{sid}")
    for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/files?path=/etc/hosts"),
                         ("GET", "/processes"), ("GET", "/events")]:
        assert api.request(method, f"/v1/sandboxes/{sid}{path}").status_code == 404
