"""`torpor volume create | list | info | rm | cp | ls` and `torpor drive create | list |
info | rm | cp | ls | attach | detach`.

A volume is mounted into a sandbox at its start (`sandbox create --volume /data=NAME`); a
drive is attached to running sandboxes at /drives/NAME. `cp` moves files in and out
without a sandbox: `torpor volume cp LOCAL NAME:/path` and `cp NAME:/path LOCAL`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from torpor.cli._common import App, conn, err, fail, handle, out, print_json, size, when

if TYPE_CHECKING:
    from torpor.sdk import VolumeInfo

JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]
NAME = Annotated[str, typer.Argument(metavar="NAME", help="Its name.")]
COLUMNS = ("NAME", "SIZE", "USED", "ON DISK", "USERS", "CREATED")


def _table(items: list[VolumeInfo]) -> None:
    table = Table(box=None, header_style="bold")
    for col in COLUMNS:
        table.add_column(col, no_wrap=True)
    for i in items:
        users = ", ".join(f"{u.sandbox_id}:{u.path}{' (ro)' if u.read_only else ''}"
                          for u in i.users)
        table.add_row(i.name, f"{i.size_mb} MiB", size(i.used_bytes), size(i.disk_bytes),
                      users, when(i.created_at))
    out.print(table)


def _split(ref: str) -> tuple[str, str] | None:
    """NAME:/path -> (NAME, /path); None for a local path."""
    name, sep, path = ref.partition(":")
    if not sep or "/" in name or not name:
        return None
    return name, path or "/"


def _verbs(app: App, kind: str) -> None:
    def client():
        from torpor.sdk import Drive, Volume

        return Volume if kind == "volume" else Drive

    @app.command()
    def create(name: NAME,
               size_mb: Annotated[int, typer.Option("--size-mb", help="Its size in MiB: "
                                                    "a real limit.")] = 1024,
               json: JSON = False) -> None:
        """Make one, empty."""
        i = client().create(name, size_mb, **conn())
        if json:
            print_json(i.model_dump(mode="json"))
            return
        out.print(i.name)

    @app.command("list")
    def list_(json: JSON = False) -> None:
        """List them, by name, with who uses them."""
        items = client().list(**conn())
        if json:
            print_json([i.model_dump(mode="json") for i in items])
            return
        _table(items)

    @app.command()
    def info(name: NAME, json: JSON = False) -> None:
        """Its size, what is used, the sandboxes that use it."""
        i = client().get(name, **conn())
        if json:
            print_json(i.model_dump(mode="json"))
            return
        _table([i])

    @app.command()
    def rm(names: Annotated[list[str], typer.Argument(metavar="NAME...")]) -> None:
        """Delete them and their files (refused while a sandbox uses one)."""
        for name in names:
            client().delete(name, **conn())
            out.print(name)

    @app.command()
    def cp(src: Annotated[str, typer.Argument(help="LOCAL (- for stdin) or NAME:/path")],
           dst: Annotated[str, typer.Argument(help="NAME:/path, or LOCAL (- for stdout)")],
           ) -> None:
        """Copy a file into or out of it, without a sandbox."""
        s, d = _split(src), _split(dst)
        if (s is None) == (d is None):
            fail(f"one side is {kind} NAME:/path and the other a local file")
        if d is not None:
            data = sys.stdin.buffer.read() if src == "-" else Path(src).read_bytes()
            n = client().upload(d[0], d[1], data, **conn())
            err.print(f"{size(n)} -> {dst}")
        else:
            data = client().download(s[0], s[1], **conn())
            if dst == "-":
                sys.stdout.buffer.write(data)
            else:
                Path(dst).write_bytes(data)
                err.print(f"{src} -> {dst} ({size(len(data))})")

    @app.command()
    def ls(ref: Annotated[str, typer.Argument(metavar="NAME[:/path]")],
           json: JSON = False) -> None:
        """List a directory of it (links shown, not followed)."""
        name, _, path = ref.partition(":")
        items = client().files(name, path or "/", **conn())
        if json:
            print_json([i.model_dump(mode="json") for i in items])
            return
        for e in items:
            out.print(f"{e.type:7} {e.size:>12} {e.name}")


volumes = App(help="Volumes: storage of a fixed size that outlives sandboxes; one sandbox "
                   "writes it, or many read it (`sandbox create --volume /data=NAME`).")
drives = App(help="Drives: one tree shared read-write by many running sandboxes, at "
                  "/drives/NAME (`drive attach ID NAME`).")
_verbs(volumes, "volume")
_verbs(drives, "drive")


@drives.command()
def attach(sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
           name: Annotated[str, typer.Argument(metavar="NAME")],
           path: Annotated[str | None, typer.Option(
               help="Its name under /drives (default: the drive's).")] = None) -> None:
    """Attach a drive to a sandbox (running, in standby or hibernated)."""
    with handle(sandbox_id) as sbx:
        out.print(sbx.attach_drive(name, path))


@drives.command()
def detach(sandbox_id: Annotated[str, typer.Argument(metavar="ID")],
           name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Take a drive away from a sandbox."""
    with handle(sandbox_id) as sbx:
        sbx.detach_drive(name)
