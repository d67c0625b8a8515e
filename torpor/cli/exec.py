"""`torpor exec ID -- CMD...`: run a command in a sandbox, its output streamed live."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from torpor.cli._common import conn, fail, pairs


def _write(stream):
    def write(data: str) -> None:
        stream.write(data)
        stream.flush()

    return write


def exec_command(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    command: Annotated[list[str], typer.Argument(
        metavar="CMD...", help="The command. One word or a quoted string runs in /bin/sh -c; "
                               "several words run as an argv.")],
    user: Annotated[str | None, typer.Option(help="user (default), root, or a uid.")] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory in the sandbox.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="K=V",
                                                  help="Environment variable; repeatable.")
                   ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the command is killed "
                                                "(0: no limit).")] = 60,
    stdin: Annotated[bool, typer.Option("--stdin", "-i",
                                        help="Send this terminal's stdin to the command.")
                     ] = False,
) -> None:
    """Run CMD in sandbox ID, streaming its stdout and stderr here, and exit with its exit
    code (124 if it timed out). Put options before ID, or the command after `--`."""
    from torpor.sdk import CommandTimeoutError, Sandbox

    if command[0] == "--":  # click keeps it once it stops parsing options at ID
        command = command[1:]
    if not command:
        fail("no command given: torpor exec ID -- CMD...")
    cmd: str | list[str] = command[0] if len(command) == 1 else command
    data = sys.stdin.read() if stdin else None
    sbx = Sandbox(sandbox_id, **conn())
    try:
        result = sbx.commands.run(cmd, on_stdout=_write(sys.stdout), on_stderr=_write(sys.stderr),
                                  user=user, cwd=cwd, env=pairs(env, "--env"), stdin=data,
                                  timeout=timeout or None)
    except CommandTimeoutError:
        fail(f"command timed out after {timeout:g}s and was killed; pass --timeout SECONDS "
             "(0: no limit)", code=124)
    finally:
        sbx.close()
    code = result.exit_code
    raise typer.Exit(code if 0 <= code <= 255 else 1)
