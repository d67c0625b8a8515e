"""`torpor shell ID`: an interactive terminal in a sandbox, in this terminal.

This terminal goes into raw mode (every key, Ctrl-C included, goes to the sandbox as a
byte), the sandbox's terminal follows this window's size (SIGWINCH), and the command exits
with the shell's exit code. The terminal's settings come back however it ends. If the
connection drops, the shell runs on in the sandbox: `torpor shell ID --attach PID`
brings back its recent screen and goes on.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Annotated

import typer

from torpor.cli._common import conn, fail, pairs


def _size() -> tuple[int, int]:
    for fd in (1, 0, 2):
        try:
            s = os.get_terminal_size(fd)
            return max(s.columns, 1), max(s.lines, 1)
        except OSError:
            continue
    return 80, 24


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(1, view)
        except BlockingIOError:
            select.select([], [1], [])
            continue
        view = view[n:]


def shell_command(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    command: Annotated[list[str] | None, typer.Argument(
        metavar="[CMD...]", help="A program to run instead of the login shell (one word or "
                                 "a quoted string runs in /bin/sh -c).")] = None,
    attach: Annotated[int | None, typer.Option(
        metavar="PID", help="Reattach to a terminal that runs already (its recent screen "
                            "first).")] = None,
    user: Annotated[str | None, typer.Option(help="user (default), root, or a uid.")] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory in the sandbox.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="K=V",
                                                  help="Environment variable; repeatable.")
                   ] = None,
) -> None:
    """Open an interactive shell in sandbox ID (your login shell there, or CMD) and exit
    with its exit code. Keys go to the sandbox as typed, Ctrl-C included."""
    import termios
    import tty

    from torpor.sdk import Sandbox

    if command and command[0] == "--":
        command = command[1:]
    cmd: str | list[str] | None = None
    if command:
        cmd = command[0] if len(command) == 1 else command
    cols, rows = _size()
    sbx = Sandbox(sandbox_id, **conn())
    try:
        if attach is not None:
            if cmd is not None:
                fail("give CMD or --attach PID, not both")
            term = sbx.pty.connect(attach, on_data=_write_all)
            if (cols, rows) != (term.info().pty.cols, term.info().pty.rows):
                term.resize(cols, rows)
        else:
            term = sbx.pty.create(cols, rows, on_data=_write_all, cmd=cmd, user=user,
                                  cwd=cwd, env=pairs(env, "--env"))
        code = _interact(term, termios, tty)
    finally:
        sbx.close()
    if code is None:
        fail(f"the connection to the sandbox was lost; the shell runs on there: torpor shell "
             f"{sandbox_id} --attach {term.pid}")
    raise typer.Exit(code if 0 <= code <= 255 else 1)


def _interact(term, termios, tty) -> int | None:
    """Copy this terminal's keys to the sandbox's until it exits; its exit code (None: the
    connection dropped while it ran)."""
    stdin = 0
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: None)
    reading = True
    try:
        if is_tty:
            tty.setraw(stdin)
        while term.connected:
            fds = [wake_r] + ([stdin] if reading else [])
            ready, _, _ = select.select(fds, [], [], 0.2)
            if wake_r in ready and signal.SIGWINCH in os.read(wake_r, 64):
                try:
                    term.resize(*_size())
                except Exception:  # noqa: BLE001, S110 - it may have just exited
                    pass
            if stdin in ready:
                data = os.read(stdin, 65536)
                if not data:  # stdin closed (not a terminal): the program goes on alone
                    reading = False
                    continue
                try:
                    term.send_input(data)
                except Exception:  # noqa: BLE001, S110 - it exited: the loop sees it
                    pass
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSAFLUSH, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    info = term.info()
    term.disconnect()
    if info.running:
        return None
    return info.exit_code
