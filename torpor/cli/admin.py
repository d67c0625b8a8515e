"""`torpor keys create | list | revoke` (templates: template.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from torpor.cli._common import App, conn, err, fail, out, print_json, when
from torpor.config import default_data_dir

if TYPE_CHECKING:
    from torpor.engine.keys import KeyStore

keys = App(help="API keys.")

JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]


DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="The server's data directory, for --offline [default: $TORPOR_DATA "
                       "or /var/lib/torpor].")]
Offline = Annotated[bool, typer.Option(
    "--offline", help="Read and write the data directory's database directly, not through "
                      "the server: on the server's host, as its user; works whether the "
                      "server runs or not.")]


@contextmanager
def _offline_keys(data_dir: Path | None) -> Iterator[tuple[KeyStore, Path]]:
    """The KeyStore the server uses, over the data directory's SQLite file."""
    try:
        from sqlalchemy.exc import SQLAlchemyError

        from torpor.engine.keys import KeyStore
        from torpor.store.db import open_db
    except ImportError as e:
        fail(f"offline key management needs the server's packages ({e}): "
             "pip install 'torpor[server]', or run it on the server's host")

    db_path = _db_path(data_dir)
    try:
        db_path.stat()
    except PermissionError:
        fail(f"cannot read {db_path}: run this as the server's user (root)")
    except FileNotFoundError:
        fail(f"no Torpor database at {db_path}: point --data-dir (or TORPOR_DATA) at the "
             "server's data directory")
    try:
        db, sessions = open_db(db_path)
    except SQLAlchemyError as e:
        fail(f"cannot open {db_path} ({e.orig or e}); run this as the server's user (root)")
    try:
        yield KeyStore(sessions), db_path
    finally:
        db.dispose()


def _db_path(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()) / "torpor.db"


def _scope(admin: bool, scope: str | None) -> str:
    if admin and scope not in (None, "admin"):
        raise typer.BadParameter(f"--admin contradicts --scope {scope}", param_hint="--scope")
    if scope not in (None, "user", "admin"):
        raise typer.BadParameter(f"{scope!r} is not user or admin",
                                 param_hint="--scope")
    return "admin" if admin else scope or "user"


@keys.command()
def create(name: Annotated[str, typer.Argument(help="What the key is for, e.g. ci.")],
           admin: Annotated[bool, typer.Option("--admin", help="Same as --scope admin.")
                            ] = False,
           scope: Annotated[str | None, typer.Option(
               help="user (sandboxes, files, commands, network) or admin (that, plus keys "
                    "and secrets) [default: user].")] = None,
           e2b: Annotated[bool, typer.Option(
               "--e2b", help="In E2B's form (e2b_ and 40 hex digits), for E2B's SDKs as "
                             "E2B_API_KEY; it works as any Torpor key too.")] = False,
           offline: Offline = False, data_dir: DataDir = None) -> None:
    """Create an API key and print it (the only time it is shown). Needs an admin key, or
    --offline on the server's host; with no server reachable, it goes offline by itself."""
    from torpor.sdk import Keys
    from torpor.sdk.errors import ServerUnavailableError

    scope = _scope(admin, scope)
    if not offline:
        try:
            with Keys(**conn()) as client:
                key = client.create(name, scope, e2b=e2b)
            _created(key.id, key.name, scope, key.key, where="", e2b=e2b)
            return
        except ServerUnavailableError as e:
            db_path = _db_path(data_dir)
            if e.code != "connect" or not db_path.exists():
                raise
            err.print(f"{e}\nwriting the key into {db_path} directly instead")
    with _offline_keys(data_dir) as (store, db_path):
        row, secret = store.create(name, admin=scope == "admin", e2b=e2b)
    _created(row.id, row.name, scope, secret, where=f" in {db_path}", e2b=e2b)


def _created(key_id: str, name: str, scope: str, secret: str | None, where: str,
             e2b: bool = False) -> None:
    out.print(secret, soft_wrap=True)
    err.print(f"{scope} key {key_id} ({name}){where}: store it now, it is not shown again; "
              "use it as " + ("E2B_API_KEY (or TORPOR_API_KEY)" if e2b else "TORPOR_API_KEY"))


@keys.command("list")
def list_keys(json: JSON = False, offline: Offline = False, data_dir: DataDir = None) -> None:
    """List API keys (never the secrets). Needs an admin key, or --offline."""
    from torpor.sdk import Keys
    from torpor.sdk.models import ApiKey

    if offline:
        with _offline_keys(data_dir) as (store, _):
            items = [ApiKey.model_validate(r, from_attributes=True) for r in store.list()]
    else:
        with Keys(**conn()) as client:
            items = client.list()
    if json:
        print_json([k.model_dump(mode="json") for k in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "SCOPE", "PREFIX", "CREATED", "LAST USED", "REVOKED"):
        table.add_column(col, no_wrap=True)
    for k in items:
        table.add_row(k.id, k.name, k.scope, k.prefix, when(k.created_at),
                      when(k.last_used_at), when(k.revoked_at) if k.revoked_at else "")
    out.print(table)


@keys.command()
def revoke(key_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke an API key; it is refused from then on. Needs an admin key; the last valid
    admin key cannot be revoked."""
    from torpor.sdk import Keys

    with Keys(**conn()) as client:
        client.revoke(key_id)
    err.print(f"revoked {key_id}")
