"""The code interpreter's server, inside a sandbox of the `code-interpreter` template.

Shipped into the template by its build (a `copy` step, `torpor/builtin_templates.py`) and run
as its start command: `python3 /opt/torpor/interpreter/server.py`. It is never imported by
the host: it runs on the template's Python with jupyter_client, next to the kernels.

It speaks on 0.0.0.0:49999 the HTTP protocol of E2B's code interpreter
(`../shared/notes/e2b-wire.md`, section 4), so E2B's SDK can reach it through a port, and
Torpor's engine reaches it through the agent's port tunnel (`torpor/engine/code.py`):

- `POST /execute {code, context_id?, language?, env_vars?, timeout?, raw_text?}` -> NDJSON
  lines: `stdout`/`stderr` {text, timestamp}, `result` {text, html, markdown, svg, png,
  jpeg, pdf, latex, json, javascript, data?, chart?, extra?, is_main_result} (`text`
  without its surrounding quotes, as E2B's, unless `raw_text`), `error` {name, value,
  traceback},
  `truncated` {stream, limit} (Torpor's: output past the bound was dropped),
  `number_of_executions` {execution_count}, `keepalive` (every 5 s of silence), and
  `end_of_execution` last. `timeout` (seconds, Torpor's) interrupts the kernel when it
  passes; a client that disconnects interrupts it too.
- `POST /contexts {language, cwd}` -> {id, language, cwd}; `GET /contexts`;
  `DELETE /contexts/{id}`; `POST /contexts/{id}/restart`; `GET /health`.

Python contexts are IPython kernels (jupyter_client's AsyncKernelManager), started through
`kernel.py` beside this file (ipykernel tuned for gVisor's costly thread hand-offs). No bash
kernel is installed, so a bash context is one long-lived `bash` process fed each cell as a
sourced file: variables, functions and the working directory carry over from cell to cell.
Errors are JSON {code, message} with 400, 404, 409 or 500.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime

import sandbox_env  # beside this file (the sandbox's env for contexts older than it)

PORT = 49999
STREAM_LIMIT = 1 << 20  # characters of stdout (and of stderr) sent per execution
RESULT_LIMIT = 16 << 20  # characters of one MIME form of a result (base64 for images)
KEEPALIVE = 5.0  # seconds of silence before a keepalive line
POLL = 0.25  # seconds between checks (deadline, disconnect, kernel alive) while busy
GATHER = 0.002  # seconds output waits for more before it is sent (fewer, larger writes)
HEAD_WAIT = 0.02  # seconds a quiet cell waits before the response's head goes alone
INTERRUPT_GRACE = 5.0  # seconds an interrupted cell has to finish before we give up on it
BODY_MAX = 64 << 20
HOME = os.path.expanduser("~")
KERNEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.py")
LANGUAGES = {"python": "python", "python3": "python", "bash": "bash", "sh": "bash"}

# MIME type -> the result's field (E2B's names)
MIME_FIELDS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown",
    "image/svg+xml": "svg", "image/png": "png", "image/jpeg": "jpeg",
    "application/pdf": "pdf", "text/latex": "latex", "application/json": "json",
    "application/javascript": "javascript",
    # the kernels' own forms (torpor_display.py), E2B's: a DataFrame's columns, a chart
    "e2b/data": "data", "e2b/chart": "chart",
}
SANDBOX_ENV = sandbox_env.SandboxEnv()


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def now() -> str:
    return datetime.now(UTC).isoformat()


class Execution:
    """One execution's output going to its client: lines, bounds, disconnect.

    Lines are chunks of the chunked response, gathered until `flush` (the contexts flush
    whenever they would wait for their kernel), so a cell's last lines and the response's
    end leave in one write; the response's head goes with the first of them (one write,
    one tunnel frame, for a short cell)."""

    def __init__(self, writer: asyncio.StreamWriter, gone: asyncio.Event, head: bytes = b"",
                 raw_text: bool = False):
        self.writer = writer
        self.raw_text = raw_text  # text/plain as the kernel gave it (see result_line)
        self.gone = gone  # the client disconnected
        self.head = head  # not sent yet
        self.sizes = {"stdout": 0, "stderr": 0}
        self.truncated: set[str] = set()
        self.last = time.monotonic()
        self.pending: list[bytes] = []
        self.pending_size = 0

    async def line(self, obj: dict) -> None:
        if self.gone.is_set():
            return
        self.last = time.monotonic()
        data = json.dumps(obj).encode() + b"\n"
        self.pending.append(b"%x\r\n%s\r\n" % (len(data), data))
        self.pending_size += len(data)
        if self.pending_size > 1 << 16:
            await self.flush()

    async def flush(self, end: bool = False) -> None:
        """Send what is gathered (and the end of the response if `end`)."""
        if end:
            self.pending.append(b"0\r\n\r\n")
        if not self.pending or self.gone.is_set():
            return
        data = self.head + b"".join(self.pending)
        self.pending, self.pending_size, self.head = [], 0, b""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.gone.set()

    def send_head(self) -> None:
        """The response's head alone, for a cell quiet for HEAD_WAIT: the client (and a
        proxy between, which answers 502 for a response that never began) knows it runs."""
        if self.head and not self.gone.is_set():
            head, self.head = self.head, b""
            try:
                self.writer.write(head)
            except (ConnectionError, OSError):
                self.gone.set()

    async def stream(self, name: str, text: str) -> None:
        room = STREAM_LIMIT - self.sizes[name]
        if room <= 0 or not text:
            if text and name not in self.truncated:
                self.truncated.add(name)
                await self.line({"type": "truncated", "stream": name, "limit": STREAM_LIMIT})
            return
        part = text[:room]
        self.sizes[name] += len(part)
        await self.line({"type": name, "text": part, "timestamp": now()})
        if len(part) < len(text):
            await self.stream(name, text[len(part):])

    async def error(self, name: str, value: str, traceback: str = "") -> None:
        await self.line({"type": "error", "name": name, "value": value,
                         "traceback": traceback})

    async def keepalive(self) -> None:
        if time.monotonic() - self.last >= KEEPALIVE:
            await self.line({"type": "keepalive"})


def result_line(data: dict, is_main: bool, raw_text: bool = False) -> dict:
    """A result's line. As E2B's server, its `text` loses one pair of quotes around it
    (`'bar'` is `bar`: a string's repr reads as the string), unless `raw_text` (Torpor's
    engine asks for the repr as it is)."""
    out: dict = {"type": "result", "is_main_result": is_main}
    text = data.get("text/plain")
    if not raw_text and isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] \
            and text[0] in "'\"":
        data = {**data, "text/plain": text[1:-1]}
    extra: dict = {}
    dropped = []
    for mime, value in data.items():
        if isinstance(value, str) and len(value) > RESULT_LIMIT:
            dropped.append(mime)
            continue
        field = MIME_FIELDS.get(mime)
        if field is not None:
            out[field] = value
        else:
            extra[mime] = value
    if dropped:
        extra["truncated"] = {"mime_types": dropped, "limit": RESULT_LIMIT}
    if extra:
        out["extra"] = extra
    return out


class Context:
    language = ""

    def __init__(self, cid: str, cwd: str):
        self.id, self.cwd = cid, cwd
        self.lock = asyncio.Lock()
        self.dead: str | None = None  # why it can run nothing until restarted
        self.sandbox_env = sandbox_env.Applied()  # reset when its kernel starts again

    def info(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def died(self) -> str:
        return (f"the {self.language} kernel of context {self.id} {self.dead}; restart the "
                f"context (POST /contexts/{self.id}/restart) to go on: its state is lost")


def _specs():
    """Kernel specs whose python3 is `kernel.py` beside this file: ipykernel tuned for a
    sandbox (see there), speaking the same protocol."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class Specs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, KERNEL, "-f", "{connection_file}"],
                              display_name="Python 3 (ipykernel)", language="python",
                              resource_dir=os.path.dirname(KERNEL))

    return Specs()


class Inbox:
    """A kernel client's IOPub messages, read straight off its ZMQ socket: a non-blocking
    receive, and the socket's descriptor watched by the event loop for as long as the
    context lives. zmq.asyncio's poll-then-receive makes several more system calls per
    message, each costly under gVisor's ptrace platform. Nothing else may read the socket
    once this exists (it would also take over the descriptor's watch)."""

    def __init__(self, channel):
        import zmq

        self._again = zmq.Again
        self._noblock = zmq.NOBLOCK
        self.session = channel.session
        self.sock = zmq.Socket.shadow(channel.socket.underlying)
        self.fd = self.sock.getsockopt(zmq.FD)
        self.ready = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self.ready.set)

    def take(self) -> dict | None:
        """The next message if one is queued, else None."""
        try:
            parts = self.sock.recv_multipart(self._noblock)
        except self._again:
            return None
        _, parts = self.session.feed_identities(parts)
        return self.session.deserialize(parts)

    async def get(self, timeout: float) -> dict:
        """The next message; queue.Empty after `timeout` seconds without one."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # cleared before looking: the descriptor signals only what changes
                    # after a receive, so a message that comes in between still wakes us
                    self.ready.clear()
                    msg = self.take()
                    if msg is not None:
                        return msg
                    await self.ready.wait()
        except TimeoutError:
            raise queue.Empty from None

    def close(self) -> None:
        """Stop watching (before the socket is closed)."""
        self.loop.remove_reader(self.fd)


class PythonContext(Context):
    """An IPython kernel."""

    language = "python"

    async def start(self) -> None:
        from jupyter_client import AsyncKernelManager

        env = dict(os.environ)
        # figures show as images (the template's MPLBACKEND=Agg is for scripts)
        env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        # Unix sockets: no ports to collide with the user's; a bare jupyter_client round
        # trip of `1+1` in a sandbox is about as fast as over loopback TCP (22 vs 21 ms,
        # p50 on a loaded 2-core host; natively 4.3 vs 5.6 ms)
        transport = os.environ.get("TORPOR_KERNEL_TRANSPORT", "ipc")
        kw = {}
        self.kdir = None
        if transport == "ipc":
            self.kdir = tempfile.mkdtemp(prefix=f"kernel-{self.id[:8]}-")
            kw = {"transport": "ipc", "ip": os.path.join(self.kdir, "k")}
        self.km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_specs(),
                                     **kw)
        await self.km.start_kernel(cwd=self.cwd, env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=120)
        self.iopub = Inbox(self.kc.iopub_channel)  # from here on, the only reader of IOPub
        self.dead = None

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.iopub.close()
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            await self.km.shutdown_kernel(now=True)
        if self.kdir:
            shutil.rmtree(self.kdir, ignore_errors=True)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def warm(self) -> None:
        """Run a first cell, so the first user's cell finds the kernel's code paths hot."""
        msg_id = self.kc.execute("1+1", store_history=False)
        while True:
            msg = await self.iopub.get(timeout=120)
            if (msg["parent_header"].get("msg_id") == msg_id
                    and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"):
                return

    async def _alive(self) -> bool:
        if self.dead is None and not await self.km.is_alive():
            code = self.km.provisioner.process.returncode if (
                self.km.provisioner is not None and self.km.provisioner.process) else None
            self.dead = "died" + (f" (exit code {code})" if code is not None else "")
        return self.dead is None

    async def execute(self, code: str, env_vars: dict, timeout: float | None,
                      out: Execution) -> None:
        # a kernel that died is noticed while waiting for it (below): no system call here
        if self.dead is not None:
            await out.error("KernelDied", self.died())
            return
        due = self.sandbox_env.due(SANDBOX_ENV)
        if due:
            self.kc.execute(sandbox_env.python_code(*due), silent=True, store_history=False,
                            stop_on_error=False)
        restore = None
        if env_vars:
            names = json.dumps(sorted(env_vars))
            self.kc.execute(
                "import os as _torpor_os\n"
                f"_torpor_env = {{k: _torpor_os.environ.get(k) for k in {names}}}\n"
                f"_torpor_os.environ.update({json.dumps(env_vars)})\n",
                silent=True, store_history=False, stop_on_error=False)
            restore = ("for _k, _v in _torpor_env.items():\n"
                       "    _torpor_os.environ.pop(_k, None) if _v is None "
                       "else _torpor_os.environ.__setitem__(_k, _v)\n"
                       "del _torpor_env, _torpor_os\n")
        msg_id = self.kc.execute(code, allow_stdin=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        count = None
        interrupted_at = None
        checked = time.monotonic()
        while True:
            msg = self.iopub.take()
            if msg is None and out.pending:
                # the kernel has nothing more right now: wait a moment for what usually
                # follows at once (a result's idle status), then send what we have
                try:
                    msg = await self.iopub.get(timeout=GATHER)
                except queue.Empty:
                    await out.flush()
            if msg is None:
                try:
                    msg = await self.iopub.get(timeout=POLL)
                except queue.Empty:
                    pass
            t = time.monotonic()
            # the checks run after POLL seconds of silence, and every POLL seconds while
            # the kernel keeps talking (a cell printing without end meets its deadline too)
            if msg is None or t - checked >= POLL:
                checked = t
                if msg is None and not await self._alive():
                    await out.error("KernelDied", self.died())
                    return
                if interrupted_at is None:
                    if deadline is not None and t > deadline:
                        await self.km.interrupt_kernel()
                        interrupted_at = t
                        await out.error("TimeoutError",
                                        f"the execution ran past its timeout of {timeout:g} s "
                                        "and was interrupted; the context keeps its state")
                    elif out.gone.is_set():
                        await self.km.interrupt_kernel()
                        interrupted_at = t
                elif t - interrupted_at > INTERRUPT_GRACE:
                    # the cell ignores SIGINT: the kernel stays busy with it; later cells
                    # wait behind it (the lock stays held until it is idle)
                    asyncio.get_running_loop().create_task(self._drain(msg_id))
                    await out.error("KernelBusy",
                                    f"the cell did not stop within {INTERRUPT_GRACE:g} s of "
                                    "its interrupt; restart the context if it never ends")
                    return
                if msg is None:
                    await out.keepalive()
                    await out.flush()
                    continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if interrupted_at is not None:
                continue  # the interrupt's KeyboardInterrupt is ours, already said
            if kind == "stream":
                await out.stream(content["name"], content["text"])
            elif kind == "execute_input":
                count = content.get("execution_count")
            elif kind in ("execute_result", "display_data"):
                await out.line(result_line(content["data"], kind == "execute_result",
                                           out.raw_text))
            elif kind == "error":
                await out.error(content["ename"], content["evalue"],
                                "\n".join(content["traceback"]))
        if restore is not None:
            self.kc.execute(restore, silent=True, store_history=False, stop_on_error=False)
        if count is not None:
            await out.line({"type": "number_of_executions", "execution_count": count})

    async def _drain(self, msg_id: str) -> None:
        """Hold the context until the cell that ignored its interrupt ends."""
        async with self.lock:
            while await self._alive():
                try:
                    msg = await self.iopub.get(timeout=POLL)
                except queue.Empty:
                    continue
                if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle"):
                    return


class BashContext(Context):
    """One `bash` process (no bash kernel is installed in the template): each cell is
    written to a file and sourced, then a marker with a per-cell token gives its exit
    status on stdout and ends its stderr. SIGINT to the process group interrupts the cell:
    its command dies, bash's trap returns from the sourced cell, and bash lives on."""

    language = "bash"

    async def start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"bash-{self.id[:8]}-")
        self.proc = await asyncio.create_subprocess_exec(
            "bash", "--noprofile", "--norc", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=self.cwd,
            start_new_session=True, limit=1 << 20)
        self.proc.stdin.write(b"trap 'return 130 2>/dev/null' INT\n")
        await self.proc.stdin.drain()
        self.count = 0
        self.dead = None

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def warm(self) -> None:
        pass

    def _check(self) -> bool:
        if self.dead is None and self.proc.returncode is not None:
            self.dead = f"exited (exit code {self.proc.returncode})"
        return self.dead is None

    async def execute(self, code: str, env_vars: dict, timeout: float | None,
                      out: Execution) -> None:
        if not self._check():
            await out.error("KernelDied", self.died())
            return
        token = secrets.token_hex(12)
        marker = f"\x1e{token}".encode()
        cell = os.path.join(self.dir, "cell.sh")
        with open(cell, "w") as f:  # noqa: ASYNC230 - a small file on tmpfs
            f.write(code if code.endswith("\n") else code + "\n")
        prefix = "".join(f"export {k}={_sh(v)}\n" for k, v in env_vars.items()
                         if k.isidentifier())
        due = self.sandbox_env.due(SANDBOX_ENV)
        script = sandbox_env.bash_code(*due, _sh) if due else ""
        script += (f"( {prefix.replace(chr(10), '; ')} . {_sh(cell)} ) </dev/null\n"
                  if env_vars else f". {_sh(cell)} </dev/null\n")
        script += (f"printf '\\036{token} %d\\n' $?\nprintf '\\036{token}\\n' >&2\n")
        self.proc.stdin.write(script.encode())
        await self.proc.stdin.drain()
        status: list[int] = []
        readers = [asyncio.create_task(self._pump(self.proc.stdout, "stdout", marker, out,
                                                  status)),
                   asyncio.create_task(self._pump(self.proc.stderr, "stderr", marker, out,
                                                  None))]
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupted_at = None
        try:
            while True:
                done, _ = await asyncio.wait(readers, timeout=POLL)
                if len(done) == 2:
                    break
                t = time.monotonic()
                if self.proc.returncode is not None:
                    break
                if interrupted_at is None:
                    if deadline is not None and t > deadline:
                        self._interrupt()
                        interrupted_at = t
                        await out.error("TimeoutError",
                                        f"the execution ran past its timeout of {timeout:g} s "
                                        "and was interrupted; the context keeps its state")
                    elif out.gone.is_set():
                        self._interrupt()
                        interrupted_at = t
                elif t - interrupted_at > INTERRUPT_GRACE:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    await self.proc.wait()
                await out.keepalive()
                await out.flush()
        finally:
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        if not self._check():
            await out.error("KernelDied", self.died())
            return
        self.count += 1
        if status and status[0] != 0 and interrupted_at is None:
            await out.error("ExitCodeError", f"the cell's last command exited with {status[0]}")
        await out.line({"type": "number_of_executions", "execution_count": self.count})

    def _interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, name: str, marker: bytes, out: Execution,
                    status: list | None) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buf = b""
        keep = len(marker)
        while True:
            data = await stream.read(65536)
            if not data:
                if buf:
                    await out.stream(name, decoder.decode(buf, final=True))
                return
            buf += data
            i = buf.find(marker)
            if i >= 0:
                if i:
                    await out.stream(name, decoder.decode(buf[:i], final=True))
                rest = buf[i + len(marker):]
                while b"\n" not in rest:
                    more = await stream.read(64)
                    if not more:
                        break
                    rest += more
                if status is not None:
                    with contextlib.suppress(ValueError):
                        status.append(int(rest.split(b"\n", 1)[0].strip() or b"0"))
                return
            # hold back only what may be the start of the marker
            j = buf.rfind(b"\x1e", max(0, len(buf) - keep))
            cut = j if j >= 0 and marker.startswith(buf[j:]) else len(buf)
            if cut:
                text = decoder.decode(buf[:cut])
                buf = buf[cut:]
                await out.stream(name, text)
                await out.flush()


def _sh(s: str) -> str:
    return "'" + str(s).replace("'", "'\\''") + "'"


class Interpreter:
    def __init__(self):
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}  # language -> id of its default context

    async def create(self, language: str, cwd: str | None) -> Context:
        lang = LANGUAGES.get((language or "python").lower())
        if lang is None:
            raise HTTPError(400, "invalid", f"language {language!r} is not available in this "
                            f"template; available: python, bash")
        cwd = cwd or HOME
        if not os.path.isabs(cwd):
            raise HTTPError(400, "invalid", f"cwd {cwd!r} must be an absolute path")
        try:
            os.makedirs(cwd, exist_ok=True)
        except OSError as e:
            raise HTTPError(400, "invalid", f"cwd {cwd!r} cannot be made: {e.strerror}") \
                from None
        if not os.access(cwd, os.R_OK | os.X_OK):
            # E2B's kernels run as root; ours as the sandbox's user, as its commands do
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
            raise HTTPError(400, "invalid", f"cwd {cwd!r} is not open to the kernels' user "
                            f"{user!r} (they run as the sandbox's user, not root): use a "
                            f"directory it may enter and read, such as {HOME!r}")
        cls = PythonContext if lang == "python" else BashContext
        ctx = cls(uuid.uuid4().hex, cwd)
        try:
            await ctx.start()
        except Exception as e:  # noqa: BLE001 - whatever stops a kernel is the answer
            raise HTTPError(500, "internal", f"the {lang} kernel did not start: {e}") from None
        self.contexts[ctx.id] = ctx
        return ctx

    async def default(self, language: str | None) -> Context:
        lang = LANGUAGES.get((language or "python").lower())
        if lang is None:
            raise HTTPError(400, "invalid", f"language {language!r} is not available in this "
                            f"template; available: python, bash")
        cid = self.defaults.get(lang)
        if cid not in self.contexts:
            ctx = await self.create(lang, HOME)
            self.defaults[lang] = cid = ctx.id
        return self.contexts[cid]

    def get(self, cid: str) -> Context:
        ctx = self.contexts.get(cid)
        if ctx is None:
            raise HTTPError(404, "not_found", f"no context {cid!r} in this sandbox")
        return ctx

    async def delete(self, cid: str) -> None:
        ctx = self.get(cid)
        del self.contexts[cid]
        await ctx.stop()

    async def restart(self, cid: str) -> Context:
        ctx = self.get(cid)
        async with ctx.lock:
            try:
                ctx.sandbox_env = sandbox_env.Applied()  # a fresh kernel has the template's
                await ctx.restart()
            except Exception as e:  # noqa: BLE001 - as in create
                ctx.dead = "could not be restarted"
                raise HTTPError(500, "internal", f"context {cid}: the kernel did not start "
                                f"again: {e}") from None
        return ctx

    async def prepare(self, body: dict) -> tuple[Context, str, dict, float | None]:
        """The context, code, env_vars and timeout of an /execute request."""
        code = body.get("code")
        if not isinstance(code, str):
            raise HTTPError(400, "invalid", "code must be a string")
        cid, language = body.get("context_id"), body.get("language")
        if cid and language:
            raise HTTPError(400, "invalid", "give context_id or language, not both")
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
            raise HTTPError(400, "invalid", "env_vars must map names to strings")
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise HTTPError(400, "invalid", "timeout must be a number of seconds above 0")
        ctx = self.get(cid) if cid else await self.default(language)
        return ctx, code, env_vars, timeout


# --- HTTP/1.1 ------------------------------------------------------------------------------

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
           500: "Internal Server Error"}


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.pending = b""  # bytes read while a response streamed (a pipelined request)

    async def read_request(self):
        buf = self.pending
        self.pending = b""
        while b"\r\n\r\n" not in buf:
            data = await self.reader.read(65536)
            if not data:
                return None
            buf += data
            if len(buf) > 65536:
                raise HTTPError(400, "invalid", "request head too large")
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length") or 0)
        if n > BODY_MAX:
            raise HTTPError(413, "invalid", "request body too large")
        while len(rest) < n:
            data = await self.reader.read(n - len(rest))
            if not data:
                return None
            rest += data
        self.pending = rest[n:]
        return method, target.split("?", 1)[0], headers, rest[:n]

    async def respond(self, status: int, body: dict | list | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                f"Content-Length: {len(data)}\r\n")
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        await self.writer.drain()

    async def watch_gone(self, gone: asyncio.Event) -> None:
        """Sets `gone` when the client closes its side while a response streams."""
        data = await self.reader.read(65536)
        while data:
            self.pending += data
            data = await self.reader.read(65536)
        gone.set()


class Server:
    def __init__(self, interp: Interpreter):
        self.interp = interp

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        try:
            while True:
                try:
                    req = await conn.read_request()
                    if req is None:
                        return
                    if not await self.route(conn, *req):
                        return
                except HTTPError as e:
                    await conn.respond(e.status, {"code": e.code, "message": e.message})
                except (ValueError, UnicodeDecodeError):
                    await conn.respond(400, {"code": "invalid", "message": "bad request"})
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def route(self, conn: Conn, method: str, path: str, headers: dict,
                    body: bytes) -> bool:
        parts = [p for p in path.split("/") if p]
        if parts == ["health"] and method == "GET":
            await conn.respond(200, {"status": "ok"})
        elif parts == ["execute"] and method == "POST":
            return await self.execute(conn, _json(body))
        elif parts == ["contexts"] and method == "POST":
            req = _json(body)
            ctx = await self.interp.create(req.get("language") or "python", req.get("cwd"))
            await conn.respond(200, ctx.info())
        elif parts == ["contexts"] and method == "GET":
            await conn.respond(200, [c.info() for c in self.interp.contexts.values()])
        elif len(parts) == 2 and parts[0] == "contexts" and method == "DELETE":
            await self.interp.delete(parts[1])
            await conn.respond(204, None)
        elif len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart" \
                and method == "POST":
            ctx = await self.interp.restart(parts[1])
            await conn.respond(200, ctx.info())
        else:
            raise HTTPError(404, "not_found", f"no route {method} {path}")
        return True

    async def execute(self, conn: Conn, body: dict) -> bool:
        ctx, code, env_vars, timeout = await self.interp.prepare(body)
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        if ctx.lock.locked():  # it waits for another execution: answer the head now
            conn.writer.write(head)
            head = b""
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(conn.watch_gone(gone))
        out = Execution(conn.writer, gone, head, raw_text=body.get("raw_text") is True)
        head_timer = asyncio.get_running_loop().call_later(HEAD_WAIT, out.send_head)
        try:
            async with ctx.lock:
                await ctx.execute(code, env_vars, timeout, out)
            await out.line({"type": "end_of_execution"})
            await out.flush(end=True)
        finally:
            head_timer.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return not gone.is_set()


def _json(body: bytes) -> dict:
    try:
        obj = json.loads(body or b"{}")
    except ValueError:
        raise HTTPError(400, "invalid", "the body is not JSON") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "invalid", "the body must be a JSON object")
    return obj


async def main(port: int = PORT, host: str = "0.0.0.0") -> None:
    # a server started in the background may have inherited SIGINT ignored, which its
    # bash contexts would inherit too (and then no interrupt could stop a cell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interp = Interpreter()
    ctx = await interp.default("python")
    await ctx.warm()
    server = await asyncio.start_server(Server(interp).handle, host, port, limit=1 << 20)
    print(f"code interpreter listening on {host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else PORT
    asyncio.run(main(port))
