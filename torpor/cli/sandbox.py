"""`torpor sandbox create | list | info | rm`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from torpor.cli._common import App, conn, out, pairs, print_json, say_error, when

app = App(help="Create, list, inspect and delete sandboxes.")

KV = Annotated[list[str] | None, typer.Option(metavar="K=V", help="Repeatable.")]


@app.command()
def create(
    template: Annotated[str, typer.Option(help="Template to start from.")] = "base",
    env: KV = None,
    metadata: KV = None,
    cpu: Annotated[float | None, typer.Option(help="CPUs (default: the template's).")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory in MiB.")] = None,
    disk_mb: Annotated[int | None, typer.Option(help="Disk in MiB.")] = None,
) -> None:
    """Create a sandbox and print its id."""
    from torpor.sdk import Sandbox

    sbx = Sandbox.create(template, env=pairs(env, "--env"),
                         metadata=pairs(metadata, "--metadata"), cpu=cpu, memory_mb=memory_mb,
                         disk_mb=disk_mb, **conn())
    sbx.close()
    out.print(sbx.id)


@app.command("list")
def list_(
    state: Annotated[str | None, typer.Option(help="Only sandboxes in this state "
                                                   "(deleted ones only with `deleted`).")
                     ] = None,
    metadata: KV = None,
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List sandboxes."""
    from torpor.sdk import Sandbox

    infos = Sandbox.list(state=state, metadata=pairs(metadata, "--metadata"), **conn())
    if json:
        print_json([i.model_dump(mode="json") for i in infos])
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "TEMPLATE", "STATE", "CPU", "MEMORY", "DISK", "CREATED", "METADATA"):
        table.add_column(col, no_wrap=col != "METADATA")
    for i in infos:
        meta = " ".join(f"{k}={v}" for k, v in i.metadata.items())
        table.add_row(i.id, i.template, i.state, f"{i.cpu:g}", f"{i.memory_mb}M",
                      f"{i.disk_mb}M", when(i.created_at), meta)
    out.print(table)


@app.command()
def info(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one sandbox."""
    from torpor.sdk import Sandbox

    sbx = Sandbox(sandbox_id, **conn())
    try:
        i = sbx.info()
    finally:
        sbx.close()
    if json:
        print_json(i.model_dump(mode="json"))
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("id", i.id), ("template", i.template), ("state", i.state),
            ("reason", i.reason or ""), ("created", when(i.created_at)),
            ("updated", when(i.updated_at)), ("cpu", f"{i.cpu:g}"),
            ("memory", f"{i.memory_mb} MiB"), ("disk", f"{i.disk_mb} MiB")]
    rows += [(f"env {k}", v) for k, v in i.env.items()]
    rows += [(f"metadata {k}", v) for k, v in i.metadata.items()]
    for k, v in rows:
        if v:
            table.add_row(k, v)
    out.print(table)


@app.command("rm")
def remove(sandbox_ids: Annotated[list[str], typer.Argument(metavar="ID...")]) -> None:
    """Delete sandboxes (and everything in them). Prints each id deleted."""
    from torpor.sdk import Sandbox, TorporError

    failed = 0
    for sid in sandbox_ids:
        sbx = Sandbox(sid, **conn())
        try:
            sbx.delete()
            out.print(sid)
        except TorporError as e:
            failed += 1
            say_error(str(e))
        finally:
            sbx.close()
    if failed:
        raise typer.Exit(1)
