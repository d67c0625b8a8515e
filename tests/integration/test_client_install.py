"""The client installs light: a fresh venv with `pip install torpor` (no extra) gets the SDK
and the CLI with httpx, pydantic, typer, rich, dockerfile-parse and wsproto only, and runs
the README's quickstart against a server. The server's packages come with the `server` extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

SERVER_ONLY = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "cryptography", "dns", "mcp")

QUICKSTART = textwrap.dedent("""
    import sys
    from torpor import Sandbox

    with Sandbox.create(env={"GREETING": "hi"}) as sbx:
        r = sbx.commands.run("echo $GREETING from $(hostname)")
        assert (r.stdout, r.exit_code) == ("hi from sandbox\\n", 0), r
        sbx.files.write("app/main.py", "print(6 * 7)\\n")
        assert sbx.commands.run("python3 app/main.py").stdout == "42\\n"
        seen = []
        sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=seen.append)
        assert "".join(seen) == "1\\n2\\n3\\n"
        assert [e.name for e in sbx.files.list("app")] == ["main.py"]
    missing = [m for m in {server_only!r} if m in sys.modules]
    assert not missing, missing
    print("quickstart ok")
""")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A venv with the project installed as a client would: the tracked files only (no
    build leftovers), `pip install <dir>` with no extra."""
    base = tmp_path_factory.mktemp("client")
    src = base / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return venv


def test_the_client_alone_has_no_server_packages(client_venv):
    py = str(client_venv / "bin" / "python")
    for mod in SERVER_ONLY:
        p = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, check=False)
        assert p.returncode != 0, f"{mod} was installed with the client"
    p = subprocess.run([py, "-c", "import httpx, pydantic, typer, rich, torpor.sdk"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr


def test_the_readme_quickstart_runs_from_the_client_alone(client_venv, server):
    env = dict(os.environ, TORPOR_URL=server.url, TORPOR_API_KEY=server.key)
    code = QUICKSTART.replace("{server_only!r}", repr(SERVER_ONLY))
    p = subprocess.run([str(client_venv / "bin" / "python"), "-c", code], env=env, cwd="/",
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0 and "quickstart ok" in p.stdout, p.stderr[-3000:]
    torpor = str(client_venv / "bin" / "torpor")
    p = subprocess.run([torpor, "sandbox", "list", "--json"], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    # the server is not there, and the CLI says how to get it
    p = subprocess.run([torpor, "serve", "--port", "1"], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode != 0 and "torpor[server]" in p.stderr, p.stderr
    # nor is the MCP library, and `torpor mcp` says how to get it
    p = subprocess.run([torpor, "mcp"], env=env, capture_output=True, text=True,
                       timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "pip install 'torpor[mcp]'" in p.stderr, p.stderr
