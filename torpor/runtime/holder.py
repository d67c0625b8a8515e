"""The per-sandbox holder: a small process that owns a sandbox's stdio channel.

Like containerd's shims, it keeps a sandbox independent of the server process. It starts
the container (`runsc run --detach` or `runsc restore --detach`) with pipes as the
container's stdin and stdout, then relays whole frames between those pipes and one server
connection on a Unix socket. When the server goes away (even by SIGKILL) the sandbox runs
on; the holder tells the agent to drop its streams (RESET), keeps the agent's frames
(up to a bound, then back-pressure), and hands them to the next server that connects.
It forwards only whole frames, so a server dying mid-write never corrupts the channel.

Stdlib only, started as `python -I -S holder.py CONFIG.json`, or ahead of need as
`holder.py --spare` and given the config's path on stdin (`--spare` then stays in its
command line). It exits when the container's stdout closes (the sandbox is gone) and
records why in the status file.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "agent"))
import protocol as P

BUFFER_LIMIT = 16 << 20  # agent frames kept while no server is connected
PIPE_SIZE = 1 << 20  # bytes each stdio pipe of the agent holds
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt the sandbox's processes when `runsc run --detach` exits. Without this they are
    reparented to PID 1, which on some hosts reaps only every second or two, and every
    `runsc delete` waits for that reaping (measured: 1.2-2 s per delete)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap(until: float | None = None) -> None:
    """Collect exited children; with `until` (a monotonic time), keep at it until no child
    is left or that time has come."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        if until is None or time.monotonic() > until:
            return
        time.sleep(0.005)


def write_status(path: str, **status) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"time": time.time(), **status}, f)
    os.replace(tmp, path)


class Holder:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.sel = selectors.DefaultSelector()
        self.conn: socket.socket | None = None
        self.conn_reader = P.FrameReader()
        self.to_server = bytearray()  # whole frames waiting for the server
        self.to_agent = bytearray()  # whole frames waiting for the agent's stdin
        self.agent_reader = P.FrameReader()
        self.agent_paused = False
        self.conn_paused = False

    def start_container(self) -> None:
        in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        for fd in (self.in_w, self.out_r):
            # a whole frame per pipe write: the default 64 KiB split each 256 KiB frame of a
            # transfer (egress, files) into four reads inside the sandbox, each a costly
            # syscall under ptrace
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # over /proc/sys/fs/pipe-max-size: the default works, only slower
        log = os.open(self.cfg["agent_log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        t0 = time.monotonic()
        proc = subprocess.run(self.cfg["command"], stdin=in_r, stdout=out_w, stderr=log,
                              close_fds=True, check=False)
        os.close(in_r)
        os.close(out_w)
        os.close(log)
        if proc.returncode != 0:
            write_status(self.cfg["status"], state="start_failed", code=proc.returncode)
            sys.exit(1)
        # the monotonic clock is the host's: the driver places these on its own timeline
        write_status(self.cfg["status"], state="running", holder_pid=os.getpid(),
                     start_seconds=round(time.monotonic() - t0, 4), runsc_began=t0,
                     runsc_ended=time.monotonic())
        os.set_blocking(self.in_w, False)
        os.set_blocking(self.out_r, False)

    def run(self) -> None:
        sock_path = self.cfg["socket"]
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock_path)
        os.chmod(sock_path, 0o600)
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.start_container()
        # SIGCHLD from adopted sandbox processes wakes the loop through this pipe
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, "sigchld")
        if self.cfg.get("restored"):
            # a restored agent still holds the streams of the server that was connected at
            # checkpoint time: have it drop them before anything else reaches it
            self.queue_agent(P.frame(P.RESET, 0))
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.out_r, selectors.EVENT_READ, "agent")
        while True:
            for key, events in self.sel.select():
                what = key.data
                if what == "sigchld":
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                    reap()
                elif what == "accept":
                    self.accept()
                elif what == "agent":
                    if events & selectors.EVENT_READ and not self.read_agent():
                        self.finish()
                        return
                elif what == "agent_w":
                    self.flush_agent()
                elif what == "conn":
                    self.on_conn(key.fileobj, events)

    # --- server side ------------------------------------------------------------------
    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            self.drop_conn()
        conn.setblocking(False)
        self.conn = conn
        self.conn_reader = P.FrameReader()
        self.sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, "conn")
        self.conn_paused = False

    def drop_conn(self) -> None:
        if self.conn is None:
            return
        if self.conn in [k.fileobj for k in self.sel.get_map().values()]:
            self.sel.unregister(self.conn)
        self.conn.close()
        self.conn = None
        # whatever the old server had opened is gone: tell the agent, at a frame boundary
        self.queue_agent(P.frame(P.RESET, 0))
        self.to_server.clear()
        self.update_agent_reading()

    def on_conn(self, sock: socket.socket, events: int) -> None:
        """The server's socket is ready. It may be one dropped earlier in the same batch of
        events (a send to a server that died, while the agent's output was relayed): that
        one is gone, and `self.conn` is None or a newer connection. (Handling it anyway
        killed the holder, and with it the sandbox, when a server was SIGKILLed while
        output streamed.)"""
        if sock is not self.conn:
            return
        if events & selectors.EVENT_READ:
            self.read_conn()
        if self.conn is not None and events & selectors.EVENT_WRITE:
            self.flush_server()

    def read_conn(self) -> None:
        try:
            data = self.conn.recv(P.CHUNK + P.HEADER_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop_conn()
            return
        self.conn_reader.feed(data)
        try:
            frames = self.conn_reader.raw_frames()
        except P.ProtocolError:
            self.drop_conn()
            return
        for _kind, raw in frames:
            self.queue_agent(raw)

    def update_conn(self) -> None:
        """Select on the server socket for what is wanted now: reading unless the agent is
        behind (back-pressure), writing while frames wait for the server."""
        if self.conn is None:
            return
        events = 0 if self.conn_paused else selectors.EVENT_READ
        if self.to_server:
            events |= selectors.EVENT_WRITE
        registered = self.conn in [k.fileobj for k in self.sel.get_map().values()]
        if events and registered:
            self.sel.modify(self.conn, events, "conn")
        elif events:
            self.sel.register(self.conn, events, "conn")
        elif registered:
            self.sel.unregister(self.conn)  # selectors cannot watch for no event

    def flush_server(self) -> None:
        if self.to_server:
            try:
                n = self.conn.send(self.to_server)
            except (BlockingIOError, InterruptedError):
                # the socket is full: wait until it can take more (update_conn watches for
                # that). Returning here left the frames waiting for some other event when
                # the socket was not watched for writing yet: a download stalled at random
                # until the next request to the sandbox.
                n = 0
            except OSError:
                self.drop_conn()
                return
            del self.to_server[:n]
        self.update_conn()
        self.update_agent_reading()

    # --- agent side -------------------------------------------------------------------
    def read_agent(self) -> bool:
        try:
            data = os.read(self.out_r, P.CHUNK + P.HEADER_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.agent_reader.feed(data)
        for _kind, raw in self.agent_reader.raw_frames():
            self.to_server += raw
        if self.conn is not None and self.to_server:
            self.flush_server()
        self.update_agent_reading()
        return True

    def update_agent_reading(self) -> None:
        limit = BUFFER_LIMIT if self.conn is None else 4 * P.CHUNK
        pause = len(self.to_server) >= limit
        if pause != self.agent_paused:
            if pause:
                self.sel.unregister(self.out_r)
            else:
                self.sel.register(self.out_r, selectors.EVENT_READ, "agent")
            self.agent_paused = pause

    def queue_agent(self, raw: bytes) -> None:
        was_empty = not self.to_agent
        self.to_agent += raw
        if was_empty:
            self.flush_agent()

    def flush_agent(self) -> None:
        while self.to_agent:
            try:
                n = os.write(self.in_w, self.to_agent)
            except BlockingIOError:
                break
            except BrokenPipeError:
                self.to_agent.clear()
                break
            del self.to_agent[:n]
        registered = "agent_w" in (k.data for k in self.sel.get_map().values())
        if self.to_agent and not registered:
            self.sel.register(self.in_w, selectors.EVENT_WRITE, "agent_w")
        elif not self.to_agent and registered:
            self.sel.unregister(self.in_w)
        # back-pressure towards the server when the agent does not keep up
        pause = len(self.to_agent) > 4 * P.CHUNK
        if pause != self.conn_paused:
            self.conn_paused = pause
            self.update_conn()

    def finish(self) -> None:
        # the agent's stdout closed: the sandbox has stopped (deleted, crashed, or killed)
        if self.conn is not None and self.to_server:
            self.conn.setblocking(True)
            try:
                self.conn.sendall(self.to_server)
            except OSError:
                pass
        write_status(self.cfg["status"], state="exited")
        try:
            os.unlink(self.cfg["socket"])
        except OSError:
            pass
        # the sentry is gone; wait for the gofer too, so nothing is left to PID 1
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        reap(until=time.monotonic() + 10)


def wait_for_work() -> str | None:
    """A spare holder (`holder.py --spare`) is started ahead of need, so that a sandbox's
    start or restore does not wait for Python to start (~25 ms): it reads the path of its
    config from stdin, then takes its sandbox directory as cwd and its holder.log as
    stdout and stderr. EOF (the server closed it or died) means no work: exit."""
    line = sys.stdin.readline().strip()
    if not line:
        return None
    d = os.path.dirname(line)
    os.chdir(d)
    log = os.open(os.path.join(d, "holder.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                  0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, to in ((null, 0), (log, 1), (log, 2)):
        os.dup2(fd, to)
    os.close(null)
    os.close(log)
    try:  # started at the lowest priority (see gvisor._popen_holder): the sandbox's own now
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError as e:
        sys.stderr.write(f"holder: could not take priority 0 back ({e})\n")
    return line


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # before the work comes: a spare holder has it done (ctypes' import is ~5 ms) when its
    # sandbox's start begins
    become_subreaper()
    path = wait_for_work() if sys.argv[1] == "--spare" else sys.argv[1]
    if path is None:
        return
    with open(path) as f:
        cfg = json.load(f)
    Holder(cfg).run()


if __name__ == "__main__":
    main()
