"""A Dockerfile as a template's steps (the JSON list `POST /v1/templates` takes).

Parsed with `dockerfile-parse`, translated instruction by instruction:

- `FROM ref`: `base` or a template this server has -> `from_template`; anything else ->
  `from_image` (an OCI image reference). Once, first (after global `ARG`s). `FROM ... AS`,
  a second `FROM`, `--platform` and `scratch` are refused.
- `RUN` (shell and exec form) -> `run`, as the template's user; the `ARG`s in scope are
  exported to it, as Docker does.
- `COPY`/`ADD` of files of the build context -> `copy` (as root, or `--chown=NAME`); a
  local archive given to `ADD` is unpacked inside the build sandbox (never on the host).
  Sources outside the context (absolute, `..`), URLs, `--from` are refused.
- `ENV`, `WORKDIR`, `USER` -> `env`, `workdir`, `user`. A WORKDIR that may not exist is
  made first (a `run` step as root, then owned by the user the next steps run as: USER's,
  else `user` on a template, root on an image), as BuildKit does.
- `ARG` with its default, a `--build-arg` value overriding it; `$VAR`, `${VAR}`,
  `${VAR:-default}` and `${VAR:+alternative}` are substituted where Docker substitutes.
- `CMD` / `ENTRYPOINT` (combined as Docker combines them) -> the `start_cmd` step (last),
  made ready by `HEALTHCHECK CMD ...` (a ready command) or a comment
  `# torpor: ready port=8000` (or `file=/path`, `cmd=...`; `timeout=SECONDS` too).
- `EXPOSE`, `LABEL`, `MAINTAINER` are accepted and ignored.
- Anything else (`VOLUME`, `SHELL`, `ONBUILD`, `STOPSIGNAL`, heredocs...) is refused
  with the instruction's name and line.

This module is shared by the server (the REST door) and the SDK, so it imports nothing of
either; errors are `DockerfileError` (a ValueError with `line` and `instruction`).
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

STAGE = ".torpor-stage"  # where a renamed COPY source is placed in the context
IGNORED = ("EXPOSE", "LABEL", "MAINTAINER")
ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# directories every template built on base has: WORKDIR there makes no step
_EXISTING = {"/", "/home/user", "/root", "/tmp", "/usr", "/etc", "/opt", "/srv", "/var/tmp"}


class DockerfileError(ValueError):
    """A Dockerfile that cannot be translated: `line` (1-based) and `instruction` say
    where, when it is one instruction's fault."""

    def __init__(self, message: str, line: int | None = None,
                 instruction: str | None = None):
        where = f"line {line}: " if line else ""
        super().__init__(where + message)
        self.line = line
        self.instruction = instruction


class Context(Protocol):
    """What the translator needs of a build context: what a path is, and glob matches."""

    def kind(self, path: str) -> str | None:
        """"file", "dir" or None (absent)."""

    def paths(self) -> Iterable[str]:
        """Every file and directory in it (relative, "/"-separated)."""


class DirContext:
    """A local directory as the build context (the SDK and the CLI)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def kind(self, path: str) -> str | None:
        p = self.root / path
        if p.is_symlink() or p.is_file():
            return "file"
        return "dir" if p.is_dir() else None

    def paths(self) -> Iterable[str]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            for n in dirnames + filenames:
                yield (rel / n).as_posix()


class TarContext:
    """A tar (or tar.gz) archive as the build context (the server): read, never
    extracted."""

    def __init__(self, data: bytes):
        self.data = data
        self.kinds: dict[str, str] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for m in tar.getmembers():
                name = _norm(m.name)
                if not name:
                    continue
                self.kinds[name] = "dir" if m.isdir() else "file"
                for parent in PurePosixPath(name).parents:
                    if str(parent) != ".":
                        self.kinds.setdefault(str(parent), "dir")

    def kind(self, path: str) -> str | None:
        path = _norm(path)
        return "dir" if not path else self.kinds.get(path)

    def paths(self) -> Iterable[str]:
        return list(self.kinds)

    def with_staged(self, staged: dict[str, str]) -> bytes:
        """The archive with each renamed source added under its staged name (gzip'd)."""
        if not staged:
            return self.data
        out = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(self.data), mode="r:*") as src, \
                tarfile.open(fileobj=out, mode="w:gz") as dst:
            members = {}
            for m in src.getmembers():
                members[_norm(m.name)] = m
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            for new, old in staged.items():
                m = members[_norm(old)]
                copy = tarfile.TarInfo(new)
                copy.size, copy.mode, copy.mtime = m.size, m.mode, m.mtime
                if m.issym():
                    copy.type, copy.linkname = tarfile.SYMTYPE, m.linkname
                    dst.addfile(copy)
                else:
                    dst.addfile(copy, src.extractfile(m))
        return out.getvalue()


def _norm(name: str) -> str:
    """A context path as COPY names it: "./a/b/" -> "a/b", "." -> ""."""
    p = str(PurePosixPath(name.lstrip("/")))
    return "" if p == "." else p


@dataclass
class Translation:
    steps: list[dict]
    sources: set[str] = field(default_factory=set)  # context paths the COPYs read
    staged: dict[str, str] = field(default_factory=dict)  # staged name -> context path


_VAR = re.compile(r"\$(?:\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+])(?P<word>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, scope: dict[str, str]) -> str:
    """Docker's variable substitution of `text` (no quote handling: see `words`)."""
    def one(m: re.Match) -> str:
        name = m.group("name") or m.group("bare")
        op, word = m.group("op"), m.group("word") or ""
        value = scope.get(name)
        if op in (":-", "-"):
            return value if (value if op == ":-" else value is not None) else word
        if op in (":+", "+"):
            return word if (value if op == ":+" else value is not None) else ""
        return value or ""
    return _VAR.sub(one, text)


def words(text: str, scope: dict[str, str] | None) -> list[str]:
    """Split as Docker's shell lexer does for ENV, COPY, WORKDIR...: whitespace separates,
    quotes group (and go), a backslash escapes; variables are substituted outside single
    quotes (`scope` None: not at all)."""
    out: list[str] = []
    cur: list[str] = []
    started = False
    i, n = 0, len(text)

    def var_at(j: int) -> tuple[str, int]:
        m = _VAR.match(text, j)
        if m is None or scope is None:
            return "$", j + 1
        return substitute(m.group(0), scope), m.end()

    while i < n:
        c = text[i]
        if c.isspace():
            if started:
                out.append("".join(cur))
                cur, started = [], False
            i += 1
        elif c == "\\" and i + 1 < n:
            cur.append(text[i + 1])
            started = True
            i += 2
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise DockerfileError("unterminated single quote")
            cur.append(text[i + 1:j])
            started = True
            i = j + 1
        elif c == '"':
            i += 1
            started = True
            while True:
                if i >= n:
                    raise DockerfileError("unterminated double quote")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\$':
                    cur.append(text[i + 1])
                    i += 2
                elif c == "$":
                    s, i = var_at(i)
                    cur.append(s)
                else:
                    cur.append(c)
                    i += 1
        elif c == "$":
            s, i = var_at(i)
            cur.append(s)
            started = True
        else:
            cur.append(c)
            started = True
            i += 1
    if started:
        out.append("".join(cur))
    return out


def _exec_form(value: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    v = value.strip()
    if not v.startswith("["):
        return None
    try:
        arr = json.loads(v)
    except ValueError:
        return None  # Docker runs a malformed array as a shell command, and so do we
    if isinstance(arr, list) and all(isinstance(x, str) for x in arr):
        return arr
    return None


def _flags(args: list[str], allowed: tuple[str, ...], line: int, instr: str
           ) -> tuple[dict[str, str], list[str]]:
    flags = {}
    while args and args[0].startswith("--"):
        name, _, value = args.pop(0)[2:].partition("=")
        if name not in allowed:
            raise DockerfileError(f"{instr} --{name} is not supported"
                                  + (" (multi-stage builds are not)" if name == "from" else ""),
                                  line, instr)
        flags[name] = value
    return flags, args


def _ready_comment(value: str, line: int) -> tuple[dict | None, float | None]:
    """`torpor: ready port=8000 timeout=30` -> ({"port": 8000}, 30.0)."""
    body = value.split(":", 1)[1].strip()
    if not body.startswith("ready"):
        raise DockerfileError(f"unknown torpor comment {value!r} (expected `# torpor: "
                              "ready port=N|file=PATH|cmd=COMMAND [timeout=SECONDS]`)", line)
    rest = body[len("ready"):].strip()
    ready: dict | None = None
    timeout = None
    m = re.search(r"(?:^|\s)timeout=(\d+(?:\.\d+)?)\s*$", rest)
    if m and not rest.startswith("cmd="):
        timeout, rest = float(m.group(1)), rest[:m.start()].strip()
    if rest.startswith("port="):
        port = rest[5:].strip()
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise DockerfileError(f"ready port {port!r} is not a port number", line)
        ready = {"port": int(port)}
    elif rest.startswith("file="):
        ready = {"file": rest[5:].strip()}
    elif rest.startswith("cmd="):
        ready = {"cmd": rest[4:].strip()}
    elif rest:
        raise DockerfileError(f"ready {rest!r}: give port=N, file=PATH or cmd=COMMAND", line)
    if ready and not next(iter(ready.values())):
        raise DockerfileError("the ready check is empty", line)
    return ready, timeout


class _Translator:
    def __init__(self, build_args: dict[str, str], is_template: Callable[[str], bool],
                 context: Context | None):
        self.build_args = build_args
        self.is_template = is_template
        self.context = context
        self.steps: list[dict] = []
        self.out = Translation(self.steps)
        self.global_args: dict[str, str | None] = {}  # ARGs before FROM
        self.args: dict[str, str | None] = {}  # ARGs in scope after FROM
        self.env: dict[str, str] = {}
        self.workdir = "/home/user"
        self.user = "user"
        self.from_seen = False
        self.cmd: tuple[str, str] | None = None  # (form, value)
        self.entrypoint: tuple[str, str] | None = None
        self.ready: dict | None = None
        self.ready_line = 0
        self.healthcheck: dict | None = None
        self.timeout: float | None = None
        self.paths: list[str] | None = None

    def scope(self) -> dict[str, str]:
        args = {k: v for k, v in self.args.items() if v is not None}
        return {**args, **self.env}

    def run(self, structure: list[dict]) -> Translation:
        for item in structure:
            instr, line = item["instruction"].upper(), item["startline"] + 1
            value = item["value"]
            if instr == "COMMENT":
                if re.match(r"torpor\s*:", value):
                    self.ready, self.timeout = _ready_comment(value, line)
                    self.ready_line = line
                continue
            if instr != "ARG" and not self.from_seen and instr != "FROM":
                raise DockerfileError(f"{instr} before FROM: a Dockerfile starts with FROM "
                                      "(only ARG may come before it)", line, instr)
            handler = getattr(self, "i_" + instr.lower(), None)
            if instr in IGNORED:
                continue
            if handler is None:
                raise DockerfileError(f"the instruction {instr} is not supported (supported: "
                                      "FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, CMD, "
                                      "ENTRYPOINT, HEALTHCHECK; ignored: EXPOSE, LABEL)",
                                      line, instr)
            if value.lstrip().startswith("<<"):
                raise DockerfileError(f"{instr} with a heredoc is not supported", line, instr)
            handler(value, line)
        if not self.from_seen:
            raise DockerfileError("the Dockerfile has no FROM")
        start = self.start_cmd()
        if start:
            self.steps.append(start)
        elif self.ready is not None:
            raise DockerfileError("a ready check without CMD or ENTRYPOINT",
                                  self.ready_line)
        return self.out

    # --- instructions -------------------------------------------------------------------
    def i_arg(self, value: str, line: int) -> None:
        ws = words(value, None)
        if len(ws) != 1:
            raise DockerfileError("ARG takes one NAME[=default]", line, "ARG")
        name, eq, default = ws[0].partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DockerfileError(f"ARG name {name!r} is not valid", line, "ARG")
        scope = {k: v for k, v in (self.args if self.from_seen else self.global_args).items()
                 if v is not None}
        if name in self.build_args:
            v: str | None = self.build_args[name]
        elif eq:
            v = substitute(default, {**scope, **self.env})
        else:  # re-declared after FROM: the global ARG's value, as Docker does
            v = self.global_args.get(name) if self.from_seen else None
        (self.args if self.from_seen else self.global_args)[name] = v

    def i_from(self, value: str, line: int) -> None:
        if self.from_seen:
            raise DockerfileError("a second FROM: multi-stage builds are not supported",
                                  line, "FROM")
        ws = words(value, {k: v for k, v in self.global_args.items() if v is not None})
        _, ws = _flags(ws, (), line, "FROM")
        if len(ws) == 3 and ws[1].lower() == "as":
            raise DockerfileError("FROM ... AS: multi-stage builds are not supported",
                                  line, "FROM")
        if len(ws) != 1:
            raise DockerfileError("FROM takes one image or template", line, "FROM")
        ref = ws[0]
        if ref == "scratch":
            raise DockerfileError("FROM scratch is not supported: start from base, a "
                                  "template or an image", line, "FROM")
        self.from_seen = True
        # who the steps run as until a USER: base's `user` (and of templates built on it);
        # an image's own user is the source's to say, root here
        if ref == "base" or self.is_template(ref):
            self.steps.append({"type": "from_template", "template": ref})
        else:
            self.user = "root"
            self.steps.append({"type": "from_image", "image": ref})

    def i_run(self, value: str, line: int) -> None:
        argv = _exec_form(value)
        ws = value.split()
        if argv is None and ws and ws[0].startswith("--"):
            raise DockerfileError(f"RUN {ws[0].split('=')[0]} is not supported", line, "RUN")
        cmd = shlex.join(argv) if argv is not None else value.strip()
        if not cmd:
            raise DockerfileError("RUN without a command", line, "RUN")
        args = {k: v for k, v in self.args.items() if v is not None and k not in self.env}
        if args:
            cmd = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in
                                       sorted(args.items())) + "; " + cmd
        self.steps.append({"type": "run", "cmd": cmd})

    def i_env(self, value: str, line: int) -> None:
        scope = self.scope()
        first = words(value, scope)
        if first and "=" not in first[0]:  # legacy `ENV KEY value with spaces`
            name, _, rest = value.strip().partition(" ")
            rest_words = words(rest, scope)
            if not rest_words:
                raise DockerfileError("ENV KEY VALUE needs a value", line, "ENV")
            env = {name: " ".join(rest_words)}
        else:
            env = {}
            for w in first:
                name, eq, v = w.partition("=")
                if not eq or not name:
                    raise DockerfileError(f"ENV {w!r} is not NAME=VALUE", line, "ENV")
                env[name] = v
        if not env:
            raise DockerfileError("ENV without a variable", line, "ENV")
        self.env.update(env)
        self.steps.append({"type": "env", "env": env})

    def i_workdir(self, value: str, line: int) -> None:
        ws = words(value, self.scope())
        if len(ws) != 1:
            raise DockerfileError("WORKDIR takes one path", line, "WORKDIR")
        path = os.path.normpath(os.path.join(self.workdir, ws[0]))
        path = "/" + path.lstrip("/")
        if path not in _EXISTING:  # made for the user the next steps run as (BuildKit's way)
            q = shlex.quote(path)
            self.steps.append({"type": "run", "user": "root",
                               "cmd": f"mkdir -p {q} && chown {shlex.quote(self.user)} {q}"})
        self.workdir = path
        self.steps.append({"type": "workdir", "path": path})

    def i_user(self, value: str, line: int) -> None:
        ws = words(value, self.scope())
        if len(ws) != 1:
            raise DockerfileError("USER takes one name", line, "USER")
        name, _, group = ws[0].partition(":")
        if group and group != name:
            raise DockerfileError(f"USER {ws[0]}: a group other than the user's own is not "
                                  "supported", line, "USER")
        self.user = name
        self.steps.append({"type": "user", "name": name})

    def i_copy(self, value: str, line: int, instr: str = "COPY") -> None:
        scope = self.scope()
        rest = value.strip()
        lead = []
        while rest.startswith("--"):  # flags come before an exec-form array too
            flag, _, rest = rest.partition(" ")
            lead.append(flag)
            rest = rest.strip()
        flags, _ = _flags(words(" ".join(lead), scope), ("chown",), line, instr)
        argv = _exec_form(rest)
        ws = [substitute(a, scope) for a in argv] if argv is not None else words(rest, scope)
        user = "root"
        if flags.get("chown"):
            name, _, group = flags["chown"].partition(":")
            if group and group != name:
                raise DockerfileError(f"{instr} --chown={flags['chown']}: a group other than "
                                      "the user's own is not supported", line, instr)
            user = name
        if len(ws) < 2:
            raise DockerfileError(f"{instr} needs a source and a destination", line, instr)
        *srcs, dst = ws
        slash = "/" if dst.endswith("/") or dst in (".", "./") else ""
        dst = os.path.normpath(os.path.join(self.workdir, dst)).rstrip("/") + slash
        for s in srcs:
            if re.match(r"^[a-z][a-z0-9+.-]*://", s) or s.startswith("git@"):
                raise DockerfileError(f"{instr} of a URL ({s}) is not supported: put the "
                                      "file in the build context, or fetch it in a RUN",
                                      line, instr)
            p = PurePosixPath(s)
            if p.is_absolute() or ".." in p.parts:
                raise DockerfileError(f"{instr} source {s!r} is outside the build context",
                                      line, instr)
        if self.context is None:
            raise DockerfileError(f"{instr} needs a build context holding {', '.join(srcs)}",
                                  line, instr)
        found = [m for s in srcs for m in self.match(s, line, instr)]
        if len(found) > 1 and not dst.endswith("/"):
            raise DockerfileError(f"{instr} of several sources needs a destination ending "
                                  "in /", line, instr)
        for src in found:
            kind = self.context.kind(src)
            self.out.sources.add(src)
            if instr == "ADD" and kind == "file" and src.endswith(ARCHIVES):
                self.add_archive(src, dst, user)
                continue
            target_dir = dst
            if kind == "file" and not dst.endswith("/"):
                target_dir = os.path.dirname(dst.rstrip("/")) or "/"
                name = os.path.basename(dst)
                if name != os.path.basename(src):  # a rename: stage it under its new name
                    staged = f"{STAGE}/{len(self.out.staged)}/{name}"
                    self.out.staged[staged] = src
                    src = staged
            step = {"type": "copy", "src": src, "dst": target_dir.rstrip("/") or "/"}
            step["user"] = user
            self.steps.append(step)

    def i_add(self, value: str, line: int) -> None:
        self.i_copy(value, line, "ADD")

    def add_archive(self, src: str, dst: str, user: str) -> None:
        """ADD of a local archive: copied into the build sandbox and unpacked there."""
        staged = f"{STAGE}/{len(self.out.staged)}/{os.path.basename(src)}"
        self.out.staged[staged] = src
        tmp = "/tmp/.torpor-add"
        self.steps.append({"type": "copy", "src": staged, "dst": tmp, "user": user})
        q = shlex.quote
        self.steps.append({"type": "run", "user": user, "cmd": (
            f"mkdir -p {q(dst)} && tar -C {q(dst)} -xf {q(tmp + '/' + os.path.basename(src))}"
            f" --no-same-owner && rm -rf {tmp}")})

    def match(self, pattern: str, line: int, instr: str) -> list[str]:
        norm = str(PurePosixPath(pattern)) if pattern not in (".", "./") else "."
        if not any(c in norm for c in "*?["):
            if norm == "." or self.context.kind(norm):
                return [norm]
            raise DockerfileError(f"{instr} source {pattern!r} is not in the build context",
                                  line, instr)
        if self.paths is None:
            self.paths = sorted(self.context.paths())
        parts = norm.split("/")
        hits = [p for p in self.paths if len(p.split("/")) == len(parts) and all(
            fnmatch.fnmatchcase(a, b) for a, b in zip(p.split("/"), parts, strict=True))]
        if not hits:
            raise DockerfileError(f"{instr} source {pattern!r} matches nothing in the build "
                                  "context", line, instr)
        return hits

    def i_cmd(self, value: str, line: int) -> None:
        self.cmd = self._form(value)

    def i_entrypoint(self, value: str, line: int) -> None:
        self.entrypoint = self._form(value)

    @staticmethod
    def _form(value: str) -> tuple[str, object]:
        argv = _exec_form(value)
        return ("exec", argv) if argv is not None else ("shell", value.strip())

    def i_healthcheck(self, value: str, line: int) -> None:
        ws = value.split()
        while ws and ws[0].startswith("--"):
            ws.pop(0)  # intervals and retries: the ready check polls until its timeout
        if ws and ws[0].upper() == "NONE":
            self.healthcheck = None
            return
        if not ws or ws[0].upper() != "CMD":
            raise DockerfileError("HEALTHCHECK takes CMD ... or NONE", line, "HEALTHCHECK")
        rest = value[value.upper().index("CMD") + 3:].strip()
        argv = _exec_form(rest)
        self.healthcheck = {"cmd": shlex.join(argv) if argv is not None else rest}

    def start_cmd(self) -> dict | None:
        ep, cmd = self.entrypoint, self.cmd
        if ep is None and cmd is None:
            return None
        if ep is not None and ep[0] == "shell":
            text = ep[1]
        elif ep is not None:
            tail = [] if cmd is None else (cmd[1] if cmd[0] == "exec"
                                           else ["/bin/sh", "-c", cmd[1]])
            text = shlex.join([*ep[1], *tail])
        else:
            text = cmd[1] if cmd[0] == "shell" else shlex.join(cmd[1])
        if not text:
            return None
        step = {"type": "start_cmd", "cmd": text}
        ready = self.ready if self.ready is not None else self.healthcheck
        if ready:
            step["ready"] = ready
        if self.timeout:
            step["timeout"] = self.timeout
        return step


def translate(text: str, *, build_args: dict[str, str] | None = None,
              is_template: Callable[[str], bool] = lambda ref: ref == "base",
              context: Context | None = None) -> Translation:
    """The steps of a Dockerfile. `is_template(ref)` says whether a FROM names a template
    (otherwise it is an image); `context` is the build context COPY reads (its sources are
    checked and globs expanded there). Raises DockerfileError."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(), env_replace=False)
    parser.content = text
    return _Translator(dict(build_args or {}), is_template, context).run(parser.structure)
