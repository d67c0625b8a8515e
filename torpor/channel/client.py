"""`AgentClient`: the agent's operations as typed methods over one `Channel`.

One method per op of `Op` (torpor/agent/protocol.py), with the keyword arguments the
agent takes.
Request/response methods return the agent's answer (a dict or a list) and wait `wait`
seconds for it (None: for ever), then abandon the stream and raise `TimeoutError`; the
streaming ones return the channel's `Stream` at once. Failures stay the channel's
(`AgentError`, `ChannelClosed`, `TimeoutError`): turning them into engine errors, with the
sandbox's id, is the engine's job (`torpor/engine/processes.py`, `files.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from torpor.agent import protocol as P
from torpor.channel import Channel, Stream

CALL_WAIT = 60.0  # seconds a request/response op may take, unless the caller says


class AgentClient:
    def __init__(self, channel: Channel):
        self.channel = channel

    async def _call(self, op: str, wait: float | None, **args: Any) -> Any:
        # as Channel.call, but with the deadline apart from the op's arguments: `exec`
        # takes a `timeout` of its own
        st = self.channel.open(op, **args)
        try:
            return await asyncio.wait_for(st.finish(), wait)
        except TimeoutError:
            st.abandon()
            raise

    # --- the agent itself ---------------------------------------------------------------
    async def ping(self, *, wait: float | None = CALL_WAIT) -> dict:
        """{pid} of the agent: it answers operations (unlike Channel.ping, a frame only)."""
        return await self._call(P.Op.PING, wait)

    async def configure(self, env: dict | None = None, *,
                        wait: float | None = CALL_WAIT) -> dict:
        """Set the environment every command starts from (None keeps it); {env,
        egress_errors}."""
        return await self._call(P.Op.CONFIGURE, wait, env=env)

    async def hibernate_check(self, *, wait: float | None = CALL_WAIT) -> dict:
        """{problems}: what would make a checkpoint fail now."""
        return await self._call(P.Op.HIBERNATE_CHECK, wait)

    async def resumed(self, warm_up: bool = False, *,
                      wait: float | None = CALL_WAIT) -> dict:
        """Tell the agent a restore just happened; with warm_up, it runs a process right
        after answering (it is busy meanwhile: make this the last call of a start)."""
        if warm_up:
            return await self._call(P.Op.RESUMED, wait, warm_up=True)
        return await self._call(P.Op.RESUMED, wait)

    async def oom_kill(self, *, wait: float | None = CALL_WAIT) -> dict:
        """Kill the session using the most memory; {killed, ...} (killed None: nothing)."""
        return await self._call(P.Op.OOM_KILL, wait)

    async def pids_kill(self, *, wait: float | None = CALL_WAIT) -> dict:
        """Kill the session with the most processes; {killed, ...}."""
        return await self._call(P.Op.PIDS_KILL, wait)

    # --- processes ----------------------------------------------------------------------
    def exec(self, argv: list[str], env: dict | None = None, cwd: str | None = None,
             user: str | int = "user", stdin: bool = False, timeout: float | None = None,
             tag: str | None = None) -> Stream:
        """Start a command and follow it: MSG start {pid}, OUT/ERR its output, MSG
        truncated {lost}, then its info as the result. With `stdin`, the stream's IN bytes
        (`Stream.send`, `send_eof`) are its stdin. `timeout` is the command's: the agent
        kills it after that many seconds."""
        return self.channel.open(P.Op.EXEC, argv=argv, env=env, cwd=cwd, user=user,
                                 stdin=stdin, timeout=timeout, tag=tag)

    async def exec_background(self, argv: list[str], env: dict | None = None,
                              cwd: str | None = None, user: str | int = "user",
                              stdin: bool = True, tag: str | None = None, *,
                              wait: float | None = CALL_WAIT) -> dict:
        """Start a command that runs on its own; its info once started. With `stdin` it
        keeps a stdin pipe for `proc_stdin`. It runs until it exits or is signalled."""
        return await self._call(P.Op.EXEC, wait, argv=argv, env=env, cwd=cwd, user=user,
                                tag=tag, background=True, stdin=stdin)

    async def proc_list(self, *, wait: float | None = CALL_WAIT) -> list[dict]:
        return await self._call(P.Op.PROC_LIST, wait)

    async def proc_info(self, pid: int, *, wait: float | None = CALL_WAIT) -> dict:
        """The process's info; AgentError "no_such_process" if the agent has no such pid."""
        return await self._call(P.Op.PROC_INFO, wait, pid=pid)

    def proc_follow(self, pid: int, offset: int | None = None, follow: bool = True) -> Stream:
        """The process's output from `offset` (None: what the agent still keeps), as
        `exec` gives it; with `follow`, on until it exits, else what there is now."""
        return self.channel.open(P.Op.PROC_FOLLOW, pid=pid, offset=offset, follow=follow)

    async def proc_stdin(self, pid: int, data: str, eof: bool = False, *,
                         wait: float | None = CALL_WAIT) -> dict:
        """Write text to the process's stdin; `eof` closes it after. {pid}."""
        return await self._call(P.Op.PROC_STDIN, wait, pid=pid, data=data, eof=eof)

    async def proc_signal(self, pid: int, signal: str = "SIGTERM", *,
                          wait: float | None = CALL_WAIT) -> dict:
        return await self._call(P.Op.PROC_SIGNAL, wait, pid=pid, signal=signal)

    async def proc_wait(self, pid: int, timeout: float | None = CALL_WAIT) -> dict:
        """The process's info once it has exited; TimeoutError after `timeout` seconds."""
        return await self._call(P.Op.PROC_WAIT, timeout, pid=pid)

    # --- terminals: processes on a pty (the proc_* methods work on them too) -----------
    async def pty_create(self, cols: int, rows: int, cmd: list[str] | None = None,
                         env: dict | None = None, cwd: str | None = None,
                         user: str | int = "user", tag: str | None = None, *,
                         wait: float | None = CALL_WAIT) -> dict:
        """Start `cmd` (None: the user's login shell) on a new terminal; its info, with
        pty {cols, rows}. It runs until it exits or is signalled."""
        return await self._call(P.Op.PTY_CREATE, wait, cols=cols, rows=rows, cmd=cmd,
                                env=env, cwd=cwd, user=user, tag=tag)

    def pty_attach(self, pid: int, offset: int | None = None, replay: int = 65536) -> Stream:
        """The terminal's output from `offset` (None: its last `replay` bytes) and on,
        live: MSG attached {offset}, OUT bytes; the stream's IN bytes are keystrokes. The
        result is its info once it exited; abandoning the stream leaves it running."""
        return self.channel.open(P.Op.PTY_ATTACH, pid=pid, offset=offset, replay=replay)

    async def pty_resize(self, pid: int, cols: int, rows: int, *,
                         wait: float | None = CALL_WAIT) -> dict:
        return await self._call(P.Op.PTY_RESIZE, wait, pid=pid, cols=cols, rows=rows)

    # --- files: paths resolve inside the sandbox, relative ones from the user's home ----
    async def fs_stat(self, path: str, user: str | int = "user", *,
                      wait: float | None = CALL_WAIT) -> dict:
        return await self._call(P.Op.FS_STAT, wait, path=path, user=user)

    async def fs_exists(self, path: str, user: str | int = "user", *,
                        wait: float | None = CALL_WAIT) -> dict:
        return await self._call(P.Op.FS_EXISTS, wait, path=path, user=user)

    async def fs_list(self, path: str, depth: int = 1, user: str | int = "user", *,
                      wait: float | None = CALL_WAIT) -> list[dict]:
        return await self._call(P.Op.FS_LIST, wait, path=path, depth=depth, user=user)

    async def fs_mkdir(self, path: str, parents: bool = True, user: str | int = "user", *,
                       wait: float | None = CALL_WAIT) -> dict:
        return await self._call(P.Op.FS_MKDIR, wait, path=path, parents=parents, user=user)

    async def fs_rename(self, src: str, dst: str, overwrite: bool = False,
                        user: str | int = "user", *,
                        wait: float | None = CALL_WAIT) -> dict:
        return await self._call(P.Op.FS_RENAME, wait, src=src, dst=dst, overwrite=overwrite,
                                user=user)

    async def fs_remove(self, path: str, recursive: bool = False, user: str | int = "user",
                        *, wait: float | None = CALL_WAIT) -> dict:
        return await self._call(P.Op.FS_REMOVE, wait, path=path, recursive=recursive,
                                user=user)

    def fs_read(self, path: str, user: str | int = "user") -> Stream:
        """MSG size {size} first (or the error as the stream's result), then OUT bytes."""
        return self.channel.open(P.Op.FS_READ, path=path, user=user)

    def fs_write(self, path: str, user: str | int = "user", mode: int | None = None,
                 in_place: bool = False) -> Stream:
        """Send the contents as IN bytes, then EOF; the result is {path, size}. The file
        appears whole at the end (written aside, then renamed), parents are created;
        `in_place`: truncated and written where it is (a watcher sees it as a program's)."""
        if in_place:
            return self.channel.open(P.Op.FS_WRITE, path=path, user=user, mode=mode,
                                     in_place=True)
        return self.channel.open(P.Op.FS_WRITE, path=path, user=user, mode=mode)

    def watch(self, path: str, recursive: bool = True, user: str | int = "user") -> Stream:
        """Changes under directory `path`: MSG {watching, dirs} once the watch is in place,
        then MSG {events: [{type, path, old_path?, dir}]}; until abandoned, or the
        directory goes (a `gone` event, then the result)."""
        return self.channel.open(P.Op.WATCH, path=path, recursive=recursive, user=user)

    # --- network ------------------------------------------------------------------------
    def connect(self, port: int) -> Stream:
        """A TCP connection to 127.0.0.1:`port` inside the sandbox: MSG connected, then the
        socket's bytes both ways (EOF frames are half-closes)."""
        return self.channel.open(P.Op.CONNECT, port=port)
