"""The sandbox's environment for the code interpreter's contexts (beside `server.py`).

The server and its default kernel start in the template's build and wake up in every
sandbox restored from its boot snapshot, so their environment is the template's: the env a
sandbox is created with (`Sandbox.create(envs=...)`) came later. The agent writes it to
ENV_FILE on every configure (`torpor/agent/envfile.py`: root's, readable by all, replaced
whole). Before a context's next execution the server compares the file with what that
context last got (one stat) and, when it changed, sets the difference in the context first
(E2B's server does the same with envd's /envs, once per context). Names whose value is
the server's own (the template's env) are left alone: the kernels have them already, with
the server's choices for kernels on top (MPLBACKEND). A per-execution
`env_vars` goes on top and is undone after, back to these values.

A file that is not root's, or not JSON `{"env": {name: value}}`, is ignored: a sandbox's
`user` cannot create or change one there (a root-owned directory), so what it holds came
from the agent.
"""

from __future__ import annotations

import json
import os

ENV_FILE = os.environ.get("TORPOR_ENV_FILE", "/run/torpor/env.json")


class SandboxEnv:
    def __init__(self, path: str = ENV_FILE):
        self.path = path
        self.key: tuple | None = None  # (inode, mtime, size) of what `env` was read from
        self.env: dict[str, str] = {}

    def current(self) -> tuple[tuple | None, dict[str, str]]:
        """(a key that changes with the file, the env it holds): one stat when unchanged."""
        try:
            st = os.stat(self.path)
        except OSError:
            self.key, self.env = None, {}
            return self.key, self.env
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self.key:
            self.key, self.env = key, self._read(st)
        return self.key, self.env

    def _read(self, st: os.stat_result) -> dict[str, str]:
        if st.st_uid != 0 or st.st_mode & 0o022:
            return {}
        try:
            with open(self.path, "rb") as f:
                env = json.loads(f.read()).get("env")
        except (OSError, ValueError, AttributeError):
            return {}
        if not isinstance(env, dict):
            return {}
        return {k: v for k, v in env.items()
                if isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                and "\0" not in k + v}


def python_code(env: dict[str, str], gone: list[str]) -> str:
    """A silent cell setting `env` in a Python kernel's os.environ, removing `gone`."""
    return ("import os as _torpor_os\n"
            f"_torpor_os.environ.update({json.dumps(env)})\n"
            f"for _k in {json.dumps(gone)}:\n"
            "    _torpor_os.environ.pop(_k, None)\n"
            "del _torpor_os\n")


def bash_code(env: dict[str, str], gone: list[str], quote) -> str:
    """Lines exporting `env` in a bash context (names a shell can hold), unsetting `gone`."""
    lines = [f"export {k}={quote(v)}\n" for k, v in env.items() if k.isidentifier()]
    lines += [f"unset {k}\n" for k in gone if k.isidentifier()]
    return "".join(lines)


class Applied:
    """What one context got from the sandbox's env; `due` gives the change to apply next."""

    def __init__(self):
        self.key: tuple | None = None
        self.env: dict[str, str] = {}

    def due(self, source: SandboxEnv) -> tuple[dict[str, str], list[str]] | None:
        """(names to set, names to remove) when the env changed since the last call."""
        key, env = source.current()
        if key == self.key:
            return None
        # the template's own env is the server's, and its kernels have it (with the server's
        # own choices for them on top, such as MPLBACKEND): only what differs is set
        want = {k: v for k, v in env.items() if os.environ.get(k) != v}
        changed = {k: v for k, v in want.items() if self.env.get(k) != v}
        gone = []
        for k in sorted(self.env.keys() - want.keys()):
            if k in os.environ:  # the template's value, which it had covered
                changed[k] = os.environ[k]
            else:
                gone.append(k)
        self.key, self.env = key, want
        return (changed, gone) if changed or gone else None
