"""Signal names and numbers, as `signal.Signals` spells them, without importing `signal`.

`signal` builds its Signals enum at import, which pulls in enum, functools and collections:
milliseconds of the agent's start inside gVisor for two lookup tables. The names are the
ones Signals uses (for a number with aliases, the alphabetically first: SIGABRT not SIGIOT,
SIGCHLD not SIGCLD, SIGIO not SIGPOLL), so what crosses the wire does not change.
"""

from __future__ import annotations

try:
    import _signal as _sig
except ImportError:  # pragma: no cover
    import signal as _sig

_BY_NAME: dict[str, int] = {}
for _name in dir(_sig):
    if _name.startswith("SIG") and not _name.startswith("SIG_"):
        _value = getattr(_sig, _name)
        if isinstance(_value, int):
            _BY_NAME[_name] = int(_value)
_BY_NUMBER: dict[int, str] = {}
for _name, _value in sorted(_BY_NAME.items(), key=lambda kv: (kv[1], kv[0])):
    _BY_NUMBER.setdefault(_value, _name)

SIGKILL = _BY_NAME["SIGKILL"]
SIGCHLD = _BY_NAME["SIGCHLD"]
SIGPIPE = _BY_NAME["SIGPIPE"]
SIGHUP = _BY_NAME["SIGHUP"]
SIGSTOP = _BY_NAME["SIGSTOP"]
SIGCONT = _BY_NAME["SIGCONT"]


def number(sig) -> int | None:
    """The number of a signal given by name ("SIGTERM") or number (15, "15"); None if this
    system has no such signal."""
    if isinstance(sig, str) and not sig.isdigit():
        return _BY_NAME.get(sig)
    try:
        n = int(sig)
    except (TypeError, ValueError):
        return None
    return n if n in _BY_NUMBER else None


def name(signum: int) -> str:
    """The name of a signal number; "SIG<n>" for one without a name (real-time signals)."""
    return _BY_NUMBER.get(signum) or f"SIG{signum}"
