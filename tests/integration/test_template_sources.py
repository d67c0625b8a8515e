"""Template sources on the engine, with real runsc: an OCI image from a registry this test
starts on 127.0.0.1 (Debian's docker-registry), the same image as a `docker save` archive
and as an OCI layout in the build context, and a Debian suite (slow: it bootstraps from the
host's Debian mirror). The image is made here, from directories, with umoci: a statically
linked busybox, a layer that deletes a file of a lower one (a whiteout), an opaque
directory, a device node and hostile symlinks. Nothing comes from outside."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest

from torpor.engine.manager import Engine
from torpor.engine.types import Exited, Output
from torpor.errors import Invalid, NotFound
from torpor.sources import DiskFull, Sources
from torpor.templates import TemplateStore

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "cat", "ls", "echo", "id", "test", "stat", "pwd", "env", "grep", "find"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv: str, cwd: Path | None = None) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{' '.join(argv)}: {p.stderr}"
    return p.stdout


def make_image(work: Path) -> Path:
    """An OCI layout `work/oci` holding `img:1`: three layers and a configuration."""
    l1, l2 = work / "l1", work / "l2"
    for d in ("bin", "etc", "opq", "keep"):
        (l1 / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, l1 / "bin/busybox")
    for applet in APPLETS:
        os.symlink("busybox", l1 / "bin" / applet)
    (l1 / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                   "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n")
    (l1 / "etc/group").write_text("root:x:0:\ndaemon:x:1:\n")
    (l1 / "etc/removed").write_text("a lower layer's file\n")
    # hostile: were these followed on the host, Torpor would write the host's /etc/passwd
    os.symlink("/etc/passwd", l1 / "etc/resolv.conf")
    os.symlink("../../../../../etc/passwd", l1 / "etc/hosts")
    os.symlink("/", l1 / "keep/host-root")
    os.mknod(l1 / "keep/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (l1 / "keep/kept").write_text("kept\n")
    (l1 / "opq/old").write_text("hidden by the opaque directory above\n")
    (l2 / "opq").mkdir(parents=True)
    (l2 / "opq/new").write_text("new\n")
    img = f"{work / 'oci'}:1"
    sh("umoci", "init", "--layout", str(work / "oci"))
    sh("umoci", "new", "--image", img)
    sh("umoci", "insert", "--image", img, str(l1), "/")
    sh("umoci", "insert", "--image", img, "--whiteout", "/etc/removed")
    sh("umoci", "insert", "--image", img, "--opaque", str(l2 / "opq"), "/opq")
    sh("umoci", "config", "--image", img, "--config.env", "FOO=from-the-image",
       "--config.env", "PATH=/bin", "--config.workingdir", "/work", "--config.cmd", "/bin/sh")
    return work / "oci"


def start_registry(work: Path, htpasswd: str | None = None) -> tuple[subprocess.Popen, str]:
    """Debian's docker-registry on 127.0.0.1:<free port>, storing under `work`; with
    `htpasswd` ("name:bcrypt hash"), only for that user."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    auth = ""
    if htpasswd:
        (work / "htpasswd").write_text(htpasswd + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {work / 'htpasswd'}\n"
    (work / "registry.yml").write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {work / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n" + auth)
    with open(work / "registry.log", "w") as logf:
        proc = subprocess.Popen(["docker-registry", "serve", str(work / "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=logf)
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            break
        except urllib.error.HTTPError:  # (401: up, and asking for credentials)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise AssertionError("the registry did not start: "
                                     + (work / "registry.log").read_text())
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def image():
    """The image, pushed to a registry on 127.0.0.1 (stopped at the end), and as archives."""
    work = Path(tempfile.mkdtemp(prefix="tpt-img-"))
    proc = None
    try:
        layout = make_image(work)
        proc, host = start_registry(work / "registry")
        sh("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:1",
           f"docker://{host}/test/img:1")
        sh("skopeo", "copy", f"oci:{layout}:1", f"docker-archive:{work / 'saved.tar'}:test/img:1")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(work / "saved.tar", arcname="saved.tar")
            tar.add(layout, arcname="layout")
            info = tarfile.TarInfo("junk.tar")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"junk\n"))
        yield {"host": host, "context": buf.getvalue(), "layout": layout, "work": work}
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


async def build(engine: Engine, name: str, steps: list[dict], context: bytes | None = None
                ) -> tuple[list[dict], dict]:
    events = [ev async for ev in await engine.builds.build(name, "latest", steps, context, {})]
    return events, events[-1]


async def run(engine: Engine, sid: str, cmd: str, user: str = "user") -> tuple[int | None, str]:
    out, code = [], None
    async for ev in await engine.processes.run(sid, ["sh", "-c", cmd], user=user):
        if isinstance(ev, Output):
            out.append(ev.data)
        elif isinstance(ev, Exited):
            code = ev.exit_code
    return code, "".join(out)


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def check_image_sandbox(engine: Engine, template: str) -> None:
    sid = (await engine.create(template=template)).id
    # the whiteout and the opaque directory of the upper layers were applied
    assert (await run(engine, sid, "test -e /etc/removed"))[0] == 1
    assert await run(engine, sid, "ls /opq") == (0, "new\n")
    assert await run(engine, sid, "cat /keep/kept") == (0, "kept\n")
    # the image's configuration: its Env; its WorkingDir exists (made at import)
    assert await run(engine, sid, "echo $FOO") == (0, "from-the-image\n")
    assert (await run(engine, sid, "test -d /work"))[0] == 0
    # the default user was added beside the image's own accounts, with a home
    assert await run(engine, sid, "id -u; id -un; echo $HOME") == (0, "1000\nuser\n/home/user\n")
    assert (await run(engine, sid, "grep -c '^daemon:' /etc/passwd"))[1] == "1\n"
    assert await run(engine, sid, "stat -c %u /home/user") == (0, "1000\n")
    # the hostile symlinks became the sandbox's own files; no device node came along
    assert await run(engine, sid, "cat /etc/resolv.conf | grep nameserver") == (
        0, "nameserver 127.0.0.1\n")
    assert (await run(engine, sid, "grep -c localhost /etc/hosts"))[1] == "2\n"
    assert (await run(engine, sid, "test -e /keep/null"))[0] == 1
    await engine.delete(sid)


def test_an_image_from_a_registry_becomes_a_template(engine_run, image):
    host = image["host"]
    host_passwd = sha("/etc/passwd")

    async def body(engine: Engine) -> None:
        steps = [{"type": "from_image", "image": f"{host}/test/img:1"},
                 {"type": "run", "cmd": "echo layered > /home/user/on-top"}]
        events, last = await build(engine, "img", steps)
        assert last["type"] == "done", last
        tpl = last["template"]
        assert tpl["usr_from"] is None and tpl["workdir"] == "/work" and tpl["user"] == "user"
        assert tpl["env"] == {"FOO": "from-the-image", "PATH": "/bin"}
        assert tpl["steps"][0]["digest"].startswith("sha256:")
        assert tpl["steps"][0]["reference"] == f"{host}/test/img:1"
        first = next(e for e in events if e["type"] == "step")
        assert first["index"] == 0 and first["cached"] is False
        assert any("unpacking" in e.get("data", "") for e in events)
        await check_image_sandbox(engine, "img")
        sid = (await engine.create(template="img")).id
        assert await run(engine, sid, "cat /home/user/on-top") == (0, "layered\n")
        # the stored root filesystem: no device node, no set-uid surprise, root's only
        sources = engine.templates.sources
        assert stat.S_IMODE(os.stat(sources).st_mode) == 0o700
        (key,) = [d.name for d in sources.iterdir() if d.is_dir()]
        for dirpath, _, files in os.walk(sources / key / "rootfs"):
            for f in files:
                mode = os.lstat(os.path.join(dirpath, f)).st_mode
                assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), f

        # the same image by its short name through the mirror (docker.io -> the test's
        # registry): one manifest digest, so the stored source is reused
        events, last = await build(engine, "img-mirror",
                                   [{"type": "from_image", "image": "test/img:1"}])
        assert last["type"] == "done", last
        assert last["template"]["steps"][0]["reference"] == "docker.io/test/img:1"
        assert [e["cached"] for e in events if e["type"] == "step"] == [True]
        assert [d.name for d in sources.iterdir() if d.is_dir()] == [key]
        # a rebuild with nothing changed: cached, quick, the same template
        t0 = time.monotonic()
        events, again = await build(engine, "img", steps)
        assert time.monotonic() - t0 < 2, "a cached rebuild from an image took over 2 s"
        assert all(e["cached"] for e in events if e["type"] == "step")
        assert again["template"]["digest"] == tpl["digest"]

        # deleting both names collects the source once no template uses it
        await engine.delete(sid)
        engine.delete_template("img")
        assert (sources / key).is_dir()  # (img-mirror still uses it)
        engine.delete_template("img-mirror")
        assert not (sources / key).exists()

    engine_run(body, registry_mirror=[host], registry_insecure=[host])
    assert sha("/etc/passwd") == host_passwd


def test_docker_save_archives_and_oci_layouts_in_the_context(engine_run, image):
    async def body(engine: Engine) -> None:
        for name, src in (("saved", "saved.tar"), ("layout", "layout")):
            _, last = await build(engine, name, [{"type": "from_archive", "src": src}],
                                  image["context"])
            assert last["type"] == "done", (src, last)
            assert last["template"]["env"]["FOO"] == "from-the-image"
            await check_image_sandbox(engine, name)

        # not an image; no context; a path outside the context
        _, last = await build(engine, "bad", [{"type": "from_archive", "src": "junk.tar"}],
                              image["context"])
        assert last["type"] == "error" and last["status"] == 422, last
        assert "junk.tar" in last["error"]["message"]
        _, last = await build(engine, "bad", [{"type": "from_archive", "src": "saved.tar"}])
        assert last["status"] == 422 and "build context" in last["error"]["message"]
        with pytest.raises(Invalid, match="inside the build context"):
            await engine.builds.build("bad", "latest", [
                {"type": "from_archive", "src": "/etc/passwd"}], image["context"], {})
        with pytest.raises(Invalid, match="inside the build context"):
            await engine.builds.build("bad", "latest", [
                {"type": "from_archive", "src": "../../etc"}], image["context"], {})
        assert engine.templates.get("bad") is None

    engine_run(body)


def test_unknown_images_and_unreachable_registries_fail_clearly(engine_run, image):
    host = image["host"]
    closed = f"127.0.0.1:{free_port()}"

    async def body(engine: Engine) -> None:
        _, last = await build(engine, "img", [{"type": "from_image", "image":
                                               f"{host}/test/img:1"}])
        assert last["type"] == "done", last
        before = engine.template("img").digest

        _, last = await build(engine, "img", [{"type": "from_image", "image":
                                               f"{host}/test/nope:1"}])
        assert last["type"] == "error" and last["status"] == 404, last
        msg = last["error"]["message"]
        assert f"{host}/test/nope:1" in msg and f"registry {host}" in msg, msg
        assert "manifest unknown" in msg

        _, last = await build(engine, "img", [{"type": "from_image", "image":
                                               f"{closed}/test/img:1"}])
        assert last["status"] == 502 and last["error"]["code"] == "registry_unreachable"
        msg = last["error"]["message"]
        assert f"cannot reach registry {closed}" in msg and "connection refused" in msg, msg

        # a plain-HTTP registry that is not listed as insecure: the error says what to do
        _, last = await build(engine, "img", [{"type": "from_image", "image":
                                               f"{host.replace('127.0.0.1', 'localhost')}"
                                               "/test/img:1"}])
        assert last["status"] == 502 and "--registry-insecure" in last["error"]["message"]

        # the name still points at what it did; nothing half-fetched is left
        assert engine.template("img").digest == before
        assert not [d for d in engine.templates.sources.iterdir() if d.name.endswith(".tmp")]

        for steps, field in (
                ([{"type": "from_image", "image": "Not A Reference"}], "steps.0.image"),
                ([{"type": "from_debian", "suite": "hamm"}], "steps.0.suite"),
                ([{"type": "env", "env": {}}, {"type": "from_image", "image": "x"}],
                 "steps.1")):
            with pytest.raises(Invalid) as err:
                await engine.builds.build("img", "latest", steps, None, {})
            assert err.value.extra["field"] == field
        with pytest.raises(Invalid, match="known: bookworm, trixie"):
            await engine.builds.build("img", "latest",
                                      [{"type": "from_debian", "suite": "hamm"}], None, {})

    engine_run(body, registry_insecure=[host])


@pytest.fixture
def tiny_store():
    """A template store on a 1 MiB tmpfs: too small for the image."""
    d = Path(tempfile.mkdtemp(prefix="tpt-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True)
    try:
        yield TemplateStore(d)
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


def test_a_full_disk_during_a_fetch_fails_and_keeps_nothing(tiny_store, image):
    host = image["host"]
    sources = Sources(tiny_store, registry_insecure=[host])

    async def main():
        async for _ in sources.fetch({"type": "from_image", "image": f"{host}/test/img:1"},
                                     1, None, "full"):
            pass

    with pytest.raises(DiskFull) as err:
        asyncio.run(main())
    assert err.value.status == 507 and "no space left" in err.value.message
    assert [p.name for p in tiny_store.sources.iterdir()] == []


def test_registry_credentials_come_from_the_auth_file(image, tmp_path):
    """A registry that wants a password: refused without the operator's auth file, fetched
    with it (skopeo's --authfile)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # (bcrypt through libxcrypt: what docker-registry's htpasswd takes)

        # (the cheapest cost: the registry checks it at every request)
        hashed = crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    proc, host = start_registry(tmp_path / "registry", f"tester:{hashed}")
    try:
        sh("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", "tester:s3cret",
           f"oci:{image['layout']}:1", f"docker://{host}/private/img:1")
        auth = tmp_path / "auth.json"
        token = base64.b64encode(b"tester:s3cret").decode()
        auth.write_text(json.dumps({"auths": {host: {"auth": token}}}))
        step = {"type": "from_image", "image": f"{host}/private/img:1"}

        async def fetch(sources: Sources) -> list:
            return [ev async for ev in sources.fetch(step, 1, None, "auth")]

        store = TemplateStore(tmp_path / "data")
        with pytest.raises(NotFound, match="credentials") as err:
            asyncio.run(fetch(Sources(store, registry_insecure=[host])))
        assert "authentication required" in err.value.message
        events = asyncio.run(fetch(Sources(store, registry_insecure=[host],
                                           registry_auth_file=str(auth))))
        tpl = events[-1]
        assert tpl.base_rootfs and Path(tpl.base_rootfs, "bin/busybox").is_file()
        assert tpl.env["FOO"] == "from-the-image"
    finally:
        stop(proc)


@pytest.mark.slow
def test_a_debian_suite_becomes_a_template(engine_run):
    """bootstraps Debian bookworm (minbase) from the host's mirror: ~45 s here."""
    async def body(engine: Engine) -> None:
        events, last = await build(engine, "deb", [{"type": "from_debian",
                                                    "suite": "bookworm"}])
        assert last["type"] == "done", (last, [e.get("data") for e in events][-20:])
        tpl = last["template"]
        assert tpl["usr_from"] is None and tpl["steps"][0]["variant"] == "minbase"
        assert any(e.get("data", "").startswith("I: ") for e in events)  # mmdebstrap's log
        sid = (await engine.create(template="deb")).id
        code, out = await run(engine, sid, "cat /etc/debian_version; id -un; "
                                           "apt-get --version | head -1")
        assert code == 0, out
        version, user, apt = out.splitlines()[:3]
        assert version.startswith("12.") and user == "user" and apt.startswith("apt ")
        # its own /usr (Debian's), not the host's: the agent's Python is not in it
        assert (await run(engine, sid, "test -e /usr/bin/python3"))[0] == 1
        meta = json.loads(next(engine.templates.sources.glob("*/source.json")).read_text())
        assert meta["kind"] == "from_debian" and meta["prepared"]["users_added"] == ["user"]

    engine_run(body)
