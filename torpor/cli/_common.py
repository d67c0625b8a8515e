"""What every CLI verb shares: the app class that turns errors into one line, the
connection options, K=V parsing, and output helpers."""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
if not out.is_terminal:
    out.width = 240  # piped tables: keep every column rather than fold them into 80


# set by the root callback from --url / --api-key (or TORPOR_URL / TORPOR_API_KEY)
CONNECTION: dict[str, str | None] = {"url": None, "api_key": None}


def conn() -> dict[str, Any]:
    """Keyword arguments for SDK clients."""
    return dict(CONNECTION)


def say_error(message: str) -> None:
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    say_error(message)
    raise typer.Exit(code)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a verb; a Torpor error, a local file error or Ctrl-C becomes one line on stderr
    and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from torpor.sdk.errors import TorporError

        try:
            return fn(*args, **kwargs)
        except TorporError as e:
            fail(str(e))
        except OSError as e:  # local files: missing, unreadable, disk full
            fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return run


class App(typer.Typer):
    """typer.Typer whose commands report errors as one line (see `_friendly`)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("rich_markup_mode", "markdown")
        kwargs.setdefault("pretty_exceptions_show_locals", False)  # locals may hold keys
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(_friendly(fn))
            return fn

        return decorator


def pairs(items: list[str] | None, what: str) -> dict[str, str] | None:
    """["K=V", ...] -> {"K": "V"}; None when no items were given."""
    if not items:
        return None
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        result[key] = value
    return result


def when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """A timer option's value: seconds ("90", "1.5"), or with units ("90s", "5m", "2h",
    "1d", "1h30m"); "0" or "off" turns the timer off."""
    t = text.strip().lower().replace(" ", "")
    if t in ("off", "never"):
        return 0.0
    try:
        value = float(t)
    except ValueError:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise typer.BadParameter(f"{text!r} is not a duration: give seconds (90), or "
                                     "90s, 5m, 2h, 1d, 1h30m; 0 or off turns it off") from None
        value = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"{text!r}: a duration is 0 (off) or more seconds")
    return value


def span(s: float | None) -> str:
    """Seconds for people: 0.84s, 42s, 12m30s, 3h05m, 2d04h."""
    if s is None:
        return "-"
    if s < 9.995:
        return f"{s:.2f}s".replace(".00s", "s")
    if s < 59.5:
        return f"{s:.0f}s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def timer(s: float | None) -> str:
    """A timer's setting: "off" when 0 or unset."""
    return span(s) if s else "off"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def handle(sandbox_id: str) -> Iterator[Any]:
    """A Sandbox handle for one command, closed (not deleted, unlike `with Sandbox...`)."""
    from torpor.sdk import Sandbox

    sbx = Sandbox(sandbox_id, **conn())
    try:
        yield sbx
    finally:
        sbx.close()

