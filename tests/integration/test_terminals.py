"""Terminals in real sandboxes: the SDK over the WebSocket, reattach with replay, refusals,
and `torpor shell` driven through tmux like a person at a keyboard."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid

import pytest
from conftest import CLI, run, wait_for

from torpor.sdk import Sandbox
from torpor.sdk.errors import AuthError, InvalidRequestError, NotFoundError


@pytest.fixture
def sbx(server, sandbox):
    s = Sandbox(sandbox, url=server.url, api_key=server.key)
    yield s
    s.close()


def _until(term, needle: bytes, timeout: float = 15.0) -> bytes:
    return wait_for(lambda: needle in term.output and term.output, timeout=timeout,
                    every=0.02)


def test_create_send_resize_kill_wait(sbx):
    got = []
    term = sbx.pty.create(cols=120, rows=40, on_data=got.append)
    try:
        assert term.pid > 0
        term.send_input(b"stty size; tty; echo $TERM; id -un\n")
        _until(term, b"user\r\n")
        out = term.output
        assert b"40 120\r\n" in out
        assert b"/dev/pts/" in out and b"xterm-256color" in out
        assert b"".join(got) == out  # on_data saw every byte, in order
        term.resize(100, 30)
        term.send_input(b"stty size\n")
        _until(term, b"30 100\r\n")
        info = sbx.pty.info(term.pid)
        assert info.running and (info.pty.cols, info.pty.rows) == (100, 30)
        assert any(t.pid == term.pid for t in sbx.pty.list())
        # Ctrl-C reaches the foreground job, not the shell
        term.send_input(b"sleep 30; echo sl''ept\n")
        time.sleep(0.5)
        term.send_input(b"\x03")
        term.send_input(b"echo after-$((6*7))\n")
        _until(term, b"after-42")
        assert b"slept" not in term.output  # only its echo, sl''ept, is there
        term.kill()
        assert term.wait(timeout=15) == 128 + 9
        assert not sbx.pty.info(term.pid).running
    finally:
        term.disconnect()


def test_exit_code_and_command(sbx):
    term = sbx.pty.create(cols=80, rows=24, cmd="printf 'a\\tb\\n'; exit 7")
    assert term.wait(timeout=15) == 7
    assert b"a\tb\r\n" in term.output
    term.disconnect()
    # a program given as argv, with env and cwd; python3's REPL on a terminal
    py = sbx.pty.create(cmd=["python3", "-q"], env={"X": "from-env"}, cwd="/tmp")
    try:
        _until(py, b">>> ")
        py.send_input("import os; print(os.getcwd(), os.environ['X'], os.isatty(0))\n")
        _until(py, b"/tmp from-env True")
        py.send_input(b"exit(5)\n")
        assert py.wait(timeout=15) == 5
    finally:
        py.disconnect()


def test_reattach_replays_recent_output(sbx):
    term = sbx.pty.create()
    pid = term.pid
    term.send_input(b"echo before-$((1+1))\n")
    _until(term, b"before-2")
    # output made while nobody is attached is kept, from the offset the client had
    term.send_input(b"sleep 1; echo away-$((5+5))\n")
    _until(term, b"echo away")
    seen = term.offset
    term.disconnect()
    time.sleep(1.5)
    back = sbx.pty.connect(pid, offset=seen)
    try:
        _until(back, b"away-10")
        assert not back.output.startswith(b"sleep 1")  # nothing from before `seen`
    finally:
        back.disconnect()
    again = sbx.pty.connect(pid)  # no offset: the recent screen
    try:
        _until(again, b"before-2")  # replayed
        again.send_input(b"echo during-$((2+2))\n")
        _until(again, b"during-4")
        mark = again.offset
    finally:
        again.disconnect()
    # from an offset: exactly what came after it, nothing twice
    tail = sbx.pty.connect(pid, offset=mark)
    try:
        tail.send_input(b"echo last-$((3+3))\n")
        _until(tail, b"last-6")
        assert b"during-4" not in tail.output and b"before-2" not in tail.output
        # an offset past the output is refused, saying what is kept
        with pytest.raises(InvalidRequestError) as e:
            sbx.pty.connect(pid, offset=tail.offset + 10**9)
        assert e.value.details.get("available")
        tail.send_input(b"exit 3\n")
        assert tail.wait(timeout=15) == 3
    finally:
        tail.disconnect()


def test_refusals(sbx, api, sandbox):
    with pytest.raises(InvalidRequestError):
        sbx.pty.create(cols=0, rows=0)
    r = api.post(f"/v1/sandboxes/{sandbox}/pty", json={"cols": 0, "rows": 0})
    assert r.status_code == 422 and r.json()["error"]["field"] in ("cols", "rows")
    term = sbx.pty.create(cmd="sleep 30")
    try:
        with pytest.raises(InvalidRequestError) as e:
            term.resize(0, 0)
        assert "cols" in str(e.value)
        r = api.post(f"/v1/sandboxes/{sandbox}/pty/{term.pid}/resize",
                     json={"cols": 80, "rows": 0})
        assert r.status_code == 422 and r.json()["error"]["field"] == "rows"
    finally:
        term.kill()
        term.disconnect()
    # a process that is not a terminal
    proc = sbx.commands.run("sleep 30", background=True)
    with pytest.raises(NotFoundError):
        sbx.pty.connect(proc.pid)
    with pytest.raises(NotFoundError):
        sbx.pty.info(proc.pid)
    proc.kill()
    with pytest.raises(NotFoundError):
        sbx.pty.create(cmd=["no-such-program-here"])


def test_socket_needs_the_key(server, sbx):
    term = sbx.pty.create(cmd="sleep 30")
    try:
        bad = Sandbox(sbx.id, url=server.url, api_key="not-a-key")
        with pytest.raises(AuthError):
            bad.pty.connect(term.pid)
        bad.close()
    finally:
        term.kill()
        term.disconnect()


# --- `torpor shell` through tmux ------------------------------------------------------------
@pytest.fixture
def tmux(server):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing: `make deps` installs it (Makefile APT_PKGS)")
    name = "torpor-test-" + uuid.uuid4().hex[:8]
    sock = f"/tmp/{name}.sock"
    env = {**os.environ, "TORPOR_URL": server.url, "TORPOR_API_KEY": server.key}

    def tm(*args: str, check: bool = True) -> str:
        return subprocess.run(["tmux", "-S", sock, *args], env=env, capture_output=True,
                              text=True, check=check, timeout=10).stdout

    tm.name = name  # type: ignore[attr-defined]
    yield tm
    tm("kill-server", check=False)
    for path in (sock, f"/tmp/{name}.status"):  # the status a test's shell writes at its end
        if os.path.exists(path):
            os.unlink(path)


def _pane(tm) -> str:
    return tm("capture-pane", "-p", "-J", "-t", tm.name)


def _until_pane(tm, keys: str, expect: str, tries: int = 4) -> None:
    """Type `keys` + Enter and wait for `expect` on the pane; type again if it did not come
    (a program that just quit may have flushed what was typed ahead, as readline does)."""
    for _ in range(tries):
        tm("send-keys", "-t", tm.name, keys, "Enter")
        try:
            wait_for(lambda: expect in _pane(tm), timeout=4, every=0.1)
            return
        except AssertionError:
            continue
    raise AssertionError(f"{expect!r} never showed; the pane:\n{_pane(tm)}")


def test_torpor_shell_in_tmux(api, tmux, sandbox):
    has = run(api, sandbox, "command -v top vim || true")["stdout"]
    status = f"/tmp/{tmux.name}.status"
    cmd = " ".join(shlex.quote(a) for a in [*CLI, "shell", sandbox])
    tmux("new-session", "-d", "-s", tmux.name, "-x", "100", "-y", "30",
         f"{cmd}; echo torpor-exit=$? > {status}; sleep 30")
    try:
        wait_for(lambda: "$" in _pane(tmux), timeout=30)
        _until_pane(tmux, "echo hi-$((40+2))", "hi-42")
        # the window's size reached the sandbox, and follows a resize
        _until_pane(tmux, "stty size", "30 100")
        tmux("resize-window", "-t", tmux.name, "-x", "90", "-y", "25")
        time.sleep(0.3)
        _until_pane(tmux, "clear; stty size", "25 90")
        # Ctrl-C goes to the sandbox: it stops `sleep`, not `torpor shell`
        tmux("send-keys", "-t", tmux.name, "sleep 30; echo not-inter''rupted", "Enter")
        time.sleep(0.5)
        tmux("send-keys", "-t", tmux.name, "C-c")
        _until_pane(tmux, "echo still-$((5*5))", "still-25")
        assert "not-interrupted" not in _pane(tmux)
        # full-screen programs: python3's REPL, and top / vim where the template has them
        _until_pane(tmux, "clear; python3 -q", ">>>")
        _until_pane(tmux, "print(6*7*1000)", "42000")
        tmux("send-keys", "-t", tmux.name, "exit()", "Enter")
        _until_pane(tmux, "clear; echo py-$((2+2))", "py-4")
        if "/top" in has:
            _until_pane(tmux, "top -d 0.3", "load average")
            tmux("send-keys", "-t", tmux.name, "q")
            _until_pane(tmux, "clear; echo top-$((3+3))", "top-6")
        if "/vim" in has:
            _until_pane(tmux, "vim -u NONE /tmp/note", "/tmp/note")
            tmux("send-keys", "-t", tmux.name, "ihello from vim", "Escape", ":wq", "Enter")
            _until_pane(tmux, "clear; cat /tmp/note", "hello from vim")
        tmux("send-keys", "-t", tmux.name, "exit 4", "Enter")
        try:
            wait_for(lambda: os.path.exists(status), timeout=15)
        except AssertionError:
            raise AssertionError("torpor shell did not exit; the pane:\n" + _pane(tmux)) from None
        with open(status) as f:
            assert f.read().strip() == "torpor-exit=4"
    finally:
        tmux("kill-server", check=False)  # before the fixture removes the status file


def test_async_twin_and_hibernation(server, sandbox, sbx):
    """AsyncSandbox.pty, and a shell that outlives a hibernation: its variables, its screen
    replayed on reattach, the same pid."""
    import asyncio

    from torpor.sdk import AsyncSandbox

    async def first() -> tuple[int, int]:
        a = AsyncSandbox(sandbox, url=server.url, api_key=server.key)
        try:
            chunks: list[bytes] = []

            async def collect(b: bytes) -> None:
                chunks.append(b)

            term = await a.pty.create(cols=90, rows=20, on_data=collect)
            await term.send_input(b"KEPT=kept-$((7*6)); stty size\n")
            for _ in range(200):
                if b"20 90" in b"".join(chunks):
                    break
                await asyncio.sleep(0.05)
            assert b"20 90\r\n" in b"".join(chunks) == term.output
            offset = term.offset
            await term.disconnect()
            return term.pid, offset
        finally:
            await a.close()  # (leaving `async with` would delete the sandbox)

    pid, offset = asyncio.run(first())
    assert sbx.hibernate().state == "hibernated"
    term = sbx.pty.connect(pid, offset=0)  # wakes the sandbox
    try:
        _until(term, b"20 90")  # the screen from before, replayed
        assert len(term.output) >= offset
        term.send_input(b"echo $KEPT\n")
        _until(term, b"kept-42\r\n")
        term.send_input(b"exit 9\n")
        assert term.wait(timeout=15) == 9
    finally:
        term.disconnect()
