"""E2B's README and documentation examples, unmodified, against Torpor (issue 15's
acceptance): each runs as its own Python program with nothing but E2B's environment
variables pointing at a Torpor server, the way a user moves existing code over.

Sources: packages/python-sdk/README.md of github.com/e2b-dev/E2B at the pinned SDK's commit,
python/README.md and python/example.py of github.com/e2b-dev/code-interpreter, and the pages
of e2b.dev/docs named on each example (quickstart, commands, filesystem, persistence,
connect, code interpreting with charts). Only `print` lines that let the test read the
outcome were added; the E2B calls are as published."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import e2b_key

pytestmark = pytest.mark.slow  # the code interpreter examples share the ci_server build


def e2b_env(server) -> dict:
    key = e2b_key(server, "e2b-examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "TORPOR_"))}
    return {**env, "E2B_API_KEY": key, "E2B_API_URL": server.url,
            "E2B_SANDBOX_URL": server.url, "E2B_DOMAIN": "localhost"}


def run_example(env: dict, code: str, timeout: float = 120) -> str:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, f"example failed:\n{p.stdout}\n{p.stderr[-4000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def env(server):
    return e2b_env(server)


@pytest.fixture(scope="module")
def ci_env(ci_server):
    return e2b_env(ci_server)


def test_readme_start_a_sandbox_and_run_commands(env):
    # packages/python-sdk/README.md, "3. Start a sandbox and run commands"
    out = run_example(env, """
        from e2b import Sandbox

        with Sandbox.create() as sandbox:
            result = sandbox.commands.run('echo "Hello from E2B!"')
            print(result.stdout)  # Hello from E2B!
    """)
    assert out.strip() == "Hello from E2B!"


def test_docs_commands_streaming_and_background(env):
    # e2b.dev/docs/commands/streaming and /commands/background
    out = run_example(env, """
        from e2b import Sandbox

        sandbox = Sandbox.create()
        result = sandbox.commands.run('echo hello; sleep 1; echo world',
                                      on_stdout=lambda data: print("out:", data.strip()),
                                      on_stderr=lambda data: print(data))
        command = sandbox.commands.run('echo hello; sleep 10; echo world',
                                       background=True,
                                       on_stdout=lambda data: print("bg:", data.strip()))
        command.kill()
        sandbox.kill()
    """)
    assert "out: hello" in out and "out: world" in out
    assert "bg: world" not in out


def test_docs_filesystem_read_write_list(env):
    # e2b.dev/docs/filesystem/read-write and /filesystem/info
    out = run_example(env, """
        from e2b import Sandbox

        sandbox = Sandbox.create()
        sandbox.files.write('/home/user/my_file.txt', 'file content')
        file_content = sandbox.files.read('/home/user/my_file.txt')
        print(file_content)
        sandbox.files.write_files([
            {"path": "/home/user/dir/a.txt", "data": "A"},
            {"path": "/home/user/dir/b.txt", "data": "B"},
        ])
        files = sandbox.files.list('/home/user/dir')
        print(sorted(f.name for f in files))
        info = sandbox.files.get_info('/home/user/my_file.txt')
        print(info.type, info.size)
        sandbox.kill()
    """)
    lines = out.splitlines()
    assert lines[0] == "file content"
    assert lines[1] == "['a.txt', 'b.txt']"
    assert lines[2].endswith(" 12") and "file" in lines[2].lower()


def test_docs_persistence_pause_and_connect(env):
    # e2b.dev/docs/sandbox/persistence: pause, then connect resumes it with memory intact
    out = run_example(env, """
        from e2b import Sandbox

        sbx = Sandbox.create()
        print('Sandbox created', sbx.sandbox_id)
        sbx.commands.run("sleep 3600", background=True)
        sbx.files.write('/home/user/state.txt', 'kept')

        sbx.pause()
        print('Sandbox paused', sbx.sandbox_id)
        print('running after pause:', sbx.is_running())

        same_sbx = sbx.connect()
        print('Connected to the sandbox', same_sbx.sandbox_id)
        print(same_sbx.files.read('/home/user/state.txt'))
        print(any('sleep 3600' in ' '.join([p.cmd] + p.args)
                  for p in same_sbx.commands.list()))
        same_sbx.kill()
    """)
    assert "running after pause: False" in out
    assert "kept\nTrue" in out


def test_docs_connect_to_a_running_sandbox_by_id(env):
    # e2b.dev/docs/sandbox/connect
    out = run_example(env, """
        from e2b import Sandbox

        sbx = Sandbox.create()
        sandbox_id = sbx.sandbox_id
        sandbox = Sandbox.connect(sandbox_id)
        result = sandbox.commands.run("pwd")
        print(result.stdout.strip())
        print(len([s for s in Sandbox.list().next_items() if s.sandbox_id == sandbox_id]))
        sandbox.kill()
    """)
    assert out.splitlines() == ["/home/user", "1"]


def test_code_interpreter_readme(ci_env):
    # e2b-dev/code-interpreter python/README.md, "3. Execute code with code interpreter"
    out = run_example(ci_env, """
        from e2b_code_interpreter import Sandbox

        with Sandbox.create() as sandbox:
            sandbox.run_code("x = 1")
            execution = sandbox.run_code("x+=1; x")
            print(execution.text)  # outputs 2
    """)
    assert out.strip() == "2"


def test_code_interpreter_chart(ci_env):
    # e2b.dev/docs/code-interpreting/create-charts-visualizations (static charts)
    out = run_example(ci_env, """
        import base64
        from e2b_code_interpreter import Sandbox

        code_to_run = '''
        import matplotlib.pyplot as plt

        plt.plot([1, 2, 3, 4])
        plt.ylabel('some numbers')
        plt.show()
        '''
        sandbox = Sandbox.create()
        execution = sandbox.run_code(code_to_run)
        first_result = execution.results[0]
        if first_result.png:
            with open('/dev/null', 'wb') as f:
                f.write(base64.b64decode(first_result.png))
            print('Chart saved as chart.png')
        print(base64.b64decode(first_result.png)[:8])
        sandbox.kill()
    """)
    assert "Chart saved as chart.png" in out
    assert "b'\\x89PNG\\r\\n\\x1a\\n'" in out


def test_code_interpreter_sandbox_killed_mid_execution(ci_env):
    # e2b-dev/code-interpreter python/tests/sync/test_killed.py: a kill while a cell runs
    # (and has printed nothing yet) ends run_code with E2B's "sandbox was killed" error
    out = run_example(ci_env, """
        import threading
        from e2b import TimeoutException
        from e2b_code_interpreter import Sandbox

        sandbox = Sandbox.create()
        timer = threading.Timer(2.0, sandbox.kill)
        timer.start()
        try:
            sandbox.run_code("import time; time.sleep(300)", timeout=300)
        except TimeoutException as e:
            print(e)
    """)
    assert "sandbox was killed while the request was in progress" in out
