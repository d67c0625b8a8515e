"""Blank disk images made ahead (runtime/layers.py DiskStock), with the real mkfs.ext4 on
real files: a start takes a whole formatted image of its size, or formats its own when
there is none; the stock makes what a start asked for only after it settled; nothing half
made ever carries an image's name, and a new stock drops what an interrupted fill left."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from torpor.runtime.layers import DiskStock


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def is_ext4(image: Path) -> bool:
    """`e2fsck -n`: a whole, clean ext4 file system (read-only check)."""
    p = subprocess.run(["e2fsck", "-n", "-f", str(image)], capture_output=True, text=True,
                       check=False)
    return p.returncode == 0


@pytest.fixture
def stock(tmp_path):
    s = DiskStock(tmp_path / "disks", keep=2, settle=0.05)
    yield s
    s.close()


def test_a_start_takes_a_formatted_image_of_its_size(stock, tmp_path):
    assert not stock.take(64, tmp_path / "a.img")  # none yet: the caller formats one
    stock.refill()
    wait_for(lambda: stock.count(64) == 2)
    assert stock.take(64, tmp_path / "b.img")
    assert (tmp_path / "b.img").stat().st_size == 64 << 20
    assert (tmp_path / "b.img").stat().st_blocks * 512 < 8 << 20  # sparse
    assert is_ext4(tmp_path / "b.img")
    assert stock.count(64) == 1
    assert not stock.take(128, tmp_path / "c.img")  # another size: not in stock
    stock.refill()
    wait_for(lambda: stock.count(64) == 2 and stock.count(128) == 2)


def test_the_stock_waits_for_the_start_to_settle(tmp_path):
    s = DiskStock(tmp_path / "disks", keep=1, settle=1.0)
    try:
        s.take(64, tmp_path / "x.img")
        s.refill()
        time.sleep(0.3)
        assert s.count(64) == 0  # not while the start that asked may still run
        wait_for(lambda: s.count(64) == 1)
    finally:
        s.close()


def test_half_made_images_are_never_taken_and_are_dropped(tmp_path):
    d = tmp_path / "disks"
    d.mkdir()
    (d / "64-abc.tmp").write_bytes(b"half")
    s = DiskStock(d, keep=1, settle=0.01)
    try:
        assert not (d / "64-abc.tmp").exists()
        assert not s.take(64, tmp_path / "x.img")
    finally:
        s.close()


def test_close_stops_the_thread_and_keeps_the_images(tmp_path):
    s = DiskStock(tmp_path / "disks", keep=1, settle=0.01)
    s.take(64, tmp_path / "x.img")
    s.refill()
    wait_for(lambda: s.count(64) == 1)
    s.close()
    assert not s._thread.is_alive()
    s.refill()  # after close: nothing more is made
    assert s.count(64) == 1
    again = DiskStock(tmp_path / "disks")  # the next server finds them
    try:
        assert again.take(64, tmp_path / "y.img")
        assert is_ext4(tmp_path / "y.img")
    finally:
        again.close()


def snapshot_disk(path: Path, data: bytes) -> Path:
    """A sparse 64 MiB image with `data` at 1 MiB (a boot snapshot's disk, as far as the
    stock can tell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(data)
    return path


def test_a_start_from_a_snapshot_takes_a_copy_of_its_disk_made_ahead(stock, tmp_path):
    src = snapshot_disk(tmp_path / "tpl" / "disk.img", b"snapshot one")
    assert not stock.take(src, tmp_path / "a.img")  # none yet: the caller copies
    stock.refill()
    wait_for(lambda: stock.count(src) == 2)
    assert stock.take(src, tmp_path / "b.img")
    got = (tmp_path / "b.img").read_bytes()
    assert got == src.read_bytes()
    assert (tmp_path / "b.img").stat().st_blocks * 512 < 4 << 20  # still sparse
    assert not os.path.samefile(src, tmp_path / "b.img")  # its own file
    assert stock.count(src) == 1
    assert stock.count(64) == 0  # copies are not blank disks


def test_copies_of_a_changed_or_deleted_snapshot_are_never_taken_and_go(stock, tmp_path):
    src = snapshot_disk(tmp_path / "tpl" / "disk.img", b"first build")
    stock.take(src, tmp_path / "a.img")
    stock.refill()
    wait_for(lambda: stock.count(src) == 2)
    # the template is rebuilt under the same path: another file, other contents
    src.unlink()
    time.sleep(0.01)
    snapshot_disk(src, b"second build")
    assert stock.count(src) == 0
    assert not stock.take(src, tmp_path / "b.img")  # never the old build's disk
    stock.refill()
    wait_for(lambda: stock.count(src) == 2)
    assert stock.take(src, tmp_path / "c.img")
    assert (tmp_path / "c.img").read_bytes() == src.read_bytes()
    stock.refill()
    wait_for(lambda: stock.count(src) == 2)
    assert len(list(stock.dir.glob("copy-*.img"))) == 2  # the old build's went
    # the template is deleted: its copies go at the next fill
    shutil.rmtree(tmp_path / "tpl")
    stock.take(64, tmp_path / "d.img")
    stock.refill()
    wait_for(lambda: not list(stock.dir.glob("copy-*")) and stock.count(64) == 2)


def test_a_new_stock_drops_copies_it_cannot_name(tmp_path):
    src = snapshot_disk(tmp_path / "tpl" / "disk.img", b"x")
    s = DiskStock(tmp_path / "disks", keep=1, settle=0.01)
    try:
        s.take(src, tmp_path / "a.img")
        s.refill()
        wait_for(lambda: s.count(src) == 1)
    finally:
        s.close()
    again = DiskStock(tmp_path / "disks")
    try:
        assert not list(again.dir.glob("copy-*"))
        assert not again.take(src, tmp_path / "b.img")
    finally:
        again.close()
