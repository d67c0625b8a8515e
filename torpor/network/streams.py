"""Byte streams for the egress proxy: asyncio streams, TLS over any stream, pinned connects.

`Stream` and `TLSStream` share one small interface (read, write, drain, write_eof, close) so
the HTTP relay does not care whether it talks plain text or terminated TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

READ_SIZE = 256 * 1024


class Stream:
    """An asyncio reader/writer pair as one object."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def read(self, n: int = READ_SIZE) -> bytes:
        """Up to n bytes; b"" at EOF or when the peer reset the connection."""
        try:
            return await self.reader.read(n)
        except (ConnectionError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof() and not self.writer.is_closing():
                self.writer.write_eof()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)


class TLSStream:
    """TLS over a Stream with ssl.MemoryBIO, so bytes already read from the stream (sent by
    the client right after its CONNECT) are not lost when TLS starts."""

    def __init__(self, raw: Stream, ctx: ssl.SSLContext, server_side: bool,
                 initial: bytes = b"", server_hostname: str | None = None):
        self.raw = raw
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=server_hostname)
        if initial:
            self._in.write(initial)

    async def handshake(self, timeout: float) -> None:
        """Raises ssl.SSLError, OSError or TimeoutError."""
        await asyncio.wait_for(self._run(self._obj.do_handshake), timeout)

    async def _run(self, fn, *args):
        while True:
            try:
                result = fn(*args)
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.raw.read(READ_SIZE)
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
                continue
            await self._flush()
            return result

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.write(data)
            await self.raw.drain()

    async def read(self, n: int = READ_SIZE) -> bytes:
        """Up to n decrypted bytes; b"" at EOF (clean or not)."""
        try:
            first = await self._run(self._obj.read, n)
        except (ssl.SSLError, ConnectionError, OSError):  # incl. close_notify and bare EOF
            return b""
        # one read returns one TLS record (16 KiB): take what is already decryptable
        parts, size = [first], len(first)
        while first and size < n:
            try:
                more = self._obj.read(n - size)
            except ssl.SSLError:
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        if data:
            self._obj.write(data)
            self.raw.write(self._out.read())

    async def drain(self) -> None:
        await self.raw.drain()

    def write_eof(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()
        self.raw.write(self._out.read())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.write_eof()
            await self.raw.drain()
        await self.raw.close()


class ConnectError(Exception):
    """Could not reach any allowed address. kind: "refused", "timeout" or "unreachable"."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.message, self.kind = message, kind


async def connect_pinned(addresses: list, port: int, timeout: float,
                         tls: ssl.SSLContext | None = None,
                         server_hostname: str | None = None) -> tuple[Stream, str]:
    """Connect to the first reachable address (in order; never resolving anything) and
    return the stream and the address used. TLS verifies against server_hostname."""
    last: ConnectError | None = None
    for ip in addresses:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                str(ip), port, ssl=tls, server_hostname=server_hostname if tls else None,
                limit=READ_SIZE), timeout)
            return Stream(reader, writer), str(ip)
        except TimeoutError:
            last = ConnectError(f"timed out connecting to {ip} port {port}", "timeout")
        except ssl.SSLError as e:
            last = ConnectError(f"TLS to {ip} port {port} failed: {e.reason or e}", "tls")
        except ConnectionRefusedError:
            last = ConnectError(f"connection refused by {ip} port {port}", "refused")
        except OSError as e:
            last = ConnectError(f"cannot connect to {ip} port {port}: {e.strerror or e}",
                                "unreachable")
    raise last or ConnectError("no address to connect to", "unreachable")
