"""Terminals: processes on a pseudo-terminal, for interactive shells and full-screen programs.

Imported on the first terminal operation, never at the agent's start (each module costs
the start milliseconds under gVisor). Named `ptys`, not `pty`: the agent's directory is
first on its path, and a `pty` here would hide the standard library's for any code that
imports it.

A terminal is a `procs.Proc` whose output is the pty master: the same bounded log with byte
offsets, the same followers, signals, waits and process listing as any command, so a client
that went away reattaches from an offset (or to the last REPLAY bytes: the recent screen)
and goes on live. Its input is the master too (a dup of it, so the log's reader and the
writer close independently). The program starts in a session of its own with the pty as
its controlling terminal, so Ctrl-C (byte 0x03) interrupts its foreground job and a resize
sends SIGWINCH, as in any terminal.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

import procs
import users
from procs import OpError, Proc

REPLAY = 64 * 1024  # bytes of recent output a reattach without an offset replays
MAX_SIZE = 4096  # columns or rows: more is a mistake, not a screen
try:
    import _signal as _sig
except ImportError:  # pragma: no cover
    import signal as _sig


def _check_size(cols, rows) -> tuple[int, int]:
    for name, v in (("cols", cols), ("rows", rows)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise OpError("bad_request", f"{name} must be a whole number")
        if not 1 <= v <= MAX_SIZE:
            raise OpError("bad_request",
                          f"{name} must be between 1 and {MAX_SIZE} (got {v}): a terminal "
                          "of 0 columns or rows cannot show anything")
    return cols, rows


def _winsize(cols: int, rows: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


class PtyProc(Proc):
    def __init__(self, table, pid: int, argv, tag, master: int, cols: int, rows: int):
        self.cols = cols
        self.rows = rows
        writer = os.dup(master)
        os.set_blocking(writer, False)  # shared with the master: its reads are polled anyway
        super().__init__(table, pid, argv, tag, writer, master, None, None)

    def resize(self, cols, rows) -> None:
        cols, rows = _check_size(cols, rows)
        fd = self.stdin_fd
        if fd is None or self.exited.is_set():
            raise OpError("not_running", f"terminal {self.pid} has exited")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, _winsize(cols, rows))
        self.cols, self.rows = cols, rows

    async def write_stdin(self, data: bytes) -> None:
        try:
            await super().write_stdin(data)
        except OSError as e:  # EIO: nobody holds the terminal's other side any more
            raise OpError("stdin_closed", f"terminal {self.pid} is closed ({e})") from None

    async def pump_input(self, st) -> None:
        """The stream's IN bytes are keystrokes. Its EOF ends this client's input, not the
        terminal's (another client may attach later)."""
        try:
            async for chunk in st.read_in():
                await self.write_stdin(chunk)
        except Exception:  # noqa: BLE001, S110 - the attach's result reports the state
            pass

    def info(self) -> dict:
        d = super().info()
        d["pty"] = {"cols": self.cols, "rows": self.rows}
        return d


def _login_shell(acc: users.Account) -> list[str]:
    for sh in (acc.shell, "/bin/bash", "/bin/sh"):
        if sh and os.access(sh, os.X_OK):
            return [sh, "-l"]
    raise OpError("not_found", "no shell in the sandbox (tried the user's, /bin/bash, "
                  "/bin/sh): give a command")


def start(table: procs.ProcessTable, cols, rows, cmd=None, env=None, cwd=None,
          user="user", tag=None) -> PtyProc:
    cols, rows = _check_size(cols, rows)
    if env is None:
        env = {}
    if not isinstance(env, dict):
        raise OpError("bad_request", "env must be an object of strings")
    for k, v in env.items():
        procs._check_text("env name", k)
        procs._check_text(f"env {k}", v)
        if not k or "=" in k:
            raise OpError("bad_request", f"env name {k!r} must be non-empty, without '='")
    if cwd is not None:
        procs._check_text("cwd", cwd)
    if isinstance(user, str):
        procs._check_text("user", user)
    acc = users.lookup(user)
    if cmd is not None:
        if not isinstance(cmd, list) or not cmd:
            raise OpError("bad_request", "cmd must be a non-empty list of strings")
        for a in cmd:
            procs._check_text("cmd", a)
        argv = list(cmd)
    else:
        argv = _login_shell(acc)
    full_env = {
        "PATH": procs.DEFAULT_PATH, "HOME": acc.home, "USER": acc.name, "LOGNAME": acc.name,
        "SHELL": acc.shell or "/bin/sh", "LANG": "C.UTF-8", "TERM": "xterm-256color",
        **table.compat_env,
    }
    full_env.update(table.agent.base_env)
    full_env.update({str(k): str(v) for k, v in env.items()})
    cwd = cwd or acc.home
    if not os.path.isdir(cwd):
        raise OpError("bad_cwd", f"working directory {cwd!r} does not exist in the sandbox")
    if "/" in argv[0]:
        paths = [argv[0]]
    else:
        paths = list(procs.pathsearch.candidates(argv[0],
                                                 full_env.get("PATH", procs.DEFAULT_PATH)))
        if not paths:
            raise OpError("not_found", f"command {argv[0]!r} not found in PATH")
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(cols, rows))
        try:  # the user's own terminal, as login(1) leaves it
            os.fchown(slave, acc.uid, -1)
            os.fchmod(slave, 0o620)
        except OSError:
            pass
        pid = _spawn(table, paths, argv, full_env, acc, cwd, slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    proc = PtyProc(table, pid, argv, tag, master, cols, rows)
    table.procs[pid] = proc
    return proc


def _spawn(table, paths, argv, env, acc: users.Account, cwd: str, slave: int) -> int:
    """fork, then in the child: a new session, the pty as its controlling terminal and its
    stdio, the user's ids, exec. (posix_spawn cannot make a controlling terminal.) A failed
    exec comes back through a close-on-exec pipe, as subprocess does it."""
    err_r, err_w = os.pipe()
    resets = (procs._DEFAULT_SIGNALS + procs._HANDLED_SIGNALS
              + procs.miniloop.get_loop().handled_signals())
    envb = [f"{k}={v}" for k, v in env.items()]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, until exec
        try:
            _sig.set_wakeup_fd(-1)
            for s in resets:
                _sig.signal(s, _sig.SIG_DFL)
            _sig.pthread_sigmask(_sig.SIG_SETMASK, [])
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            os.chdir(cwd)
            if acc.uid != 0 or acc.gid != 0:
                os.setgroups(acc.groups)
                os.setresgid(acc.gid, acc.gid, acc.gid)
                os.setresuid(acc.uid, acc.uid, acc.uid)
            envd = dict(e.split("=", 1) for e in envb)
            last = None
            for path in paths:
                try:
                    os.execve(path, argv, envd)
                except OSError as e:
                    last = e
            raise last or OSError("no candidate")
        except BaseException as e:  # noqa: BLE001 - the parent reports it
            try:
                os.write(err_w, f"{type(e).__name__}:{getattr(e, 'errno', 0) or 0}:{e}"
                         .encode(errors="replace")[:1000])
            finally:
                os._exit(127)
    os.close(err_w)
    try:
        report = b""
        while True:
            chunk = os.read(err_r, 1024)
            if not chunk:
                break
            report += chunk
    finally:
        os.close(err_r)
    if report:
        try:  # the child is gone: collect it before the SIGCHLD handler looks
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        kind, _, rest = report.decode(errors="replace").partition(":")
        _errno, _, message = rest.partition(":")
        if kind in ("FileNotFoundError", "NotADirectoryError"):
            raise OpError("not_found", f"command {argv[0]!r} not found ({message})")
        if kind == "PermissionError":
            raise OpError("permission_denied", f"cannot run {argv[0]!r}: {message}")
        raise OpError("spawn_failed", f"cannot start {argv[0]!r} on a terminal: {kind}: "
                      f"{message}")
    return pid


def get(table: procs.ProcessTable, pid) -> PtyProc:
    proc = table.get(pid)
    if not isinstance(proc, PtyProc):
        raise OpError("not_a_terminal", f"process {pid} is not a terminal (it has no pty)")
    return proc


# --- operations (agent.HANDLERS reaches these through a lazy import) --------------------------
async def op_pty_create(agent, st, cols, rows, cmd=None, env=None, cwd=None, user="user",
                        tag=None):
    return start(agent.procs, cols, rows, cmd, env, cwd, user, tag).info()


async def op_pty_attach(agent, st, pid, offset=None, replay=REPLAY):
    proc = get(agent.procs, pid)
    if offset is None:
        if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
            raise OpError("bad_request", "replay must be a number of bytes, 0 or more")
        offset = max(proc.log_start, proc.log_end - replay)
    elif isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise OpError("bad_request", "offset must be a byte offset, 0 or more")
    elif not proc.log_start <= offset <= proc.log_end:
        raise OpError("bad_request", f"offset {offset} is not kept: terminal {proc.pid} "
                      f"has bytes {proc.log_start} to {proc.log_end} of its output",
                      field="offset", available=[proc.log_start, proc.log_end])
    await st.msg({"event": "attached", "offset": offset, "pid": proc.pid,
                  "pty": {"cols": proc.cols, "rows": proc.rows}})
    agent.loop.create_task(proc.pump_input(st))
    try:
        await proc.follow(st, offset=offset, blocking=True)
    finally:
        st.inbox.put_nowait(None)  # ends pump_input
    return proc.info()


async def op_pty_resize(agent, st, pid, cols, rows):
    proc = get(agent.procs, pid)
    proc.resize(cols, rows)
    return {"pid": proc.pid, "cols": proc.cols, "rows": proc.rows}


HANDLERS = {
    "pty_create": op_pty_create,
    "pty_attach": op_pty_attach,
    "pty_resize": op_pty_resize,
}
