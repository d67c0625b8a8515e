"""Built-in templates and the build network policy, on the engine with real runsc.

The package registries resolve to 203.0.113.80 here (a documentation range the egress policy
always denies); the engines that install from them allow that range and trust the system CA
bundle upstream, as an operator of such a host would (`--egress-allow-cidr
203.0.113.0/24 --egress-upstream-ca /etc/ssl/certs/ca-certificates.crt`).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from torpor import builtin_templates
from torpor.builtin_templates import INTERPRETER_PORT, Builtin
from torpor.engine.manager import Engine
from torpor.engine.types import Exited, Output
from torpor.errors import Invalid, NotFound, TorporError

INDEX_RANGE = "203.0.113.0/24"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
INDEX_ACCESS = {"egress_allow_cidr": [INDEX_RANGE], "egress_upstream_ca": [SYSTEM_CA]}
# one small package nothing here has installed; pip gives up at once instead of retrying
SMALL = [{"type": "env", "env": {"PIP_RETRIES": "0", "PIP_TIMEOUT": "10"}},
         {"type": "pip_install", "packages": ["iniconfig==2.0.0"]}]


async def last_event(events) -> dict:
    last = {}
    async for ev in events:
        last = ev
    return last


def build_sandboxes(engine: Engine, name: str) -> list[str]:
    """The ids of the sandboxes the builds of `name` ran in (all deleted by now)."""
    return [i.id for i in engine.list(state="deleted", metadata={"torpor.build": name})]


async def run(engine: Engine, sid: str, argv: list[str]) -> tuple[int | None, str]:
    out, code = [], None
    async for ev in await engine.processes.run(sid, argv, timeout=120):
        if isinstance(ev, Output):
            out.append(ev.data)
        elif isinstance(ev, Exited):
            code = ev.exit_code
    return code, "".join(out)


def test_a_build_the_proxy_refuses_fails_naming_the_refusal(engine_run):
    """No allow for the registries' range: pip's error, and the proxy's rule beside it, in
    the step's error; the build sandbox's egress log keeps the refusal after it is gone."""
    async def body(engine: Engine) -> None:
        last = await last_event(await engine.builds.build("refused", "latest", SMALL, None,
                                                          {}))
        assert last["type"] == "error" and last["status"] == 422, last
        err = last["error"]
        assert err["code"] == "build_failed" and err["exit_code"] != 0
        assert "the egress proxy refused" in err["message"]
        assert any(r.startswith("pypi.org:443") and "always-deny: 203.0.113.0/24 documentation"
                   in r for r in err["egress_refusals"]), err["egress_refusals"]
        [sid] = build_sandboxes(engine, "refused")
        log = engine.traffic.egress_log(sid)
        assert log and all(not e.allowed for e in log)
        assert {e.host for e in log} == {"pypi.org"}
        assert "documentation range (203.0.113.80)" in log[0].rule
        with pytest.raises(NotFound):
            engine.traffic.egress_log("sbxnosuchsandbox")

    engine_run(body)


def test_the_server_build_policy_applies_and_a_build_may_only_narrow_it(engine_run):
    async def body(engine: Engine) -> None:
        assert engine.traffic.build_policy(None) == {
            "egress": "deny-all", "allow": ["pypi.org", "files.pythonhosted.org"], "deny": []}
        # sandboxes other than builds keep the server's default
        assert engine.traffic.policy(None)["egress"] == "allow-all"
        with pytest.raises(Invalid, match="example.com") as e:
            await engine.builds.build("wide", "latest", SMALL, None, {},
                                      network={"allow": ["example.com"]})
        assert e.value.extra["field"] == "network.allow"
        # the index is reachable, the files host denied by the request: the step fails
        # once pip goes for the wheel, and says which rule refused it
        last = await last_event(await engine.builds.build(
            "narrowed", "latest", SMALL, None, {},
            network={"deny": ["files.pythonhosted.org"]}))
        assert last["type"] == "error", last
        assert any(r.startswith("files.pythonhosted.org:443")
                   and "deny: files.pythonhosted.org" in r
                   for r in last["error"]["egress_refusals"]), last["error"]
        [sid] = build_sandboxes(engine, "narrowed")
        log = engine.traffic.egress_log(sid)
        assert any(e.allowed and e.host == "pypi.org" and e.rule == "allow: pypi.org"
                   for e in log)
        assert engine.records.find(sid).network["deny"] == ["files.pythonhosted.org"]

    engine_run(body, build_egress="deny-all",
               build_egress_allow=["pypi.org", "files.pythonhosted.org"], **INDEX_ACCESS)


def test_a_builtin_is_built_once_on_first_use_and_its_failure_is_the_creates_error(
        engine_run, monkeypatch):
    steps = [{"type": "run", "cmd": "echo cannot build this; exit 7"}]
    monkeypatch.setitem(builtin_templates.BUILTINS, "tiny", Builtin(
        "tiny", "a test's built-in", lambda: list(steps), {"memory_mb": 256}))

    async def body(engine: Engine) -> None:
        with pytest.raises(NotFound, match="built-ins are"):
            await engine.build_builtin("nosuch")
        # three creates at once: one build, whose failure each of them gets
        got = await asyncio.gather(*[engine.create(template="tiny") for _ in range(3)],
                                   return_exceptions=True)
        assert all(isinstance(e, TorporError) for e in got), got
        assert {(e.status, e.code) for e in got} == {(422, "build_failed")}
        assert "the built-in template tiny could not be built" in got[0].message
        assert "cannot build this" in got[0].message and got[0].extra["exit_code"] == 7
        assert len(build_sandboxes(engine, "tiny")) == 1
        with pytest.raises(NotFound):
            engine.template("tiny")

        # fixed: the next create builds it (once more) and starts from it
        steps[:] = [{"type": "run", "cmd": "echo built > /home/user/tiny"}]
        a, b = await asyncio.gather(engine.create(template="tiny"),
                                    engine.create(template="tiny:latest"))
        assert len(build_sandboxes(engine, "tiny")) == 2
        # each first use is a build record, with its state and log, like any build
        records = [r for r in engine.build_records.list() if r.name == "tiny"]
        assert [r.state for r in records] == ["succeeded", "failed"]
        assert records[1].error["status"] == 422
        tpl = engine.template("tiny")
        assert tpl.description == "a test's built-in" and tpl.memory_mb == 256
        for info in (a, b):
            assert engine.records.get(info.id).template_digest == tpl.digest
            assert await run(engine, info.id, ["cat", "/home/user/tiny"]) == (0, "built\n")
        # a create with another tag is no first use: the usual 404
        with pytest.raises(NotFound):
            await engine.create(template="tiny:v2")
        # built on purpose (what `POST /v1/templates {"name": "tiny"}` does): cached
        last = await last_event(await engine.builds.build("tiny", "latest", [], None, {}))
        assert last["type"] == "done" and last["template"]["digest"] == tpl.digest

    engine_run(body)


def test_rest_builds_the_builtin_of_a_name_without_steps_under_the_narrowed_policy(api):
    """`POST /v1/templates {"name": "code-interpreter"}`: the door sends no steps, the engine
    builds the built-in; `network: deny-all` keeps the package index out, and the failed
    step names the rule that refused it."""
    with api.stream("POST", "/v1/templates", headers={"Accept": "application/x-ndjson"},
                    json={"name": "code-interpreter",
                          "network": {"egress": "deny-all"}}) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line) for line in r.iter_lines() if line]
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps[0] == {"type": "from_template", "template": "base"}
    assert "ipykernel==7.4.0" in steps[1]["packages"]
    last = events[-1]
    assert last["type"] == "error" and last["status"] == 422, last
    assert any(r.startswith("pypi.org:443") and "deny-all: no allow rule matches pypi.org"
               in r for r in last["error"]["egress_refusals"]), last["error"]
    assert api.get("/v1/templates/code-interpreter").status_code == 404


@pytest.mark.slow
def test_code_interpreter_builds_from_the_index_and_starts_with_its_server_running(
        engine_run):
    """The package-index build through the proxy (about a minute here), by a create's first
    use; the code interpreter's server runs in the restored sandbox and executes code."""
    async def body(engine: Engine) -> None:
        t0 = time.monotonic()
        first, second = await asyncio.gather(engine.create(template="code-interpreter"),
                                             engine.create(template="code-interpreter"))
        built_in = time.monotonic() - t0
        print(f"code-interpreter: built and two sandboxes created in {built_in:.1f}s")
        # one build: its pip and copy steps' sandboxes and its boot snapshot's
        sandboxes = build_sandboxes(engine, "code-interpreter")
        assert len(sandboxes) == 3
        hosts = {(e.host, e.allowed) for sid in sandboxes
                 for e in engine.traffic.egress_log(sid)}
        assert ("pypi.org", True) in hosts and ("files.pythonhosted.org", True) in hosts
        tpl = engine.template("code-interpreter")
        assert tpl.snapshot and tpl.env["MPLBACKEND"] == "Agg"

        for info in (first, second):
            sid = info.id
            assert any(e.kind == "state" and e.to_state == "running"
                       and e.detail.get("boot_snapshot") for e in engine.events(sid))
            # the kernel was running before anything ran here: restored, not started
            procs = await engine.processes.list(sid)
            assert any(p["tag"] == "start_cmd" and p["running"]
                       and "interpreter/server.py" in " ".join(p["argv"]) for p in procs)
        sid = first.id
        code, out = await run(engine, sid, [
            "python3", "-c", ("import numpy, pandas, matplotlib; print(numpy.__version__, "
                              "pandas.__version__, matplotlib.get_backend())")])
        assert code == 0 and out.split()[2].lower() == "agg", out
        assert out.split()[:2] == ["2.4.6", "3.1.2"]
        # the code interpreter's server answers inside the sandbox, its kernel warm
        client = f"""
import json, urllib.request
req = urllib.request.Request("http://127.0.0.1:{INTERPRETER_PORT}/execute",
                             data=json.dumps({{"code": "1+1"}}).encode())
lines = [json.loads(x) for x in urllib.request.urlopen(req, timeout=60).read().splitlines()]
print([x.get("text") for x in lines if x["type"] == "result"], lines[-1]["type"])
"""
        for s in (first.id, second.id):
            assert await run(engine, s, ["python3", "-c", client]) == (
                0, "['2'] end_of_execution\n")

        # built on purpose again, nothing changed: every step cached, no sandbox booted
        t0 = time.monotonic()
        events = [ev async for ev in await engine.build_builtin("code-interpreter")]
        assert events[-1]["type"] == "done", events[-1]
        assert [e["cached"] for e in events if e["type"] == "step"
                and e["step"]["type"] in ("pip_install", "start_cmd")] == [True, True]
        assert events[-1]["template"]["digest"] == tpl.digest
        assert len(build_sandboxes(engine, "code-interpreter")) == 3
        print(f"code-interpreter: cached rebuild in {time.monotonic() - t0:.2f}s")

    engine_run(body, **INDEX_ACCESS)
