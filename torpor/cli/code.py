"""`torpor run-code ID CODE`: run code in a sandbox's code interpreter."""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from torpor.cli._common import conn, fail, pairs


def _write(stream):
    def write(data: str) -> None:
        stream.write(data)
        stream.flush()

    return write


def _image_path(base: Path, n: int) -> Path:
    return base if n == 0 else base.with_name(f"{base.stem}-{n + 1}{base.suffix}")


def run_code_command(
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id (template "
                                              "code-interpreter).")],
    code: Annotated[str, typer.Argument(metavar="CODE", help="The code; - reads it from "
                                        "stdin.")],
    context: Annotated[str | None, typer.Option(help="A context's id (default: the default "
                                                "context of the language).")] = None,
    language: Annotated[str | None, typer.Option(help="python (default) or bash.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="K=V",
                                                  help="Environment variable for this run; "
                                                       "repeatable.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the kernel is interrupted "
                                                "(0: no limit).")] = 300,
    png: Annotated[Path | None, typer.Option(help="Save PNG results here (a second one as "
                                             "NAME-2.png, ...).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole execution as "
                                          "JSON instead.")] = False,
) -> None:
    """Run CODE in sandbox ID's code interpreter: stdout and stderr stream here, then the
    text of each result; an error's traceback goes to stderr and the exit code is 1."""
    from torpor.sdk import Sandbox

    if code == "-":
        code = sys.stdin.read()
    sbx = Sandbox(sandbox_id, **conn())
    live = {} if as_json else {"on_stdout": _write(sys.stdout),
                               "on_stderr": _write(sys.stderr)}
    try:
        ex = sbx.run_code(code, context=context, language=language,
                          env=pairs(env, "--env"), timeout=timeout or None, **live)
    finally:
        sbx.close()
    if as_json:
        print(json.dumps(dataclasses.asdict(ex), indent=2))
        raise typer.Exit(1 if ex.error else 0)
    saved = 0
    for r in ex.results:
        if r.png is not None and png is not None:
            path = _image_path(png, saved)
            try:
                path.write_bytes(base64.b64decode(r.png))
            except OSError as e:
                fail(f"cannot write {path}: {e.strerror}")
            saved += 1
            print(f"saved a PNG result to {path}", file=sys.stderr)
        elif r.text is not None:
            print(r.text)
        if r.png is not None and png is None:
            print("(a PNG result: pass --png FILE to save it)", file=sys.stderr)
    if ex.truncated:
        print(f"(output of {', '.join(ex.truncated)} was cut at the interpreter's bound)",
              file=sys.stderr)
    if ex.error is not None:
        print(ex.error.traceback or f"{ex.error.name}: {ex.error.value}", file=sys.stderr)
        if ex.error.name not in (ex.error.traceback or ""):
            print(f"{ex.error.name}: {ex.error.value}", file=sys.stderr)
        raise typer.Exit(1)
