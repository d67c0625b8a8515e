"""File watch (issue 14 item 3): inotify in the agent under real runsc, the REST stream
(NDJSON and SSE), the SDK's handle, and a watch that outlives standby and hibernation."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run, wait_for

from torpor import Sandbox
from torpor.sdk.errors import ConflictError, NotFoundError


@pytest.fixture
def conn(server):
    return {"url": server.url, "api_key": server.key}


def _until(handle, pred, timeout=15.0):
    """Events from the handle until one matches `pred`; all of them, that one last."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = handle.get(timeout=max(0.05, deadline - time.monotonic()))
        if ev is None:
            continue
        got.append(ev)
        if pred(ev):
            return got
    raise AssertionError(f"no matching event within {timeout}s; got {got}")


def test_watch_reports_each_kind_of_change_recursively(conn):
    with Sandbox.create(**conn) as sbx:
        sbx.commands.run("mkdir -p /home/user/w/old", check=True)
        with sbx.files.watch("/home/user/w") as h:
            sbx.commands.run(
                "cd /home/user/w && mkdir -p sub/deep && echo a > sub/deep/a && "
                "python3 -c \"f = open('big', 'w')\nfor i in range(2000): f.write('x'); "
                "f.flush()\" && chmod 600 big && mv big sub/big2 && rm sub/deep/a && "
                "mv sub/big2 /tmp/out && touch old/inner && touch done", check=True)
            got = _until(h, lambda e: e.type == "create" and e.path == "done")
        seen = {(e.type, e.path) for e in got}
        for want in [("create", "sub"), ("create", "sub/deep"), ("create", "sub/deep/a"),
                     ("write", "sub/deep/a"), ("create", "big"), ("write", "big"),
                     ("chmod", "big"), ("rename", "sub/big2"), ("remove", "sub/deep/a"),
                     ("remove", "sub/big2"), ("create", "old/inner"), ("create", "done")]:
            assert want in seen, (want, got)
        rename = next(e for e in got if e.type == "rename")
        assert rename.old_path == "big" and not rename.dir
        assert next(e for e in got if e.path == "sub/deep").dir
        # 2000 flushed writes to one file: coalesced while unsent (one per path per batch)
        writes = [e for e in got if e.type == "write" and e.path == "big"]
        assert 1 <= len(writes) < 2000, len(writes)


def test_watch_errors_and_non_recursive(conn, api):
    with Sandbox.create(**conn) as sbx:
        with pytest.raises(NotFoundError, match="no such file"):
            sbx.files.watch("/home/user/nope")
        sbx.files.write("/home/user/afile", "x")
        with pytest.raises(ConflictError, match="not a directory"):
            sbx.files.watch("/home/user/afile")
        r = api.get(f"/v1/sandboxes/{sbx.id}/files/watch", params={"path": "/nope/x"})
        assert r.status_code == 404 and "/nope/x" in r.json()["error"]["message"]
        sbx.commands.run("mkdir -p /home/user/n/sub", check=True)
        with sbx.files.watch("/home/user/n", recursive=False) as h:
            sbx.commands.run("touch /home/user/n/sub/hidden /home/user/n/top", check=True)
            got = _until(h, lambda e: e.path == "top")
        assert all(not e.path.startswith("sub/") for e in got), got


def test_watch_over_rest_as_sse_and_the_end_of_the_directory(server, sandbox, api):
    run(api, sandbox, "mkdir -p /home/user/s")
    url = f"/v1/sandboxes/{sandbox}/files/watch"
    with api.stream("GET", url, params={"path": "s"},  # relative: from the user's home
                    headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "event: watching"
        next(lines), next(lines)
        run(api, sandbox, "echo hi > /home/user/s/f && rm -r /home/user/s")
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "gone":
                    break
    kinds = [(e["type"], e["path"]) for e in events]
    assert kinds[0] == ("create", "f") and ("remove", "f") in kinds
    assert kinds[-1] == ("gone", "")


def test_watch_outlives_standby_and_hibernation(conn, api):
    with Sandbox.create(**conn) as sbx:
        sbx.commands.run("mkdir -p /home/user/p", check=True)
        with sbx.files.watch("/home/user/p") as h:
            # an open watch neither keeps the sandbox awake nor refuses a standby
            assert sbx.standby().state == "standby"
            assert h.get(timeout=0.5) is None  # frozen: nothing happens
            sbx.commands.run("touch /home/user/p/after-standby", check=True)  # thaws it
            _until(h, lambda e: e.path == "after-standby")
            assert sbx.hibernate().state == "hibernated"
            sbx.resume()
            # the server watches anew once the sandbox runs again (within ~0.1 s)
            wait_for(lambda: _rewatched(sbx, h), timeout=20, every=0.3)
            assert h.error is None


def _rewatched(sbx, h) -> bool:
    name = f"after-hibernation-{time.monotonic_ns()}"
    sbx.commands.run(f"touch /home/user/p/{name}", check=True)
    ev = h.get(timeout=1.0)
    while ev is not None and ev.path != name:
        ev = h.get(timeout=1.0)
    return ev is not None
