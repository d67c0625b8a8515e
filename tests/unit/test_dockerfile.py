"""The Dockerfile translator (torpor/dockerfile.py): every instruction it takes, what it
refuses (with the line), ARG substitution, COPY sources, contexts as a directory and as a
tar archive."""

from __future__ import annotations

import io
import tarfile

import pytest

from torpor.dockerfile import DirContext, DockerfileError, TarContext, translate, words


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "app" / "sub").mkdir(parents=True)
    (tmp_path / "app" / "main.py").write_text("print(1)\n")
    (tmp_path / "app" / "util.py").write_text("x = 1\n")
    (tmp_path / "app" / "sub" / "deep.txt").write_text("deep\n")
    (tmp_path / "req.txt").write_text("flask\n")
    with tarfile.open(tmp_path / "bundle.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "req.txt", arcname="inside.txt")
    return tmp_path


def steps(text, ctx=None, **kw):
    return translate(text, context=DirContext(ctx) if ctx else None, **kw).steps


def error(text, ctx=None, **kw) -> DockerfileError:
    with pytest.raises(DockerfileError) as e:
        translate(text, context=DirContext(ctx) if ctx else None, **kw)
    return e.value


def test_from_base_template_or_image():
    assert steps("FROM base\n") == [{"type": "from_template", "template": "base"}]
    assert steps("FROM python:3.12-slim\n") == [{"type": "from_image",
                                                 "image": "python:3.12-slim"}]
    known = {"datasci", "web:v2"}
    assert steps("FROM web:v2\n", is_template=known.__contains__) == [
        {"type": "from_template", "template": "web:v2"}]


def test_run_shell_and_exec_form():
    assert steps("FROM base\nRUN echo a \\\n  && echo b\nRUN [\"python3\", \"-c\", "
                 "\"print('x y')\"]\n")[1:] == [
        {"type": "run", "cmd": "echo a   && echo b"},
        {"type": "run", "cmd": "python3 -c 'print('\"'\"'x y'\"'\"')'"}]


def test_env_both_forms_quotes_and_substitution():
    out = steps('FROM base\nENV A=1 B="two words" C=\'$A\' D=${A}x\nENV E $B and more\n'
                "ENV A=2 F=$A\n")
    # one ENV sees the values from before it (Docker: `ENV abc=bye def=$abc` takes the
    # old abc)
    assert out[1:] == [{"type": "env", "env": {"A": "1", "B": "two words", "C": "$A",
                                               "D": "x"}},
                       {"type": "env", "env": {"E": "two words and more"}},
                       {"type": "env", "env": {"A": "2", "F": "1"}}]


def test_arg_defaults_build_args_and_scope():
    text = ("ARG SRC=base\nARG VER=1\nFROM ${SRC}\nARG VER\nARG OTHER=${VER}-x\n"
            "ENV V=$VER O=$OTHER N=${NOPE:-dflt} P=${VER:+set}\nRUN echo $VER\n")
    out = steps(text)
    assert out[0] == {"type": "from_template", "template": "base"}
    assert out[1] == {"type": "env", "env": {"V": "1", "O": "1-x", "N": "dflt", "P": "set"}}
    # ARGs reach RUN as environment variables, as Docker gives them
    assert out[2] == {"type": "run", "cmd": "export OTHER=1-x VER=1; echo $VER"}
    out = steps(text, build_args={"VER": "9", "SRC": "python:3.12"})
    assert out[0] == {"type": "from_image", "image": "python:3.12"}
    assert out[1]["env"]["V"] == "9" and out[1]["env"]["O"] == "9-x"
    # an ARG declared only before FROM is not in scope after it (Docker's rule)
    assert steps("ARG X=1\nFROM base\nENV Y=${X:-unset}\n")[1] == {
        "type": "env", "env": {"Y": "unset"}}


def test_workdir_user_and_ignored():
    out = steps("FROM base\nWORKDIR /srv/app\nWORKDIR sub\nWORKDIR /home/user\n"
                "USER root\nEXPOSE 8000\nLABEL a=b\n")
    assert out[1:] == [
        {"type": "run", "cmd": "mkdir -p /srv/app && chown user /srv/app", "user": "root"},
        {"type": "workdir", "path": "/srv/app"},
        {"type": "run", "cmd": "mkdir -p /srv/app/sub && chown user /srv/app/sub",
         "user": "root"},
        {"type": "workdir", "path": "/srv/app/sub"},
        {"type": "workdir", "path": "/home/user"},
        {"type": "user", "name": "root"}]
    # after USER, and on an image: made for that user
    assert steps("FROM base\nUSER app\nWORKDIR /w\n")[2]["cmd"] == "mkdir -p /w && chown app /w"
    assert steps("FROM debian:12\nWORKDIR /w\n")[1]["cmd"] == "mkdir -p /w && chown root /w"


def test_copy_files_dirs_renames_globs(ctx):
    t = translate("FROM base\nWORKDIR /srv\nCOPY req.txt ./\nCOPY app /opt/app\n"
                  "COPY req.txt /etc/requirements.txt\nCOPY app/*.py /py/\n"
                  "COPY --chown=user [\"req.txt\", \"/home/user/\"]\n", context=DirContext(ctx))
    copies = [s for s in t.steps if s["type"] == "copy"]
    assert copies == [
        {"type": "copy", "src": "req.txt", "dst": "/srv", "user": "root"},
        {"type": "copy", "src": "app", "dst": "/opt/app", "user": "root"},
        {"type": "copy", "src": ".torpor-stage/0/requirements.txt", "dst": "/etc",
         "user": "root"},
        {"type": "copy", "src": "app/main.py", "dst": "/py", "user": "root"},
        {"type": "copy", "src": "app/util.py", "dst": "/py", "user": "root"},
        {"type": "copy", "src": "req.txt", "dst": "/home/user", "user": "user"}]
    assert t.staged == {".torpor-stage/0/requirements.txt": "req.txt"}
    assert t.sources == {"req.txt", "app", "app/main.py", "app/util.py"}


def test_add_local_archive_unpacks_in_the_sandbox(ctx):
    t = translate("FROM base\nADD bundle.tar.gz /opt/b/\n", context=DirContext(ctx))
    assert t.steps[1] == {"type": "copy", "src": ".torpor-stage/0/bundle.tar.gz",
                          "dst": "/tmp/.torpor-add", "user": "root"}
    assert t.steps[2]["type"] == "run" and "tar -C /opt/b/ -xf" in t.steps[2]["cmd"]


def test_cmd_entrypoint_and_ready():
    assert steps("FROM base\nCMD python3 -m http.server\n")[-1] == {
        "type": "start_cmd", "cmd": "python3 -m http.server"}
    out = steps("# torpor: ready port=8000 timeout=30\nFROM base\nENTRYPOINT [\"python3\"]\n"
                "CMD [\"-m\", \"http.server\", \"8000\"]\nRUN true\n")
    assert out[-1] == {"type": "start_cmd", "cmd": "python3 -m http.server 8000",
                       "ready": {"port": 8000}, "timeout": 30.0}
    assert out[-2] == {"type": "run", "cmd": "true"}  # the start command goes last
    out = steps("FROM base\nHEALTHCHECK --interval=5s CMD [\"test\", \"-e\", \"/tmp/up\"]\n"
                "CMD serve\n")
    assert out[-1]["ready"] == {"cmd": "test -e /tmp/up"}
    assert steps("FROM base\n# torpor: ready file=/tmp/ok\nCMD x\n")[-1]["ready"] == {
        "file": "/tmp/ok"}


@pytest.mark.parametrize("text,line,instruction,words_", [
    ("FROM base AS build\n", 1, "FROM", "multi-stage"),
    ("FROM base\nFROM base\n", 2, "FROM", "multi-stage"),
    ("FROM --platform=linux/arm64 base\n", 1, "FROM", "--platform"),
    ("FROM scratch\n", 1, "FROM", "scratch"),
    ("RUN echo\nFROM base\n", 1, "RUN", "before FROM"),
    ("FROM base\nVOLUME /data\n", 2, "VOLUME", "VOLUME is not supported"),
    ("FROM base\n\nSHELL [\"bash\", \"-c\"]\n", 3, "SHELL", "SHELL is not supported"),
    ("FROM base\nONBUILD RUN x\n", 2, "ONBUILD", "ONBUILD"),
    ("FROM base\nSTOPSIGNAL SIGINT\n", 2, "STOPSIGNAL", "STOPSIGNAL"),
    ("FROM base\nCOPY --from=build /x /y\n", 2, "COPY", "--from"),
    ("FROM base\nCOPY --chmod=755 req.txt /y\n", 2, "COPY", "--chmod"),
    ("FROM base\nADD https://example.com/x.tgz /y\n", 2, "ADD", "URL"),
    ("FROM base\nCOPY ../secret /y\n", 2, "COPY", "outside the build context"),
    ("FROM base\nCOPY /etc/passwd /y\n", 2, "COPY", "outside the build context"),
    ("FROM base\nCOPY app/../../x /y\n", 2, "COPY", "outside the build context"),
    ("FROM base\nCOPY missing.txt /y\n", 2, "COPY", "not in the build context"),
    ("FROM base\nCOPY app/*.nope /y/\n", 2, "COPY", "matches nothing"),
    ("FROM base\nCOPY req.txt app /y\n", 2, "COPY", "ending in /"),
    ("FROM base\nRUN --mount=type=cache,target=/x true\n", 2, "RUN", "--mount"),
    ("FROM base\nRUN <<EOF\necho\nEOF\n", 2, "RUN", "heredoc"),
    ("FROM base\nUSER user:staff\n", 2, "USER", "group"),
])
def test_refused_with_line(ctx, text, line, instruction, words_):
    e = error(text, ctx)
    assert e.line == line and e.instruction == instruction, (e, e.line, e.instruction)
    assert words_ in str(e) and str(e).startswith(f"line {line}: ")


def test_copy_without_context_and_without_from():
    e = error("FROM base\nCOPY a /b\n")
    assert e.line == 2 and "needs a build context" in str(e)
    assert "no FROM" in str(error("# only a comment\n"))
    assert "torpor comment" in str(error("# torpor: colour=blue\nFROM base\n"))
    assert "without CMD" in str(error("# torpor: ready port=80\nFROM base\n"))


def test_tar_context_matches_the_directory(ctx):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("app", "req.txt"):
            tar.add(ctx / name, arcname=name)
    tctx = TarContext(buf.getvalue())
    text = "FROM base\nCOPY app/*.py /py/\nCOPY req.txt /etc/requirements.txt\nCOPY app /a\n"
    t = translate(text, context=tctx)
    assert t.steps == translate(text, context=DirContext(ctx)).steps
    # the staged (renamed) source is added to the archive, with the same bytes
    with tarfile.open(fileobj=io.BytesIO(tctx.with_staged(t.staged)), mode="r:*") as tar:
        staged = tar.extractfile(".torpor-stage/0/requirements.txt").read()
        names = tar.getnames()
    assert staged == b"flask\n" and "app/sub/deep.txt" in names


def test_words_lexer():
    assert words("a 'b c' \"d $X e\" f\\ g $X", {"X": "1"}) == ["a", "b c", "d 1 e", "f g",
                                                                "1"]
    assert words("$X", None) == ["$X"]
    with pytest.raises(DockerfileError):
        words("'open", {})
