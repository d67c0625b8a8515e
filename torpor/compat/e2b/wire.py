"""E2B's control-plane JSON: reading request bodies (field by field, so a wrong or
unsupported field is a 400 naming it) and writing E2B's shapes of a sandbox.

Field names and types are E2B's (`e2b/api/client/models` of the SDKs, 2.45.1 and the
newest): `templateID`, `envVars`, `autoPause`, `allow_internet_access` (sic), ...
"""

from __future__ import annotations

import re
from datetime import datetime

from torpor.compat.e2b import sandboxes as sbx
from torpor.errors import Invalid

CLIENT_ID = "torpor"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ALL_TRAFFIC = "0.0.0.0/0"  # E2B's ALL_TRAFFIC selector
# E2B's template names that are Torpor's built-ins under another name
TEMPLATES = {"code-interpreter-v1": "code-interpreter", "code-interpreter": "code-interpreter"}


class Body:
    """A JSON object from a request, read field by field: `get` checks a field's type,
    `done` refuses what was not read (a field Torpor does not support yet), so nothing is
    ignored silently."""

    def __init__(self, data, where: str = "body"):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise Invalid(f"the {where} must be a JSON object", field=where)
        self.data = dict(data)
        self.where = where

    def get(self, name: str, kind, default=None, field: str | None = None):
        value = self.data.pop(name, None)
        if value is None:
            return default
        ok = isinstance(value, kind) and not (isinstance(value, bool)
                                             and bool not in _tuple(kind))
        if not ok:
            names = {str: "a string", int: "an integer", bool: "true or false",
                     dict: "an object", list: "a list", float: "a number"}
            want = " or ".join(names.get(k, k.__name__) for k in _tuple(kind))
            raise Invalid(f"{field or name} must be {want}", field=field or name)
        return value

    def unsupported(self, name: str, allowed=(None,), why: str = "") -> None:
        """Refuse `name` unless it is absent or one of `allowed` (the values that change
        nothing on Torpor)."""
        if name not in self.data:
            return
        value = self.data.pop(name)
        if value in allowed or (isinstance(value, dict | list) and not value
                                and None in allowed):
            return
        raise Invalid(f"{name} is not supported by Torpor yet" + (f": {why}" if why else ""),
                      field=name)

    def done(self) -> None:
        if self.data:
            name = min(self.data)
            raise Invalid(f"{name} is not a field Torpor knows in this request (known to "
                          "E2B's API, perhaps, but not supported here yet)", field=name)


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def timeout_of(body: Body, name: str = "timeout", default: int | None = None) -> int | None:
    t = body.get(name, int, default)
    if t is not None and t < 0:
        raise Invalid(f"{name} must be >= 0 seconds", field=name)
    return t


def str_map(value: dict | None, field: str, names: bool = False) -> dict[str, str]:
    out = {}
    for k, v in (value or {}).items():
        if not isinstance(v, str):
            raise Invalid(f"{field}.{k} must be a string", field=f"{field}.{k}")
        if names and not ENV_NAME.match(k):
            raise Invalid(f"{field}: {k!r} is not an environment variable name",
                          field=f"{field}.{k}")
        out[k] = v
    return out


def template_of(template_id: str) -> str:
    """The Torpor template (or snapshot id) an E2B templateID names."""
    return TEMPLATES.get(template_id, template_id)


# --- network: E2B's allowOut / denyOut over Torpor's egress policy --------------------------
def network_of(body: Body | None, internet: bool | None) -> tuple[dict, dict]:
    """(Torpor's egress policy, E2B's network as stored for info) from a create's
    `network` object (or a network update's fields) and `allow_internet_access`.

    E2B allows what allowOut names even where denyOut would deny it; Torpor's deny entries
    always win. So: denyOut with ALL_TRAFFIC (or no internet access) is Torpor's deny-all with
    allowOut as its exceptions (E2B's other deny entries deny nothing more); otherwise
    allow-all with denyOut as its deny entries, and allowOut alongside them is refused (an
    exception to a partial deny cannot be said on Torpor)."""
    allow_out = deny_out = None
    public = True
    if body is not None:
        allow_out = body.get("allowOut", list, field="network.allowOut")
        deny_out = body.get("denyOut", list, field="network.denyOut")
        public = body.get("allowPublicTraffic", bool, True, field="network.allowPublicTraffic")
        for name in ("rules", "egressProxy", "maskRequestHost", "dnsServers"):
            body.unsupported(name, why="Torpor's egress policy has allow and deny entries "
                                       "(hosts, *.domains, IPs, CIDRs) only")
        body.done()
    allow_out = [str(x) for x in allow_out or []]
    deny_out = [str(x) for x in deny_out or []]
    deny_all = internet is False or ALL_TRAFFIC in deny_out
    if deny_all:
        policy = {"egress": "deny-all", "allow": allow_out, "deny": []}
    else:
        if allow_out and deny_out:
            raise Invalid("network.allowOut together with a denyOut that does not deny all "
                          f"traffic ({ALL_TRAFFIC}) is not supported by Torpor: its deny "
                          "entries always win over its allow entries", field="network.allowOut")
        policy = {"egress": "allow-all", "allow": [], "deny": deny_out}
    e2b = {"allowOut": allow_out, "denyOut": deny_out, "allowPublicTraffic": public}
    if internet is not None:
        e2b["allowInternetAccess"] = internet
    return policy, e2b


# --- E2B's shapes of a sandbox ---------------------------------------------------------------
def iso(t: datetime) -> str:
    return sbx._aware(t).isoformat().replace("+00:00", "Z")


def sandbox(info, door: dict) -> dict:
    """`Sandbox` (create, connect, fork): what the SDK needs to reach the sandbox."""
    out = {"templateID": door.get("template_id") or info.template, "sandboxID": info.id,
           "clientID": CLIENT_ID, "envdVersion": door.get("envd_version") or sbx.ENVD_VERSION}
    if door.get("alias"):
        out["alias"] = door["alias"]
    if door.get("access_token"):
        out["envdAccessToken"] = door["access_token"]
    if door.get("traffic_token"):
        out["trafficAccessToken"] = door["traffic_token"]
    return out


def listed(v: sbx.View) -> dict:
    """`ListedSandbox` (list)."""
    info, door = v.info, v.door
    out = {"templateID": door.get("template_id") or info.template, "sandboxID": info.id,
           "clientID": CLIENT_ID, "startedAt": iso(info.created_at), "endAt": iso(v.end_at),
           "cpuCount": max(1, round(info.cpu)), "memoryMB": info.memory_mb,
           "diskSizeMB": info.disk_mb, "state": v.state,
           "envdVersion": door.get("envd_version") or sbx.ENVD_VERSION,
           "metadata": dict(info.metadata)}
    out["alias"] = door.get("alias") or info.template
    return out


def detail(v: sbx.View) -> dict:
    """`SandboxDetail` (info)."""
    out = listed(v)
    door = v.door
    if door.get("access_token"):
        out["envdAccessToken"] = door["access_token"]
    net = door.get("network")
    if net is None:  # a sandbox made through Torpor's own API: its policy in E2B's words
        pol = v.info.network or {}
        deny_all = pol.get("egress") == "deny-all"
        net = {"allowOut": list(pol.get("allow") or []),
               "denyOut": [ALL_TRAFFIC] if deny_all else list(pol.get("deny") or []),
               "allowPublicTraffic": True}
    net = dict(net)
    internet = net.pop("allowInternetAccess", None)
    if internet is not None:
        out["allowInternetAccess"] = internet
    out["network"] = net
    pause = door.get("auto_pause", v.info.expire_action == "hibernate")
    out["lifecycle"] = {"autoResume": bool(door.get("auto_resume")),
                        "onTimeout": "pause" if pause else "kill"}
    return out
