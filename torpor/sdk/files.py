"""`sbx.files`: read, write, list and move files in a sandbox. Contents stream both ways,
so a file of any size passes through in chunks of `_streams.CHUNK` bytes.

`Files` (sync) and `AsyncFiles` (async) are twins over `_api`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Self, overload

import httpx

from torpor.sdk import _api
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk._streams import CHUNK, async_body, sync_body
from torpor.sdk.errors import TorporError
from torpor.sdk.models import EntryInfo, WriteInfo
from torpor.sdk.watch import AsyncWatchHandle, FsEvent, WatchHandle

Progress = Callable[[int], Any]  # called with the number of bytes just moved
ReadFormat = Literal["text", "bytes", "stream"]


def _text(data: bytes, path: str, sid: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise TorporError(f"{path} is not UTF-8 text; read it with format='bytes'",
                          code="not_text", sandbox_id=sid,
                          operation=f"read file {path}") from None


def _size(resp: httpx.Response) -> int | None:
    n = resp.headers.get("content-length")
    return int(n) if n and n.isdigit() else None


def _local_mode(local_path: str | os.PathLike[str]) -> int:
    return os.stat(local_path).st_mode & 0o7777


def _part(local_path: str | os.PathLike[str]) -> Path:
    p = Path(local_path)
    return p.with_name(p.name + ".part")


class FileStream:
    """A remote file's bytes as they arrive: iterate it, then it closes itself. `size` is
    the length when the server said it. Use it as a context manager to close early."""

    def __init__(self, resp: httpx.Response, chunks: Iterator[bytes]):
        self.size = _size(resp)
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Files:
    """`sbx.files`. Relative paths start at the user's home (/home/user); `user` (default
    the template's user) is whom the operation runs as and who owns what it creates."""

    def __init__(self, session: SyncSession, sandbox_id: str):
        self._s, self._sid = session, sandbox_id

    @overload
    def read(self, path: str, format: Literal["text"] = ..., *,
             user: str | None = ...) -> str: ...

    @overload
    def read(self, path: str, format: Literal["bytes"], *, user: str | None = ...) -> bytes: ...

    @overload
    def read(self, path: str, format: Literal["stream"], *,
             user: str | None = ...) -> FileStream: ...

    def read(self, path: str, format: ReadFormat = "text", *,
             user: str | None = None) -> str | bytes | FileStream:
        """The file's content as text (UTF-8), bytes, or a FileStream of chunks."""
        call = _api.read_file(self._sid, path, user)
        if format == "stream":
            resp = self._s.open(call)
            return FileStream(resp, self._s.iter_bytes(resp, call, CHUNK))
        data = self._s.call(call)
        return data if format == "bytes" else _text(data, path, self._sid)

    def write(self, path: str, data: Any, *, mode: int | str | None = None,
              user: str | None = None, on_progress: Progress | None = None) -> WriteInfo:
        """Write `data` (str, bytes, a binary or text file object, or an iterator of bytes)
        to `path`, creating parents. Anything but str/bytes is streamed in chunks, never
        held whole."""
        body = sync_body(data, on_progress)
        return self._s.call(_api.write_file(self._sid, path, body, mode, user))

    def upload(self, local_path: str | os.PathLike[str], path: str, *,
               mode: int | str | None = None, user: str | None = None,
               on_progress: Progress | None = None) -> WriteInfo:
        """Stream a local file to `path`; `mode` defaults to the local file's."""
        with open(local_path, "rb") as f:
            return self.write(path, f, mode=_local_mode(local_path) if mode is None else mode,
                              user=user, on_progress=on_progress)

    def download(self, path: str, local_path: str | os.PathLike[str], *,
                 user: str | None = None, on_progress: Progress | None = None) -> int:
        """Stream `path` into `local_path` (written whole or not at all); returns bytes."""
        part, n = _part(local_path), 0
        try:
            with self.read(path, "stream", user=user) as stream, open(part, "wb") as f:
                for chunk in stream:
                    f.write(chunk)
                    n += len(chunk)
                    if on_progress is not None:
                        on_progress(len(chunk))
            os.replace(part, local_path)
        finally:
            part.unlink(missing_ok=True)
        return n

    def list(self, path: str = ".", depth: int = 1, *,
             user: str | None = None) -> list[EntryInfo]:
        return self._s.call(_api.list_dir(self._sid, path, depth, user))

    def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        return self._s.call(_api.stat(self._sid, path, user))

    def exists(self, path: str, *, user: str | None = None) -> bool:
        return self._s.call(_api.exists(self._sid, path, user))

    def make_dir(self, path: str, *, parents: bool = True, user: str | None = None) -> bool:
        """Create a directory; False if it already existed."""
        return self._s.call(_api.make_dir(self._sid, path, parents, user))

    def rename(self, src: str, dst: str, *, overwrite: bool = False,
               user: str | None = None) -> str:
        return self._s.call(_api.rename(self._sid, src, dst, overwrite, user))

    def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        self._s.call(_api.remove(self._sid, path, recursive, user))

    def watch(self, path: str, *, recursive: bool = True,
              on_event: Callable[[FsEvent], Any] | None = None,
              user: str | None = None) -> WatchHandle:
        """Watch directory `path` for changes; returns once the watch is in place.
        `on_event(FsEvent)` is called from a reader thread; without it, iterate the handle
        (or `get(timeout)`). `stop()` ends it. NotFoundError if `path` does not exist,
        ConflictError if it is not a directory. See torpor.sdk.watch for what it outlives."""
        return WatchHandle(self._s, self._sid, path, recursive, user, on_event)


class AsyncFileStream:
    """The async twin of FileStream: `async for chunk in stream`."""

    def __init__(self, resp: httpx.Response, chunks: AsyncIterator[bytes]):
        self.size = _size(resp)
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncFiles:
    """`sbx.files` of an AsyncSandbox; `write` also takes async iterators and async file
    objects."""

    def __init__(self, session: AsyncSession, sandbox_id: str):
        self._s, self._sid = session, sandbox_id

    async def read(self, path: str, format: ReadFormat = "text", *,
                   user: str | None = None) -> Any:
        call = _api.read_file(self._sid, path, user)
        if format == "stream":
            resp = await self._s.open(call)
            return AsyncFileStream(resp, self._s.iter_bytes(resp, call, CHUNK))
        data = await self._s.call(call)
        return data if format == "bytes" else _text(data, path, self._sid)

    async def write(self, path: str, data: Any, *, mode: int | str | None = None,
                    user: str | None = None, on_progress: Progress | None = None) -> WriteInfo:
        body = async_body(data, on_progress)
        return await self._s.call(_api.write_file(self._sid, path, body, mode, user))

    async def upload(self, local_path: str | os.PathLike[str], path: str, *,
                     mode: int | str | None = None, user: str | None = None,
                     on_progress: Progress | None = None) -> WriteInfo:
        import anyio.to_thread

        f = await anyio.to_thread.run_sync(open, local_path, "rb")
        try:
            return await self.write(path, f,
                                    mode=_local_mode(local_path) if mode is None else mode,
                                    user=user, on_progress=on_progress)
        finally:
            f.close()

    async def download(self, path: str, local_path: str | os.PathLike[str], *,
                       user: str | None = None, on_progress: Progress | None = None) -> int:
        import anyio.to_thread

        part, n = _part(local_path), 0
        try:
            stream: AsyncFileStream = await self.read(path, "stream", user=user)
            async with stream:
                f = await anyio.to_thread.run_sync(open, part, "wb")
                try:
                    async for chunk in stream:
                        await anyio.to_thread.run_sync(f.write, chunk)
                        n += len(chunk)
                        if on_progress is not None:
                            on_progress(len(chunk))
                finally:
                    f.close()
            os.replace(part, local_path)
        finally:
            part.unlink(missing_ok=True)
        return n

    async def list(self, path: str = ".", depth: int = 1, *,
                   user: str | None = None) -> list[EntryInfo]:
        return await self._s.call(_api.list_dir(self._sid, path, depth, user))

    async def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        return await self._s.call(_api.stat(self._sid, path, user))

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        return await self._s.call(_api.exists(self._sid, path, user))

    async def make_dir(self, path: str, *, parents: bool = True,
                       user: str | None = None) -> bool:
        return await self._s.call(_api.make_dir(self._sid, path, parents, user))

    async def rename(self, src: str, dst: str, *, overwrite: bool = False,
                     user: str | None = None) -> str:
        return await self._s.call(_api.rename(self._sid, src, dst, overwrite, user))

    async def remove(self, path: str, *, recursive: bool = False,
                     user: str | None = None) -> None:
        await self._s.call(_api.remove(self._sid, path, recursive, user))

    async def watch(self, path: str, *, recursive: bool = True,
                    on_event: Callable[[FsEvent], Any] | None = None,
                    user: str | None = None) -> AsyncWatchHandle:
        """As Files.watch; `on_event` may be async; `async for ev in handle` without it."""
        return await AsyncWatchHandle(self._s, self._sid, path, recursive, user,
                                      on_event)._start()
