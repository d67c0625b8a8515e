"""An in-memory driver for unit tests of the engine: no root, no runsc, no subprocess.

What httpx's MockTransport is to its client: the engine holds it as it holds the gVisor
driver and cannot tell the difference on the channel. Each sandbox is a fake agent, an
asyncio task speaking the agent's frames (`torpor/agent/protocol.py`: HELLO, OPEN -> reply
frames, PING -> PONG, RESET) on one end of a `socket.socketpair()`; the other end is a real
`Channel`. The agent answers the engine's own operations (ping, configure, proc_info,
proc_list, hibernate_check, resumed, oom_kill, pids_kill) and runs `echo` (anything else
exits 127); other operations get the real agent's `unknown_op` error.

It keeps the real driver's semantics where the engine's state machine depends on them: a
frozen agent answers nothing until thawed; a checkpoint stops it (its channel closes) and
keeps its state as the "image"; `restore` starts it again from that; `adopt` reconnects
while its task lives in this driver. Tests set what it reports (`set_usage`, `set_load`,
`set_disk`, `set_limits`, `set_problems`), make the next start, checkpoint or restore fail
(`fail_next`), or make a sandbox die (`crash`). It isolates nothing: `driver = "fake"` is
for tests only.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shlex
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torpor._version import __version__
from torpor.agent import protocol as P
from torpor.channel import Channel, ChannelClosed
from torpor.runtime.base import DriverError, Limits, Load, SandboxSpec, Usage

FAILABLE = ("start", "checkpoint", "restore", "snapshot_live")
AGENT_PID = 1  # the agent is the first process of its sandbox


@dataclass
class AgentState:
    """What a checkpoint keeps of a fake agent: its image."""
    env: dict[str, str] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)  # what hibernate_check reports
    procs: dict[int, dict] = field(default_factory=dict)  # the commands it ran, by pid
    next_pid: int = AGENT_PID + 1


def _soon(loop: asyncio.AbstractEventLoop, fn) -> None:
    """Run `fn` on `loop`: now if this is its thread, else next (the engine calls freeze
    and stop from worker threads). Nothing if the loop is gone: so is the agent."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn()
        return
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # closed
        pass


def _echo_words(argv: list) -> list[str] | None:
    """The words `echo` prints for this argv (`echo ...` or `sh -c "echo ..."`), else None."""
    if str(argv[0]).rsplit("/", 1)[-1] == "echo":
        return [str(a) for a in argv[1:]]
    if len(argv) == 3 and str(argv[0]).rsplit("/", 1)[-1] in ("sh", "bash") \
            and argv[1] == "-c":
        try:
            words = shlex.split(str(argv[2]))
        except ValueError:
            return None
        if words and words[0] == "echo":
            return words[1:]
    return None


class FakeAgent:
    """One sandbox's agent. It serves one connection at a time, as the real one does
    through its holder: a new connection (adopt) drops the previous one."""

    def __init__(self, sid: str, state: AgentState):
        self.sid = sid
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.frozen = False  # set from any thread; read by the agent before each frame
        self._thawed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self, hello: bool) -> Channel:
        mine, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        host_reader, host_writer = await asyncio.open_unix_connection(sock=theirs,
                                                                      limit=4 << 20)
        self._disconnect()  # the previous server's channel sees its end, as with a holder
        self._writer = writer
        if hello:  # once after start; a restored or adopted agent says nothing
            writer.write(P.jframe(P.HELLO, 0, {"version": P.VERSION, "pid": AGENT_PID}))
        self._task = self.loop.create_task(self._serve(reader, writer),
                                           name=f"fake-agent-{self.sid}")
        return Channel(host_reader, host_writer)

    def alive_here(self) -> bool:
        """True if the caller's event loop is the agent's (its sockets belong to it)."""
        try:
            return asyncio.get_running_loop() is self.loop and not self.loop.is_closed()
        except RuntimeError:
            return False

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = frozen
        if not frozen:
            _soon(self.loop, self._thawed.set)

    def end(self) -> None:
        """The sandbox stops: close its channel; the state stays with the caller."""
        self.frozen = False
        _soon(self.loop, self._disconnect)

    def _disconnect(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _while_frozen(self) -> None:
        while self.frozen:
            self._thawed.clear()
            await self._thawed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = P.FrameReader()
        try:
            while True:
                await self._while_frozen()  # a frozen agent reads nothing
                data = await reader.read(P.CHUNK + P.HEADER_SIZE)
                if not data:
                    return  # that server went away; the agent lives on for the next one
                frames.feed(data)
                for kind, sid, payload in frames.frames():
                    await self._while_frozen()  # nor acts on what it had read
                    if kind == P.PING:
                        writer.write(P.frame(P.PONG, sid, payload))
                    elif kind == P.OPEN:
                        writer.write(self._answer(sid, payload))
                    # RESET, CLOSE, IN, EOF, CREDIT: every operation answered at once, so
                    # no stream of this agent is open for them to act on
                await writer.drain()
        except (OSError, P.ProtocolError):
            pass  # as the real agent: a broken host end is a closed one
        finally:
            writer.close()

    # --- operations -----------------------------------------------------------------
    def _answer(self, sid: int, payload: bytes) -> bytes:
        """Every frame answering one OPEN, its CLOSE last (as `Agent.run_op` does)."""
        out: list[bytes] = []
        try:
            req = P.loads(payload)
            op = req.pop("op")
            handler = OPS.get(op)
            if handler is None:
                raise P.OpError("unknown_op", f"unknown operation {op!r}")
            body = {"result": handler(self, sid, out, **req)}
        except P.OpError as e:
            body = {"error": e.to_wire()}
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            body = {"error": {"code": "bad_request", "message": str(e)}}
        out.append(P.jframe(P.CLOSE, sid, body))
        return b"".join(out)

    def op_ping(self, sid, out, **_):
        return {"pid": AGENT_PID}

    def op_configure(self, sid, out, env: dict | None = None):
        if env is not None:
            self.state.env = {str(k): str(v) for k, v in env.items()}
        return {"env": self.state.env, "egress_errors": []}

    def op_exec(self, sid, out, argv, background=False, tag=None, **_):
        if not isinstance(argv, list) or not argv:
            raise P.OpError("bad_request", "argv must be a non-empty list of strings")
        pid = self.state.next_pid
        self.state.next_pid += 1
        words = _echo_words(argv)
        stdout = (" ".join(words) + "\n").encode() if words is not None else b""
        stderr = b"" if words is not None else \
            f"{argv[0]}: not found (the fake agent runs only echo)\n".encode()
        info = {"pid": pid, "argv": argv, "tag": tag, "started_at": time.time(),
                "running": False, "exit_code": 0 if words is not None else 127,
                "signal": None, "timed_out": False,
                "output_bytes": len(stdout) + len(stderr), "output_start": 0}
        self.state.procs[pid] = info
        if not background:
            out.append(P.jframe(P.MSG, sid, {"event": "start", "pid": pid}))
            for kind, data in ((P.OUT, stdout), (P.ERR, stderr)):
                if data:
                    out.append(P.frame(kind, sid, data))
        return info

    def op_proc_list(self, sid, out, **_):
        return list(self.state.procs.values())

    def op_proc_info(self, sid, out, pid):
        if int(pid) not in self.state.procs:
            raise P.OpError("no_such_process", f"no process {pid} started by the agent")
        return self.state.procs[int(pid)]

    def op_hibernate_check(self, sid, out, **_):
        return {"problems": copy.deepcopy(self.state.problems)}

    def op_resumed(self, sid, out, **_):
        return {}

    def op_oom_kill(self, sid, out, **_):
        return {"killed": None}  # no process to kill: the fake runs none

    op_pids_kill = op_oom_kill


OPS = {name[3:]: fn for name, fn in vars(FakeAgent).items() if name.startswith("op_")}


class FakeDriver:
    name = "fake"

    def __init__(self, checkpoint_blockers: frozenset[str] = frozenset({"deleted_file"}),
                 ping_timeout: float = 1.0):
        # as a current runsc by default, so the engine's refusal path runs in tests
        self.checkpoint_blockers = frozenset(checkpoint_blockers)
        self.ping_timeout = ping_timeout  # how long adopt and restore wait for a pong
        self.calls: list[tuple[str, str]] = []  # (operation, sandbox id), in order
        self._agents: dict[str, FakeAgent] = {}  # running (or frozen) sandboxes
        self._disks: dict[str, int] = {}  # sandboxes that have a disk: its bytes
        self._images: dict[str, AgentState] = {}
        self._usage: dict[str, Usage] = {}
        self._load: dict[str, Load] = {}
        self._limits: dict[str, Limits] = {}
        self._fail: dict[str, str] = {}
        self.volume_root: Path | None = None  # volumes' directories (a temp dir if unset)

    # --- what tests set -------------------------------------------------------------
    def fail_next(self, op: str, message: str = "injected failure") -> None:
        """The next call of `op` (start, checkpoint or restore) raises DriverError."""
        if op not in FAILABLE:
            raise ValueError(f"fail_next takes one of {', '.join(FAILABLE)}, not {op!r}")
        self._fail[op] = message

    def set_usage(self, sid: str, cpu_seconds: float | None = 0.0,
                  memory_bytes: int | None = 0, oom_kills: int = 0) -> None:
        """What `usage` reports (and `memory_in_use`, the memory figure)."""
        self._usage[sid] = Usage(cpu_seconds, memory_bytes, oom_kills)

    def set_load(self, sid: str, tasks: int | None = 1,
                 memory_charged: int | None = 0) -> None:
        self._load[sid] = Load(tasks, memory_charged)

    def set_limits(self, sid: str, soft_memory_bytes: int, tasks: int) -> None:
        self._limits[sid] = Limits(soft_memory_bytes, tasks)

    def set_disk(self, sid: str, nbytes: int) -> None:
        """Bytes of the sandbox's disk (`disk_bytes` adds the image's)."""
        self._disks[sid] = nbytes

    def crash(self, sid: str) -> None:
        """The sandbox dies on its own (its agent exits, its runtime dies): its channel
        closes while its holder would still be there, as a crash looks to the engine."""
        self._agents[sid].end()

    def set_problems(self, sid: str, problems: list[dict]) -> None:
        """What the running sandbox's `hibernate_check` reports from now on."""
        agent = self._agents.get(sid)
        if agent is None:
            raise ValueError(f"sandbox {sid} is not running in this fake driver")
        agent.state.problems = copy.deepcopy(problems)

    def _check_failure(self, op: str, sid: str) -> None:
        self.calls.append((op, sid))
        message = self._fail.pop(op, None)
        if message is not None:
            raise DriverError(f"sandbox {sid}: {op} failed: {message}")

    # --- lifecycle ------------------------------------------------------------------
    def describe(self) -> dict:
        return {"driver": self.name, "version": __version__, "platform": "memory"}

    async def start(self, spec: SandboxSpec) -> Channel:
        self._disks.setdefault(spec.id, 0)  # made before a failure, as a real disk is
        self._check_failure("start", spec.id)
        if spec.id in self._agents:
            raise DriverError(f"sandbox {spec.id} is already running: stop or destroy it "
                              "first")
        agent = FakeAgent(spec.id, AgentState())
        chan = await agent.connect(hello=True)
        self._agents[spec.id] = agent
        await chan.wait_ready(self.ping_timeout)
        return chan

    async def adopt(self, spec: SandboxSpec, ping: bool = True) -> Channel:
        self.calls.append(("adopt", spec.id))
        agent = self._agents.get(spec.id)
        if agent is None or not agent.alive_here():
            raise DriverError(f"sandbox {spec.id}: no fake holder of it in this driver and "
                              "event loop (a fake sandbox lives as long as both)")
        chan = await agent.connect(hello=False)
        if ping:
            try:
                await chan.ping(timeout=self.ping_timeout)
            except (TimeoutError, ChannelClosed) as e:
                await chan.close()
                raise DriverError(f"sandbox {spec.id}: agent does not answer ({e!r})") from None
        return chan

    def release(self, spec: SandboxSpec) -> None:
        self.calls.append(("release", spec.id))  # nothing of a fake is mounted or held

    def stop(self, spec: SandboxSpec) -> None:
        self.calls.append(("stop", spec.id))
        self._end(spec.id)

    async def destroy(self, spec: SandboxSpec) -> None:
        self.calls.append(("destroy", spec.id))
        self._end(spec.id)
        for figures in (self._disks, self._images, self._usage, self._load, self._limits):
            figures.pop(spec.id, None)

    def _end(self, sid: str) -> None:
        agent = self._agents.pop(sid, None)
        if agent is not None:
            agent.end()

    # --- standby and hibernation ----------------------------------------------------
    def freeze(self, spec: SandboxSpec, frozen: bool) -> None:
        self.calls.append(("freeze" if frozen else "thaw", spec.id))
        agent = self._agents.get(spec.id)
        if agent is None:
            raise DriverError(f"sandbox {spec.id} is not running: nothing to "
                              f"{'freeze' if frozen else 'thaw'}")
        agent.set_frozen(frozen)

    async def checkpoint(self, spec: SandboxSpec) -> dict:
        self._check_failure("checkpoint", spec.id)  # it stays as it was, frozen or not
        agent = self._agents.get(spec.id)
        if agent is None:
            raise DriverError(f"sandbox {spec.id} is not running: nothing to checkpoint")
        t0 = time.monotonic()
        self._images[spec.id] = copy.deepcopy(agent.state)
        del self._agents[spec.id]
        agent.end()
        return {"seconds": round(time.monotonic() - t0, 3),
                "image_bytes": self._image_bytes(spec.id)}

    async def restore(self, spec: SandboxSpec) -> Channel:
        self._check_failure("restore", spec.id)  # nothing runs; the image stays
        if spec.id not in self._images:
            raise DriverError(f"sandbox {spec.id}: its checkpoint image is missing")
        if spec.id in self._agents:
            raise DriverError(f"sandbox {spec.id} is already running: it cannot be restored")
        agent = FakeAgent(spec.id, copy.deepcopy(self._images[spec.id]))
        chan = await agent.connect(hello=False)
        self._agents[spec.id] = agent
        await chan.ping(timeout=self.ping_timeout)
        return chan

    # --- templates: layers and boot snapshots ------------------------------------------
    def capture(self, spec: SandboxSpec, dest: Path) -> None:
        """A fake sandbox changes no files: its layer is empty."""
        self.calls.append(("capture", spec.id))
        self._end(spec.id)
        for part in ("root", "usr"):
            (dest / part).mkdir(parents=True, exist_ok=True)

    def export_snapshot(self, spec: SandboxSpec, dest: Path) -> None:
        self.calls.append(("export_snapshot", spec.id))
        if spec.id not in self._images:
            raise DriverError(f"sandbox {spec.id}: no checkpoint image to keep")
        dest.mkdir(parents=True)
        (dest / "snapshot.json").write_text(json.dumps(asdict(self._images.pop(spec.id))))

    async def start_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> Channel:
        self.calls.append(("start_from_snapshot", spec.id))
        state = AgentState(**json.loads((snapshot / "snapshot.json").read_text()))
        state.procs = {int(k): v for k, v in state.procs.items()}
        self._images[spec.id] = state
        self._disks.setdefault(spec.id, 0)
        return await self.restore(spec)

    def snapshot_live(self, spec: SandboxSpec, dest: Path, memory: bool) -> dict:
        """The agent's state as it is now (a fake sandbox changes no files: an empty layer
        without memory); the sandbox runs on."""
        self._check_failure("snapshot_live", spec.id)
        agent = self._agents.get(spec.id)
        if agent is None:
            raise DriverError(f"sandbox {spec.id} is not running: nothing to snapshot")
        dest.mkdir(parents=True, exist_ok=not memory)
        if memory:
            (dest / "snapshot.json").write_text(json.dumps(asdict(agent.state)))
        else:
            for part in ("root", "usr"):
                (dest / part).mkdir(exist_ok=True)
        return {"pause_ms": 0.0, "bytes": 0}

    def drop_image(self, sid: str) -> None:
        self.calls.append(("drop_image", sid))
        self._images.pop(sid, None)

    def checkpoint_refusal(self, problem: dict) -> str:
        return (f"process {problem.get('pid')} ({str(problem.get('cmdline', ''))[:80]}) has "
                f"a {problem.get('kind', 'problem')}, which the fake driver (like runsc) "
                "cannot checkpoint. Stop it, or keep the sandbox in standby")

    # --- what it uses ---------------------------------------------------------------
    # --- volumes and drives: plain directories (no size limit), kept until the process
    # ends or `volume_root` is removed by the test that gave it --------------------------
    def _volumes(self) -> Path:
        if self.volume_root is None:
            self.volume_root = Path(tempfile.mkdtemp(prefix="torpor-fake-volumes-"))
        return self.volume_root

    def create_volume(self, vid: str, size_mb: int) -> None:
        self.calls.append(("create_volume", vid))
        (self._volumes() / vid).mkdir()

    def volume_path(self, vid: str) -> Path:
        path = self._volumes() / vid
        if not path.is_dir():
            raise DriverError(f"volume {vid}: its directory is missing ({path})")
        return path

    def volume_usage(self, vid: str) -> dict:
        used = sum(f.stat().st_size for f in self.volume_path(vid).rglob("*") if f.is_file())
        return {"used_bytes": used, "size_bytes": None, "disk_bytes": used}

    def volume_space(self) -> int:
        return shutil.disk_usage(self._volumes()).free

    def release_volume(self, vid: str) -> None:
        self.calls.append(("release_volume", vid))

    def delete_volume(self, vid: str) -> None:
        self.calls.append(("delete_volume", vid))
        shutil.rmtree(self._volumes() / vid, ignore_errors=True)

    def attach_drive(self, spec: SandboxSpec, name: str, vid: str) -> None:
        self.calls.append(("attach_drive", spec.id))
        if spec.id not in self._agents:
            raise DriverError(f"sandbox {spec.id} is not running in this fake driver")
        spec.drives[name] = vid

    def detach_drive(self, spec: SandboxSpec, name: str) -> None:
        self.calls.append(("detach_drive", spec.id))
        spec.drives.pop(name, None)

    def limits(self, spec: SandboxSpec) -> Limits:
        return self._limits.get(spec.id) or Limits(spec.memory_mb << 20, spec.pids)

    def load(self, spec: SandboxSpec) -> Load:
        if spec.id in self._load:
            return self._load[spec.id]
        if spec.id not in self._agents:
            return Load(None, None)
        return Load(1, self.usage(spec).memory_bytes)

    def memory_in_use(self, spec: SandboxSpec) -> int | None:
        return self.usage(spec).memory_bytes

    def usage(self, spec: SandboxSpec) -> Usage:
        if spec.id in self._usage:
            return self._usage[spec.id]
        if spec.id not in self._agents:
            return Usage(None, None, 0)
        return Usage(0.0, 0, 0)

    def memory_alert(self, spec: SandboxSpec, threshold: int) -> int | None:
        return None  # no notification: the engine's watchdog polls instead

    def disk_bytes(self, spec: SandboxSpec) -> int:
        return self._disks.get(spec.id, 0) + self._image_bytes(spec.id)

    def _image_bytes(self, sid: str) -> int:
        image = self._images.get(sid)
        return len(json.dumps(asdict(image))) if image is not None else 0

    # --- housekeeping ---------------------------------------------------------------
    def reap(self) -> None:
        pass  # no helper processes

    def close(self) -> None:
        pass  # the sandboxes run on, as the real ones do, until this object goes

    def leftovers(self, sid: str) -> list[str]:
        out = []
        if sid in self._agents:
            out.append(f"fake agent of {sid}" + (" (frozen)" if self._agents[sid].frozen
                                                 else ""))
        if sid in self._disks:
            out.append(f"fake disk of {sid}")
        if sid in self._images:
            out.append(f"fake image of {sid}")
        return out
