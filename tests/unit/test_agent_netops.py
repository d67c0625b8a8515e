"""The agent's sockets: `connect` (the host reaches a port inside), and egress (programs
inside reach the host through the agent's listeners), driven over its stdio on the host.

The agent runs in a network namespace of its own (`unshare --net`, loopback only), as in a
sandbox, so its listeners never touch the host's ports. No runsc needed.
"""

from __future__ import annotations

import textwrap

import pytest
from test_agent_protocol import Agent, run

from torpor.agent import protocol as P

ECHO_SERVER = textwrap.dedent("""
    import socket
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 8123)); s.listen(); print("ready", flush=True)
    c, _ = s.accept()
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(data.upper()); c.close()
""")


@pytest.fixture
def agent():
    a = Agent(native=False, netns=True)
    try:
        yield a
    finally:
        a.close()


def wait_ready(agent: Agent, pid: int) -> None:
    follow = agent.open("proc_follow", pid=pid)
    while True:
        kind, _, payload = agent.recv(follow)
        if kind == P.OUT and b"ready" in payload:
            agent.send(P.CLOSE, follow)
            return
        assert kind != P.CLOSE, "the server exited"


def read_stream(agent: Agent, sid: int) -> tuple[bytes, bool, dict | None]:
    """OUT bytes of an agent stream until its EOF or CLOSE; granting credit as read."""
    data = bytearray()
    while True:
        kind, _, payload = agent.recv(sid)
        if kind == P.OUT:
            data += payload
            agent.send(P.CREDIT, sid, P.credit_frame(sid, len(payload))[P.HEADER_SIZE:])
        elif kind == P.EOF:
            return bytes(data), True, None
        elif kind == P.CLOSE:
            return bytes(data), False, P.loads(payload)


def next_open(agent: Agent) -> tuple[int, dict]:
    """The next stream the agent opens (even id)."""
    for s, frames in list(agent.pending.items()):
        for i, (kind, _, payload) in enumerate(frames):
            if kind == P.OPEN:
                del frames[i]
                return s, P.loads(payload)
    while True:
        kind, sid, payload = agent._next()
        if kind == P.OPEN:
            assert sid % 2 == 0, "agent streams have even ids"
            return sid, P.loads(payload)
        agent.pending.setdefault(sid, []).append((kind, sid, payload))


def test_connect_carries_bytes_both_ways_with_half_close(agent):
    srv = run(agent, ["python3", "-c", ECHO_SERVER], background=True).result
    wait_ready(agent, srv["pid"])
    sid = agent.open("connect", port=8123)
    kind, _, payload = agent.recv(sid)
    assert kind == P.MSG and P.loads(payload)["event"] == "connected"
    agent.send_in(sid, b"hello through the tunnel", eof=True)  # EOF: a half-close
    data, eof, _ = read_stream(agent, sid)
    assert (data, eof) == (b"HELLO THROUGH THE TUNNEL", True)
    kind, _, payload = agent.recv(sid)
    assert kind == P.CLOSE
    result = P.loads(payload)["result"]
    assert result == {"bytes_to_host": 24, "bytes_to_socket": 24}


def test_connect_to_a_closed_port_is_refused_clearly(agent):
    res = agent.call("connect", port=8124)
    assert res.error["code"] == "connection_refused"
    assert "no process is listening on port 8124" in res.error["message"]
    assert agent.call("connect", port=70000).error["code"] == "bad_request"
    assert agent.call("connect", port=80, host="10.0.0.1").error["code"] == "bad_request"


CLIENT = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    c.sendall(b"CONNECT example.test:443 HTTP/1.1\\r\\n\\r\\n")
    c.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    print(data.decode())
""")


@pytest.mark.parametrize(("port", "listener"), [(3128, "http"), (1080, "socks")])
def test_egress_connections_become_streams_to_the_host(agent, port, listener):
    cli = run(agent, ["python3", "-c", CLIENT, str(port)], background=True).result
    sid, req = next_open(agent)
    assert req["op"] == "egress" and req["listener"] == listener
    agent.window[sid] = P.WINDOW
    data, eof, _ = read_stream(agent, sid)
    assert data == b"CONNECT example.test:443 HTTP/1.1\r\n\r\n" and eof
    agent.send_in(sid, b"HTTP/1.1 403 Forbidden\r\n\r\ndenied", eof=True)
    kind, _, payload = agent.recv(sid)
    assert kind == P.CLOSE and P.loads(payload)["result"]["bytes_to_socket"] == 32
    done = agent.ok("proc_wait", pid=cli["pid"])
    assert done["exit_code"] == 0
    out = agent.call("proc_follow", pid=cli["pid"], offset=0, follow=False)
    assert b"403 Forbidden" in out.out and b"denied" in out.out


def test_the_host_closing_an_egress_stream_resets_the_program(agent):
    script = textwrap.dedent("""
        import socket
        c = socket.create_connection(("127.0.0.1", 3128))
        c.sendall(b"x")
        print(repr(c.recv(10)))
    """)
    cli = run(agent, ["python3", "-c", script], background=True).result
    sid, _ = next_open(agent)
    agent.send(P.CLOSE, sid, P.dumps({"result": None}).encode())
    assert agent.ok("proc_wait", pid=cli["pid"])["exit_code"] in (0, 1)
    out = agent.call("proc_follow", pid=cli["pid"], offset=0, follow=False)
    assert b"b''" in out.out or b"Connection reset" in out.err


def test_dns_queries_are_answered_by_the_host(agent):
    script = textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(20)
        s.sendto(b"\\x12\\x34query", ("127.0.0.1", 53))
        print(s.recvfrom(512)[0].hex())
    """)
    cli = run(agent, ["python3", "-c", script], background=True).result
    sid, req = next_open(agent)
    assert req["op"] == "dns" and bytes.fromhex(req["query"]) == b"\x12\x34query"
    agent.send(P.CLOSE, sid, P.dumps({"result": {"answer": b"\x12\x34answer".hex()}}).encode())
    assert agent.ok("proc_wait", pid=cli["pid"])["exit_code"] == 0
    out = agent.call("proc_follow", pid=cli["pid"], offset=0, follow=False)
    assert out.out.strip() == b"\x12\x34answer".hex().encode()


def test_configure_reports_no_listener_errors(agent):
    assert agent.ok("configure", env={})["egress_errors"] == []
