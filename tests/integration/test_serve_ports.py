"""`make serve` and `torpor serve` with the preview port: settable, and a taken one is named."""

from __future__ import annotations

import shutil
import socket
import subprocess

from conftest import CLI, ROOT, make_data_dir

from torpor.runtime.gvisor import purge


def test_make_serve_passes_the_preview_port():
    out = subprocess.run(["make", "-n", "serve", "PREVIEW_PORT=7181"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert "--preview-port 7181" in out
    env_out = subprocess.run(["make", "-n", "serve"], cwd=ROOT, check=True,
                             capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "TORPOR_PREVIEW_PORT": "7182"}).stdout
    assert "--preview-port 7182" in env_out


def test_a_taken_preview_port_names_every_way_to_choose_another():
    data = make_data_dir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            p = subprocess.run([*CLI, "serve", "--host", "127.0.0.1", "--port", "0",
                                "--data-dir", str(data), "--pool-size", "0",
                                "--preview-port", str(port)],
                               cwd=ROOT, capture_output=True, text=True, timeout=120,
                               check=False)
        finally:
            purge(data)
            shutil.rmtree(data, ignore_errors=True)
    assert p.returncode != 0
    message = " ".join((p.stdout + p.stderr).split())
    assert f"127.0.0.1:{port}" in message
    for way in ("make serve PREVIEW_PORT=N", "--preview-port N", "TORPOR_PREVIEW_PORT=N"):
        assert way in message, message
