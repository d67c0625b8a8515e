"""`torpor secret create | list | info | update | delete`.

A value is read from stdin (a hidden prompt on a terminal) or from an environment
variable, never from the command line: other users of the host can read a process's
arguments in /proc.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from torpor.cli._common import App, conn, err, fail, out, print_json, when

if TYPE_CHECKING:
    from torpor.sdk import SecretInfo

app = App(help="Secrets for credential brokering: sandboxes see a placeholder, the egress "
               "proxy sends the value to the secret's allowed hosts only. Values are "
               "write-only: nothing shows them again.")

NAME = Annotated[str, typer.Argument(metavar="NAME", help="The secret's name, e.g. openai.")]
JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]
VALUE_STDIN = Annotated[bool, typer.Option(
    "--value-stdin", help="Read the value from stdin (one trailing newline is dropped); on a "
                          "terminal, prompt for it without echo.")]
VALUE_ENV = Annotated[str | None, typer.Option(
    "--value-env", metavar="VAR", help="Read the value from environment variable VAR. There "
                                       "is no option taking the value itself: other users "
                                       "of the host can read command lines in /proc.")]


def _read_value(value_env: str | None) -> str:
    if value_env is not None:
        value = os.environ.get(value_env)
        if value is None:
            fail(f"environment variable {value_env} is not set", code=2)
        return value
    if sys.stdin.isatty():
        return typer.prompt("Value", hide_input=True, err=True)
    value = sys.stdin.read()
    # `echo "$X" | torpor secret create` adds one newline, which a value may not hold
    if value.endswith("\r\n"):
        return value[:-2]
    return value.removesuffix("\n")


def _print(i: SecretInfo) -> None:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in (("name", i.name), ("allowed hosts", " ".join(i.allowed_hosts)),
                 ("inject body", "yes" if i.inject_body else "no"),
                 ("created", when(i.created_at)), ("updated", when(i.updated_at))):
        table.add_row(k, v)
    out.print(table)


@app.command()
def create(
    name: NAME,
    host: Annotated[list[str], typer.Option(
        "--host", metavar="HOST", help="A host the value may be sent to: api.openai.com, "
                                       "*.example.com, host:port. Repeatable.")],
    inject_body: Annotated[bool, typer.Option(
        "--inject-body", help="Also replace the placeholder in request bodies, not only in "
                              "headers.")] = False,
    value_stdin: VALUE_STDIN = False,
    value_env: VALUE_ENV = None,
    json: JSON = False,
) -> None:
    """Store a new secret. The value comes from stdin (default) or --value-env, never
    from an argument: other users of the host can read command lines in /proc."""
    from torpor.sdk import Secret

    if value_stdin and value_env is not None:
        fail("give --value-stdin or --value-env, not both", code=2)
    i = Secret.create(name, _read_value(value_env), host, inject_body, **conn())
    if json:
        print_json(i.model_dump(mode="json"))
        return
    err.print(f"created secret {i.name} for {', '.join(i.allowed_hosts)}")


@app.command("list")
def list_(json: JSON = False) -> None:
    """List secrets (never their values)."""
    from torpor.sdk import Secret

    items = Secret.list(**conn())
    if json:
        print_json([i.model_dump(mode="json") for i in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "ALLOWED HOSTS", "INJECT BODY", "CREATED", "UPDATED"):
        table.add_column(col, no_wrap=col != "ALLOWED HOSTS")
    for i in items:
        table.add_row(i.name, " ".join(i.allowed_hosts), "yes" if i.inject_body else "no",
                      when(i.created_at), when(i.updated_at))
    out.print(table)


@app.command()
def info(name: NAME, json: JSON = False) -> None:
    """Show one secret's hosts and times (never its value)."""
    from torpor.sdk import Secret

    i = Secret.get(name, **conn())
    if json:
        print_json(i.model_dump(mode="json"))
        return
    _print(i)


@app.command()
def update(
    name: NAME,
    host: Annotated[list[str] | None, typer.Option(
        "--host", metavar="HOST", help="Replace the allowed hosts with these. "
                                       "Repeatable.")] = None,
    inject_body: Annotated[bool | None, typer.Option(
        "--inject-body/--no-inject-body", help="Replace the placeholder in request bodies "
                                               "too, or only in headers.")] = None,
    value_stdin: VALUE_STDIN = False,
    value_env: VALUE_ENV = None,
    json: JSON = False,
) -> None:
    """Rotate a secret's value (--value-stdin or --value-env) and/or change its hosts or
    --inject-body; what is not given stays."""
    from torpor.sdk import Secret

    if value_stdin and value_env is not None:
        fail("give --value-stdin or --value-env, not both", code=2)
    value = _read_value(value_env) if value_stdin or value_env is not None else None
    if value is None and not host and inject_body is None:
        fail("nothing to change: give --value-stdin, --value-env, --host or "
             "--inject-body/--no-inject-body", code=2)
    i = Secret.update(name, value=value, allowed_hosts=host or None, inject_body=inject_body,
                      **conn())
    if json:
        print_json(i.model_dump(mode="json"))
        return
    _print(i)


@app.command()
def delete(name: NAME) -> None:
    """Delete a secret."""
    from torpor.sdk import Secret

    Secret.delete(name, **conn())
    err.print(f"deleted secret {name}")
