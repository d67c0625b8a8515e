"""Sandboxed code is hostile: it must not reach host files, other sandboxes, the server's
database or secrets, or host processes; the files API must not be a way out either."""

from __future__ import annotations

import secrets
from pathlib import Path

from conftest import ROOT, run

HOST_MARKERS = [Path("/root"), Path("/tmp"), Path("/var/tmp")]


def test_host_files_are_not_visible(server, api, sandbox):
    token = "torpor-escape-" + secrets.token_hex(6)
    made = []
    try:
        for d in HOST_MARKERS:
            p = d / token
            p.write_text("host secret")
            made.append(p)
        # every filesystem of the sandbox but the host's read-only /usr (searched by name)
        out = run(api, sandbox, f"find / -xdev -name '{token}*' 2>/dev/null; "
                                f"find /tmp /var /root /home /run /dev -name '{token}*'; "
                                f"ls /usr /.torpor/usr | grep -c '{token}'; "
                                f"cat /root/{token} /tmp/{token} 2>&1", user="root", timeout=120)
        assert "host secret" not in out["stdout"]
        assert token not in out["stdout"].replace(f"/root/{token}: No such", "").replace(
            f"/tmp/{token}: No such", "")
    finally:
        for p in made:
            p.unlink()


def test_server_data_database_and_checkout_are_not_visible(server, api, sandbox):
    data = server.data_dir
    paths = [data, data / "torpor.db", data / "api-key", ROOT, ROOT / "pyproject.toml",
             Path("/var/lib/torpor")]
    for p in paths:
        out = run(api, sandbox, f"ls -d {p} 2>&1; cat {p} 2>&1 | head -c 100", user="root")
        assert "No such file" in out["stdout"], (p, out)
    key = server.key
    # /usr and /.torpor/usr are the host's read-only system tree: no keys there
    out = run(api, sandbox, f"grep -r -l '{key}' / --exclude-dir=usr --exclude-dir=.torpor "
                            "--exclude-dir=proc --exclude-dir=sys 2>/dev/null | head",
              user="root", timeout=100)
    assert out["stdout"] == ""


def test_other_sandboxes_are_not_visible(api, sandbox):
    other = api.post("/v1/sandboxes", json={}).json()["id"]
    try:
        token = "torpor-neighbour-" + secrets.token_hex(6)
        run(api, other, f"echo secret > /home/user/{token}; sleep 300 &")
        out = run(api, sandbox, f"find / -xdev -name '{token}' 2>/dev/null; "
                                f"find /tmp /home /root /run -name '{token}'",
                  user="root", timeout=120)
        assert out["stdout"] == ""
        procs = run(api, sandbox, "ps -eo args", user="root")["stdout"]
        assert "sleep 300" not in procs
    finally:
        api.delete(f"/v1/sandboxes/{other}")


def test_host_processes_are_not_visible(server, api, sandbox):
    out = run(api, sandbox, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
              user="root")
    assert "torpor" not in out["stdout"].replace("/.torpor/", "")
    assert "holder.py" not in out["stdout"] and "runsc" not in out["stdout"]
    assert "pytest" not in out["stdout"]


def test_agent_bundle_and_host_usr_are_read_only(api, sandbox):
    out = run(api, sandbox, "echo x >> /.torpor/agent/agent.py; echo x > /.torpor/usr/evil; "
                            "rm -f /.torpor/usr/bin/python3; ls /.torpor/usr/bin/python3",
              user="root")
    assert out["stderr"].count("Read-only file system") >= 2, out
    assert "/.torpor/usr/bin/python3" in out["stdout"]
    assert not Path("/usr/evil").exists()


def test_server_port_and_host_network_unreachable(server, api, sandbox):
    code = ("import socket\n"
            "for host in ('127.0.0.1', '10.0.2.2'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {server.port}), timeout=2)\n"
            "        print('CONNECTED', host)\n"
            "    except OSError as e:\n"
            "        print('refused', host, e)\n")
    api.put(f"/v1/sandboxes/{sandbox}/files", params={"path": "/tmp/net.py"},
            content=code.encode())
    out = run(api, sandbox, "python3 /tmp/net.py")
    assert "CONNECTED" not in out["stdout"], out
    ifaces = run(api, sandbox, "ls /sys/class/net 2>/dev/null; cat /proc/net/dev")["stdout"]
    assert "eth" not in ifaces and "veth" not in ifaces


def test_files_api_dotdot_and_absolute_paths_stay_inside(api, sandbox):
    base = f"/v1/sandboxes/{sandbox}/files"
    host_shadow = Path("/etc/shadow").read_bytes()
    for path in ["../../../../../../etc/shadow", "/etc/../../../etc/shadow",
                 "/home/user/../../etc/shadow"]:
        r = api.get(base, params={"path": path})
        assert r.status_code == 200
        assert r.content != host_shadow and b"user:*:" in r.content
    r = api.put(base, params={"path": "../../../../../../tmp/torpor-dotdot-escape"},
                content=b"x")
    assert r.status_code == 200
    assert not Path("/tmp/torpor-dotdot-escape").exists()


def test_files_api_through_symlinks_made_by_sandboxed_code(api, sandbox):
    run(api, sandbox, "ln -s / /home/user/hostroot; ln -s /etc /home/user/etc-link; "
                      "ln -s /proc/1/root /home/user/pid1root")
    base = f"/v1/sandboxes/{sandbox}/files"
    # this runsc resolves "<link to />/more/path" to "/" itself (a gVisor bug: 409, is a
    # directory); either way the answer comes from the sandbox, never the host
    r = api.get(base, params={"path": "hostroot/etc/hostname"})
    assert r.content == b"sandbox\n" if r.status_code == 200 else r.status_code == 409
    r = api.get(base, params={"path": "etc-link/hostname"})
    assert r.content == b"sandbox\n"
    # /proc/1/root is the sandbox's own root, when gVisor resolves it at all
    r = api.get(base, params={"path": "pid1root/etc/hostname"})
    assert r.content == b"sandbox\n" if r.status_code == 200 else r.status_code in (404, 409)
    token = "torpor-symlink-" + secrets.token_hex(4)
    r = api.put(base, params={"path": f"etc-link/{token}", "user": "root"}, content=b"x")
    assert r.status_code == 200
    assert not Path(f"/etc/{token}").exists()
    listing = api.get(base + "/list", params={"path": "hostroot/"}).json()
    names = {e["name"] for e in listing}
    assert ".torpor" in names and "work" not in names
