"""Sockets inside the sandbox, joined to streams of the channel.

The sandbox has no network interface (runsc `--network=none`), only its own loopback. Two
things cross the boundary, both as streams of the agent's channel, never as packets:

- egress: the agent listens on 127.0.0.1:3128 (HTTP proxy) and 127.0.0.1:1080 (SOCKS5);
  each connection a program makes there becomes a stream the agent opens towards the host
  (`{"op": "egress", "listener": ...}`), where the server's egress proxy decides what may
  leave. DNS queries to 127.0.0.1:53 (UDP) go the same way, one short stream per query.
  Whatever sandboxed code sets or unsets, there is no other way out.
- ingress (preview URLs): the host opens a stream `{"op": "connect", "port": N}` and the
  agent connects to 127.0.0.1:N inside the sandbox.

A joined socket moves bytes both ways with the channel's flow control: OUT frames carry the
socket's bytes to the host, IN frames the host's bytes to the socket; EOF frames (either
way) are half-closes; CLOSE ends the stream once both directions are done.

Uses `_socket` (the C module), not `socket`: the latter imports enum, which costs start-up
time inside gVisor.
"""

from __future__ import annotations

import _socket
import errno

import miniloop
import protocol as P

OpError = P.OpError
CancelledError = miniloop.CancelledError

HTTP_PROXY_PORT = 3128
SOCKS_PORT = 1080
DNS_PORT = 53
READ_SIZE = 256 * 1024
DNS_TIMEOUT = 10.0


async def _wait_fd(loop: miniloop.Loop, fd: int, write: bool) -> None:
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (
        loop.add_reader, loop.remove_reader)
    add(fd, miniloop._set_if_pending, fut, None)
    try:
        await fut
    finally:
        remove(fd)


async def _sock_to_stream(loop: miniloop.Loop, sock, st) -> int:
    """Socket bytes to the host as OUT, until the socket's EOF; then an EOF frame."""
    fd = sock.fileno()
    total = 0
    while not st.closed:
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            await _wait_fd(loop, fd, write=False)
            continue
        except OSError:
            data = b""
        if not data:
            break
        total += len(data)
        await st.send(P.OUT, data)
    if not st.closed:
        await st.agent.write(P.frame(P.EOF, st.sid))
    return total


async def _stream_to_sock(loop: miniloop.Loop, sock, st) -> int:
    """IN bytes from the host to the socket, until the host's EOF; then a half-close."""
    fd = sock.fileno()
    total = 0
    async for chunk in st.read_in():
        view = memoryview(chunk)
        while view:
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                await _wait_fd(loop, fd, write=True)
                continue
            except OSError:
                return total  # the program closed its end: drop what the host still sends
            view = view[n:]
            total += n
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass
    return total


async def join(st, sock) -> dict:
    """Move bytes between `sock` and stream `st` until both directions end. Closes sock."""
    loop = miniloop.get_loop()
    down = loop.create_task(_stream_to_sock(loop, sock, st))
    try:
        to_host = await _sock_to_stream(loop, sock, st)
        to_socket = await down
    finally:
        if not down.done():
            down.cancel()
        loop.forget_fd(sock.fileno())
        sock.close()
    return {"bytes_to_host": to_host, "bytes_to_socket": to_socket}


# --- ingress: the host connects to a port inside the sandbox ------------------------------
async def op_connect(agent, st, port: int, host: str = "127.0.0.1"):
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise OpError("bad_request", f"port must be 1..65535, not {port!r}")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise OpError("bad_request", "only loopback ports inside the sandbox can be reached")
    family = _socket.AF_INET6 if host == "::1" else _socket.AF_INET
    addr = "::1" if host == "::1" else "127.0.0.1"
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        err = sock.connect_ex((addr, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await _wait_fd(agent.loop, sock.fileno(), write=True)
            err = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err:
            if err == errno.ECONNREFUSED:
                raise OpError("connection_refused",
                              f"no process is listening on port {port} in the sandbox",
                              port=port)
            raise OpError("connect_failed", f"connecting to port {port}: "
                          f"{errno.errorcode.get(err, err)}", port=port)
    except BaseException:
        agent.loop.forget_fd(sock.fileno())
        sock.close()
        raise
    await st.msg({"event": "connected", "port": port})
    return await join(st, sock)


# --- egress: programs in the sandbox connect out through the host -------------------------
class Egress:
    """The listeners that carry the sandbox's traffic to the host's egress proxy."""

    def __init__(self, agent):
        self.agent = agent
        self.listeners: dict[int, tuple[object, str]] = {}  # fd -> (socket, listener name)
        self.dns = None
        self.errors: list[str] = []

    def start(self) -> None:
        for port, name in ((HTTP_PROXY_PORT, "http"), (SOCKS_PORT, "socks")):
            try:
                sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen(128)
                sock.setblocking(False)
            except OSError as e:
                self.errors.append(f"listen 127.0.0.1:{port}: {e}")
                continue
            self.listeners[sock.fileno()] = (sock, name)
            self.agent.loop.add_reader(sock.fileno(), self._accept, sock.fileno())
        try:
            dns = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
            dns.bind(("127.0.0.1", DNS_PORT))
            dns.setblocking(False)
        except OSError as e:
            self.errors.append(f"listen udp 127.0.0.1:{DNS_PORT}: {e}")
        else:
            self.dns = dns
            self.agent.loop.add_reader(dns.fileno(), self._dns_query)

    def rearm(self) -> None:
        """Register the listeners with the loop again (on SIGHUP, as for stdin)."""
        loop = self.agent.loop
        for fd in self.listeners:
            loop.remove_reader(fd)
            loop.add_reader(fd, self._accept, fd)
        if self.dns is not None:
            loop.remove_reader(self.dns.fileno())
            loop.add_reader(self.dns.fileno(), self._dns_query)

    def _accept(self, fd: int) -> None:
        sock, name = self.listeners[fd]
        while True:
            try:
                cfd, peer = sock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the program sees its connect hang, then fail
            conn = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, cfd)
            conn.setblocking(False)
            st = self.agent.open_stream({"op": P.Op.EGRESS, "listener": name,
                                         "peer_port": peer[1]})
            st.task = self.agent.loop.create_task(self._carry(st, conn))

    async def _carry(self, st, conn) -> None:
        try:
            result = await join(st, conn)
            await st.close(result)
        except CancelledError:
            pass  # the host closed the stream (or reset the channel): conn is closed

    def _dns_query(self) -> None:
        while True:
            try:
                query, addr = self.dns.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            st = self.agent.open_stream({"op": P.Op.DNS, "query": query.hex()})
            st.task = self.agent.loop.create_task(self._answer(st, addr))

    async def _answer(self, st, addr) -> None:
        timer = self.agent.loop.call_later(DNS_TIMEOUT, st.abort)
        try:
            body = await st.reply()
        except CancelledError:
            return
        finally:
            timer.cancel()
        answer = (body.get("result") or {}).get("answer") if isinstance(body, dict) else None
        if answer:
            try:
                self.dns.sendto(bytes.fromhex(answer), addr)
            except (OSError, ValueError):
                pass


HANDLERS = {P.Op.CONNECT: op_connect}
