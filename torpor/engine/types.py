"""What the engine's process and file surface hands to every front door: a command's
events, as types, and the one place where the agent channel's failures become engine
errors (`torpor/errors.py`), so no door ever sees the channel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from torpor.channel import AgentError, ChannelClosed
from torpor.errors import Timeout, TorporError, Unavailable, from_agent


@dataclass(frozen=True)
class Started:
    """The command runs (first event of `Processes.run`)."""

    pid: int


@dataclass(frozen=True)
class Output:
    """Output of the command, decoded as UTF-8 (bad bytes replaced), in order."""

    stream: Literal["stdout", "stderr"]
    data: str


@dataclass(frozen=True)
class Truncated:
    """The agent dropped `lost` bytes of output before they were read (its buffer is
    bounded; a follow from an old offset starts past what it no longer has)."""

    lost: int


@dataclass(frozen=True)
class Exited:
    """The command ended (last event): `signal` names the signal that killed it, if one
    did; `timed_out` if the agent killed it for its timeout."""

    exit_code: int | None
    signal: str | None
    timed_out: bool
    pid: int


@dataclass(frozen=True)
class Failed:
    """The operation failed instead of ending (last event): the sandbox stopped, the
    command could not start, ..."""

    error: TorporError


Event = Started | Output | Truncated | Exited | Failed


@contextmanager
def agent_errors(sid: str, op: str | None) -> Iterator[None]:
    """Turn the channel's failures inside the block into engine errors naming the sandbox
    and the operation (`op`, the agent's word; None while a stream opens)."""
    try:
        yield
    except AgentError as e:
        raise from_agent(sid, e) from None
    except ChannelClosed:
        during = f" during {op}" if op else ""
        raise Unavailable(f"sandbox {sid}: the sandbox stopped{during}",
                          sandbox_id=sid) from None
    except TimeoutError:
        raise Timeout(f"sandbox {sid}: the agent did not answer {op or 'a request'} in time; "
                      "the sandbox may be overloaded: try again, or look at its events",
                      sandbox_id=sid) from None
