"""The code interpreter's view of the sandbox's env (torpor/interpreter/sandbox_env.py):
the agent's file read only when root's and not writable by others, a context given only
what changed (and the template's own values back when the sandbox's go), and the code
that sets it in a Python kernel and a bash context run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torpor.interpreter import sandbox_env as se


def write(path, env, mode=0o644):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env}, f)
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # a new inode: the key changes even within one mtime tick


@pytest.fixture
def source(tmp_path):
    return se.SandboxEnv(str(tmp_path / "env.json"))


def test_no_file_no_env(source):
    assert source.current() == (None, {})
    assert se.Applied().due(source) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the file must be root's")
def test_a_file_others_may_write_or_not_json_is_ignored(source):
    write(source.path, {"A": "1"}, mode=0o666)
    assert source.current()[1] == {}
    write(source.path, {"A": "1"})
    assert source.current()[1] == {"A": "1"}
    with open(source.path, "w") as f:
        f.write("[1, 2")
    assert source.current()[1] == {}
    write(source.path, {"A": 1, "": "x", "B=C": "x", "D": "ok", "E": "a\0b"})
    assert source.current()[1] == {"D": "ok"}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user")
def test_a_file_not_roots_is_ignored(source):
    write(source.path, {"A": "1"})
    os.chown(source.path, 1000, 1000)  # what the sandbox's user could have made
    assert source.current()[1] == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="the file must be root's")
def test_a_context_gets_what_changed_and_the_templates_values_back(source, monkeypatch):
    monkeypatch.setenv("TEMPLATE_VAR", "tpl")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the server's own: kernels have their choice
    ctx = se.Applied()
    write(source.path, {"MPLBACKEND": "Agg", "A": "1", "B": "2", "TEMPLATE_VAR": "mine"})
    assert ctx.due(source) == ({"A": "1", "B": "2", "TEMPLATE_VAR": "mine"}, [])
    assert ctx.due(source) is None  # unchanged: nothing to do
    write(source.path, {"MPLBACKEND": "Agg", "A": "1", "B": "3"})
    assert ctx.due(source) == ({"B": "3", "TEMPLATE_VAR": "tpl"}, [])
    write(source.path, {"MPLBACKEND": "Agg"})
    assert ctx.due(source) == ({}, ["A", "B"])
    # another context, and one restarted (a fresh Applied), get the whole of it
    assert se.Applied().due(source) is None  # nothing differs from the server's own


def test_the_code_sets_and_removes_in_python_and_bash(monkeypatch):
    env = {"A": "it's \"q\" $x `y` \\n", "B": "\u2028 é"}
    monkeypatch.setenv("GONE", "was here")
    code = se.python_code(env, ["GONE"]) + \
        "import os, json; print(json.dumps([os.environ.get(k) for k in ('A', 'B', 'GONE')]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [env["A"], env["B"], None]

    def sh(s):
        return "'" + s.replace("'", "'\\''") + "'"
    script = se.bash_code({**env, "NOT-A-NAME": "x"}, ["GONE"], sh) + \
        'printf "%s|%s|%s" "$A" "$B" "${GONE-unset}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out == f"{env['A']}|{env['B']}|unset"
