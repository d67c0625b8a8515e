"""The control plane's routes (`control.create_control_app` adds them): each a few lines
over the engine and `sandboxes.py`, in E2B's paths, bodies and status codes."""

from __future__ import annotations

import urllib.parse
from datetime import datetime

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from torpor.builtin_templates import builtin
from torpor.compat.e2b import envd, wire
from torpor.compat.e2b import sandboxes as sbx
from torpor.compat.e2b.control import (
    E2BError,
    new_token,
    once,
    page,
    read_body,
    view_or_404,
)
from torpor.compat.e2b.wire import Body
from torpor.errors import Conflict, Invalid, NotFound

DOOR = sbx.DOOR
V1_CREATE_TIMEOUT = 15  # E2B's defaults when a body leaves timeout out
V2_TIMEOUT = sbx.DEFAULT_TIMEOUT
COLD = "e2b-pause-"  # the name of the filesystem-only snapshot a memory-less pause keeps


def add(app: FastAPI, engine, auth: list) -> None:
    samples = app.state.samples

    # --- create, connect, resume ------------------------------------------------------------
    async def create(request: Request, v2: bool):
        b = await read_body(request)
        template_id = b.get("templateID", str)
        if not template_id:
            raise Invalid("templateID is required", field="templateID")
        timeout = wire.timeout_of(b, default=V2_TIMEOUT if v2 else V1_CREATE_TIMEOUT)
        metadata = wire.str_map(b.get("metadata", dict), "metadata")
        env = wire.str_map(b.get("envVars", dict), "envVars", names=True)
        secure = b.get("secure", bool, False)
        if v2:  # no `secure` in v2: every sandbox gets an access token
            secure = True
        internet = b.get("allow_internet_access", bool)
        auto_pause = b.get("autoPause", bool, False)
        auto_pause_memory = b.get("autoPauseMemory", bool, True)
        resume = Body(b.get("autoResume", dict), "autoResume")
        auto_resume = resume.get("enabled", bool, False, field="autoResume.enabled")
        resume.done()
        cpu = b.get("cpuCount", int)
        net = b.get("network", dict)
        policy, e2b_net = wire.network_of(Body(net, "network") if net is not None else None,
                                          internet)
        if b.data.get("mcp"):
            raise Invalid("Failed to start MCP gateway: Torpor does not run E2B's MCP "
                          "gateway in sandboxes yet (the `mcp` field)", field="mcp")
        b.unsupported("mcp")
        b.unsupported("iam", why="workload identity tokens")
        b.unsupported("volumeMounts", why="mount Torpor volumes through Torpor's own API")
        b.done()
        template = resolve_template(template_id)

        async def make():
            info = await engine.create(template=template, env=env, metadata=metadata,
                                       network=policy, cpu=cpu)
            try:
                door = engine.set_door_state(
                    info.id, DOOR, access_token=new_token() if secure else None,
                    traffic_token=None if e2b_net["allowPublicTraffic"] else new_token(),
                    auto_pause=auto_pause, auto_pause_memory=auto_pause_memory,
                    auto_resume=auto_resume, template_id=template_id,
                    alias=None if template.startswith("snap_") else template_id,
                    envd_version=sbx.ENVD_VERSION, network=e2b_net)
                sbx.set_timeout(engine, info.id, timeout, auto_pause)
            except BaseException:
                await engine.delete(info.id, "e2b_create_failed")
                raise
            return wire.sandbox(info, door)

        key = request.headers.get("idempotency-key") if v2 else None
        if key:  # one key's retries: another API key's same Idempotency-Key is its own
            key = f"{request.state.key_id}:{key}"
        return JSONResponse(await once(app, key, make), status_code=201)

    @app.post("/sandboxes", dependencies=auth)
    async def create_v1(request: Request):
        return await create(request, v2=False)

    @app.post("/v2/sandboxes", dependencies=auth)
    async def create_v2(request: Request):
        return await create(request, v2=True)

    def resolve_template(template_id: str) -> str:
        name = wire.template_of(template_id)
        if name.startswith("snap_"):
            return name
        for s in engine.list_snapshots():  # a snapshot's name works as a template too
            if s.name == template_id:
                return s.id
        return name

    async def connect(request: Request, sid: str, v2: bool, resume_only: bool = False):
        b = await read_body(request)
        timeout = wire.timeout_of(b, default=V2_TIMEOUT)
        memory = b.get("memory", bool, True)
        auto_pause = b.get("autoPause", bool) if resume_only else None
        b.done()
        v = sbx.view(engine, sid)
        if v is None:
            raise NotFound(f"sandbox {sid} not found")
        if not sbx.is_e2b(v):
            # made through Torpor's API: E2B's connect opens its envd, with a token of its own
            engine.set_door_state(sid, DOOR, access_token=new_token(), template_id=v.info.template,
                                  alias=v.info.template, envd_version=sbx.ENVD_VERSION)
        if v.state == "paused":
            await wake(v, memory)
            if auto_pause is not None:
                engine.set_door_state(sid, DOOR, auto_pause=auto_pause)
            sbx.unpause(engine, v, timeout)
            status = 201
        elif resume_only:
            raise Conflict(f"sandbox {sid} is already running")
        else:
            sbx.extend_timeout(engine, v, timeout)
            status = 200
        body = wire.sandbox(engine.get(sid), engine.door_state(sid, DOOR))
        return JSONResponse(body, status_code=status)

    @app.post("/sandboxes/{sid}/connect", dependencies=auth)
    async def connect_v1(sid: str, request: Request):
        return await connect(request, sid, v2=False)

    @app.post("/v2/sandboxes/{sid}/connect", dependencies=auth)
    async def connect_v2(sid: str, request: Request):
        return await connect(request, sid, v2=True)

    @app.post("/sandboxes/{sid}/resume", dependencies=auth)
    async def resume(sid: str, request: Request):
        return await connect(request, sid, v2=False, resume_only=True)

    # --- list, info ------------------------------------------------------------------------
    def views(states: set[str], metadata: dict, template: str | None,
              after: datetime | None) -> list[sbx.View]:
        out = []
        for info in engine.list(metadata=metadata or None):
            if "torpor.build" in info.metadata:
                continue  # a template build's sandbox is Torpor's own
            v = sbx.view(engine, info.id)
            if v is None or v.state not in states:
                continue
            if template and template not in (v.door.get("template_id"), v.door.get("alias"),
                                              info.template):
                continue
            if after and sbx._aware(info.created_at) < after:
                continue
            out.append(v)
        return out

    @app.get("/v2/sandboxes", dependencies=auth)
    async def list_v2(request: Request, limit: int | None = None,
                      nextToken: str | None = None, order: str = "desc",
                      template: str | None = None, startedAfter: str | None = None):
        q = request.query_params
        states = set()
        for part in q.getlist("state"):
            states |= {s.strip() for s in part.split(",") if s.strip()}
        bad = states - {"running", "paused"}
        if bad:
            raise Invalid(f"state must be running or paused, not {min(bad)!r}",
                          field="state")
        if order not in ("asc", "desc"):
            raise Invalid("order must be asc or desc", field="order")
        after = None
        if startedAfter:
            try:
                after = sbx._aware(datetime.fromisoformat(startedAfter))
            except ValueError:
                raise Invalid("startedAfter must be an ISO 8601 time",
                              field="startedAfter") from None
        found = views(states or {"running", "paused"}, metadata_query(q.get("metadata")),
                      template, after)

        def key(v):
            return [wire.iso(v.info.created_at), v.info.id]

        found.sort(key=key, reverse=order == "desc")
        chunk, nxt = page(found, limit, nextToken, key, desc=order == "desc")
        headers = {"X-Next-Token": nxt} if nxt else {}
        return JSONResponse([wire.listed(v) for v in chunk], headers=headers)

    @app.get("/sandboxes", dependencies=auth)
    async def list_v1(request: Request):
        found = views({"running"}, metadata_query(request.query_params.get("metadata")),
                      None, None)
        found.sort(key=lambda v: (v.info.created_at, v.info.id), reverse=True)
        return [wire.listed(v) for v in found]

    @app.get("/sandboxes/{sid}", dependencies=auth)
    async def info(sid: str):
        return wire.detail(view_or_404(engine, sid))

    # --- kill, timeout, refresh ------------------------------------------------------------
    @app.delete("/sandboxes/{sid}", dependencies=auth)
    async def kill(sid: str):
        try:
            info = engine.get(sid)
        except NotFound:
            info = None
        if info is None or info.state == "deleted":
            raise NotFound(f"sandbox {sid} not found")
        cold = engine.door_state(sid, DOOR).get("cold_snapshot")
        await engine.delete(sid, "e2b_kill")
        samples.forget(sid)
        if cold:
            engine.delete_snapshot(cold, force=True)
        return Response(status_code=204)

    @app.post("/sandboxes/{sid}/timeout", dependencies=auth)
    async def set_timeout(sid: str, request: Request):
        b = await read_body(request)
        timeout = wire.timeout_of(b)
        if timeout is None:
            raise Invalid("timeout is required", field="timeout")
        b.done()
        v = view_or_404(engine, sid)
        if v.state == "paused":
            raise NotFound(f"sandbox {sid} is paused: connect to it first")
        sbx.set_timeout(engine, sid, timeout)
        return Response(status_code=204)

    @app.post("/sandboxes/{sid}/refreshes", dependencies=auth)
    async def refresh(sid: str, request: Request):
        b = await read_body(request)
        duration = wire.timeout_of(b, "duration", default=60)
        b.done()
        v = view_or_404(engine, sid)
        if v.state == "paused":
            raise NotFound(f"sandbox {sid} is paused: connect to it first")
        sbx.extend_timeout(engine, v, duration)
        return Response(status_code=204)

    # --- metrics ---------------------------------------------------------------------------
    @app.get("/sandboxes/{sid}/metrics", dependencies=auth)
    async def metrics(sid: str, start: int | None = None, end: int | None = None):
        v = view_or_404(engine, sid)
        if v.state == "running":
            samples.take(engine, v.info)
        return samples.series(sid, start, end)

    # --- pause -----------------------------------------------------------------------------
    @app.post("/sandboxes/{sid}/pause", dependencies=auth)
    async def pause(sid: str, request: Request):
        b = await read_body(request)
        memory = b.get("memory", bool, True)
        b.get("requireHealthyGuest", bool)  # a hibernation needs the agent's answer anyway
        b.done()
        v = view_or_404(engine, sid)
        if v.state == "paused":
            raise Conflict(f"sandbox {sid} is already paused")
        cold = None
        if not memory:  # its files now; its connect cold-boots from them
            cold = (await engine.snapshot(sid, COLD + sid, memory=False)).id
        await pause_sandbox(v)
        if cold:
            engine.set_door_state(sid, DOOR, cold_snapshot=cold)
        return Response(status_code=204)

    async def wake(v: sbx.View, memory: bool = True) -> None:
        """Resume a paused sandbox: from memory (a hibernation's resume), or cold-booted
        from its files (a memory-less pause, autoPauseMemory false, or `memory: false`)."""
        sid = v.info.id
        sbx.stop_clock(engine, v)  # its old timeout must not fire while it wakes
        cold = v.door.get("cold_snapshot")
        if cold is None and (not memory or v.door.get("auto_pause_memory") is False):
            # hibernated with its memory (the engine's expiry): its files as they are now
            cold = (await engine.snapshot(sid, COLD + sid, memory=False)).id
        if cold is None:
            await engine.resume(sid, "e2b_connect")
            return
        await engine.restore(sid, cold)
        engine.set_door_state(sid, DOOR, cold_snapshot=None)
        engine.delete_snapshot(cold, force=True)

    async def pause_sandbox(v: sbx.View) -> None:
        sid = v.info.id
        left = max((v.end_at - sbx.utcnow()).total_seconds(), 0.0)
        engine.update(sid, touch=False, ttl=0)  # a paused sandbox does not time out
        # paused first: envd's streams of it are cut (as E2B's are), and their clients'
        # health checks see it gone; new envd requests get 502 meanwhile
        engine.set_door_state(sid, DOOR, paused=True)
        try:
            await envd.cut_streams(engine, sid)
            if v.info.state != "hibernated":
                await engine.hibernate(sid, "e2b_pause")
        except Conflict as e:
            engine.set_door_state(sid, DOOR, paused=None)
            sbx.set_timeout(engine, sid, left)
            raise E2BError(500, f"sandbox {sid} could not be paused: {e.message}") from None

    async def keep_paused(v: sbx.View) -> None:
        # a snapshot or fork wakes its source: an E2B-paused one goes back to sleep
        if v.state == "paused":
            await engine.hibernate(v.info.id, "e2b_pause")

    # --- snapshots and templates -----------------------------------------------------------
    @app.post("/sandboxes/{sid}/snapshots", dependencies=auth)
    async def snapshot(sid: str, request: Request):
        b = await read_body(request)
        name = b.get("name", str)
        memory = b.get("memory", bool, True)
        b.done()
        v = view_or_404(engine, sid)
        sbx.stop_clock(engine, v)
        snap = await engine.snapshot(sid, name, memory=memory)
        await keep_paused(v)
        return JSONResponse({"snapshotID": snap.id, "names": [snap.name] if snap.name else []},
                            status_code=201)

    @app.get("/snapshots", dependencies=auth)
    async def snapshots(sandboxID: str | None = None, name: str | None = None,
                        limit: int | None = None, nextToken: str | None = None):
        found = [s for s in engine.list_snapshots(sandboxID)
                 if (name is None or s.name == name)
                 and not (s.name or "").startswith(COLD)]  # a pause's own

        def key(s):
            return [wire.iso(s.created_at), s.id]

        found.sort(key=key, reverse=True)
        chunk, nxt = page(found, limit, nextToken, key, desc=True)
        return JSONResponse([{"snapshotID": s.id, "names": [s.name] if s.name else []}
                             for s in chunk], headers={"X-Next-Token": nxt} if nxt else {})

    @app.delete("/templates/{tid:path}", dependencies=auth)
    async def delete_template(tid: str):
        ref = resolve_template(tid)
        if ref.startswith("snap_"):
            # the sandboxes made from it keep what they stand on (the store counts them)
            engine.delete_snapshot(ref, force=True)
        else:
            engine.delete_template(ref)
        return Response(status_code=204)

    @app.get("/templates/aliases/{alias:path}", dependencies=auth)
    async def template_alias(alias: str):
        name = wire.template_of(alias)
        try:
            engine.template(name)
        except NotFound:
            if builtin(name) is None:
                raise NotFound(f"template alias {alias!r} not found") from None
        return {"templateID": alias, "public": True}

    # --- fork, network ---------------------------------------------------------------------
    @app.post("/sandboxes/{sid}/fork", dependencies=auth)
    async def fork(sid: str, request: Request):
        b = await read_body(request)
        timeout = wire.timeout_of(b, default=V2_TIMEOUT)
        count = b.get("count", int, 1)
        b.done()
        v = view_or_404(engine, sid)
        sbx.stop_clock(engine, v)
        forks = await engine.fork(sid, count)
        await keep_paused(v)
        src = v.door
        out = []
        for info in forks:
            door = engine.set_door_state(
                info.id, DOOR, **{k: src.get(k) for k in (
                    "auto_pause", "auto_pause_memory", "auto_resume", "template_id", "alias",
                    "envd_version", "network")},
                access_token=new_token() if src.get("access_token") else None,
                traffic_token=new_token() if src.get("traffic_token") else None)
            sbx.set_timeout(engine, info.id, timeout)
            out.append({"sandbox": wire.sandbox(info, door)})
        return JSONResponse(out, status_code=201)

    @app.put("/sandboxes/{sid}/network", dependencies=auth)
    async def update_network(sid: str, request: Request):
        b = await read_body(request)
        internet = b.get("allow_internet_access", bool)
        policy, e2b_net = wire.network_of(b, internet)
        v = view_or_404(engine, sid)
        e2b_net["allowPublicTraffic"] = (v.door.get("network") or {}).get(
            "allowPublicTraffic", True)
        engine.update_network(sid, policy)
        engine.set_door_state(sid, DOOR, network=e2b_net)
        return Response(status_code=204)


def metadata_query(raw: str | None) -> dict[str, str]:
    """E2B's metadata filter: `k=v&...` of %-quoted keys and values, sent as one query
    parameter (so quoted twice on the wire: one unquote is the framework's)."""
    if not raw:
        return {}
    return {urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(raw, keep_blank_values=True)}
