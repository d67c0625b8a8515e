"""Built-in templates: templates every server can build from a fixed step list, by name.

A built-in is not shipped prebuilt: it is built on first use (`Engine.create` of its name
when no template of that name exists) or on purpose (`torpor template build
code-interpreter`, `POST /v1/templates {"name": "code-interpreter"}` with no steps), from
the steps below, through the egress proxy under the server's build network policy. Once
built it is a template like any other (`torpor template list`, `rm`, rebuilt by name).

- `code-interpreter`: `base` (the host's Debian Python 3.11) with ipykernel,
  jupyter_client, numpy, pandas, matplotlib and e2b-charts from the package index,
  `MPLBACKEND=Agg`, and the code interpreter's server (`torpor/interpreter/server.py`, with
  the kernel launcher `kernel.py` it starts its Python kernels with, `sandbox_env.py` and
  the kernels' display hooks `torpor_display.py`, copied in from the context the built-in
  provides) running on port 49999 in its boot snapshot, its default Python kernel warm.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# What code-interpreter asks for, with versions that have wheels for CPython 3.11 on
# x86_64 (nothing compiles in the build) ...
CODE_INTERPRETER_PACKAGES = [
    "ipykernel==7.4.0",
    "jupyter_client==8.10.0",
    "numpy==2.4.6",
    "pandas==3.1.2",
    "matplotlib==3.11.2",
    # the chart data of matplotlib figures (a result's `chart`), as E2B's interpreter has it
    "e2b-charts==1.1.0",
]
# ... and everything they pull in, pinned as pip resolved it for them (`pip install
# --dry-run --report` on CPython 3.11), so a build next year installs the same files.
CODE_INTERPRETER_LOCK = [
    "asttokens==3.0.2", "comm==0.2.3", "contourpy==1.3.3", "cycler==0.12.1",
    "debugpy==1.8.22", "executing==2.3.0", "fonttools==4.69.1", "ipython==9.19.1",
    "ipython_pygments_lexers==1.1.1", "jedi==0.20.1", "jupyter_core==5.9.1",
    "kiwisolver==1.5.1", "matplotlib-inline==0.2.2", "nest-asyncio2==1.7.4",
    "packaging==26.4", "parso==0.8.7", "pexpect==4.9.0", "pillow==13.0.0",
    "platformdirs==4.14.9", "prompt_toolkit==3.0.53", "psutil==7.2.2", "ptyprocess==0.7.0",
    "pure_eval==0.2.4", "Pygments==2.21.0", "pyparsing==3.3.3", "python-dateutil==4.0.0",
    "pyzmq==27.3.0", "stack-data==0.6.3", "tornado==6.6.1", "traitlets==5.16.1",
    "typing_extensions==4.16.0", "tzdata==2026.6", "wcwidth==0.9.5",
    # e2b-charts'
    "annotated-types==0.8.0", "pydantic==2.14.4", "pydantic_core==2.50.5",
    "typing-inspection==0.4.5",
]


# The code interpreter's HTTP server (torpor/interpreter/server.py, E2B's protocol), where
# the template has it and the port it listens on inside the sandbox.
INTERPRETER_DIR = "/opt/torpor/interpreter"
INTERPRETER_PORT = 49999
# its files: the server, the kernel launcher it starts its Python contexts with, the
# sandbox's env for its contexts, the kernels' display hooks (an IPython extension)
_INTERPRETER_FILES = ("server.py", "kernel.py", "sandbox_env.py", "torpor_display.py")
_INTERPRETER_SOURCE = Path(__file__).parent / "interpreter"


def interpreter_command() -> str:
    """The start command: the code interpreter's server, which starts the default Python
    context (an IPython kernel) and runs a first cell before it listens, so the boot
    snapshot holds a warm kernel."""
    return f"exec python3 {INTERPRETER_DIR}/server.py {INTERPRETER_PORT}"


def interpreter_context() -> bytes:
    """The build context of `code-interpreter`: a tar holding `interpreter/` with the
    files of _INTERPRETER_FILES, with fixed metadata (owner, mode, time) so its layer's key
    changes only with the files' contents."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("interpreter")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        for name in _INTERPRETER_FILES:
            data = (_INTERPRETER_SOURCE / name).read_bytes()
            f = tarfile.TarInfo(f"interpreter/{name}")
            f.size, f.mode = len(data), 0o644
            tar.addfile(f, io.BytesIO(data))
    return buf.getvalue()


def code_interpreter() -> list[dict]:
    """The steps of `code-interpreter`."""
    return [
        {"type": "from_template", "template": "base"},
        {"type": "pip_install", "packages": CODE_INTERPRETER_PACKAGES + CODE_INTERPRETER_LOCK},
        {"type": "env", "env": {"MPLBACKEND": "Agg"}},
        {"type": "copy", "src": "interpreter", "dst": INTERPRETER_DIR, "user": "root"},
        # importing IPython, numpy's and matplotlib's first use under ptrace takes a while
        {"type": "start_cmd", "cmd": interpreter_command(),
         "ready": {"port": INTERPRETER_PORT}, "timeout": 180},
    ]


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    steps: Callable[[], list[dict]]
    resources: dict = field(default_factory=dict)  # template defaults (cpu, memory_mb, ...)
    context: Callable[[], bytes] | None = None  # the build context its copy steps read


BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    Builtin("code-interpreter",
            "Python 3.11 with ipykernel, numpy, pandas and matplotlib; the code "
            f"interpreter (E2B's protocol) listens on port {INTERPRETER_PORT} from the start, "
            "a Python kernel warm",
            code_interpreter, context=interpreter_context),
]}


def builtin(name: str) -> Builtin | None:
    """The built-in template of that name (without a tag), or None."""
    return BUILTINS.get(name)
