"""`torpor`: the command line. Each verb is a few lines over one SDK call (or, for
`serve`, over `torpor.server.run`); see docs/cli.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from torpor.cli import _common, admin, files, sandbox
from torpor.cli._common import App, fail
from torpor.cli.exec import exec_command

app = App(help="Torpor: perpetual sandboxes for AI agents.")
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(files.app, name="files")
app.add_typer(admin.templates, name="template")
app.add_typer(admin.keys, name="keys")
# options after the sandbox id belong to the command: `torpor exec ID ls -la`
app.command("exec", context_settings={"allow_interspersed_args": False})(exec_command)


@app.callback()
def root(
    url: Annotated[str | None, typer.Option(envvar="TORPOR_URL", show_envvar=True,
                                            help="Server URL [default: "
                                                 "http://127.0.0.1:7070].")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TORPOR_API_KEY", show_envvar=False,
                                                help="API key [env var: TORPOR_API_KEY; "
                                                     "default: $TORPOR_DATA/api-key].")
                       ] = None,
) -> None:
    """Torpor: perpetual sandboxes for AI agents."""
    _common.CONNECTION.update(url=url, api_key=api_key)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on "
                                                  "[default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: 7070].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="State directory [default: "
                                                       "$TORPOR_DATA or /var/lib/torpor].")
                        ] = None,
    pool_size: Annotated[int | None, typer.Option(help="Sandboxes kept booted per template "
                                                       "[default: 2].")] = None,
) -> None:
    """Run the Torpor server (needs root and gVisor's runsc)."""
    from torpor import errors
    from torpor.config import Settings

    given = {"host": host, "port": port, "data_dir": data_dir, "pool_size": pool_size}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    try:
        from torpor.server import run
    except ImportError as e:
        fail(f"the server cannot start in this installation ({e})")
    try:
        run(settings)
    except errors.TorporError as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"{e.strerror}: {e.filename}; run as root, or pass --data-dir to a directory "
             "you own")


if __name__ == "__main__":
    app()
