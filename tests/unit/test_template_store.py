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
