"""The template store's collection: what a build in progress made or stands on is held
(its layers and unnamed templates are not collected by a delete that runs meanwhile)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.templates import Template, TemplateStore

pytestmark = pytest.mark.unit


def layer(store: TemplateStore, key: str) -> None:
    tmp = store.layer_tmp(key)
    (tmp / "root" / "f").write_text(key)
    store.commit_layer(tmp, key)


def test_a_build_holds_its_layers_and_templates_until_released(tmp_path: Path):
    store = TemplateStore(tmp_path)
    layer(store, "a" * 64)
    layer(store, "b" * 64)
    mid = store.put(Template(name="x", path=tmp_path, base_rootfs=str(tmp_path),
                             layers=["a" * 64]))
    store.hold("build:x", digest=mid.digest)
    store.hold("build:x", layer="b" * 64)
    removed = store.gc(in_use=set())
    assert removed == []
    assert store.has_layer("a" * 64) and store.has_layer("b" * 64)
    assert store.by_digest(mid.digest) is not None
    store.release("build:x")
    removed = store.gc(in_use=set())
    assert mid.digest in removed
    assert not store.has_layer("a" * 64) and not store.has_layer("b" * 64)


def test_a_named_template_keeps_its_layers_without_a_hold(tmp_path: Path):
    store = TemplateStore(tmp_path)
    layer(store, "c" * 64)
    t = store.put(Template(name="y", path=tmp_path, base_rootfs=str(tmp_path),
                           layers=["c" * 64]))
    store.tag("y", "latest", t.digest)
    assert store.gc(in_use=set()) == []
    assert store.get("y").layers == ["c" * 64]


def test_the_base_profile_answers_the_same_without_forking_id(tmp_path: Path):
    """base's /etc/profile takes bash's $EUID instead of `$(id -u)` (a fork and an exec
    under gVisor for every login shell) and still sets the same PATH, in bash and in sh."""
    import subprocess

    from torpor.templates import build_base_rootfs
    if not Path("/etc/profile").is_file():
        pytest.skip("no /etc/profile on this host")
    build_base_rootfs(tmp_path / "rootfs")
    ours = tmp_path / "rootfs/etc/profile"
    assert "${EUID:-$(id -u)}" in ours.read_text()
    assert '"$(id -u)"' not in ours.read_text()
    for profile in ("/etc/profile", str(ours)):
        for shell in ("bash", "sh"):
            out = subprocess.run([shell, "-c", f". {profile}; echo $PATH"],
                                 capture_output=True, text=True, check=True,
                                 env={"HOME": str(tmp_path)}).stdout
            assert "/usr/sbin" in out  # the tests run as root
