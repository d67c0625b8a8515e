"""API key scopes (admin manages keys and secrets, user does the rest), the last admin key,
and the operator's way back in: `torpor keys create --admin --offline` on the data dir."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess

import httpx
import pytest

from tests.conftest import CLI, Server, cli, make_data_dir, teardown_data_dir
from torpor.errors import Conflict
from torpor.sdk import Keys
from torpor.sdk.errors import AuthError, ConflictError


@pytest.fixture
def own():
    """A server of this test's own: these tests revoke its admin key."""
    srv = Server(make_data_dir(), pool_size=0).start()
    yield srv
    teardown_data_dir(srv)


def new_key(srv: Server, name: str, scope: str | None = None, admin_key: str | None = None
            ) -> dict:
    body = {"name": name} if scope is None else {"name": name, "scope": scope}
    with srv.client(admin_key) as c:
        r = c.post("/v1/keys", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def status(srv: Server, key: str, method: str = "GET", path: str = "/v1/sandboxes",
           **kw) -> httpx.Response:
    with srv.client(key) as c:
        return c.request(method, path, **kw)


def test_user_key_is_refused_key_routes_but_keeps_sandboxes(own):
    user = new_key(own, "ci")
    assert user["scope"] == "user"  # the default
    admin = new_key(own, "ops", scope="admin")
    assert admin["scope"] == "admin"
    for method, path, kw in [("GET", "/v1/keys", {}),
                             ("POST", "/v1/keys", {"json": {"name": "x", "scope": "admin"}}),
                             ("DELETE", f"/v1/keys/{admin['id']}", {})]:
        r = status(own, user["key"], method, path, **kw)
        assert r.status_code == 403, (method, path, r.text)
        err = r.json()["error"]
        assert err["code"] == "forbidden" and "admin" in err["message"]
        assert err["key_id"] == user["id"]
    # nothing was made or revoked, and the user key still does what it did before
    assert status(own, admin["key"], path="/v1/keys").status_code == 200
    assert len(status(own, own.key, path="/v1/keys").json()) == 3
    assert status(own, user["key"]).status_code == 200
    assert status(own, user["key"], path="/v1/templates").status_code == 200
    # a bad key is still 401, not 403
    assert status(own, "tpr_wrong", path="/v1/keys").status_code == 401


def test_secret_writes_are_admin_only(own):
    user = new_key(own, "ci")["key"]
    body = {"name": "tok", "value": "s3cret", "allowed_hosts": ["api.example.com"]}
    r = status(own, user, "POST", "/v1/secrets", json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert status(own, own.key, "POST", "/v1/secrets", json=body).status_code == 201
    # a user key may not widen where the value goes, nor replace or delete it
    r = status(own, user, "PUT", "/v1/secrets/tok", json={"allowed_hosts": ["evil.example"]})
    assert r.status_code == 403
    assert status(own, user, "DELETE", "/v1/secrets/tok").status_code == 403
    # reading names and hosts stays open (needed to grant one to a sandbox)
    r = status(own, user, "GET", "/v1/secrets/tok")
    assert r.status_code == 200 and r.json()["allowed_hosts"] == ["api.example.com"]


def test_last_admin_key_cannot_be_revoked(own):
    first = next(k for k in status(own, own.key, path="/v1/keys").json())
    assert first["scope"] == "admin"
    r = status(own, own.key, "DELETE", f"/v1/keys/{first['id']}")  # itself, the only admin
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "conflict"
    assert "--admin" in r.json()["error"]["message"]
    assert status(own, own.key).status_code == 200
    # user keys do not count: with one, the last admin still cannot go
    user = new_key(own, "ci")
    assert status(own, own.key, "DELETE", f"/v1/keys/{first['id']}").status_code == 409
    # with a second admin, the first can go; then the second is the last
    second = new_key(own, "ops", scope="admin")
    assert status(own, second["key"], "DELETE", f"/v1/keys/{first['id']}").status_code == 204
    assert status(own, own.key).status_code == 401
    with pytest.raises(ConflictError):
        Keys(url=own.url, api_key=second["key"]).revoke(second["id"])
    # revoking everything but the last admin works
    assert status(own, second["key"], "DELETE", f"/v1/keys/{user['id']}").status_code == 204
    listed = {k["id"]: k for k in status(own, second["key"], path="/v1/keys").json()}
    assert [i for i, k in listed.items() if k["revoked_at"] is None] == [second["id"]]


def test_store_refuses_last_admin_in_one_statement(tmp_path):
    """Against a real SQLite file, below the API: two admins revoked in turn leave one."""
    from torpor.engine.keys import KeyStore
    from torpor.store.db import open_db

    db, sessions = open_db(tmp_path / "torpor.db")
    try:
        store = KeyStore(sessions)
        a, _ = store.create("a", admin=True)
        b, _ = store.create("b", admin=True)
        u, _ = store.create("u")
        store.revoke(a.id)
        store.revoke(a.id)  # again: already revoked, not an error
        with pytest.raises(Conflict):
            store.revoke(b.id)
        store.revoke(u.id)
        assert store.has_valid_admin()
        assert {r.id: (r.scope, r.revoked_at is None) for r in store.list()} == {
            a.id: ("admin", False), b.id: ("admin", True), u.id: ("user", False)}
    finally:
        db.dispose()


def test_revoked_key_is_refused_at_once_on_every_door(own):
    k = new_key(own, "short-lived")
    # used first, so the server has it cached
    assert status(own, k["key"]).status_code == 200
    assert status(own, k["key"], "POST", "/v1/sandboxes/sbxnope/commands",
                  json={"cmd": "true"}).status_code == 404
    assert status(own, own.key, "DELETE", f"/v1/keys/{k['id']}").status_code == 204
    assert status(own, k["key"]).status_code == 401
    # FastCommands and the port proxy check keys before FastAPI does
    assert status(own, k["key"], "POST", "/v1/sandboxes/sbxnope/commands",
                  json={"cmd": "true"}).status_code == 401
    assert status(own, k["key"], path="/v1/sandboxes/sbxnope/ports/80/").status_code == 401
    listed = {x["id"]: x for x in status(own, own.key, path="/v1/keys").json()}
    assert listed[k["id"]]["revoked_at"] is not None and listed[k["id"]]["scope"] == "user"


def revoke_all_in_db(srv: Server) -> None:
    """What the old code allowed: every key revoked (the server stopped)."""
    with sqlite3.connect(srv.data_dir / "torpor.db") as db:
        db.execute("UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP")
    db.close()


def test_locked_out_server_says_so_and_offline_create_gets_back_in(own):
    old = own.key
    own.stop(signal.SIGTERM)
    revoke_all_in_db(own)
    mark = len(own.log.read_text())
    own.start()
    log = own.log.read_text()[mark:]
    assert "no valid admin API key" in log
    assert f"torpor keys create NAME --admin --offline --data-dir {own.data_dir}" in log
    assert status(own, old).status_code == 401
    # no key was minted behind the operator's back
    with sqlite3.connect(own.data_dir / "torpor.db") as db:
        assert db.execute("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"
                          ).fetchone()[0] == 0
    db.close()

    # while the server runs: the new key works at once (a cache miss reads the database)
    r = cli(None, "keys", "create", "ops", "--admin", "--offline", "--data-dir",
            str(own.data_dir))
    assert r.returncode == 0, r.stderr
    live = r.stdout.strip()
    assert live.startswith("tpr_") and "admin key" in r.stderr
    assert status(own, live, path="/v1/keys").status_code == 200

    # with the server stopped: --offline, and the fallback when no server answers
    own.stop(signal.SIGTERM)
    r = cli(None, "keys", "create", "ops2", "--scope", "admin", "--offline", "--data-dir",
            str(own.data_dir))
    assert r.returncode == 0, r.stderr
    offline = r.stdout.strip()
    r = cli_at(own, "keys", "create", "ops3", "--admin", "--data-dir", str(own.data_dir))
    assert r.returncode == 0, r.stderr
    assert "cannot reach" in r.stderr and "directly instead" in r.stderr
    fallback = r.stdout.strip()
    r = cli(None, "keys", "list", "--offline", "--data-dir", str(own.data_dir))
    assert r.returncode == 0 and "ops3" in r.stdout and "admin" in r.stdout

    mark = len(own.log.read_text())
    own.start()
    assert "no valid admin API key" not in own.log.read_text()[mark:]
    for key in (live, offline, fallback):
        r = status(own, key, path="/v1/keys")
        assert r.status_code == 200, r.text
    scopes = {k["name"]: k["scope"] for k in r.json() if k["revoked_at"] is None}
    assert scopes == {"ops": "admin", "ops2": "admin", "ops3": "admin"}


def cli_at(srv: Server, *args: str) -> subprocess.CompletedProcess:
    """The CLI pointed at `srv`'s address (stopped or not), with a key that is no good."""
    env = dict(os.environ, TORPOR_URL=srv.url, TORPOR_API_KEY="tpr_none")
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_offline_create_refuses_a_dir_without_a_database(tmp_path):
    r = cli(None, "keys", "create", "ops", "--admin", "--offline", "--data-dir",
            str(tmp_path))
    assert r.returncode != 0 and "no Torpor database" in r.stderr
    assert not (tmp_path / "torpor.db").exists()


def test_cli_and_sdk_carry_the_scope(own):
    with Keys(url=own.url, api_key=own.key) as keys:
        made = keys.create("robot", scope="admin")
        assert made.scope == "admin"
        user = keys.create("ci")
        assert user.scope == "user"
        assert {k.name: k.scope for k in keys.list()}["robot"] == "admin"
    with pytest.raises(AuthError) as e, Keys(url=own.url, api_key=user.key) as keys:
        keys.list()
    assert e.value.status == 403
    r = cli(own, "keys", "create", "bot", "--scope", "admin")
    assert r.returncode == 0, r.stderr
    assert "admin key" in r.stderr
    r = cli(own, "keys", "list")
    assert r.returncode == 0 and "SCOPE" in r.stdout
    bot = next(line for line in r.stdout.splitlines() if " bot " in line)
    assert "admin" in bot
    r = cli(own, "keys", "create", "x", "--admin", "--scope", "user")
    assert r.returncode != 0
