"""What E2B sees of a Torpor sandbox, and the E2B lifecycle over Torpor's.

E2B's state of a sandbox is `running` or `paused`. Torpor's own standby and hibernation of
an idle sandbox stay invisible (`running`: the next request wakes it); `paused` is a sandbox
E2B paused (`POST /sandboxes/{id}/pause`, or its timeout with autoPause), which Torpor keeps
hibernated and which envd traffic does not wake unless autoResume is set.

E2B's timeout is Torpor's `ttl` (counted from the sandbox's creation, so it is set as the
sandbox's age now plus the timeout) with `expire_action` delete, or hibernate with
autoPause. What E2B needs beyond the engine's record lives in the engine's door state
under "e2b" (keys in `KEYS`; the envd door reads them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from torpor.engine.types import SandboxInfo
from torpor.errors import NotFound

DOOR = "e2b"
ENVD_PORT = 49983
# the envd version a sandbox advertises: the SDKs switch features on by it
# (e2b/envd/versions.py; 0.6.4, watching network mounts, is the newest they test for)
ENVD_VERSION = "0.6.4"
DEFAULT_TIMEOUT = 300
# door-state keys (engine.door_state(sid, "e2b")): access_token, traffic_token, auto_pause,
# auto_pause_memory, auto_resume, paused, end_at (ISO), timeout (s, for a resume),
# template_id, alias, envd_version, network (E2B's form, for info), cold_snapshot (the
# filesystem-only snapshot of a memory-less pause, which its connect restores)
KEYS = ("access_token", "traffic_token", "auto_pause", "auto_pause_memory", "auto_resume",
        "paused", "end_at", "timeout", "template_id", "alias", "envd_version", "network",
        "cold_snapshot")
GONE = ("deleted", "failed", "creating")


@dataclass
class View:
    """A sandbox as E2B sees it: the engine's record, the door's state, E2B's state."""

    info: SandboxInfo
    door: dict
    state: str  # running | paused

    @property
    def end_at(self) -> datetime:
        return end_at(self.info, self.door)


def is_e2b(v: View) -> bool:
    """Whether the sandbox came through the E2B door (a create, fork or connect of it):
    only those answer envd and port traffic, which carries no API key."""
    return bool(v.door.get("envd_version"))


def utcnow() -> datetime:
    return datetime.now(UTC)


def end_at(info: SandboxInfo, door: dict) -> datetime:
    """When the sandbox's E2B timeout ends: the door's record of it, or the ttl a native
    create gave it; a sandbox without either has none (shown as far in the future)."""
    if door.get("end_at"):
        return datetime.fromisoformat(door["end_at"])
    created = _aware(info.created_at)
    if info.ttl:
        return created + timedelta(seconds=info.ttl)
    return created + timedelta(days=3650)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def is_paused(info: SandboxInfo, door: dict) -> bool:
    """Paused by E2B: by pause, or hibernated by its timeout with autoPause (the engine's
    expiry hibernates it; the door notices when it next looks)."""
    if door.get("paused"):
        return True
    return bool(door.get("auto_pause") and info.state == "hibernated"
                and door.get("end_at") and end_at(info, door) <= utcnow())


def view(engine, sid: str) -> View | None:
    """The sandbox as E2B sees it, or None if E2B would not find it (unknown, deleted,
    failed, still being created)."""
    try:
        info = engine.get(sid)
        door = engine.door_state(sid, DOOR)
    except NotFound:
        return None
    if info.state in GONE:
        return None
    paused = is_paused(info, door)
    if paused and not door.get("paused"):
        door = engine.set_door_state(sid, DOOR, paused=True)  # its autoPause timeout fired
    return View(info, door, "paused" if paused else "running")


def set_timeout(engine, sid: str, seconds: float, auto_pause: bool | None = None) -> datetime:
    """Make the sandbox's E2B timeout end `seconds` from now (0: now; it may shorten it):
    Torpor's ttl becomes its age plus `seconds`, and its expiry deletes it, or hibernates it
    with autoPause. Returns the new end."""
    info = engine.get(sid)
    door = engine.door_state(sid, DOOR)
    if auto_pause is None:  # (a sandbox made through Torpor's API: its own expire action)
        auto_pause = bool(door.get("auto_pause", info.expire_action == "hibernate"))
    now = utcnow()
    age = max((now - _aware(info.created_at)).total_seconds(), 0.0)
    # a ttl of 0 is "none" to the engine: an expiry due now is the age (plus a hair)
    ttl = age + max(float(seconds), 0.0) + (0.001 if seconds <= 0 else 0.0)
    end = now + timedelta(seconds=max(float(seconds), 0.0))
    engine.set_door_state(sid, DOOR, end_at=end.isoformat(), timeout=seconds)
    engine.update(sid, touch=False, ttl=ttl,
                  expire_action="hibernate" if auto_pause else "delete")
    return end


def extend_timeout(engine, v: View, seconds: float) -> datetime:
    """Connect's rule: the timeout ends `seconds` from now unless it ends later already."""
    if v.state == "running" and v.end_at >= utcnow() + timedelta(seconds=seconds):
        return v.end_at
    return set_timeout(engine, v.info.id, seconds)


def stop_clock(engine, v: View) -> None:
    """Before a paused sandbox wakes (a resume, or a snapshot or fork of it): its old
    timeout, which may have passed (Torpor hibernated it idle before it did), must not fire
    while it runs; `unpause` or the pause that follows sets what comes next."""
    if v.state == "paused" and v.info.ttl:
        engine.update(v.info.id, touch=False, ttl=0)


def unpause(engine, v: View, seconds: float | None = None) -> None:
    """A paused sandbox is E2B-running again (its resume itself is the engine's: the next
    request to it wakes it): it is no longer paused and its timeout starts anew."""
    engine.set_door_state(v.info.id, DOOR, paused=None)
    set_timeout(engine, v.info.id, seconds if seconds is not None
                else float(v.door.get("timeout") or DEFAULT_TIMEOUT))
