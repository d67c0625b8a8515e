"""The E2B-compatible control plane (torpor/compat/e2b: routing, control, routes) driven by
E2B's own SDK (e2b==2.45.1, sync and async) against the session's real server, and by plain
httpx calls shaped as the newest SDK sends them (`/v2/sandboxes`, Idempotency-Key,
`memory` on connect and pause). Envd itself (commands, files through E2B) is tested in
test_e2b_envd.py; here what a sandbox runs is checked through Torpor's own API."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime

import httpx
import pytest
from conftest import (
    Server,
    e2b_environment,
    e2b_key,
    free_port,
    make_data_dir,
    run,
    teardown_data_dir,
    wait_for,
    wait_listening,
)
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    SandboxException,
    SandboxNotFoundException,
)
from e2b.sandbox.network import ALL_TRAFFIC


@pytest.fixture(scope="module")
def key(server):
    return e2b_key(server, "e2b-control")


@pytest.fixture(scope="module")
def e2b_env(server, key):
    with e2b_environment(server, key):
        yield


@pytest.fixture(scope="module")
def made(api, e2b_env):
    """Ids of the sandboxes a test made; all deleted after the module, also on failure."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        api.delete(f"/v1/sandboxes/{sid}")


@pytest.fixture(scope="module")
def e2b_api(server, key):
    with httpx.Client(base_url=server.url, headers={"X-API-KEY": key}, timeout=120) as c:
        yield c


def state(api, sid: str) -> str:
    r = api.get(f"/v1/sandboxes/{sid}")
    return r.json()["state"] if r.status_code == 200 else "gone"


def create(made, **kw) -> Sandbox:
    sbx = Sandbox.create(**kw)
    made.append(sbx.sandbox_id)
    return sbx


# --- keys and errors ------------------------------------------------------------------------
def test_e2b_keys_have_e2bs_form_and_work_on_both_doors(server, key):
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", key)
    with server.client() as c:
        r = c.post("/v1/keys", json={"name": "rest-e2b", "e2b": True})
        assert r.status_code == 201, r.text
        rest_key = r.json()["key"]
        assert re.fullmatch(r"e2b_[0-9a-f]{40}", rest_key)
        assert c.post("/v1/keys", json={"name": "plain"}).json()["key"].startswith("tpr_")
    with server.client(key=key) as c:
        assert c.get("/v1/sandboxes").status_code == 200  # the native door takes it too
    for k in (key, rest_key):
        assert httpx.get(server.url + "/v2/sandboxes", headers={"X-API-KEY": k}).status_code \
            == 200


def test_error_shapes(server, e2b_api, e2b_env):
    r = httpx.get(server.url + "/v2/sandboxes", headers={"X-API-KEY": "e2b_" + "0" * 40})
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "invalid API key"}
    assert r.headers["Should-Retry"] == "false"
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="e2b_" + "1" * 40).next_items()
    r = httpx.post(server.url + "/sandboxes", json={"templateID": "base"})
    assert r.status_code == 401 and r.json()["code"] == 401
    # a sandbox that never was: 404 on the control plane, 502 on its envd and ports
    missing = "sbx" + "0" * 13
    r = e2b_api.get(f"/sandboxes/{missing}")
    assert r.status_code == 404 and r.json() == {"code": 404,
                                                 "message": f"sandbox {missing} not found"}
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(missing)
    assert Sandbox.kill(missing) is False
    for port in ("49983", "49999", "8000"):
        r = httpx.get(server.url + "/health", headers={"E2b-Sandbox-Id": missing,
                                                       "E2b-Sandbox-Port": port})
        assert r.status_code == 502 and r.json() == {
            "sandboxId": missing, "message": "The sandbox was not found", "code": 502}
    r = httpx.get(server.url + "/health", headers={"Host": f"49983-{missing}.localhost"})
    assert r.status_code == 502 and r.json()["sandboxId"] == missing
    # what Torpor does not support yet is refused by name, before anything starts
    before = len(e2b_api.get("/v2/sandboxes").json())
    for body, field in (({"volumeMounts": [{"name": "v", "path": "/v"}]}, "volumeMounts"),
                        ({"iam": {"tokens": {"aws": {"audience": "a"}}}}, "iam"),
                        ({"network": {"egressProxy": {"address": "p:1080"}}}, "egressProxy"),
                        ({"network": {"allowOut": ["1.1.1.1"], "denyOut": ["10.0.0.0/8"]}},
                         "network.allowOut"),
                        ({"timeout": "soon"}, "timeout"), ({"envVars": {"A-B": "x"}}, "envVars"),
                        ({"surprise": 1}, "surprise")):
        r = e2b_api.post("/sandboxes", json={"templateID": "base", **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["code"] == 400 and field in r.json()["message"], r.text
    r = e2b_api.post("/v2/sandboxes", json={"templateID": "base", "mcp": {"x": {}}})
    assert r.status_code == 400 and "Failed to start MCP gateway" in r.json()["message"]
    r = e2b_api.post("/sandboxes", content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == 400
    r = e2b_api.post("/sandboxes", json={"templateID": "no-such-template"})
    assert r.status_code == 404 and "no-such-template" in r.json()["message"]
    r = e2b_api.get("/sandboxes/x/nowhere")
    assert r.status_code == 404 and r.json()["code"] == 404
    assert len(e2b_api.get("/v2/sandboxes").json()) == before  # none was made
    # the native door is unchanged under the E2B door
    assert httpx.get(server.url + "/healthz").json()["ok"] is True
    assert "/v2/sandboxes" not in httpx.get(server.url + "/openapi.json").json()["paths"]


# --- create, info, list, kill --------------------------------------------------------------
def test_create_info_list_and_kill(api, made, e2b_api):
    tag = f"list-{time.time_ns()}"
    sbxs = [create(made, timeout=120, metadata={"suite": tag, "n": str(i), "odd": "a b&c=d/é"},
                   envs={"GREETING": f"hi {i}"}) for i in range(3)]
    first = sbxs[0]
    assert run(api, first.sandbox_id, "echo $GREETING")["stdout"] == "hi 0\n"
    info = first.get_info()
    assert info.sandbox_id == first.sandbox_id and info.template_id == "base"
    assert info.state == SandboxState.RUNNING and info.metadata["odd"] == "a b&c=d/é"
    assert 110 < (info.end_at - datetime.now(UTC)).total_seconds() <= 121
    assert info.envd_version >= "0.6.4" and info.cpu_count >= 1
    # secure (the SDK's default): an access token, kept for envd to check
    assert first._envd_access_token and len(first._envd_access_token) == 64
    detail = e2b_api.get(f"/sandboxes/{first.sandbox_id}").json()
    assert detail["envdAccessToken"] == first._envd_access_token
    assert detail["lifecycle"] == {"autoResume": False, "onTimeout": "kill"}

    # metadata filter (E2B quotes it twice), newest first, pages of 2 with X-Next-Token
    pager = Sandbox.list(query=SandboxQuery(metadata={"suite": tag, "odd": "a b&c=d/é"}),
                         limit=2)
    page1 = pager.next_items()
    assert pager.has_next
    page2 = pager.next_items()
    assert not pager.has_next
    got = [s.sandbox_id for s in page1 + page2]
    assert got == [s.sandbox_id for s in reversed(sbxs)]
    assert [s.sandbox_id for s in Sandbox.list(
        query=SandboxQuery(metadata={"suite": tag}), order="asc").next_items()] == \
        [s.sandbox_id for s in sbxs]
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": tag},
                                           state=[SandboxState.PAUSED])).next_items() == []
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "nothing-" + tag})
                        ).next_items() == []
    r = e2b_api.get("/v2/sandboxes", params={"state": "sleeping"})
    assert r.status_code == 400 and "state" in r.json()["message"]

    # kill: 204, then 404 (False); the sandbox is gone in Torpor too
    assert Sandbox.kill(sbxs[2].sandbox_id) is True
    assert Sandbox.kill(sbxs[2].sandbox_id) is False
    assert state(api, sbxs[2].sandbox_id) == "gone"
    assert sbxs[1].kill() is True


def test_a_sandbox_made_through_torpors_api(server, api, made, e2b_api):
    r = api.post("/v1/sandboxes", json={"metadata": {"door": "native"}, "ttl": 600,
                                        "expire_action": "hibernate"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    made.append(sid)
    info = Sandbox.get_info(sid)
    assert info.template_id == "base" and info.state == SandboxState.RUNNING
    assert info.metadata == {"door": "native"} and info.lifecycle["on_timeout"] == "pause"
    assert 590 < (info.end_at - datetime.now(UTC)).total_seconds() <= 601
    # its envd and ports take no API key: closed until E2B's connect, which gives a token
    for port in ("49983", "8000"):
        r = httpx.get(server.url + "/health", headers={"E2b-Sandbox-Id": sid,
                                                       "E2b-Sandbox-Port": port})
        assert r.status_code == 502 and r.json()["sandboxId"] == sid
    r = e2b_api.post(f"/sandboxes/{sid}/connect", json={"timeout": 30})
    assert r.status_code == 200 and len(r.json()["envdAccessToken"]) == 64
    r = httpx.get(server.url + "/health", headers={"E2b-Sandbox-Id": sid})
    assert r.status_code == 204
    Sandbox.set_timeout(sid, 900)
    native = api.get(f"/v1/sandboxes/{sid}").json()
    assert native["expire_action"] == "hibernate" and native["ttl"] > 890


# --- timeout, pause, connect, auto-resume ---------------------------------------------------
def test_timeout_kills_and_set_timeout_shortens(api, made):
    short = create(made, timeout=2)
    longer = create(made, timeout=300)
    before = longer.get_info().end_at
    longer.set_timeout(3)
    assert longer.get_info().end_at < before  # it may shorten
    wait_for(lambda: state(api, short.sandbox_id) == "gone", timeout=20)
    wait_for(lambda: state(api, longer.sandbox_id) == "gone", timeout=20)
    with pytest.raises(SandboxNotFoundException):
        longer.get_info()


def test_auto_pause_timeout_pauses_and_connect_resumes(server, api, made, e2b_api):
    sbx = create(made, timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": False})
    run(api, sbx.sandbox_id, "echo kept > /home/user/mark")
    wait_for(lambda: sbx.get_info().state == SandboxState.PAUSED, timeout=20)
    assert state(api, sbx.sandbox_id) == "hibernated"
    # paused without autoResume: its envd and ports answer 502, and do not wake it
    r = httpx.get(server.url + "/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id})
    assert r.status_code == 502 and r.json()["sandboxId"] == sbx.sandbox_id
    assert state(api, sbx.sandbox_id) == "hibernated"
    assert [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(
        state=[SandboxState.PAUSED])).next_items()].count(sbx.sandbox_id) == 1
    # connect resumes it (201), with a new timeout; a second connect finds it running (200)
    r = e2b_api.post(f"/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 60})
    assert r.status_code == 201, r.text
    assert r.json()["sandboxID"] == sbx.sandbox_id
    assert r.json()["envdAccessToken"] == sbx._envd_access_token
    assert state(api, sbx.sandbox_id) == "running"
    assert run(api, sbx.sandbox_id, "cat /home/user/mark")["stdout"] == "kept\n"
    end = sbx.get_info().end_at
    r = e2b_api.post(f"/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 5})
    assert r.status_code == 200
    assert sbx.get_info().end_at == end  # connect extends a timeout, never shortens it
    assert sbx.get_info().state == SandboxState.RUNNING


def test_timeout_of_a_sandbox_torpor_hibernated_idle(api, made, e2b_api):
    # Torpor hibernates an idle sandbox before its E2B timeout ends (still running to
    # E2B); once the timeout has passed, it is paused, and connect wakes it for good
    sbx = create(made, timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": False})
    assert api.post(f"/v1/sandboxes/{sbx.sandbox_id}/hibernate").status_code == 200
    assert sbx.get_info().state == SandboxState.RUNNING
    wait_for(lambda: sbx.get_info().state == SandboxState.PAUSED, timeout=10)
    r = e2b_api.post(f"/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 30})
    assert r.status_code == 201, r.text
    time.sleep(1.5)  # the old timeout must not fire again once it runs
    assert state(api, sbx.sandbox_id) == "running"
    assert sbx.get_info().state == SandboxState.RUNNING


def test_pause_and_auto_resume_on_traffic(server, api, made):
    sbx = create(made, timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True})
    sid = sbx.sandbox_id
    run(api, sid, "cd /tmp && echo served > index.html && "
                  "(python3 -m http.server 8000 >/dev/null 2>&1 &)")
    wait_listening(api, sid, 8000)
    assert sbx.pause() is True
    assert state(api, sid) == "hibernated"
    assert sbx.get_info().state == SandboxState.PAUSED
    assert Sandbox.pause(sid) is False  # 409: already paused
    with pytest.raises(SandboxNotFoundException):
        sbx.set_timeout(30)  # a paused sandbox's timeout waits for its connect
    # autoResume: traffic to one of its ports wakes it, with its processes as they were
    r = httpx.get(server.url + "/index.html", headers={"E2b-Sandbox-Id": sid,
                                                       "E2b-Sandbox-Port": "8000"})
    assert r.status_code == 200 and r.text == "served\n"
    assert sbx.get_info().state == SandboxState.RUNNING
    # the same through a {port}-{id}.{domain} host name
    r = httpx.get(server.url + "/index.html", headers={"Host": f"8000-{sid}.localhost"})
    assert r.status_code == 200 and r.text == "served\n"


def test_memoryless_pause_cold_boots_with_the_files(api, made):
    def marks(sid: str) -> str:
        run(api, sid, "echo kept > /home/user/mark; (sleep 1000 >/dev/null 2>&1 &)")
        return run(api, sid, "pgrep -x sleep")["stdout"]

    def after(sid: str) -> None:
        assert run(api, sid, "cat /home/user/mark")["stdout"] == "kept\n"
        assert run(api, sid, "pgrep -x sleep")["exit_code"] == 1  # a cold boot

    # pause(keep_memory=False): a filesystem-only pause, resumed by connect only
    sbx = create(made, timeout=120)
    assert marks(sbx.sandbox_id)
    assert sbx.pause(keep_memory=False) is True
    assert sbx.get_info().state == SandboxState.PAUSED
    assert Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items() == []
    Sandbox.connect(sbx.sandbox_id)
    assert sbx.get_info().state == SandboxState.RUNNING
    after(sbx.sandbox_id)
    # the timeout's autoPause without memory: the same at its connect
    sbx = create(made, timeout=2,
                 lifecycle={"on_timeout": {"action": "pause", "keep_memory": False}})
    assert marks(sbx.sandbox_id)
    wait_for(lambda: sbx.get_info().state == SandboxState.PAUSED, timeout=20)
    sbx.connect()
    after(sbx.sandbox_id)
    snaps = api.get("/v1/snapshots").json()
    assert not any(s["sandbox_id"] == sbx.sandbox_id for s in snaps)  # none left behind


def test_metrics(made):
    sbx = create(made, timeout=60)
    start = datetime.now(UTC)
    metrics = sbx.get_metrics()
    assert len(metrics) == 1
    m = metrics[0]
    assert m.cpu_count >= 1 and 0 <= m.cpu_used_pct <= 100
    assert 0 < m.mem_used <= m.mem_total and 0 < m.disk_used <= m.disk_total
    assert abs((m.timestamp - start).total_seconds()) < 5
    # a range from before the sandbox was has none
    assert sbx.get_metrics(start=datetime(2020, 1, 1, tzinfo=UTC),
                           end=datetime(2020, 1, 2, tzinfo=UTC)) == []


# --- snapshots, fork, templates -------------------------------------------------------------
def test_snapshot_fork_and_templates(api, made, e2b_api):
    src = create(made, timeout=120)
    run(api, src.sandbox_id, "echo from-source > /home/user/f")
    snap = src.create_snapshot(name=f"e2b-snap-{time.time_ns()}")
    assert snap.snapshot_id.startswith("snap_") and snap.names
    listed = Sandbox.list_snapshots(sandbox_id=src.sandbox_id).next_items()
    assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
    assert Sandbox.list_snapshots(name=snap.names[0]).next_items()[0].snapshot_id == \
        snap.snapshot_id
    # a snapshot's id (or name) works as a templateID
    for ref in (snap.snapshot_id, snap.names[0]):
        copy = create(made, template=ref, timeout=60)
        assert run(api, copy.sandbox_id, "cat /home/user/f")["stdout"] == "from-source\n"
        copy.kill()
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False

    forks = src.fork(count=2)
    made.extend(f.sandbox_id for f in forks)
    assert len({f.sandbox_id for f in forks} | {src.sandbox_id}) == 3
    tokens = {f._envd_access_token for f in forks} | {src._envd_access_token}
    assert len(tokens) == 3 and None not in tokens  # each fork has its own token
    for f in forks:
        assert run(api, f.sandbox_id, "cat /home/user/f")["stdout"] == "from-source\n"
        assert f.get_info().state == SandboxState.RUNNING

    assert e2b_api.get("/templates/aliases/base").json() == {"templateID": "base",
                                                             "public": True}
    r = e2b_api.get("/templates/aliases/code-interpreter-v1")
    assert r.status_code == 200 and r.json()["templateID"] == "code-interpreter-v1"
    r = e2b_api.get("/templates/aliases/no-such-alias")
    assert r.status_code == 404 and r.json()["code"] == 404
    assert e2b_api.delete("/templates/no%2Fsuch%3Atemplate").status_code == 404
    assert e2b_api.delete("/templates/base").status_code == 409


def test_network_maps_onto_the_egress_policy(server, api, made, e2b_api):
    sbx = create(made, timeout=60, network={"allow_out": ["1.1.1.1", "*.example.com"],
                                            "deny_out": [ALL_TRAFFIC]})
    policy = api.get(f"/v1/sandboxes/{sbx.sandbox_id}").json()["network"]
    assert policy == {"egress": "deny-all", "allow": ["1.1.1.1", "*.example.com"],
                      "deny": []}
    info = sbx.get_info()
    assert info.network["allow_out"] == ["1.1.1.1", "*.example.com"]
    sbx.update_network({"deny_out": ["203.0.113.0/24"]})
    policy = api.get(f"/v1/sandboxes/{sbx.sandbox_id}").json()["network"]
    assert policy == {"egress": "allow-all", "allow": [], "deny": ["203.0.113.0/24"]}
    # allowPublicTraffic false: its ports answer only with its traffic token (as on E2B)
    private = create(made, timeout=60, network={"allow_public_traffic": False})
    assert private.traffic_access_token
    run(api, private.sandbox_id, "cd /tmp && echo p > index.html && "
                                 "(python3 -m http.server 8080 >/dev/null 2>&1 &)")
    wait_listening(api, private.sandbox_id, 8080)
    to = {"E2b-Sandbox-Id": private.sandbox_id, "E2b-Sandbox-Port": "8080"}
    r = httpx.get(server.url + "/index.html", headers=to)
    assert r.status_code == 403 and r.json()["code"] == 403
    r = httpx.get(server.url + "/index.html", headers={
        **to, "E2B-Traffic-Access-Token": "x" * len(private.traffic_access_token)})
    assert r.status_code == 403
    r = httpx.get(server.url + "/index.html", headers={
        **to, "E2B-Traffic-Access-Token": private.traffic_access_token})
    assert r.status_code == 200 and r.text == "p\n"
    offline = create(made, timeout=60, allow_internet_access=False)
    assert api.get(f"/v1/sandboxes/{offline.sandbox_id}").json()["network"]["egress"] == \
        "deny-all"
    assert offline.get_info().allow_internet_access is False


# --- the newest SDK's v2 calls, as it sends them ---------------------------------------------
def test_v2_paths_as_the_newest_sdk_sends_them(server, api, made, e2b_api):
    body = {"templateID": "base", "metadata": {"v": "2"}, "envVars": {"X": "1"},
            "autoPause": True, "autoResume": {"enabled": False}}
    first = e2b_api.post("/v2/sandboxes", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201, first.text
    sid = first.json()["sandboxID"]
    made.append(sid)
    assert len(first.json()["envdAccessToken"]) == 64  # v2: always a token
    again = e2b_api.post("/v2/sandboxes", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 201 and again.json() == first.json()  # one sandbox
    with server.client() as c:  # another API key's same Idempotency-Key is its own
        other = c.post("/v1/keys", json={"name": "other", "e2b": True}).json()["key"]
    r = httpx.post(server.url + "/v2/sandboxes", json=body,
                   headers={"Idempotency-Key": "k-1", "X-API-KEY": other})
    assert r.status_code == 201 and r.json()["sandboxID"] != sid
    made.append(r.json()["sandboxID"])
    assert "envdAccessToken" in r.json() and \
        r.json()["envdAccessToken"] != first.json()["envdAccessToken"]
    detail = e2b_api.get(f"/sandboxes/{sid}").json()
    end = datetime.fromisoformat(detail["endAt"])
    assert 290 < (end - datetime.now(UTC)).total_seconds() <= 301  # v2's default timeout
    assert detail["lifecycle"] == {"autoResume": False, "onTimeout": "pause"}
    r = e2b_api.post(f"/v2/sandboxes/{sid}/connect", json={})
    assert r.status_code == 200 and r.json()["sandboxID"] == sid
    # memory false matters to a paused sandbox only (a cold boot); a running one runs on
    run(api, sid, "(sleep 1000 >/dev/null 2>&1 &)")
    r = e2b_api.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 60, "memory": False})
    assert r.status_code == 200 and run(api, sid, "pgrep -x sleep")["exit_code"] == 0
    r = e2b_api.post(f"/v2/sandboxes/{sid}/connect", json={"memory": "no"})
    assert r.status_code == 400 and r.json()["message"] == "memory must be true or false"
    r = e2b_api.post(f"/sandboxes/{sid}/pause", json={"memory": True,
                                                       "requireHealthyGuest": False})
    assert r.status_code == 204
    assert e2b_api.post(f"/sandboxes/{sid}/pause", json={}).status_code == 409
    r = e2b_api.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 60})
    assert r.status_code == 201 and state(api, sid) == "running"
    r = e2b_api.post(f"/sandboxes/{sid}/snapshots", json={"name": "v2-snap", "memory": True})
    assert r.status_code == 201 and r.json()["names"] == ["v2-snap"]
    assert e2b_api.delete(f"/templates/{r.json()['snapshotID']}").status_code == 204
    r = e2b_api.post(f"/sandboxes/{sid}/refreshes", json={"duration": 30})
    assert r.status_code == 204
    assert e2b_api.post(f"/sandboxes/{sid}/timeout", json={"timeout": 0}).status_code == 204
    # timeout 0 with autoPause: paused now
    wait_for(lambda: e2b_api.get(f"/sandboxes/{sid}").json()["state"] == "paused",
             timeout=20)


# --- async ----------------------------------------------------------------------------------
def test_async_sdk(api, made):
    async def main():
        sbx = await AsyncSandbox.create(timeout=60, metadata={"async": "yes"})
        made.append(sbx.sandbox_id)
        info = await sbx.get_info()
        assert info.state == SandboxState.RUNNING and info.metadata == {"async": "yes"}
        pager = AsyncSandbox.list(query=SandboxQuery(metadata={"async": "yes"}))
        assert [s.sandbox_id for s in await pager.next_items()] == [sbx.sandbox_id]
        assert await sbx.pause() is True
        assert (await sbx.get_info()).state == SandboxState.PAUSED
        resumed = await AsyncSandbox.connect(sbx.sandbox_id, timeout=30)
        assert (await resumed.get_info()).state == SandboxState.RUNNING
        assert len(await resumed.get_metrics()) >= 1
        assert await resumed.kill() is True
        with pytest.raises(SandboxNotFoundException):
            await AsyncSandbox.get_info(sbx.sandbox_id)
        with pytest.raises(SandboxException):
            await AsyncSandbox.create(template="no-such-template")

    asyncio.run(main())


# --- a port of its own ----------------------------------------------------------------------
def test_e2b_port_of_its_own(key):
    e2b_port = free_port()
    srv = Server(make_data_dir(), pool_size=0, args=["--e2b-port", str(e2b_port)])
    try:
        srv.start()
        own = f"http://127.0.0.1:{e2b_port}"
        with srv.client() as c:
            e2b_key = c.post("/v1/keys", json={"name": "p", "e2b": True}).json()["key"]
        h = {"X-API-KEY": e2b_key}
        r = httpx.post(own + "/sandboxes", headers=h, json={"templateID": "base",
                                                           "timeout": 30})
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        assert httpx.get(own + f"/sandboxes/{sid}", headers=h).json()["state"] == "running"
        # the native API is not on the E2B port; on the main port, both are
        r = httpx.get(own + "/v1/sandboxes", headers=h)
        assert r.status_code == 404 and r.json()["code"] == 404
        assert httpx.get(own + "/healthz").status_code == 404
        assert httpx.get(srv.url + "/v1/sandboxes", headers=h).status_code == 200
        assert httpx.get(srv.url + "/v2/sandboxes", headers=h).status_code == 200
        # E2B's debug mode names its sandbox debug_sandbox_id: the server maps it onto one
        with srv.client() as c:
            run(c, sid, "cd /tmp && echo debug > index.html && "
                        "(python3 -m http.server 8000 >/dev/null 2>&1 &)")
            wait_listening(c, sid, 8000)
        debug = {"E2b-Sandbox-Id": "debug_sandbox_id", "E2b-Sandbox-Port": "8000"}
        assert httpx.get(own + "/index.html", headers=debug).status_code == 502
        srv.stop()
        srv.extra_env["TORPOR_E2B_DEBUG_SANDBOX"] = sid
        srv.start()
        r = httpx.get(own + "/index.html", headers=debug)
        assert r.status_code == 200 and r.text == "debug\n"
        assert httpx.delete(own + f"/sandboxes/{sid}", headers=h).status_code == 204
    finally:
        teardown_data_dir(srv)
