"""Processes started by the agent: spawn, output log, followers, stdin, signals, reaping.

Each process's stdout and stderr go into one bounded log of records. A foreground command's
follower applies back-pressure (the agent stops reading the pipes while the host has not
taken the output), so a command that floods output blocks instead of filling memory. With
no blocking follower the log keeps the newest LOG_LIMIT bytes and counts what it dropped.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal as _signal
import time
from collections import deque

import protocol as P
from protocol import OpError

LOG_LIMIT = 4 << 20  # bytes of output kept per process
READ_SIZE = 64 * 1024
KEEP_EXITED = 200  # exited processes remembered for status queries
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _user(name_or_uid) -> pwd.struct_passwd:
    try:
        if isinstance(name_or_uid, int) or str(name_or_uid).isdigit():
            return pwd.getpwuid(int(name_or_uid))
        return pwd.getpwnam(str(name_or_uid))
    except KeyError:
        raise OpError("unknown_user", f"no user {name_or_uid!r} in this sandbox") from None


def _groups(pw: pwd.struct_passwd) -> list[int]:
    try:
        return os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError:
        return [pw.pw_gid]


class Proc:
    def __init__(self, table: "ProcessTable", pid: int, argv, tag, stdin_fd, out_fd, err_fd,
                 timeout):
        self.table = table
        self.pid = pid
        self.argv = argv
        self.tag = tag
        self.started_at = time.time()
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.timed_out = False
        self.exited = asyncio.Event()
        self.stdin_fd = stdin_fd
        self.log: deque = deque()  # (offset, kind, bytes)
        self.log_start = 0  # offset of the first byte still in the log
        self.log_end = 0  # offset after the last byte
        self.changed = asyncio.Event()
        self.blocking: set = set()  # followers that hold back reading: {Follower}
        self.open_pipes = 0
        self.reading_paused = False
        self._fds: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        for fd, kind in ((out_fd, P.OUT), (err_fd, P.ERR)):
            os.set_blocking(fd, False)
            self._fds[fd] = kind
            self.open_pipes += 1
            loop.add_reader(fd, self._on_readable, fd)
        self.pipes_done = asyncio.Event()
        self._timer = loop.call_later(timeout, self._on_timeout) if timeout else None

    # --- output ---------------------------------------------------------------------------
    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)
            os.close(fd)
            del self._fds[fd]
            self.open_pipes -= 1
            if self.open_pipes == 0:
                self.pipes_done.set()
            self._notify()
            return
        self.log.append((self.log_end, self._fds[fd], data))
        self.log_end += len(data)
        self._trim()
        self._notify()
        self._apply_backpressure()

    def _trim(self) -> None:
        floor = min((f.pos for f in self.blocking), default=self.log_end)
        while self.log and self.log_end - self.log_start > LOG_LIMIT:
            off, _, data = self.log[0]
            if off + len(data) > floor:
                break
            self.log.popleft()
            self.log_start = off + len(data)

    def _apply_backpressure(self) -> None:
        floor = min((f.pos for f in self.blocking), default=self.log_end)
        should_pause = self.log_end - floor >= LOG_LIMIT
        if should_pause == self.reading_paused:
            return
        loop = asyncio.get_running_loop()
        for fd in self._fds:
            if should_pause:
                loop.remove_reader(fd)
            else:
                loop.add_reader(fd, self._on_readable, fd)
        self.reading_paused = should_pause

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def chunks_from(self, pos: int):
        """Records at or after pos: (offset, kind, bytes), the first one cut to start at pos."""
        for off, kind, data in self.log:
            end = off + len(data)
            if end <= pos:
                continue
            if off < pos:
                yield pos, kind, data[pos - off:]
            else:
                yield off, kind, data

    async def follow(self, st, offset: int | None, blocking: bool, live: bool = True) -> None:
        f = Follower(offset if offset is not None else self.log_start)
        if f.pos < self.log_start:
            await st.msg({"event": "truncated", "lost": self.log_start - f.pos})
            f.pos = self.log_start
        if blocking:
            self.blocking.add(f)
        try:
            while not st.closed:
                changed = self.changed
                for off, kind, data in list(self.chunks_from(f.pos)):
                    await st.send(kind, data)
                    f.pos = off + len(data)
                    if blocking:
                        self._trim()
                        self._apply_backpressure()
                if self.pipes_done.is_set() and self.exited.is_set() and f.pos >= self.log_end:
                    break
                if not live and f.pos >= self.log_end:
                    break
                if f.pos < self.log_end:
                    continue
                if self.pipes_done.is_set() and not self.exited.is_set():
                    await self.exited.wait()
                    continue
                await changed.wait()
        finally:
            self.blocking.discard(f)
            if blocking:
                self._apply_backpressure()

    # --- input and control ------------------------------------------------------------------
    async def write_stdin(self, data: bytes) -> None:
        if self.stdin_fd is None:
            raise OpError("stdin_closed", f"process {self.pid} has no open stdin")
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            try:
                n = os.write(self.stdin_fd, view)
                view = view[n:]
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_writer(self.stdin_fd, fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_writer(self.stdin_fd)
            except BrokenPipeError:
                self.close_stdin()
                raise OpError("stdin_closed", f"process {self.pid} closed its stdin") from None

    async def feed_stdin(self, st) -> None:
        try:
            async for chunk in st.read_in():
                await self.write_stdin(chunk)
        except Exception:
            pass
        finally:
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            try:
                os.close(self.stdin_fd)
            except OSError:
                pass
            self.stdin_fd = None

    def send_signal(self, name) -> None:
        try:
            sig = _signal.Signals[name] if isinstance(name, str) else _signal.Signals(int(name))
        except (KeyError, ValueError):
            raise OpError("bad_signal", f"unknown signal {name!r}") from None
        if self.exited.is_set():
            raise OpError("not_running", f"process {self.pid} has exited")
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            os.kill(self.pid, sig)

    def _on_timeout(self) -> None:
        if not self.exited.is_set():
            self.timed_out = True
            try:
                os.killpg(self.pid, _signal.SIGKILL)
            except OSError:
                pass

    def on_exit(self, status: int) -> None:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            self.signal = _signal.Signals(sig).name
            self.exit_code = 128 + sig
        else:
            self.exit_code = os.WEXITSTATUS(status)
        if self._timer:
            self._timer.cancel()
        self.close_stdin()
        self.exited.set()
        self._notify()

    def info(self) -> dict:
        return {
            "pid": self.pid,
            "argv": self.argv,
            "tag": self.tag,
            "started_at": self.started_at,
            "running": not self.exited.is_set(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "output_bytes": self.log_end,
            "output_start": self.log_start,
        }


class Follower:
    __slots__ = ("pos",)

    def __init__(self, pos: int):
        self.pos = pos


class ProcessTable:
    def __init__(self, agent):
        self.agent = agent
        self.procs: dict[int, Proc] = {}
        self.exited_order: deque = deque()

    def all(self):
        return list(self.procs.values())

    def get(self, pid: int) -> Proc:
        proc = self.procs.get(int(pid))
        if proc is None:
            raise OpError("no_such_process", f"no process {pid} started by the agent")
        return proc

    def start(self, argv, env, cwd, user, want_stdin, timeout, tag) -> Proc:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise OpError("bad_request", "argv must be a non-empty list of strings")
        pw = _user(user)
        full_env = {
            "PATH": DEFAULT_PATH,
            "HOME": pw.pw_dir,
            "USER": pw.pw_name,
            "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh",
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
        }
        full_env.update(self.agent.base_env)
        full_env.update({str(k): str(v) for k, v in env.items()})
        cwd = cwd or pw.pw_dir
        if not os.path.isdir(cwd):
            raise OpError("bad_cwd", f"working directory {cwd!r} does not exist in the sandbox")
        exe = argv[0]
        if "/" not in exe:
            from shutil import which

            found = which(exe, path=full_env.get("PATH", DEFAULT_PATH))
            if not found:
                raise OpError("not_found", f"command {exe!r} not found in PATH")
            exe = found
        in_r = in_w = None
        if want_stdin:
            in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        actions = [
            (os.POSIX_SPAWN_DUP2, in_r, 0) if in_r is not None
            else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        pid = self._spawn(exe, argv, full_env, cwd, pw, actions)
        for fd in (in_r, out_w, err_w):
            if fd is not None:
                os.close(fd)
        if in_w is not None:
            os.set_blocking(in_w, False)
        proc = Proc(self, pid, argv, tag, in_w, out_r, err_r, timeout)
        self.procs[pid] = proc
        return proc

    def _spawn(self, exe, argv, env, cwd, pw, actions) -> int:
        """posix_spawn (vfork: ~2x faster than fork under gVisor) as another user.

        CPython will not vfork when asked to change uid, so the agent sets its own real ids
        to the target's and lets POSIX_SPAWN_RESETIDS make them effective in the child; the
        child's exec then sets the saved ids too. The agent is single-threaded, so nothing
        runs with the borrowed ids, and it takes its own back right after.
        """
        old_cwd = os.getcwd()
        switch = pw.pw_uid != 0
        try:
            os.chdir(cwd)
            if switch:
                os.setgroups(_groups(pw))
                os.setresgid(pw.pw_gid, 0, 0)
                os.setresuid(pw.pw_uid, 0, 0)
            else:
                os.setgroups(_groups(pw))
            return os.posix_spawn(exe, argv, env, file_actions=actions, setsid=True,
                                  resetids=switch)
        except FileNotFoundError:
            raise OpError("not_found", f"command {argv[0]!r} not found") from None
        except PermissionError as e:
            raise OpError("permission_denied", f"cannot run {argv[0]!r}: {e}") from None
        finally:
            if switch:
                os.setresuid(0, 0, 0)
                os.setresgid(0, 0, 0)
            os.setgroups([0])
            os.chdir(old_cwd)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is None:
                continue
            proc.on_exit(status)
            self.exited_order.append(pid)
            while len(self.exited_order) > KEEP_EXITED:
                old = self.exited_order.popleft()
                p = self.procs.get(old)
                if p is not None and p.exited.is_set():
                    del self.procs[old]

    def kill_largest(self) -> dict:
        """Kill the process using the most memory in the sandbox (the agent excepted)."""
        best = None
        me = os.getpid()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/statm") as f:
                    rss_pages = int(f.read().split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, ValueError, IndexError):
                continue
            if best is None or rss_pages > best[1]:
                best = (int(name), rss_pages, cmd)
        if best is None:
            return {"killed": None}
        pid, pages, cmd = best
        try:
            os.kill(pid, _signal.SIGKILL)
        except OSError:
            return {"killed": None}
        return {"killed": pid, "rss_bytes": pages * os.sysconf("SC_PAGE_SIZE"), "cmdline": cmd}
