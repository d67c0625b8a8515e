"""`torpor template list` and `torpor keys create | list | revoke`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from torpor.cli._common import App, conn, err, out, print_json, when

templates = App(help="Templates sandboxes start from.")
keys = App(help="API keys.")

JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@templates.command("list")
def list_templates(json: JSON = False) -> None:
    """List templates."""
    from torpor.sdk import Templates

    with Templates(**conn()) as client:
        items = client.list()
    if json:
        print_json([t.model_dump(mode="json") for t in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "CPU", "MEMORY", "DISK", "USER", "WORKDIR", "DESCRIPTION"):
        table.add_column(col, no_wrap=col != "DESCRIPTION")
    for t in items:
        table.add_row(t.name, f"{t.cpu:g}", f"{t.memory_mb}M", f"{t.disk_mb}M", t.user,
                      t.workdir, t.description)
    out.print(table)


@keys.command()
def create(name: Annotated[str, typer.Argument(help="What the key is for, e.g. ci.")]) -> None:
    """Create an API key and print it (the only time it is shown)."""
    from torpor.sdk import Keys

    with Keys(**conn()) as client:
        key = client.create(name)
    out.print(key.key, soft_wrap=True)
    err.print(f"key {key.id} ({key.name}): store it now, it is not shown again; use it as "
              "TORPOR_API_KEY")


@keys.command("list")
def list_keys(json: JSON = False) -> None:
    """List API keys (never the secrets)."""
    from torpor.sdk import Keys

    with Keys(**conn()) as client:
        items = client.list()
    if json:
        print_json([k.model_dump(mode="json") for k in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "REVOKED"):
        table.add_column(col, no_wrap=True)
    for k in items:
        table.add_row(k.id, k.name, k.prefix, when(k.created_at), when(k.last_used_at),
                      when(k.revoked_at) if k.revoked_at else "")
    out.print(table)


@keys.command()
def revoke(key_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke an API key; it is refused from then on."""
    from torpor.sdk import Keys

    with Keys(**conn()) as client:
        client.revoke(key_id)
    err.print(f"revoked {key_id}")
