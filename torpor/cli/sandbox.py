"""`torpor sandbox create | list | info | rm | update | standby | hibernate | resume |
events | usage`."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from json import dumps
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from torpor.cli._common import (
    App,
    conn,
    fail,
    handle,
    out,
    pairs,
    print_json,
    say_error,
    seconds,
    size,
    span,
    timer,
    when,
)

if TYPE_CHECKING:
    from torpor.sdk import SandboxInfo, Usage

app = App(help="Create, list, inspect, put to sleep, wake and delete sandboxes.")

KV = Annotated[list[str] | None, typer.Option(metavar="K=V", help="Repeatable.")]
JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ID = Annotated[str, typer.Argument(metavar="ID")]
IDS = Annotated[list[str], typer.Argument(metavar="ID...")]


class Egress(str, Enum):
    allow_all = "allow-all"
    deny_all = "deny-all"


class ExpireAction(str, Enum):
    delete = "delete"
    hibernate = "hibernate"


def _timer_option(help_: str) -> Any:
    return typer.Option(metavar="S", parser=seconds, help=help_, rich_help_panel="Timers")


StandbyAfter = Annotated[float | None, _timer_option("Idle time before standby.")]
HibernateAfter = Annotated[float | None, _timer_option(
    "Further time in standby before hibernation.")]
Ttl = Annotated[float | None, _timer_option("Lifetime from creation, then --expire-action.")]
IdleTtl = Annotated[float | None, _timer_option("Idle time, then --expire-action.")]
Expire = Annotated[ExpireAction | None, typer.Option(
    help="What expiry (--ttl, --idle-ttl) does [default: delete].", rich_help_panel="Timers")]


def _timers(standby_after: float | None, hibernate_after: float | None, ttl: float | None,
            idle_ttl: float | None, expire_action: ExpireAction | None) -> dict[str, Any]:
    return {"standby_after": standby_after, "hibernate_after": hibernate_after, "ttl": ttl,
            "idle_ttl": idle_ttl,
            "expire_action": expire_action.value if expire_action else None}



def _volumes(given: list[str] | None) -> dict | None:
    """--volume PATH=NAME[:ro] -> the create's volumes."""
    out_: dict = {}
    for path, name in (pairs(given, "--volume") or {}).items():
        name, _, ro = name.partition(":")
        if ro not in ("", "ro", "rw"):
            fail(f"--volume {path}={name}:{ro}: the mode is ro or rw")
        out_[path] = {"volume": name, "read_only": ro == "ro"}
    return out_ or None

@app.command()
def create(
    template: Annotated[str, typer.Option(help="Template to start from.")] = "base",
    env: KV = None,
    metadata: KV = None,
    cpu: Annotated[float | None, typer.Option(help="CPUs (default: the template's).")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory in MiB.")] = None,
    disk_mb: Annotated[int | None, typer.Option(help="Disk in MiB.")] = None,
    standby_after: StandbyAfter = None,
    hibernate_after: HibernateAfter = None,
    ttl: Ttl = None,
    idle_ttl: IdleTtl = None,
    expire_action: Expire = None,
    egress: Annotated[Egress | None, typer.Option(
        help="Egress default [default: the server's].", rich_help_panel="Network")] = None,
    allow: Annotated[list[str] | None, typer.Option(
        metavar="ENTRY", help="Allowed under deny-all: domain, *.domain, IP, CIDR, :port. "
                              "Repeatable.", rich_help_panel="Network")] = None,
    deny: Annotated[list[str] | None, typer.Option(
        metavar="ENTRY", help="Always denied. Repeatable.", rich_help_panel="Network")
    ] = None,
    secret: Annotated[list[str] | None, typer.Option(
        metavar="VAR=NAME", help="Grant a secret: VAR holds a placeholder the egress proxy "
                                 "swaps on the secret's hosts. Repeatable.",
        rich_help_panel="Network")] = None,
    volume: Annotated[list[str] | None, typer.Option(
        metavar="PATH=NAME[:ro]", help="Mount a volume at PATH from the start (read-only "
                                       "with :ro). Repeatable.")] = None,
) -> None:
    """Create a sandbox and print its id.

    Unset resources come from the template, unset timers from the server's defaults.
    Timers take seconds, or 90s, 5m, 2h, 1d, 1h30m; 0 or off turns one off."""
    from torpor.sdk import Sandbox

    network = {k: v for k, v in (("egress", egress.value if egress else None),
                                 ("allow", allow), ("deny", deny)) if v is not None} or None
    sbx = Sandbox.create(template, env=pairs(env, "--env"),
                         metadata=pairs(metadata, "--metadata"), cpu=cpu, memory_mb=memory_mb,
                         disk_mb=disk_mb, network=network, secrets=pairs(secret, "--secret"),
                         volumes=_volumes(volume),
                         **_timers(standby_after, hibernate_after, ttl, idle_ttl,
                                   expire_action),
                         **conn())
    sbx.close()
    out.print(sbx.id)


@app.command("list")
def list_(
    state: Annotated[str | None, typer.Option(help="Only sandboxes in this state "
                                                   "(deleted ones only with `deleted`).")
                     ] = None,
    metadata: KV = None,
    json: JSON = False,
) -> None:
    """List sandboxes."""
    from torpor.sdk import Sandbox

    infos = Sandbox.list(state=state, metadata=pairs(metadata, "--metadata"), **conn())
    if json:
        print_json([i.model_dump(mode="json") for i in infos])
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "TEMPLATE", "STATE", "CPU", "MEMORY", "DISK", "CREATED", "LAST ACTIVE",
                "METADATA"):
        table.add_column(col, no_wrap=col != "METADATA")
    for i in infos:
        meta = " ".join(f"{k}={v}" for k, v in i.metadata.items())
        table.add_row(i.id, i.template, i.state, f"{i.cpu:g}", f"{i.memory_mb}M",
                      f"{i.disk_mb}M", when(i.created_at), when(i.last_active_at), meta)
    out.print(table)


def _timer_rows(i: SandboxInfo) -> list[tuple[str, str]]:
    if i.standby_after is None:  # a server without standby
        return []
    return [("standby after", timer(i.standby_after)),
            ("hibernate after", timer(i.hibernate_after) if i.standby_after else
             f"{timer(i.hibernate_after)} (never: no standby)"),
            ("ttl", timer(i.ttl)), ("idle ttl", timer(i.idle_ttl)),
            ("expire action", (i.expire_action or "-") if i.ttl or i.idle_ttl
             else f"{i.expire_action} (no ttl set)")]


def _print_info(i: SandboxInfo) -> None:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("id", i.id), ("template", i.template), ("state", i.state),
            ("reason", i.reason or ""), ("created", when(i.created_at)),
            ("updated", when(i.updated_at)),
            ("last active", when(i.last_active_at) if i.last_active_at else ""),
            ("cpu", f"{i.cpu:g}"), ("memory", f"{i.memory_mb} MiB"),
            ("disk", f"{i.disk_mb} MiB")]
    rows += _timer_rows(i)
    rows += [(f"env {k}", v) for k, v in i.env.items()]
    rows += [(f"metadata {k}", v) for k, v in i.metadata.items()]
    if i.network:
        n = i.network
        rows.append(("egress", n.get("egress", "") + "".join(
            f" allow {a}" for a in n.get("allow") or []) + "".join(
            f" deny {d}" for d in n.get("deny") or [])))
    rows += [(f"secret {k}", v) for k, v in i.secrets.items()]
    rows += [(f"port {p}", "public" if v.get("public") else "private")
             for p, v in i.ports.items()]
    for k, v in rows:
        if v:
            table.add_row(k, v)
    out.print(table)


@app.command()
def info(sandbox_id: ID, json: JSON = False) -> None:
    """Show one sandbox, with its timers. Does not wake it."""

    with handle(sandbox_id) as sbx:
        i = sbx.info()
    if json:
        print_json(i.model_dump(mode="json"))
        return
    _print_info(i)


@app.command()
def update(
    sandbox_id: ID,
    standby_after: StandbyAfter = None,
    hibernate_after: HibernateAfter = None,
    ttl: Ttl = None,
    idle_ttl: IdleTtl = None,
    expire_action: Expire = None,
    json: JSON = False,
) -> None:
    """Change a sandbox's timers; those not given stay as they are.

    Timers take seconds, or 90s, 5m, 2h, 1d, 1h30m; 0 or off turns one off."""

    timers = _timers(standby_after, hibernate_after, ttl, idle_ttl, expire_action)
    if all(v is None for v in timers.values()):
        fail("nothing to change: give --standby-after, --hibernate-after, --ttl, --idle-ttl "
             "or --expire-action", code=2)
    with handle(sandbox_id) as sbx:
        i = sbx.update(**timers)
    if json:
        print_json(i.model_dump(mode="json"))
        return
    _print_info(i)


def _each(sandbox_ids: list[str], act: Callable[[Any], str]) -> None:
    """Run `act(sbx)` on each sandbox and print the line it returns; a failure is one error
    line and the next sandbox goes on; any failure makes the exit code 1."""
    from torpor.sdk import Sandbox, TorporError

    failed = 0
    for sid in sandbox_ids:
        sbx = Sandbox(sid, **conn())
        try:
            out.print(act(sbx))
        except TorporError as e:
            failed += 1
            say_error(str(e))
        finally:
            sbx.close()
    if failed:
        raise typer.Exit(1)


def _transition(sandbox_ids: list[str], verb: str) -> None:
    """Call `verb` (standby, hibernate, resume) on each sandbox; print id, state, time."""
    def act(sbx) -> str:
        t0 = time.monotonic()
        i = getattr(sbx, verb)()
        return f"{sbx.id} {i.state} ({span(time.monotonic() - t0)})"
    _each(sandbox_ids, act)


@app.command()
def standby(sandbox_ids: IDS) -> None:
    """Freeze sandboxes now: memory stays, CPU stops; any request wakes them at once."""
    _transition(sandbox_ids, "standby")


@app.command()
def hibernate(sandbox_ids: IDS) -> None:
    """Checkpoint sandboxes to disk and free their memory; any request restores them."""
    _transition(sandbox_ids, "hibernate")


@app.command()
def resume(sandbox_ids: IDS) -> None:
    """Wake sandboxes from standby or hibernation."""
    _transition(sandbox_ids, "resume")


def _detail(detail: dict[str, Any]) -> str:
    parts = []
    for k, v in detail.items():
        if k in ("duration_ms", "from"):  # shown in their own columns
            continue
        if k.endswith("_bytes") and isinstance(v, int | float):
            v = size(v)
        elif not isinstance(v, str | int | float):
            v = dumps(v, separators=(",", ":"))
        text = str(v)
        parts.append(f"{k}={text if len(text) <= 100 else text[:99] + '…'}")
    return " ".join(parts)


@app.command()
def events(sandbox_id: ID, json: JSON = False) -> None:
    """A sandbox's history: state changes with their reason and duration, timer changes,
    failed hibernations."""

    with handle(sandbox_id) as sbx:
        items = sbx.events()
    if json:
        print_json([e.model_dump(mode="json") for e in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("TIME", "KIND", "FROM -> TO", "REASON", "DURATION", "DETAIL"):
        table.add_column(col, no_wrap=col != "DETAIL",
                         justify="right" if col == "DURATION" else "left")
    for e in items:
        change = (f"{e.from_state or '-'} -> {e.to_state or '-'}"
                  if e.from_state or e.to_state else "")
        ms = e.duration_ms
        table.add_row(when(e.at), e.kind, change, e.reason or "",
                      "" if ms is None else span(ms / 1000), _detail(e.detail))
    out.print(table)


STATE_ORDER = ("creating", "running", "standby", "hibernated", "failed")


def _states(items: list[Usage]) -> list[str]:
    seen = {s for u in items for s in u.seconds_by_state}
    return [s for s in STATE_ORDER if s in seen] + sorted(seen - set(STATE_ORDER))


@app.command()
def usage(
    sandbox_id: Annotated[str | None, typer.Argument(
        metavar="ID", help="One sandbox; without it, all (filtered by --state and "
                             "--metadata).")] = None,
    state: Annotated[str | None, typer.Option(help="Only sandboxes in this state "
                                                   "(deleted ones only with `deleted`).")
                     ] = None,
    metadata: KV = None,
    json: JSON = False,
) -> None:
    """What sandboxes consumed: CPU seconds, memory GiB-seconds, time in each state,
    disk. Does not wake them."""
    from torpor.sdk import Sandbox

    if sandbox_id is not None:
        if state or metadata:
            fail("--state and --metadata select among all sandboxes; not with an ID", code=2)
        with handle(sandbox_id) as sbx:
            u = sbx.usage()
        if json:
            print_json(u.model_dump(mode="json"))
            return
        table = Table(box=None, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        rows = [("id", u.sandbox_id), ("state", u.state), ("cpu", f"{u.cpu_seconds:,.2f} s"),
                ("memory", f"{u.memory_gib_seconds:,.2f} GiB-s"), ("disk", size(u.disk_bytes))]
        rows += [(f"time {s}", span(u.seconds_by_state[s])) for s in _states([u])]
        rows += [(f"metadata {k}", v) for k, v in u.metadata.items()]
        for k, v in rows:
            table.add_row(k, v)
        out.print(table)
        return

    report = Sandbox.usage_all(state=state, metadata=pairs(metadata, "--metadata"), **conn())
    if json:
        print_json(report.model_dump(mode="json"))
        return
    states = _states(report.sandboxes)
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    for col in ("CPU S", "MEM GIB-S", "DISK", *(s.upper() for s in states)):
        table.add_column(col, no_wrap=True, justify="right")
    table.add_column("METADATA")
    for u in report.sandboxes:
        table.add_row(u.sandbox_id, u.state, f"{u.cpu_seconds:,.2f}",
                      f"{u.memory_gib_seconds:,.2f}", size(u.disk_bytes),
                      *(span(u.seconds_by_state[s]) if s in u.seconds_by_state else "-"
                        for s in states),
                      " ".join(f"{k}={v}" for k, v in u.metadata.items()))
    t = report.total
    table.add_section()
    table.add_row(f"total ({len(report.sandboxes)})", "", f"{t.cpu_seconds:,.2f}",
                  f"{t.memory_gib_seconds:,.2f}", size(t.disk_bytes),
                  *(span(sum(u.seconds_by_state.get(s, 0.0) for u in report.sandboxes))
                    for s in states), "", style="bold")
    out.print(table)


@app.command("rm")
def remove(sandbox_ids: IDS) -> None:
    """Delete sandboxes (and everything in them). Prints each id deleted."""
    def act(sbx) -> str:
        sbx.delete()
        return sbx.id
    _each(sandbox_ids, act)
