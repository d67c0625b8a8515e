"""The engine's files: a sandbox's files read, written and managed, for every front door.

Paths resolve inside the sandbox (relative ones from `user`'s home); new files and
directories belong to `user`. Contents stream both ways through the agent channel with
its flow control, so the server holds at most a window of any file, whatever its size.
Entries are the agent's dicts (`name`, `path`, `type`, `size`, `mode`, `uid`, `gid`,
`owner`, `mtime`, `target` for a symlink); failures are engine errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from torpor.agent import protocol as P
from torpor.channel import ChannelClosed, Stream
from torpor.engine.processes import ClientOf
from torpor.engine.types import agent_errors


class Files:
    def __init__(self, client_of: ClientOf):
        self.client_of = client_of

    async def read(self, sid: str, path: str,
                   user: str | int = "user") -> tuple[int | None, AsyncIterator[bytes]]:
        """The file's size and its bytes. Waits for the size (or the error) before
        returning, so a missing file raises here, before a front door answers; a failure
        later raises from the iteration. Iterate to the end (or close the iterator)."""
        client = await self.client_of(sid)
        with agent_errors(sid, None):
            stream = client.fs_read(path, user)
        it = stream.__aiter__()
        first = await anext(it, None)
        if first is None or first.kind != "msg":
            with agent_errors(sid, P.Op.FS_READ):
                await stream.finish()
        size = first.msg.get("size") if first is not None and first.msg else None
        return size, _contents(sid, stream, it)

    async def write(self, sid: str, path: str, user: str | int, mode: int | None,
                    chunks: AsyncIterator[bytes]) -> dict:
        """Write `chunks` to the file, created (with its parents) or replaced whole at the
        end; `mode` as permission bits (None: the old file's, or 0644). {path, size}."""
        client = await self.client_of(sid)
        with agent_errors(sid, None):
            stream = client.fs_write(path, user, mode)
        try:
            async for chunk in chunks:
                if chunk:
                    await stream.send(chunk)
                    if stream.done.is_set():
                        break
            await stream.send_eof()
        except ChannelClosed:
            pass  # the agent closed the stream early: its error is in finish()
        except BaseException:
            stream.abandon()  # the upload broke off: the agent drops its temporary file
            raise
        with agent_errors(sid, P.Op.FS_WRITE):
            return await stream.finish()

    async def stat(self, sid: str, path: str, user: str | int = "user") -> dict:
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.FS_STAT):
            return await client.fs_stat(path, user)

    async def exists(self, sid: str, path: str, user: str | int = "user") -> dict:
        """{exists}; a dangling symlink exists."""
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.FS_EXISTS):
            return await client.fs_exists(path, user)

    async def list(self, sid: str, path: str, depth: int = 1,
                   user: str | int = "user") -> list[dict]:
        """The directory's entries, sorted by name, `depth` levels down."""
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.FS_LIST):
            return await client.fs_list(path, depth, user)

    async def mkdir(self, sid: str, path: str, parents: bool = True,
                    user: str | int = "user") -> dict:
        """{created, path}; created False if the directory was there already."""
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.FS_MKDIR):
            return await client.fs_mkdir(path, parents, user)

    async def rename(self, sid: str, src: str, dst: str, overwrite: bool = False,
                     user: str | int = "user") -> dict:
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.FS_RENAME):
            return await client.fs_rename(src, dst, overwrite, user)

    async def remove(self, sid: str, path: str, recursive: bool = False,
                     user: str | int = "user") -> dict:
        client = await self.client_of(sid)
        with agent_errors(sid, P.Op.FS_REMOVE):
            return await client.fs_remove(path, recursive, user)


async def _contents(sid: str, stream: Stream, it: AsyncIterator) -> AsyncIterator[bytes]:
    try:
        async for ev in it:
            if ev.kind == "stdout":
                yield ev.data
        with agent_errors(sid, P.Op.FS_READ):
            await stream.finish()
    finally:
        stream.abandon()
