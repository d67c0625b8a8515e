"""Secrets: the encrypted store (unit, on a real SQLite file) and its front doors (REST,
SDK, CLI) against a real `torpor serve`. The value must never come back out."""

from __future__ import annotations

import asyncio
import os
import secrets as pysecrets
import stat
import threading
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import Server, cli, make_data_dir, teardown_data_dir
from sqlalchemy import text

from torpor.engine.secrets import (
    KeyFileError,
    SecretStore,
    check_host,
    load_or_create_key,
    new_placeholder,
)
from torpor.errors import Conflict, Invalid, NotFound, TorporError
from torpor.network.policy import host_matches
from torpor.store.db import open_db


def unique_value() -> str:
    return "sk-test-" + pysecrets.token_hex(16)


@pytest.fixture
def db(tmp_path):
    engine, sessions = open_db(tmp_path / "t.db")
    yield engine, sessions
    engine.dispose()


@pytest.fixture
def store(db, tmp_path):
    return SecretStore(db[1], tmp_path / "secrets.key")


# --- the store -----------------------------------------------------------------------------

def test_roundtrip_and_metadata(store):
    v = unique_value()
    info = store.create("openai", v, ["API.OpenAI.com", "api.openai.com"])
    assert info.name == "openai" and info.allowed_hosts == ["api.openai.com"]
    assert info.inject_body is False and info.created_at == info.updated_at
    assert "value" not in vars(info) and v not in repr(info)
    assert store.value("openai") == v
    assert store.get("openai") == info
    assert [i.name for i in store.list()] == ["openai"]

    v2 = unique_value()
    after = store.replace("openai", value=v2)
    assert store.value("openai") == v2
    assert after.allowed_hosts == ["api.openai.com"] and after.updated_at > info.updated_at
    after = store.replace("openai", allowed_hosts=["*.openai.com:443"], inject_body=True)
    assert after.allowed_hosts == ["*.openai.com:443"] and after.inject_body
    assert store.value("openai") == v2  # hosts changed, value kept

    store.create("b", "é" * 10, ["10.0.0.1:8080"], inject_body=True)
    got = store.values(["openai", "b", "openai"])
    assert got["openai"][0] == v2 and got["b"][0] == "é" * 10
    assert got["b"][1].allowed_hosts == ["10.0.0.1:8080"] and got["b"][1].inject_body
    assert [i.name for i in store.list()] == ["b", "openai"]

    with pytest.raises(NotFound) as e:
        store.values(["openai", "nope", "gone"])
    assert e.value.extra["missing"] == ["nope", "gone"]
    assert set(store.values(["openai", "nope"], missing_ok=True)) == {"openai"}
    assert store.values([]) == {}

    store.delete("b")
    for call in (store.get, store.value, store.delete):
        with pytest.raises(NotFound):
            call("b")
    with pytest.raises(NotFound):
        store.replace("b", value="x")


def test_create_conflict_and_empty_replace(store):
    store.create("a", "one", ["a.com"])
    with pytest.raises(Conflict) as e:
        store.create("a", "two", ["b.com"])
    assert e.value.extra["field"] == "name"
    assert store.value("a") == "one"
    with pytest.raises(Invalid):
        store.replace("a")


def test_key_file_is_private_and_reused(store, db, tmp_path):
    key_path = tmp_path / "secrets.key"
    assert not key_path.exists()  # made on first use, not on construction
    v = unique_value()
    store.create("s", v, ["a.com"])
    st = key_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32
    # a second store (a restarted server) reads the same key
    again = SecretStore(db[1], key_path)
    assert again.value("s") == v
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".secrets")] == []


def test_key_file_readable_by_others_is_made_private(store, db, tmp_path):
    store.create("s", "v", ["a.com"])
    key_path = tmp_path / "secrets.key"
    key_path.chmod(0o644)
    assert SecretStore(db[1], key_path).value("s") == "v"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_concurrent_key_creation_agrees(tmp_path):
    path = tmp_path / "k"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and path.read_bytes() == keys[0]


def test_bad_key_length_names_the_file(db, tmp_path):
    key_path = tmp_path / "secrets.key"
    key_path.write_bytes(b"short")
    with pytest.raises(KeyFileError) as e:
        SecretStore(db[1], key_path).create("s", "v", ["a.com"])
    assert str(key_path) in e.value.message and "5 bytes" in e.value.message


def test_wrong_key_fails_clearly(store, db, tmp_path):
    v = unique_value()
    store.create("s", v, ["a.com"])
    key_path = tmp_path / "secrets.key"
    key_path.write_bytes(os.urandom(32))
    with pytest.raises(TorporError) as e:
        SecretStore(db[1], key_path).value("s")
    assert "cannot be decrypted" in e.value.message and str(key_path) in e.value.message
    assert v not in e.value.message


def test_ciphertext_is_bound_to_its_name(store, db):
    store.create("a", "value-of-a", ["a.com"])
    store.create("b", "value-of-b", ["b.com"])
    engine = db[0]
    with engine.begin() as conn:
        conn.execute(text("UPDATE secrets SET ciphertext = "
                          "(SELECT ciphertext FROM secrets WHERE name = 'a') WHERE name = 'b'"))
    assert store.value("a") == "value-of-a"
    with pytest.raises(TorporError, match="cannot be decrypted"):
        store.value("b")
    with pytest.raises(TorporError, match="cannot be decrypted"):
        store.values(["b"])


def test_stored_format_and_unknown_version(store, db):
    store.create("a", "hello", ["a.com"])
    with db[0].begin() as conn:
        blob = conn.execute(text("SELECT ciphertext FROM secrets")).scalar_one()
        assert blob[0] == 1 and len(blob) == 1 + 12 + len("hello") + 16
        conn.execute(text("UPDATE secrets SET ciphertext = :b"), {"b": b"\x07" + blob[1:]})
    with pytest.raises(TorporError, match="unknown format"):
        store.value("a")


def _db_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_plaintext_never_reaches_the_database_or_wal(db, tmp_path):
    engine, sessions = db
    store = SecretStore(sessions, tmp_path / "secrets.key")
    old, new = unique_value(), unique_value()
    store.create("s", old, ["a.com"])
    store.replace("s", value=new)
    store.create("t", new, ["a.com"])  # the same value under another name: another blob
    assert (tmp_path / "t.db-wal").exists()  # the rows are (at least) in the WAL now
    blob = _db_bytes(tmp_path / "t.db")
    for v in (old, new):
        assert v.encode() not in blob and v.encode("utf-16-le") not in blob
    with engine.begin() as conn:
        blobs = conn.execute(text("SELECT ciphertext FROM secrets")).scalars().all()
    assert len(set(blobs)) == 2  # random nonces: equal values do not look equal
    engine.dispose()  # checkpoints the WAL into the main file
    blob = _db_bytes(tmp_path / "t.db")
    assert old.encode() not in blob and new.encode() not in blob


@pytest.mark.parametrize("name", ["", "1abc", "_a", "a b", "a/b", "a" * 65, "a\n", "é"])
def test_bad_names(store, name):
    with pytest.raises(Invalid) as e:
        store.create(name, "v", ["a.com"])
    assert e.value.extra["field"] == "name"


def test_good_names(store):
    for name in ("a", "A.b-c_d", "x" * 64):
        store.create(name, "v", ["a.com"])


@pytest.mark.parametrize("value", ["", "ab\ncd", "ab\rcd", "ab\r\n", "ab\x00cd",
                                   "x" * 65537, "é" * 32769, "\ud800", 42, None, b"bytes"])
def test_bad_values_are_refused_without_echo(store, value):
    with pytest.raises(Invalid) as e:
        store.create("s", value, ["a.com"])
    assert e.value.extra["field"] == "value"
    if isinstance(value, str) and len(value) > 2:
        assert value not in e.value.message and "ab" not in e.value.message
    store.create("ok", "fine", ["a.com"])
    with pytest.raises(Invalid):
        store.replace("ok", value=value)
    assert store.value("ok") == "fine"


def test_largest_value(store):
    v = "é" * 32768  # 65536 bytes
    store.create("s", v, ["a.com"])
    assert store.value("s") == v


@pytest.mark.parametrize("hosts", [[], "api.openai.com", None, ["a.com"] * 0,
                                   [f"h{i}.com" for i in range(65)], [""], [3],
                                   ["https://api.openai.com"], ["api.openai.com/v1"],
                                   ["a b.com"], [" a.com"], ["*.com"], ["a.*.com"],
                                   ["*a.com"], ["*"], ["a.com:0"], ["a.com:65536"],
                                   ["a.com:x"], ["a.com:"], ["999.0.0.1"], ["[::1"],
                                   ["[::1]x"], ["a..com"], ["-a.com"], ["é.com"],
                                   ["*.10.0.0.1"], ["a.com."], ["user@a.com"], ["a.com?x"]])
def test_bad_host_patterns(store, hosts):
    with pytest.raises(Invalid) as e:
        store.create("s", "v", hosts)
    assert e.value.extra["field"].startswith("allowed_hosts")


def test_host_patterns_are_canonical():
    assert check_host("API.OpenAI.com") == "api.openai.com"
    assert check_host("*.Example.com") == "*.example.com"
    assert check_host("api.example.com:08443") == "api.example.com:8443"
    assert check_host("10.0.0.1") == "10.0.0.1"
    assert check_host("[2001:DB8:0::1]:443") == "[2001:db8::1]:443"
    assert check_host("::1") == "[::1]"
    assert check_host("localhost:65535") == "localhost:65535"


def host_allowed(patterns, host, port):
    """What the proxy decides for stored patterns: canonical here, matched there."""
    return host_matches([check_host(p) for p in patterns], host, port)


def test_stored_patterns_mean_to_the_proxy_what_they_say():
    assert host_allowed(["api.openai.com"], "API.openai.com.", 443)
    assert host_allowed(["api.openai.com"], "api.openai.com", 8443)  # any port
    assert not host_allowed(["api.openai.com"], "evil-api.openai.com", 443)
    assert host_allowed(["*.example.com"], "a.b.example.com", 443)
    assert not host_allowed(["*.example.com"], "example.com", 443)
    assert not host_allowed(["*.example.com"], "badexample.com", 443)
    assert host_allowed(["a.com:8443"], "a.com", 8443)
    assert not host_allowed(["a.com:8443"], "a.com", 443)
    assert host_allowed(["[::1]:443"], "::1", 443) and host_allowed(["[::1]"], "[::1]", 80)
    assert not host_allowed(["10.0.0.1"], "10.0.0.2", 80)


def test_placeholder():
    a, b = new_placeholder(), new_placeholder()
    assert a != b and a.startswith("torpor_ph_") and len(a) == len("torpor_ph_") + 40


# --- REST, SDK and CLI against a real server ----------------------------------------------

@pytest.fixture(scope="module")
def srv():
    if os.geteuid() != 0:
        pytest.skip("a real server needs root")
    server = Server(make_data_dir(), pool_size=0)
    try:
        server.start()
        yield server
    finally:
        teardown_data_dir(server)


@pytest.fixture
def api(srv):
    with srv.client() as c:
        yield c


@pytest.fixture
def conn(srv):
    return {"url": srv.url, "api_key": srv.key}


META = {"name", "allowed_hosts", "inject_body", "created_at", "updated_at"}


def stored_value(srv: Server, name: str) -> str:
    """Decrypt what the server stored, straight from its data dir (no API returns it)."""
    engine, sessions = open_db(srv.data_dir / "torpor.db")
    try:
        return SecretStore(sessions, srv.data_dir / "secrets.key").value(name)
    finally:
        engine.dispose()


def test_rest_crud_never_returns_the_value(api, srv):
    v = unique_value()
    r = api.post("/v1/secrets", json={"name": "rest1", "value": v,
                                      "allowed_hosts": ["API.example.com", "*.example.org"]})
    assert r.status_code == 201, r.text
    assert set(r.json()) == META and v not in r.text
    assert r.json()["allowed_hosts"] == ["api.example.com", "*.example.org"]
    assert r.json()["inject_body"] is False
    assert stored_value(srv, "rest1") == v
    seen = [r.text]

    r = api.post("/v1/secrets", json={"name": "rest1", "value": v, "allowed_hosts": ["a.com"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    seen.append(r.text)

    r = api.get("/v1/secrets")
    assert r.status_code == 200 and "rest1" in [s["name"] for s in r.json()["secrets"]]
    assert all(set(s) == META for s in r.json()["secrets"])
    seen.append(r.text)
    r = api.get("/v1/secrets/rest1")
    assert r.status_code == 200 and r.json()["name"] == "rest1"
    seen.append(r.text)

    v2 = unique_value()
    r = api.put("/v1/secrets/rest1", json={"value": v2, "inject_body": True})
    assert r.status_code == 200 and r.json()["inject_body"] is True
    assert r.json()["allowed_hosts"] == ["api.example.com", "*.example.org"]
    assert (datetime.fromisoformat(r.json()["updated_at"])
            > datetime.fromisoformat(r.json()["created_at"]))
    assert stored_value(srv, "rest1") == v2
    seen.append(r.text)
    r = api.put("/v1/secrets/rest1", json={"allowed_hosts": ["b.com:8443"]})
    assert r.status_code == 200 and r.json()["allowed_hosts"] == ["b.com:8443"]
    seen.append(r.text)

    for method, path, body in (("GET", "/v1/secrets/nope", None),
                               ("PUT", "/v1/secrets/nope", {"value": v}),
                               ("DELETE", "/v1/secrets/nope", None)):
        r = api.request(method, path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        seen.append(r.text)

    r = api.put("/v1/secrets/rest1", json={})
    assert r.status_code == 422
    assert api.delete("/v1/secrets/rest1").status_code == 204
    assert api.get("/v1/secrets/rest1").status_code == 404
    assert api.delete("/v1/secrets/rest1").status_code == 404
    for t in seen:
        assert v not in t and v2 not in t

    # the value is on disk only as ciphertext, under a private key the server made
    key = srv.data_dir / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 32
    blob = _db_bytes(srv.data_dir / "torpor.db")
    assert v.encode() not in blob and v2.encode() not in blob


def test_rest_needs_a_key(srv):
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/v1/secrets").status_code == 401
        r = c.post("/v1/secrets", json={"name": "x", "value": "v", "allowed_hosts": ["a.com"]})
        assert r.status_code == 401


def test_rest_validation_errors_never_echo_the_value(api, srv):
    v = unique_value()
    good = {"name": "val1", "value": v, "allowed_hosts": ["a.com"]}
    cases = [
        ({**good, "value": v + "\r\nX-Injected: 1"}, "value"),
        ({**good, "value": v + "\x00"}, "value"),
        ({**good, "value": v * 4000}, "value"),  # > 64 KiB
        ({**good, "value": [v]}, "value"),  # pydantic: not a string
        ({**good, "value": {"nested": v}}, "value"),
        ({**good, "extra": v}, "extra"),  # pydantic: unknown field
        ({**good, "name": "1bad"}, "name"),
        ({**good, "allowed_hosts": []}, "allowed_hosts"),
        ({**good, "allowed_hosts": "a.com"}, "allowed_hosts"),
        ({**good, "allowed_hosts": ["https://a.com/"]}, "allowed_hosts.0"),
        ({k: x for k, x in good.items() if k != "allowed_hosts"}, "allowed_hosts"),
    ]
    for body, field in cases:
        r = api.post("/v1/secrets", json=body)
        assert r.status_code == 422, (field, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid" and err["field"] == field, r.text
        assert v not in r.text, f"value echoed for {field}: {r.text}"
    # a body that is not JSON at all
    r = api.post("/v1/secrets", content=f'{{"name": "val1", "value": "{v}"'.encode(),
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and v not in r.text
    # updates too
    api.post("/v1/secrets", json=good).raise_for_status()
    try:
        for body in ({"value": v + "\n"}, {"value": [v]}, {"value": v, "name": "x"}):
            r = api.put("/v1/secrets/val1", json=body)
            assert r.status_code == 422 and v not in r.text, r.text
    finally:
        api.delete("/v1/secrets/val1")
    assert v not in srv.log.read_text(errors="replace")  # nor in the server's log


def test_openapi_has_no_value_in_answers(api):
    spec = api.get("/openapi.json").json()
    for name in ("SecretOut", "SecretList"):
        assert "value" not in spec["components"]["schemas"][name]["properties"]


def test_sdk(conn):
    from torpor.sdk import (
        ConflictError,
        InvalidRequestError,
        NotFoundError,
        Secret,
        SecretInfo,
    )

    v = unique_value()
    info = Secret.create("sdk1", v, allowed_hosts=["api.openai.com"], **conn)
    try:
        assert isinstance(info, SecretInfo) and info.allowed_hosts == ["api.openai.com"]
        assert v not in info.model_dump_json()
        assert info.created_at.tzinfo is not None
        with pytest.raises(ConflictError):
            Secret.create("sdk1", v, ["a.com"], **conn)
        assert "sdk1" in [s.name for s in Secret.list(**conn)]
        assert Secret.get("sdk1", **conn).name == "sdk1"
        up = Secret.update("sdk1", allowed_hosts="*.openai.com", inject_body=True, **conn)
        assert up.allowed_hosts == ["*.openai.com"] and up.inject_body
        up = Secret.update("sdk1", value=unique_value(), **conn)
        assert up.allowed_hosts == ["*.openai.com"]
        with pytest.raises(InvalidRequestError) as e:
            Secret.update("sdk1", value=v + "\n", **conn)
        assert e.value.field == "value" and v not in str(e.value)
        with pytest.raises(InvalidRequestError) as e:
            Secret.create("sdk2", v, ["http://a.com"], **conn)
        assert e.value.field == "allowed_hosts.0" and v not in str(e.value)
        with pytest.raises(ValueError):
            Secret.update("sdk1", **conn)
        with pytest.raises(NotFoundError):
            Secret.get("nope", **conn)
        with pytest.raises(NotFoundError):
            Secret.update("nope", value="x", **conn)
    finally:
        Secret.delete("sdk1", **conn)
    with pytest.raises(NotFoundError):
        Secret.delete("sdk1", **conn)


def test_async_sdk(conn):
    from torpor.sdk import AsyncSecret, ConflictError, NotFoundError

    async def main():
        info = await AsyncSecret.create("async1", unique_value(), ["a.com"], True, **conn)
        assert info.inject_body
        with pytest.raises(ConflictError):
            await AsyncSecret.create("async1", "v", ["a.com"], **conn)
        assert "async1" in [s.name for s in await AsyncSecret.list(**conn)]
        assert (await AsyncSecret.get("async1", **conn)).allowed_hosts == ["a.com"]
        up = await AsyncSecret.update("async1", inject_body=False, **conn)
        assert up.inject_body is False
        await AsyncSecret.delete("async1", **conn)
        with pytest.raises(NotFoundError):
            await AsyncSecret.get("async1", **conn)

    asyncio.run(main())


def _cli(srv, *args, input=None, env=None):
    from typer.testing import CliRunner

    from torpor.cli.main import app

    return CliRunner(env=env).invoke(app, ["--url", srv.url, "--api-key", srv.key, *args],
                                     input=input)


def test_cli(srv):
    import json

    v, v2 = unique_value(), unique_value()
    res = _cli(srv, "secret", "create", "cli1", "--host", "api.openai.com", "--host",
               "*.example.com", input=v + "\n")
    assert res.exit_code == 0, res.output
    assert "created secret cli1" in res.stderr and v not in res.output
    try:
        assert stored_value(srv, "cli1") == v  # the trailing newline was dropped
        res = _cli(srv, "secret", "list")
        assert res.exit_code == 0 and "cli1" in res.stdout and "api.openai.com" in res.stdout
        res = _cli(srv, "secret", "list", "--json")
        item = next(s for s in json.loads(res.stdout) if s["name"] == "cli1")
        assert set(item) == META and item["inject_body"] is False
        res = _cli(srv, "secret", "create", "cli1", "--host", "a.com", input="x")
        assert res.exit_code == 1 and res.stderr.startswith("error:")
        assert "Traceback" not in res.output

        res = _cli(srv, "secret", "update", "cli1", "--value-env", "ROTATED",
                   "--inject-body", "--json", env={"ROTATED": v2})
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["inject_body"] is True
        assert stored_value(srv, "cli1") == v2
        res = _cli(srv, "secret", "update", "cli1", "--host", "b.com")
        assert res.exit_code == 0 and "b.com" in res.stdout
        res = _cli(srv, "secret", "info", "cli1", "--json")
        assert json.loads(res.stdout)["allowed_hosts"] == ["b.com"]
        res = _cli(srv, "secret", "update", "cli1")  # nothing to change
        assert res.exit_code == 2 and "nothing to change" in res.stderr
        res = _cli(srv, "secret", "update", "cli1", "--value-stdin", input="a\nb\n")
        assert res.exit_code == 1 and "CR, LF" in res.stderr
        res = _cli(srv, "secret", "update", "cli1", "--value-env", "UNSET_VAR_XYZ")
        assert res.exit_code == 2 and "UNSET_VAR_XYZ" in res.stderr
        res = _cli(srv, "secret", "create", "cli2", input="v")  # no --host
        assert res.exit_code == 2
        res = _cli(srv, "secret", "create", "cli2", "--host", "a.com", "--value-stdin",
                   "--value-env", "X", input="v")
        assert res.exit_code == 2
    finally:
        res = _cli(srv, "secret", "delete", "cli1")
    assert res.exit_code == 0 and "deleted secret cli1" in res.stderr
    res = _cli(srv, "secret", "delete", "cli1")
    assert res.exit_code == 1 and "no secret cli1" in res.stderr
    assert "secret" in _cli(srv, "secret", "create", "--help").stdout


def test_cli_subprocess_reads_the_value_from_stdin(srv):
    from torpor.sdk import Secret

    v = unique_value()
    p = cli(srv, "secret", "create", "sub1", "--host", "a.com", input=v + "\n")
    assert p.returncode == 0, p.stderr
    assert v not in p.stdout + p.stderr
    try:
        assert Secret.get("sub1", url=srv.url, api_key=srv.key).allowed_hosts == ["a.com"]
        assert stored_value(srv, "sub1") == v
    finally:
        Secret.delete("sub1", url=srv.url, api_key=srv.key)
