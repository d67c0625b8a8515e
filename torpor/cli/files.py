"""`torpor files cp | ls`: copy files in and out of a sandbox (streamed), list them."""

from __future__ import annotations

import os
import re
import stat as st
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from torpor.cli._common import App, conn, err, fail, out, print_json, size, when

app = App(help="Copy files to and from sandboxes, and list them.")

REMOTE = re.compile(r"^(sbx_?[A-Za-z0-9]+):(.*)$", re.DOTALL)
PROGRESS_FROM = 8 << 20  # bytes: smaller copies finish before a bar helps


def parse_remote(arg: str) -> tuple[str, str] | None:
    """"sbxabc:/path" -> ("sbxabc", "/path"); a local path -> None. An empty remote path is
    the user's home."""
    m = REMOTE.match(arg)
    return (m.group(1), m.group(2) or ".") if m else None


@contextmanager
def progress_bar(total: int | None, label: str):
    """Yield an `advance(n)` callback; draws a bar on stderr for large copies to a terminal."""
    if total is None or total < PROGRESS_FROM or not err.is_terminal:
        yield None
        return
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def cp(
    src: Annotated[str, typer.Argument(help="Local path, or ID:PATH; - is stdin.")],
    dst: Annotated[str, typer.Argument(help="ID:PATH, or local path; - is stdout.")],
) -> None:
    """Copy one file into a sandbox (cp FILE ID:PATH) or out of one (cp ID:PATH FILE).
    A destination that is a directory (or ends in /) gets the source's name."""
    from torpor.sdk import Sandbox

    rsrc, rdst = parse_remote(src), parse_remote(dst)
    if (rsrc is None) == (rdst is None):
        fail("one of SRC and DST must be a sandbox path (sbx...:PATH), the other local")
    sid = (rsrc or rdst)[0]  # type: ignore[index]
    sbx = Sandbox(sid, **conn())
    try:
        if rdst is not None:
            _upload(sbx, src, rdst[1])
        else:
            _download(sbx, rsrc[1], dst)  # type: ignore[index]
    finally:
        sbx.close()


def _upload(sbx: Any, src: str, path: str) -> None:
    from torpor.sdk import NotFoundError

    if src == "-":
        sbx.files.write(path, sys.stdin.buffer)
        return
    if os.path.isdir(src):
        fail(f"{src} is a directory; cp copies single files (tar it first)")
    total = os.path.getsize(src)
    if path.endswith("/"):
        path += os.path.basename(src)
    else:
        try:
            if sbx.files.stat(path).is_dir:
                path = f"{path.rstrip('/')}/{os.path.basename(src)}"
        except NotFoundError:
            pass  # a new file
    with progress_bar(total, os.path.basename(src)) as advance:
        info = sbx.files.upload(src, path, on_progress=advance)
    err.print(f"{src} -> {sbx.id}:{info.path} ({size(info.size)})")


def _download(sbx: Any, path: str, dst: str) -> None:
    entry = sbx.files.stat(path)
    if entry.is_dir:
        fail(f"{sbx.id}:{entry.path} is a directory; cp copies single files")
    if dst == "-":
        with sbx.files.read(path, "stream") as stream:
            for chunk in stream:
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    target = Path(dst)
    if dst.endswith("/") or target.is_dir():
        target = target / entry.name
    with progress_bar(entry.size, entry.name) as advance:
        n = sbx.files.download(path, target, on_progress=advance)
    err.print(f"{sbx.id}:{entry.path} -> {target} ({size(n)})")


def _mode(e: Any) -> str:
    kind = {"dir": st.S_IFDIR, "symlink": st.S_IFLNK, "file": st.S_IFREG}.get(e.type, 0)
    return st.filemode(kind | e.mode)


@app.command()
def ls(
    target: Annotated[str, typer.Argument(metavar="ID[:PATH]",
                                          help="Sandbox and directory (default: home).")],
    depth: Annotated[int, typer.Option(help="Levels to descend.")] = 1,
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List a directory in a sandbox."""
    from torpor.sdk import Sandbox

    sid, path = parse_remote(target) or (target, ".")
    sbx = Sandbox(sid, **conn())
    try:
        entries = sbx.files.list(path, depth=depth)
    finally:
        sbx.close()
    if json:
        print_json([e.model_dump(mode="json") for e in entries])
        return
    table = Table(box=None, header_style="bold")
    for col, justify in (("MODE", "left"), ("OWNER", "left"), ("SIZE", "right"),
                         ("MODIFIED", "left"), ("NAME", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "NAME")
    for e in sorted(entries, key=lambda e: e.path):
        name = e.path if depth > 1 else e.name  # deeper entries need their directory
        if e.is_dir:
            name += "/"
        if e.target:
            name += f" -> {e.target}"
        table.add_row(_mode(e), e.owner, size(e.size) if not e.is_dir else "-", when(e.mtime),
                      name)
    out.print(table)
