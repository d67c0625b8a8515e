"""Processes started by the agent: spawn, output log, followers, stdin, signals, reaping.

Each process's stdout and stderr go into one bounded log of records. A foreground command's
follower applies back-pressure (the agent stops reading the pipes while the host has not
taken the output), so a command that floods output blocks instead of filling memory. With
no blocking follower the log keeps the newest LOG_LIMIT bytes and counts what it dropped.

Starting a command is on every request's path, and inside gVisor each syscall costs tens of
microseconds, so `start` does only what it must: accounts come from a cache (`users`), the
command from a PATH index (`pathsearch`), the agent changes directory once (no getcwd, no
way back: nothing else in the agent uses relative paths), and the process starts through
compat/native.c when it is built (~10 syscalls in the child before the exec, where glibc's
posix_spawn makes ~130), else through os.posix_spawn.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import time

import miniloop
import pathsearch
import protocol as P
import signames
import users
from protocol import OpError

LOG_LIMIT = 4 << 20  # bytes of output kept in memory per process; older ones spill to disk
# TORPOR_OUTPUT_SPILL_MB=0: no spill, the oldest output past LOG_LIMIT is dropped
SPILL = os.environ.get("TORPOR_OUTPUT_SPILL_MB", "").strip() != "0"
EXIT_GRACE = 0.1  # seconds a finished command waits for output still in its pipes
READ_SIZE = 64 * 1024
DRAIN_LIMIT = 1 << 20  # bytes read at most when the exit grace ends
MAX_TIMEOUT = 10 * 365 * 86400  # seconds: the longest command timeout the agent takes
KEEP_EXITED = 200  # exited processes remembered for status queries
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_COMPAT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat")
# Loaded into every process the agent starts (LD_PRELOAD) when it is there and the kernel
# needs it: works around kernels (gVisor) that reject statx(AT_NO_AUTOMOUNT). See
# compat/statx_compat.c. Loading it costs every process ~1 ms in gVisor.
COMPAT_LIB = os.path.join(_COMPAT_DIR, "libtorpor_compat.so")
AT_NO_AUTOMOUNT = 0x800
# Python ignores these at start-up and ignored signals stay ignored across exec: without
# this, `yes | head -1` in a sandbox complains of a broken pipe instead of dying quietly.
_DEFAULT_SIGNALS = (signames.number("SIGPIPE"), signames.number("SIGXFSZ"))
# Signals with a handler in this process (CPython's for SIGINT, and the loop's): a child
# that shares our memory until its exec must not run them (see compat/native.c).
_HANDLED_SIGNALS = (signames.number("SIGINT"),)


def _load_native():
    """compat/_torpor_native (compat/native.c), when it was built for this interpreter."""
    if os.environ.get("TORPOR_AGENT_NATIVE") == "0":  # for tests of the fallback
        return None
    sys.path.append(_COMPAT_DIR)
    try:
        import _torpor_native

        return _torpor_native
    except ImportError:
        return None
    finally:
        sys.path.remove(_COMPAT_DIR)


_native = _load_native()


class Proc:
    def __init__(self, table: ProcessTable, pid: int, argv, tag, stdin_fd, out_fd, err_fd,
                 timeout):
        self.table = table
        self.pid = pid
        self.argv = argv
        self.tag = tag
        self.started_at = time.time()
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.timed_out = False
        self.exited = miniloop.Event()
        self.grace_over = False
        self.stdin_fd = stdin_fd
        self._stdin_wait: miniloop.Future | None = None  # a writer waiting for pipe space
        self.log = _Fifo()  # (offset, kind, bytes)
        self.log_start = 0  # offset of the first byte still kept (in memory or spilled)
        self.mem_start = 0  # offset of the first byte of the in-memory log
        self.spill = None  # spill.ProcSpill once output outgrew the in-memory log
        self.log_end = 0  # offset after the last byte
        self.changed = miniloop.Event()
        self.blocking: set = set()  # followers that hold back reading: {Follower}
        self.open_pipes = 0
        self.reading_paused = False
        self.pipes_done = miniloop.Event()
        self._fds: dict[int, int] = {}
        loop = miniloop.get_loop()
        for fd, kind in ((out_fd, P.OUT), (err_fd, P.ERR)):
            if fd is None:  # a terminal (ptys.py): one output, the pty master
                continue
            self._fds[fd] = kind
            self.open_pipes += 1
            loop.add_reader(fd, self._on_readable, fd)
        self._timer = loop.call_later(timeout, self._on_timeout) if timeout else None

    # --- output ---------------------------------------------------------------------------
    def _on_readable(self, fd: int) -> None:
        # The read ends are blocking (setting O_NONBLOCK would cost two syscalls per command):
        # the loop calls us only when poll says the pipe is readable and nobody else reads
        # it, so one read() returns at once, with data or with EOF.
        self._read(fd)
        self._apply_backpressure()

    def _read(self, fd: int) -> bool:
        """One read of a pipe known to be readable; False once it reached EOF (and is closed)."""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            miniloop.get_loop().forget_fd(fd)
            os.close(fd)
            del self._fds[fd]
            self.open_pipes -= 1
            if self.open_pipes == 0:
                self.pipes_done.set()
            self._notify()
            return False
        self.log.append((self.log_end, self._fds[fd], data))
        self.log_end += len(data)
        self._trim()
        self._notify()
        return True

    def _drain(self) -> None:
        """Read what the pipes hold right now, without waiting for more.

        Called when the exit grace ends: everything the process wrote before it exited is in
        its pipes by then, but the loop may not have read it yet. Under load the agent can be
        kept off the CPU for longer than the grace (0.5 s was seen with 30 busy sandboxes on
        two cores); the timer then fires before the next poll, and the followers used to
        finish with the output still in the pipe. Bounded, because something the command left
        in the background may still be writing; what comes later stays in the log.
        """
        budget = DRAIN_LIMIT
        while self._fds and budget > 0:
            p = select.poll()
            for fd in self._fds:
                p.register(fd, select.POLLIN)
            ready = [fd for fd, _ in p.poll(0)]
            if not ready:
                return
            for fd in ready:
                before = self.log_end
                self._read(fd)
                budget -= self.log_end - before or 1

    def _trim(self) -> None:
        """Past LOG_LIMIT bytes in memory, move the oldest records to the sandbox's disk
        (spill.py; bounded, the oldest dropped there), or drop them if that fails."""
        floor = min((f.pos for f in self.blocking), default=self.log_end)
        while self.log and self.log_end - self.mem_start > LOG_LIMIT:
            off, kind, data = self.log.first()
            if off + len(data) > floor:
                break
            self.log.popleft()
            self.mem_start = off + len(data)
            if self.spill is None and SPILL:
                try:
                    import spill

                    self.spill = spill.ProcSpill(spill.store(), self.pid)
                except OSError:
                    pass
            if self.spill is not None:
                self.spill.put(off, kind, data)
        self._kept()

    def _kept(self) -> None:
        start = self.spill.start if self.spill is not None else None
        self.log_start = self.mem_start if start is None else start

    def forget(self) -> None:
        """The table forgets this process: its spilled output goes too."""
        if self.spill is not None:
            self.spill.drop_all()
            self.spill = None

    def _apply_backpressure(self) -> None:
        floor = min((f.pos for f in self.blocking), default=self.log_end)
        should_pause = self.log_end - floor >= LOG_LIMIT
        if should_pause == self.reading_paused:
            return
        loop = miniloop.get_loop()
        for fd in self._fds:
            if should_pause:
                loop.remove_reader(fd)
            else:
                loop.add_reader(fd, self._on_readable, fd)
        self.reading_paused = should_pause

    def _notify(self) -> None:
        self.changed.set()
        self.changed = miniloop.Event()

    def chunks_from(self, pos: int):
        """Records at or after pos: (offset, kind, bytes), the first one cut to start at pos;
        from the spilled part, a batch of them (call again from where it ends)."""
        if pos < self.mem_start and self.spill is not None:
            self._kept()
            got = self.spill.read(pos, self.mem_start)
            if got:
                return got
        out = []
        for off, kind, data in self.log:
            end = off + len(data)
            if end <= pos:
                continue
            if off < pos:
                out.append((pos, kind, data[pos - off:]))
            else:
                out.append((off, kind, data))
        return out

    async def follow(self, st, offset: int | None, blocking: bool, live: bool = True) -> None:
        f = Follower(offset if offset is not None else self.log_start)
        if blocking:
            self.blocking.add(f)
        try:
            while not st.closed:
                changed = self.changed
                self._kept()
                if f.pos < self.log_start:  # dropped (the spill's bound) while behind
                    await st.msg({"event": "truncated", "lost": self.log_start - f.pos})
                    f.pos = self.log_start
                for off, kind, data in self.chunks_from(f.pos):
                    if off > f.pos:  # lost meanwhile (a spill that failed)
                        await st.msg({"event": "truncated", "lost": off - f.pos})
                    elif off < f.pos:
                        break
                    await st.send(kind, data)
                    f.pos = off + len(data)
                    if blocking:
                        self._trim()
                        self._apply_backpressure()
                if (self.exited.is_set() and f.pos >= self.log_end
                        and (self.pipes_done.is_set() or self.grace_over)):
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
        view = memoryview(data)
        while view:
            if self.stdin_fd is None:
                raise OpError("stdin_closed", f"process {self.pid} has no open stdin")
            try:
                n = os.write(self.stdin_fd, view)
                view = view[n:]
            except BlockingIOError:
                loop = miniloop.get_loop()
                fd = self.stdin_fd
                fut = self._stdin_wait = loop.create_future()
                loop.add_writer(fd, _resolve, fut)
                try:
                    await fut
                finally:
                    self._stdin_wait = None
                    if self.stdin_fd == fd:
                        loop.remove_writer(fd)
            except BrokenPipeError:
                self.close_stdin()
                raise OpError("stdin_closed", f"process {self.pid} closed its stdin") from None

    async def feed_stdin(self, st) -> None:
        try:
            async for chunk in st.read_in():
                await self.write_stdin(chunk)
        except Exception:  # noqa: BLE001, S110 - the exec's result reports what happened
            pass
        finally:
            self.close_stdin()

    def close_stdin(self) -> None:
        fd = self.stdin_fd
        if fd is None:
            return
        self.stdin_fd = None
        # a writer may be waiting on this fd: take it off the loop before the number is freed
        miniloop.get_loop().forget_fd(fd)
        try:
            os.close(fd)
        except OSError:
            pass
        if self._stdin_wait is not None:
            _resolve(self._stdin_wait)  # the writer wakes up and finds stdin closed

    def send_signal(self, name) -> None:
        sig = signames.number(name)
        if sig is None:
            raise OpError("bad_signal", f"unknown signal {name!r}")
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
                os.killpg(self.pid, signames.SIGKILL)
            except OSError:
                pass

    def _end_grace(self) -> None:
        self._drain()
        self.grace_over = True
        self._notify()

    def on_exit(self, status: int) -> None:
        # A command is done when its process exits, even if something it left running in
        # the background (`cmd &`) still holds its stdout: followers get EXIT_GRACE more
        # for what is in flight, then finish; later output stays in the log.
        miniloop.get_loop().call_later(EXIT_GRACE, self._end_grace)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            self.signal = signames.name(sig)
            self.exit_code = 128 + sig
        else:
            self.exit_code = os.WEXITSTATUS(status)
        if self._timer:
            self._timer.cancel()
        self.close_stdin()
        self.exited.set()
        self._notify()
        if self.spill is not None:
            self.spill.finished()

    def info(self) -> dict:
        self._kept()  # the spill may have dropped this one's oldest for another's output
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


class _Fifo:
    """Append at the end, pop from the front, iterate in order: the two uses of a deque here,
    without importing collections (milliseconds of start-up inside gVisor)."""

    __slots__ = ("_head", "_items")

    def __init__(self):
        self._items: list = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __iter__(self):
        items = self._items
        for i in range(self._head, len(items)):
            yield items[i]

    def append(self, item) -> None:
        self._items.append(item)

    def first(self):
        return self._items[self._head]

    def popleft(self):
        item = self._items[self._head]
        self._items[self._head] = None
        self._head += 1
        if self._head >= 64 and self._head * 2 >= len(self._items):
            del self._items[:self._head]
            self._head = 0
        return item


class _FastSpawner:
    """compat/native.c: the child resets the signals we handle and takes the user's ids
    itself; the agent changes nothing of its own."""

    def __init__(self, table: ProcessTable, env: dict, acc: users.Account, fds):
        self.env = []
        for k, v in env.items():
            if "=" in k:
                raise ValueError("illegal environment variable name")
            self.env.append(k + "=" + v)
        self.fds = fds
        self.ids = None if acc.uid == 0 and acc.gid == 0 else (acc.uid, acc.gid, acc.groups)
        self.resets = (_DEFAULT_SIGNALS + _HANDLED_SIGNALS
                       + miniloop.get_loop().handled_signals())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def spawn(self, path, argv) -> int:
        return _native.spawn(path, argv, self.env, self.fds, self.ids, True, self.resets)


class _PosixSpawner:
    """os.posix_spawn (vfork: ~2x faster than fork under gVisor) as another user.

    CPython will not vfork when asked to change uid, so the agent sets its own real ids to
    the target's and lets POSIX_SPAWN_RESETIDS make them effective in the child; the child's
    exec then sets the saved ids too. The agent is single-threaded, so nothing runs with the
    borrowed ids, and it takes its own back when the `with` block ends.
    """

    def __init__(self, table: ProcessTable, env: dict, acc: users.Account, fds):
        self.table = table
        self.env = env
        self.acc = acc
        self.actions = [(os.POSIX_SPAWN_DUP2, a, b) for a, b in fds]
        self.switch = acc.uid != 0 or acc.gid != 0

    def __enter__(self):
        if self.switch:
            acc = self.acc
            if self.table._groups != acc.groups:
                os.setgroups(acc.groups)
                self.table._groups = acc.groups
            os.setresgid(acc.gid, 0, 0)
            os.setresuid(acc.uid, 0, 0)
        return self

    def __exit__(self, *exc) -> bool:
        if self.switch:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)
        return False

    def spawn(self, path, argv) -> int:
        return os.posix_spawn(path, argv, self.env, file_actions=self.actions, setsid=True,
                              resetids=self.switch, setsigdef=_DEFAULT_SIGNALS)


def _check_text(what: str, value) -> None:
    """A string the kernel can take: no NUL byte, no lone surrogate (not UTF-8)."""
    if not isinstance(value, str):
        raise OpError("bad_request", f"{what} must be a string")
    if "\0" in value:
        raise OpError("bad_request", f"{what} contains a NUL byte")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise OpError("bad_request", f"{what} is not valid UTF-8 text "
                      "(it holds a lone surrogate)") from None


def _check_timeout(timeout):
    """None, or seconds in (0, MAX_TIMEOUT]: whatever the host let through, a number must
    never reach the loop's timers in a shape that breaks them."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise OpError("bad_request", "timeout must be a number of seconds")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise OpError("bad_request",
                      f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds")
    return float(timeout)


def _resolve(fut: miniloop.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Follower:
    __slots__ = ("pos",)

    def __init__(self, pos: int):
        self.pos = pos


class ProcessTable:
    def __init__(self, agent):
        self.agent = agent
        self.procs: dict[int, Proc] = {}
        self.exited_order = _Fifo()
        self._groups: tuple | None = None  # the agent's supplementary groups, as last set
        self.compat_env: dict[str, str] = {}
        self.check_compat()

    def check_compat(self) -> None:
        """Decide again whether to preload the statx fix (at start, and when the host
        configures us: a restored sandbox may run on another runsc, or another agent bundle).
        Without compat/native.c to ask the kernel, assume it needs the fix."""
        needed = True
        if _native is not None:
            needed = _native.statx_errno("/", AT_NO_AUTOMOUNT) == errno.EINVAL
        use = needed and os.path.exists(COMPAT_LIB)
        self.compat_env = {"LD_PRELOAD": COMPAT_LIB} if use else {}

    def warm_up(self) -> None:
        """Do once, before the first command asks, what makes the first command slow.

        Run while the host is still taking the HELLO (or while a pooled sandbox waits):
        read the accounts, index the PATH directories that hold `true`, and run `true` the
        way commands run. That last part fills gVisor's own caches (the dynamic loader,
        libc, the locale, the statx fix): the first process in a sandbox otherwise takes
        ~20 ms more than the next ones. Failures here are not anyone's problem.
        """
        try:
            try:
                acc = users.lookup("user")
            except OpError:
                acc = users.lookup(0)
            env = {"PATH": DEFAULT_PATH, "HOME": acc.home, "LANG": "C.UTF-8",
                   **self.compat_env}
            path = next(pathsearch.candidates("true", DEFAULT_PATH), None)
            if path is None:
                return
            make = _FastSpawner if _native is not None else _PosixSpawner
            with make(self, env, acc, []) as spawner:
                spawner.spawn(path, ["true"])  # reaped, unknown, by reap()
        except Exception:  # noqa: BLE001, S110 - a cold cache is only slower
            pass

    def all(self):
        return list(self.procs.values())

    def get(self, pid: int) -> Proc:
        proc = self.procs.get(int(pid))
        if proc is None:
            raise OpError("no_such_process", f"no process {pid} started by the agent")
        return proc

    def start(self, argv, env, cwd, user, want_stdin, timeout, tag) -> Proc:
        if not isinstance(argv, list) or not argv:
            raise OpError("bad_request", "argv must be a non-empty list of strings")
        for a in argv:
            _check_text("argv", a)
        if not isinstance(env, dict):
            raise OpError("bad_request", "env must be an object of strings")
        for k, v in env.items():
            _check_text("env name", k)
            _check_text(f"env {k}", v)
            if not k or "=" in k:
                raise OpError("bad_request", f"env name {k!r} must be non-empty, without '='")
        if cwd is not None:
            _check_text("cwd", cwd)
        if isinstance(user, str):
            _check_text("user", user)
        timeout = _check_timeout(timeout)
        acc = users.lookup(user)
        full_env = {
            "PATH": DEFAULT_PATH,
            "HOME": acc.home,
            "USER": acc.name,
            "LOGNAME": acc.name,
            "SHELL": acc.shell or "/bin/sh",
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
            **self.compat_env,
        }
        full_env.update(self.agent.base_env)
        full_env.update({str(k): str(v) for k, v in env.items()})
        cwd = cwd or acc.home
        try:
            # the child inherits our directory; chdir also checks that cwd is one (one
            # syscall instead of isdir + getcwd + chdir + chdir back)
            os.chdir(cwd)
        except (OSError, ValueError, TypeError):
            raise OpError("bad_cwd",
                          f"working directory {cwd!r} does not exist in the sandbox") from None
        in_r = in_w = None
        if want_stdin:
            in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # the agent's own fd 0 is /dev/null, opened read-only: without a pipe the child
        # simply inherits it
        fds = [(out_w, 1), (err_w, 2)]
        if in_r is not None:
            fds.append((in_r, 0))
        try:
            pid = self._spawn(argv, full_env, acc, fds)
        except BaseException:
            for fd in (in_w, out_r, err_r):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                if fd is not None:
                    os.close(fd)
        if in_w is not None:
            os.set_blocking(in_w, False)
        proc = Proc(self, pid, argv, tag, in_w, out_r, err_r, timeout)
        self.procs[pid] = proc
        return proc

    def _spawn(self, argv, env: dict, acc: users.Account, fds) -> int:
        """Start argv[0] (searched in PATH like execvp when it has no slash) as acc."""
        exe = argv[0]
        if acc.uid == 0 and acc.gid == 0 and self._groups != acc.groups:
            # root's children inherit the agent's groups: keep them root's
            os.setgroups(acc.groups)
            self._groups = acc.groups
        make = _FastSpawner if _native is not None else _PosixSpawner
        spawner = make(self, env, acc, fds)
        try:
            with spawner:
                if "/" in exe:
                    return spawner.spawn(exe, argv)
                # like execvp: go on past what this user may not execute, and report that
                # if nothing else is found
                denied = None
                for path in pathsearch.candidates(exe, env.get("PATH", DEFAULT_PATH)):
                    try:
                        return spawner.spawn(path, argv)
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    except PermissionError as e:
                        denied = denied or e
                if denied is not None:
                    raise denied
                raise OpError("not_found", f"command {exe!r} not found in PATH")
        except FileNotFoundError:
            raise OpError("not_found", f"command {exe!r} not found") from None
        except PermissionError as e:
            raise OpError("permission_denied", f"cannot run {exe!r}: {e}") from None

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
                    p.forget()

    def _sessions(self) -> dict[int, list[tuple[int, int]]]:
        """Processes of the sandbox by session, as (pid, resident bytes); the agent's own
        session is left out."""
        me = os.getpid()
        mine = os.getsid(me)
        page = os.sysconf("SC_PAGE_SIZE")
        sessions: dict[int, list[tuple[int, int]]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                sid, rss = int(fields[3]), int(fields[21]) * page
            except (OSError, ValueError, IndexError):
                continue
            if sid != mine:
                sessions.setdefault(sid, []).append((int(name), rss))
        return sessions

    def _kill_session(self, sid: int, procs: list[tuple[int, int]]) -> dict:
        # each command runs in a session of its own: this ends the command and everything
        # it started, and nothing else; stop them all first so that none forks on
        biggest = max(procs, key=lambda p: p[1])
        try:
            with open(f"/proc/{biggest[0]}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        for sig in (signames.SIGSTOP, signames.SIGKILL):
            for pid, _ in procs:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        return {"killed": biggest[0], "processes": len(procs), "session": sid,
                "rss_bytes": sum(r for _, r in procs), "cmdline": cmd}

    def _stop_the_world(self, pick) -> dict:
        """Stop every process but the agent with one kill(-1) (the agent is init, which
        kill(-1) spares), so that a runaway neither grows nor competes with the agent for
        CPU while it looks for the culprit; kill the session `pick` chooses; resume the rest.
        Processes a user had stopped on purpose are resumed too."""
        try:
            os.kill(-1, signames.SIGSTOP)
        except OSError:
            pass
        try:
            sessions = self._sessions()
            if not sessions:
                return {"killed": None}
            sid, procs = max(sessions.items(), key=pick)
            return self._kill_session(sid, procs)
        finally:
            try:
                os.kill(-1, signames.SIGCONT)
            except OSError:
                pass

    def kill_runaway(self) -> dict:
        """Kill the session with the most processes (a fork bomb and its offspring)."""
        return self._stop_the_world(lambda kv: len(kv[1]))

    def kill_largest(self) -> dict:
        """Kill the session using the most memory: the command that grew past the limit,
        with what it started (a single hog, or many small processes)."""
        return self._stop_the_world(lambda kv: sum(r for _, r in kv[1]))
