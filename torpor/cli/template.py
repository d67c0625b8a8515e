"""`torpor template build | list | show | rm | logs | builds`: each a few lines over the
SDK's `Template` (torpor/sdk/templates.py)."""

from __future__ import annotations

import json as _json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from torpor.cli._common import App, conn, fail, out, pairs, print_json, when

app = App(help="Templates sandboxes start from: build, list, show, rm, logs.")

JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _builtins() -> set[str]:
    try:
        from torpor.builtin_templates import BUILTINS
    except ImportError:
        return set()
    return set(BUILTINS)


def _name_tag(ref: str) -> tuple[str, str]:
    name, _, tag = ref.partition(":")
    return name, tag or "latest"


class _Progress:
    """Prints a build's steps and log lines as they come."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.monotonic()

    def step(self, ev: dict) -> None:
        step = ev.get("step") or {}
        kind = step.get("type", "?")
        what = {"run": step.get("cmd"), "copy": f"{step.get('src')} -> {step.get('dst')}",
                "start_cmd": step.get("cmd"), "env": " ".join(
                    f"{k}={v}" for k, v in (step.get("env") or {}).items()),
                "apt_install": " ".join(step.get("packages") or []),
                "pip_install": " ".join(step.get("packages") or [])}.get(kind)
        what = what or next((str(v) for k, v in step.items() if k != "type"), "")
        line = Text.assemble((f"Step {ev.get('index', 0) + 1}/{ev.get('total', '?')} ", "bold"),
                             (kind, "bold cyan"), " ", what.splitlines()[0][:160] if what
                             else "")
        if ev.get("cached"):
            line.append("  (cached)", style="green")
        out.print(line)

    def log(self, text: str) -> None:
        if not self.quiet:
            out.print(Text("  " + text, style="dim"))


@app.command("build")
def build(
    source: Annotated[str, typer.Argument(
        help="The build context directory (COPY reads it), or the name of a built-in "
             "template (code-interpreter).", show_default=False)] = ".",
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="The Dockerfile [default: CONTEXT/Dockerfile].")] = None,
    tag: Annotated[str | None, typer.Option(
        "--tag", "-t", help="NAME[:TAG] of the template (tag: latest).")] = None,
    build_arg: Annotated[list[str] | None, typer.Option(
        "--build-arg", help="K=V for an ARG of the Dockerfile. Repeatable.")] = None,
    steps: Annotated[Path | None, typer.Option(
        "--steps", help="A JSON file of steps (as POST /v1/templates takes) instead of a "
                        "Dockerfile; copy sources are paths in CONTEXT.")] = None,
    cpu: Annotated[float | None, typer.Option(help="Default cores of its sandboxes.")] = None,
    memory: Annotated[int | None, typer.Option(help="Default memory (MiB).")] = None,
    disk: Annotated[int | None, typer.Option(help="Default disk (MiB).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Steps only, no log "
                                                              "lines.")] = False,
    json: JSON = False,
) -> None:
    """Build a template from a Dockerfile, a JSON step list, or a built-in's recipe, with
    its steps and their output as they run. Exits non-zero if the build fails."""
    from torpor.sdk import Template

    resources: dict[str, Any] = {"cpu": cpu, "memory_mb": memory, "disk_mb": disk}
    ctx = Path(source)
    if file is None and steps is None and not ctx.is_dir():
        if source not in _builtins():
            fail(f"{source!r} is neither a directory (a build context) nor a built-in "
                 f"template ({', '.join(sorted(_builtins())) or 'none here'})")
        name, tg = _name_tag(tag or source)
        t = Template(name, tg, **resources)  # no steps: the server's built-in recipe
    else:
        if tag is None:
            fail("give the template's name: -t NAME[:TAG]")
        name, tg = _name_tag(tag)
        if steps is not None:
            if file is not None:
                fail("give --steps or -f (a Dockerfile), not both")
            try:
                listed = _json.loads(steps.read_text())
            except ValueError as e:
                fail(f"{steps}: not JSON ({e})")
            if not isinstance(listed, list):
                fail(f"{steps}: a JSON list of steps is expected")
            t = Template.from_steps(listed, ctx, name=name, tag=tg, **resources)
        else:
            dockerfile = file if file is not None else ctx / "Dockerfile"
            t = Template.from_dockerfile(dockerfile, ctx, pairs(build_arg, "--build-arg"),
                                         name=name, tag=tg, **resources)
    progress = _Progress(quiet or json)
    info = t.build(on_log=progress.log, on_step=None if json else progress.step, **conn())
    if json:
        print_json(info.model_dump(mode="json"))
        return
    took = time.monotonic() - progress.t0
    out.print(Text.assemble(("built ", "bold green"), info.ref, f" {info.digest} ",
                            (f"in {took:.1f}s", "dim"),
                            (" (boot snapshot)" if info.snapshot else "", "cyan")))


@app.command("list")
def list_templates(json: JSON = False) -> None:
    """List templates (every name:tag)."""
    from torpor.sdk import Template

    items = Template.list(**conn())
    if json:
        print_json([t.model_dump(mode="json") for t in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "TAG", "DIGEST", "SNAPSHOT", "CPU", "MEMORY", "DISK", "CREATED",
                "DESCRIPTION"):
        table.add_column(col, no_wrap=col != "DESCRIPTION")
    for t in items:
        table.add_row(t.name, t.tag, t.digest.removeprefix("sha256:")[:12],
                      "yes" if t.snapshot else "-", f"{t.cpu:g}", f"{t.memory_mb}M",
                      f"{t.disk_mb}M", when(t.created_at), t.description)
    out.print(table)


@app.command("show")
def show(ref: Annotated[str, typer.Argument(help="NAME, NAME:TAG or sha256:DIGEST.")],
         json: JSON = False) -> None:
    """A template's configuration and the steps it was built from."""
    from torpor.sdk import Template

    t = Template.get(ref, **conn())
    if json:
        print_json(t.model_dump(mode="json"))
        return
    res = f"cpu {t.cpu:g}, memory {t.memory_mb}M, disk {t.disk_mb}M"
    rows = [("name", t.ref), ("digest", t.digest), ("created", when(t.created_at)),
            ("parent", t.parent or "-"), ("resources", res),
            ("user", t.user), ("workdir", t.workdir),
            ("env", " ".join(f"{k}={v}" for k, v in t.env.items()) or "-"),
            ("start_cmd", t.start_cmd or "-"), ("ready", _json.dumps(t.ready) if t.ready
                                                 else "-"),
            ("snapshot", "yes" if t.snapshot else "no"), ("layers", str(len(t.layers)))]
    for k, v in rows:
        out.print(Text.assemble((f"{k:<10}", "bold"), str(v)))
    for i, step in enumerate(t.steps):
        out.print(Text.assemble((f"  {i + 1:>3}. ", "dim"), _json.dumps(step)))


@app.command("rm")
def remove(ref: Annotated[str, typer.Argument(help="NAME, NAME:TAG or sha256:DIGEST.")],
           force: Annotated[bool, typer.Option(
               "--force", help="Even if sandboxes or templates use it (what it holds stays "
                               "until they are gone).")] = False) -> None:
    """Remove a template's name:tag."""
    from torpor.sdk import Template

    Template.delete(ref, force, **conn())
    out.print(f"removed {ref}")


@app.command("logs")
def logs(build_id: Annotated[str, typer.Argument(help="The build's id (bld...).")],
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the build "
                                                                     "ends.")] = False,
         json: JSON = False) -> None:
    """A build's steps and output (exit status 1 if it failed)."""
    from torpor.sdk import Template

    progress = _Progress(False)
    failed = None
    for ev in Template.logs(build_id, follow=follow, **conn()):
        if json:
            print(_json.dumps(ev), flush=True)
        elif ev.get("type") == "step":
            progress.step(ev)
        elif ev.get("type") == "log":
            for line in (ev.get("data") or "").splitlines():
                progress.log(line)
        elif ev.get("type") == "truncated":
            out.print(Text(f"  ... {ev.get('lost')} earlier events dropped", style="yellow"))
        elif ev.get("type") == "done":
            tpl = ev.get("template") or {}
            out.print(Text.assemble(("built ", "bold green"), f"{tpl.get('name')}:"
                                    f"{tpl.get('tag')} {tpl.get('digest')}"))
        if ev.get("type") == "error":
            failed = (ev.get("error") or {}).get("message", "the build failed")
    if failed:
        fail(failed)


@app.command("builds")
def builds(json: JSON = False) -> None:
    """Recent template builds, newest first."""
    from torpor.sdk import Template

    items = Template.builds(**conn())
    if json:
        print_json([b.model_dump(mode="json") for b in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("ID", "TEMPLATE", "STATE", "STEPS", "STARTED", "FINISHED", "DIGEST"):
        table.add_column(col, no_wrap=True)
    for b in items:
        table.add_row(b.id, f"{b.name}:{b.tag}", b.state, str(len(b.progress)),
                      when(b.started_at), when(b.finished_at),
                      (b.digest or "-").removeprefix("sha256:")[:12])
    out.print(table)
