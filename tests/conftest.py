"""Shared fixtures: a real `torpor serve` on loopback with its own data dir, real runsc.

The tests sit by kind, and each kind is a marker, so one kind runs alone
(`pytest -m unit`): `unit/` needs neither runsc nor a server (the agent runs on the host,
the SDK against a mock transport, the engine in-process), `integration/` runs real
sandboxes under a real server, `security/` tries to escape them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# the `torpor` command line, run by this interpreter (the venv's) from the checkout
CLI = [sys.executable, "-c", "from torpor.cli.main import app; app()"]


def cli(server: Server | None, *args: str, input: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI as a subprocess (pointed at `server` if given); text output, no check."""
    env = dict(os.environ)
    if server is not None:
        env.update(TORPOR_URL=server.url, TORPOR_API_KEY=server.key)
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          input=input, timeout=timeout, check=False)


E2B_ENV = ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN")


def e2b_key(server: Server, name: str) -> str:
    """A new key in E2B's form (`torpor keys create NAME --e2b`)."""
    out = cli(server, "keys", "create", name, "--e2b")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@contextmanager
def e2b_environment(server: Server, key: str) -> Iterator[None]:
    """E2B's environment variables pointing at `server`, as a user sets them, in this
    process (E2B's SDKs read them on each call); the old values come back after."""
    saved = {k: os.environ.get(k) for k in E2B_ENV}
    os.environ.update(E2B_API_KEY=key, E2B_API_URL=server.url, E2B_SANDBOX_URL=server.url,
                      E2B_DOMAIN="localhost")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `torpor serve` subprocess. Stop it with SIGTERM or SIGKILL; start it again on the
    same data dir to test restarts."""

    def __init__(self, data_dir: Path, pool_size: int = 1, env: dict | None = None,
                 args: list[str] | None = None):
        self.extra_env = env or {}
        self.args = list(args or [])
        self.data_dir = data_dir
        self.pool_size = pool_size
        self.port = free_port()
        self.preview_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self) -> Server:
        env = dict(os.environ, TORPOR_DATA=str(self.data_dir),
                   TORPOR_POOL_SIZE=str(self.pool_size), **self.extra_env)
        cmd = [*CLI, "serve",
               "--host", "127.0.0.1", "--port", str(self.port), "--data-dir",
               str(self.data_dir), "--pool-size", str(self.pool_size),
               "--preview-port", str(self.preview_port), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"server did not answer: {self.log.read_text()[-3000:]}")
        self.key = (self.data_dir / "api-key").read_text().strip()
        return self

    def client(self, key: str | None = None, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {key or self.key}"})

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def make_data_dir() -> Path:
    # short, so the holders' Unix socket paths stay far below the 108-byte limit
    return Path(tempfile.mkdtemp(prefix="tpt-", dir="/tmp"))


def teardown_data_dir(server: Server) -> None:
    from torpor.runtime.gvisor import purge

    server.stop(signal.SIGKILL)
    purge(server.data_dir)
    shutil.rmtree(server.data_dir, ignore_errors=True)
    server.log.unlink(missing_ok=True)  # tests read it while their server runs


@pytest.fixture(scope="session")
def server():
    if os.geteuid() != 0:
        pytest.exit("the integration suite runs sandboxes and needs root", returncode=2)
    srv = Server(make_data_dir(), pool_size=1).start()
    yield srv
    teardown_data_dir(srv)


# the package index: the registries resolve to a documentation range here, so a server that
# builds from it allows that range and trusts the system CA bundle upstream
INDEX = ["--egress-allow-cidr", "203.0.113.0/24",
         "--egress-upstream-ca", "/etc/ssl/certs/ca-certificates.crt"]


@pytest.fixture(scope="session")
def ci_server():
    """A server of its own with the built-in `code-interpreter` template built (about a
    minute, from the package index: see INDEX), once for the whole run: every module that
    runs code in a kernel shares it."""
    srv = Server(make_data_dir(), pool_size=0, args=INDEX).start()
    try:
        with srv.client(timeout=600) as c:
            # the first create of the built-in builds it
            r = c.post("/v1/sandboxes", json={"template": "code-interpreter"})
            assert r.status_code == 201, r.text
            c.delete(f"/v1/sandboxes/{r.json()['id']}")
        yield srv
    finally:
        teardown_data_dir(srv)


@pytest.fixture(scope="session")
def api(server):
    with server.client() as c:
        yield c


@pytest.fixture
def sandbox(api):
    r = api.post("/v1/sandboxes", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


def wait_for(pred, timeout: float = 30.0, every: float = 0.25):
    """pred()'s first true value, polling every `every` s; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def wait_listening(api, sid: str, port: int, timeout: float = 30.0) -> None:
    """Until something in the sandbox accepts connections on 127.0.0.1:port."""
    probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}))\""
    wait_for(lambda: run(api, sid, probe)["exit_code"] == 0, timeout, every=0.2)


def run(api, sid: str, cmd: str, **kw) -> dict:
    r = api.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": cmd, **kw})
    assert r.status_code == 200, r.text
    return r.json()


class EngineRun:
    """`engine_run(body, **settings)`: run `async body(engine)` on an Engine in this process,
    over the fixture's own data dir (real runsc), with the server's defaults for tests (no
    warm pool, no previews, no memory watermark) under `settings`; every sandbox is deleted
    and the engine stopped after it, the data dir purged when the test ends."""

    def __init__(self):
        self.data_dir = make_data_dir()

    def __call__(self, body, **settings) -> None:
        import asyncio

        from torpor.config import Settings
        from torpor.engine.manager import Engine

        settings = {"pool_size": 0, "preview_port": 0, "memory_watermark": 0,
                    "egress_log_days": 0, **settings}

        async def main():
            engine = Engine(Settings(data_dir=self.data_dir, **settings))
            await engine.start()
            try:
                await body(engine)
            finally:
                for info in engine.list():
                    await engine.delete(info.id)
                await engine.stop(hibernate=False)
        asyncio.run(main())


@pytest.fixture
def engine_run():
    from torpor.runtime.gvisor import purge

    run = EngineRun()
    try:
        yield run
    finally:
        purge(run.data_dir)
        shutil.rmtree(run.data_dir, ignore_errors=True)


KINDS = ("unit", "integration", "security")


def pytest_collection_modifyitems(config, items):
    """Mark each test with its kind: the name of the folder it sits in."""
    for item in items:
        kind = Path(str(item.path)).parent.name
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))
