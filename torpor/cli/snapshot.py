"""`torpor snapshot create | list | info | rm`, and `torpor sandbox fork | restore`.

A snapshot keeps a live sandbox (memory and files, or files only with --no-memory); the
sandbox runs on. `torpor sandbox create --template SNAPSHOT_ID` starts a copy of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from torpor.cli import sandbox
from torpor.cli._common import App, conn, err, handle, out, print_json, size, when

if TYPE_CHECKING:
    from torpor.sdk import SnapshotInfo

app = App(help="Snapshots of live sandboxes (memory and files), which outlive them: create "
               "sandboxes from them (`sandbox create --template SNAPSHOT_ID`), roll a "
               "sandbox back (`sandbox restore`), or fork one (`sandbox fork`).")

SNAP = Annotated[str, typer.Argument(metavar="SNAPSHOT_ID", help="A snapshot's id, snap_...")]
ID = Annotated[str, typer.Argument(metavar="ID", help="A sandbox's id.")]
JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _row(i: SnapshotInfo) -> list[str]:
    return [i.id, i.name or "", i.sandbox_id, "yes" if i.memory else "no", size(i.bytes),
            "" if i.pause_ms is None else f"{i.pause_ms:.0f} ms", when(i.created_at)]


COLUMNS = ("ID", "NAME", "SANDBOX", "MEMORY", "DISK", "PAUSE", "CREATED")


def _table(items: list[SnapshotInfo]) -> None:
    table = Table(box=None, header_style="bold")
    for col in COLUMNS:
        table.add_column(col, no_wrap=True)
    for i in items:
        table.add_row(*_row(i))
    out.print(table)


@app.command()
def create(
    sandbox_id: ID,
    name: Annotated[str | None, typer.Option(help="A label for people.")] = None,
    memory: Annotated[bool, typer.Option(
        "--memory/--no-memory", help="Keep its processes and memory too, or its files "
                                     "only.")] = True,
    json: JSON = False,
) -> None:
    """Snapshot a sandbox; it runs on after a short pause."""
    with handle(sandbox_id) as sbx:
        i = sbx.snapshot(name=name, memory=memory)
    if json:
        print_json(i.model_dump(mode="json"))
        return
    out.print(i.id)
    err.print(f"snapshot of {sandbox_id}: {size(i.bytes)} on disk, paused "
              f"{i.pause_ms or 0:.0f} ms")


@app.command("list")
def list_(
    sandbox_id: Annotated[str | None, typer.Option(
        "--sandbox", metavar="ID", help="Only the snapshots of this sandbox.")] = None,
    json: JSON = False,
) -> None:
    """List snapshots, oldest first."""
    from torpor.sdk import Snapshot

    items = Snapshot.list(sandbox_id, **conn())
    if json:
        print_json([i.model_dump(mode="json") for i in items])
        return
    _table(items)


@app.command()
def info(snapshot_id: SNAP, json: JSON = False) -> None:
    """Show one snapshot."""
    from torpor.sdk import Snapshot

    i = Snapshot.get(snapshot_id, **conn())
    if json:
        print_json(i.model_dump(mode="json"))
        return
    _table([i])


@app.command("rm")
def rm(
    snapshot_ids: Annotated[list[str], typer.Argument(metavar="SNAPSHOT_ID...")],
    force: Annotated[bool, typer.Option(
        "--force", help="Delete even if sandboxes use it (its files stay until they are "
                        "gone).")] = False,
) -> None:
    """Delete snapshots (refused while sandboxes use them, unless --force)."""
    from torpor.sdk import Snapshot

    for sid in snapshot_ids:
        Snapshot.delete(sid, force, **conn())
        err.print(f"deleted snapshot {sid}")


@sandbox.app.command()
def fork(
    sandbox_id: ID,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=20,
                                       help="How many copies.")] = 1,
    json: JSON = False,
) -> None:
    """Start COUNT copies of a sandbox as it is now (memory and files); it runs on."""
    with handle(sandbox_id) as sbx:
        forks = sbx.fork(count)
    infos = []
    for f in forks:
        infos.append(f.info())
        f.close()
    if json:
        print_json([i.model_dump(mode="json") for i in infos])
        return
    for i in infos:
        out.print(i.id)


@sandbox.app.command()
def restore(sandbox_id: ID, snapshot_id: SNAP, json: JSON = False) -> None:
    """Roll a sandbox back to a snapshot: same id, processes and files as they were."""
    with handle(sandbox_id) as sbx:
        i = sbx.restore(snapshot_id)
    if json:
        print_json(i.model_dump(mode="json"))
        return
    err.print(f"restored {sandbox_id} to {snapshot_id}: {i.state}")
