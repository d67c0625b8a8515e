"""What the driver reads off the installed runsc: its release, and the checkpoint options
it has (a stand-in runsc script plays an old and a new release)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from torpor.runtime.gvisor import CHECKPOINT_FIXED, checkpoint_flags, release_date, runsc_version


def fake_runsc(tmp: Path, version: str, checkpoint_help: str) -> str:
    p = tmp / "runsc"
    p.write_text("#!/bin/sh\n"
                 f'if [ "$1" = "--version" ]; then echo "runsc version {version}"; '
                 'echo "spec: 1.0.2"; exit 0; fi\n'
                 f'if [ "$1" = "checkpoint" ]; then echo "{checkpoint_help}" >&2; exit 0; fi\n'
                 "exit 1\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_release_dates():
    assert release_date("0.0~20240729.0") == 20240729
    assert release_date("release-20221219.0") == 20221219
    assert release_date("unknown") == 0
    assert release_date("0.0~20221219.0") < CHECKPOINT_FIXED <= release_date("0.0~20240729.0")


def test_checkpoint_flags_follow_what_runsc_offers(tmp_path):
    new = fake_runsc(tmp_path, "0.0~20240729.0",
                     "  -compression value\\n    compress checkpoint image on disk.")
    assert runsc_version(new) == "0.0~20240729.0"
    assert checkpoint_flags(new, "none") == ["--compression=none"]
    assert checkpoint_flags(new, "flate") == ["--compression=flate-best-speed"]
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    old = fake_runsc(old_dir, "0.0~20221219.0", "  -image-path string")
    assert checkpoint_flags(old, "none") == []  # always compressed there


@pytest.mark.skipif(not shutil.which("runsc") or os.geteuid() != 0, reason="needs runsc")
def test_the_installed_runsc_is_read():
    runsc = shutil.which("runsc")
    assert release_date(runsc_version(runsc)) > 0
    flags = checkpoint_flags(runsc, "none")
    assert flags in ([], ["--compression=none"])
