"""Template sources without a registry or runsc: image references as docker normalises them,
the registries.conf made from the operator's settings, what skopeo's failures mean, the host's
Debian mirror, and making a hostile root filesystem fit to run without touching the host."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from torpor.errors import Invalid
from torpor.sources import Sources, debian, oci, rootfs
from torpor.templates import TemplateStore


@pytest.mark.parametrize("ref,want", [
    ("python", "docker.io/library/python:latest"),
    ("python:3.12-slim", "docker.io/library/python:3.12-slim"),
    ("me/app:1", "docker.io/me/app:1"),
    ("index.docker.io/library/debian:12", "docker.io/library/debian:12"),
    ("ghcr.io/owner/img", "ghcr.io/owner/img:latest"),
    ("localhost/img:2", "localhost/img:2"),
    ("127.0.0.1:5000/test/img:1", "127.0.0.1:5000/test/img:1"),
    ("quay.io/a/b/c@sha256:" + "a" * 64, "quay.io/a/b/c@sha256:" + "a" * 64),
    ("busybox:1.36@sha256:" + "b" * 64, "docker.io/library/busybox:1.36@sha256:" + "b" * 64),
])
def test_references_are_normalised_like_docker(ref, want):
    assert str(oci.parse_image(ref)) == want


@pytest.mark.parametrize("ref", ["", "Python", "python:", "a b", "img@sha256:12",
                                 "docker.io/-bad/x", "x:" + "t" * 200, " python"])
def test_bad_references_are_refused(ref):
    with pytest.raises(ValueError):
        oci.parse_image(ref)


def test_mirrors_and_insecure_registries_become_a_registries_conf():
    mirrors, plain = oci.parse_mirrors(["mirror.local:5000", "ghcr.io=https://ghcache/ghcr",
                                        "quay.io=http://10.0.0.9:8080"])
    assert mirrors == {"docker.io": "mirror.local:5000", "ghcr.io": "ghcache/ghcr",
                       "quay.io": "10.0.0.9:8080"}
    assert plain == {"10.0.0.9:8080"}
    conf = oci.registries_conf(mirrors, plain | {"127.0.0.1:5000"})
    import tomllib

    regs = {r["prefix"]: r for r in tomllib.loads(conf)["registry"]}
    assert regs["docker.io"]["mirror"] == [{"location": "mirror.local:5000",
                                            "insecure": False}]
    assert regs["quay.io"]["mirror"][0] == {"location": "10.0.0.9:8080", "insecure": True}
    assert regs["127.0.0.1:5000"]["insecure"] is True and "mirror" not in regs["127.0.0.1:5000"]
    with pytest.raises(ValueError, match="REGISTRY=HOST"):
        oci.parse_mirrors(["docker.io="])
    with pytest.raises(Invalid):
        Sources(TemplateStore(Path("/nonexistent")), registry_mirror=["bad host=x"])
    one = Sources(TemplateStore(Path("/nonexistent")), registry_mirror="m.example",
                  registry_insecure="m.example")  # (one string from a config file)
    assert one.mirrors == {"docker.io": "m.example"} and one.insecure == {"m.example"}


def test_skopeo_failures_are_told_apart():
    line = ('time="2026-01-01T00:00:00Z" level=fatal msg="Error parsing image name '
            '\\"docker://h/x:1\\": reading manifest 1 in h/x: manifest unknown"')
    assert oci.skopeo_reason(line).endswith("manifest unknown")
    assert oci.classify(oci.skopeo_reason(line)) == "not_found"
    assert oci.classify("pinging container registry h: dial tcp 127.0.0.1:1: connect: "
                        "connection refused") == "unreachable"
    assert oci.classify("writing blob: write /x: no space left on device") == "disk_full"
    assert oci.classify("unauthorized: authentication required") == "denied"
    assert "--registry-cert-dir" in oci.hint("x509: certificate signed by unknown authority")


def test_the_host_debian_mirror_is_read_from_apt(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://security.debian.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb-src deb\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert debian.host_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d/debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://old.example/debian bookworm main\n")
    assert debian.host_mirror(tmp_path) == "http://old.example/debian"
    (tmp_path / "sources.list").unlink()
    assert debian.host_mirror(tmp_path) == debian.DEFAULT_MIRROR


def test_paths_resolve_inside_the_rootfs(tmp_path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    os.symlink("usr/bin", root / "bin")
    os.symlink("/", root / "up")
    os.symlink("../../../../..", root / "usr/climb")
    os.symlink("/etc/passwd", root / "pw")
    os.symlink("loop", root / "loop")
    assert rootfs.resolve_in(root, "/bin/sh") == root / "usr/bin/sh"
    assert rootfs.resolve_in(root, "up/etc/passwd") == root / "etc/passwd"
    assert rootfs.resolve_in(root, "usr/climb/etc") == root / "etc"
    assert rootfs.resolve_in(root, "../../etc") == root / "etc"
    assert rootfs.resolve_in(root, "pw") == root / "etc/passwd"
    assert rootfs.resolve_in(root, "pw", follow_last=False) == root / "pw"
    with pytest.raises(rootfs.UnsafeRootfs):
        rootfs.resolve_in(root, "loop/x")


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_hostile_rootfs_is_made_fit_without_touching_the_host(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (device nodes, ownership)")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/sh").write_text("")
    (root / "dev").mkdir()
    os.mknod(root / "dev/sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # followed on the host, these would make Torpor write /usr/local/etc/passwd and read
    # the host's /etc/shadow
    os.symlink("/usr/local/etc", root / "etc")
    (root / "usr/local/etc").mkdir(parents=True)
    os.symlink("/etc/shadow", root / "usr/local/etc/shadow")
    os.symlink("/tmp/../root", root / "home")
    os.setxattr(root / "bin", "trusted.overlay.opaque", b"y")
    before = {p: _digest(p) for p in ("/etc/passwd", "/etc/group", "/etc/hosts")}
    did = rootfs.prepare(root, workdir="/srv/app")
    assert {p: _digest(p) for p in before} == before
    assert not os.path.lexists("/usr/local/etc/passwd")
    assert did["devices"] == 2 and did["xattrs"] == 1 and did["users_added"] == ["root", "user"]
    passwd = (root / "usr/local/etc/passwd").read_text()
    assert "user:x:1000:1000:Sandbox user:/home/user:/bin/sh" in passwd
    assert "user:x:1000:" in (root / "usr/local/etc/group").read_text()
    assert "nameserver 127.0.0.1" in (root / "usr/local/etc/resolv.conf").read_text()
    # the image's shadow points at the host's: not read, not written through
    assert (root / "usr/local/etc/shadow").is_symlink()
    home = rootfs.resolve_in(root, "home/user")
    assert home == root / "root/user" and os.stat(home).st_uid == 1000
    for d in ("proc", "sys", "tmp", ".torpor/usr", ".torpor/agent", "srv/app"):
        assert (root / d).is_dir(), d
    assert not os.listxattr(root / "bin")


def test_a_rootfs_whose_etc_loops_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/etc", root / "etc")  # (inside the rootfs: a link to itself)
    with pytest.raises(rootfs.UnsafeRootfs, match="too many levels"):
        rootfs.prepare(root)


def test_an_image_with_its_own_user_keeps_it(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                     "user:x:1000:1000::/srv/user:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    did = rootfs.prepare(root)
    assert did["users_added"] == []
    assert [ln for ln in (root / "etc/passwd").read_text().splitlines()
            if ln.startswith("user:")] == ["user:x:1000:1000::/srv/user:/bin/sh"]
    assert (root / "srv/user").is_dir()
