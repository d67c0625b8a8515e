"""A sandbox's states and the transitions between them, written once.

Every state change goes through `check_transition` (the record layer calls it), so a
transition not in `TRANSITIONS` is a bug and raises `IllegalTransition`. An operation asked
for in a state that does not allow it answers one uniform 409 (`require`):
"cannot <action> a sandbox in state <state>".
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from torpor.errors import Conflict


class State(StrEnum):
    CREATING = "creating"  # its record exists; the driver is starting it
    RUNNING = "running"
    STANDBY = "standby"  # every task frozen, memory resident, no CPU
    HIBERNATED = "hibernated"  # checkpointed to disk: nothing of it runs or is mounted
    FAILED = "failed"  # stopped for a reason (the record's `reason`); its disk is kept
    DELETED = "deleted"  # gone; the record stays for its events and usage


# from -> the states it may change to
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.RUNNING, State.FAILED, State.DELETED}),
    State.RUNNING: frozenset({State.STANDBY, State.HIBERNATED, State.FAILED, State.DELETED}),
    State.STANDBY: frozenset({State.RUNNING, State.HIBERNATED, State.FAILED, State.DELETED}),
    State.HIBERNATED: frozenset({State.RUNNING, State.FAILED, State.DELETED}),
    State.FAILED: frozenset({State.DELETED}),
    State.DELETED: frozenset(),
}
LIVE = frozenset({State.RUNNING, State.STANDBY, State.HIBERNATED})  # what the API lists
PARKED = frozenset({State.STANDBY, State.HIBERNATED})  # a request wakes these
IN_MEMORY = frozenset({State.RUNNING, State.STANDBY})  # its processes exist (not on disk)


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the engine, never a user error."""


def check_transition(sid: str, old: str, new: str) -> None:
    if State(new) not in TRANSITIONS[State(old)]:
        raise IllegalTransition(f"sandbox {sid}: {old} -> {new} is not a legal transition")


def require(sid: str, state: str, action: str, allowed: Iterable[State],
            hint: str = "") -> None:
    """409 unless `state` is one of `allowed`: "cannot <action> a sandbox in state <state>"."""
    if state not in allowed:
        raise Conflict(f"cannot {action} a sandbox in state {state}"
                       + (f" ({hint})" if hint else ""),
                       sandbox_id=sid, state=str(state))
