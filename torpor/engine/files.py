"""The engine's files: a sandbox's files read, written and managed, for every front door.

Paths resolve inside the sandbox (relative ones from `user`'s home); new files and
directories belong to `user`. Contents stream both ways through the agent channel with
its flow control, so the server holds at most a window of any file, whatever its size.
Entries are the agent's dicts (`name`, `path`, `type`, `size`, `mode`, `uid`, `gid`,
`owner`, `mtime`, `target` for a symlink); failures are engine errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from torpor.agent import protocol as P
from torpor.channel import AgentError, ChannelClosed, Stream
from torpor.engine.processes import ClientOf
from torpor.engine.types import FsEvent, agent_errors
from torpor.errors import from_agent

# (sid) -> once the sandbox runs again, without waking it; NotFound once it is deleted
AwaitRunning = Callable[[str], Awaitable[None]]


class Files:
    """`await_running(sid)`, when given, lets a watch outlive a hibernation: when the
    sandbox's channel closes under it, the watch waits for the sandbox to run again
    (whoever wakes it) and watches anew."""

    def __init__(self, client_of: ClientOf, await_running: AwaitRunning | None = None):
        self.client_of = client_of
        self.await_running = await_running

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
                    chunks: AsyncIterator[bytes], in_place: bool = False) -> dict:
        """Write `chunks` to the file, created (with its parents) or replaced whole at the
        end; `mode` as permission bits (None: the old file's, or 0644). {path, size}.
        `in_place`: truncated and written where it is, as a program in the sandbox would
        (what a watcher sees then is a create or write, a chmod, a write; a failed upload
        leaves the part written)."""
        client = await self.client_of(sid)
        with agent_errors(sid, None):
            stream = client.fs_write(path, user, mode, in_place=in_place)
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

    async def watch(self, sid: str, path: str, recursive: bool = True,
                    user: str | int = "user") -> AsyncIterator[FsEvent]:
        """Changes under directory `path`, as FsEvents, until the consumer stops (or the
        directory goes: a `gone` event ends it). Waits until the watch is in place before
        returning, so a missing path or a file raises here (NotFound, Conflict).

        The watch's stream does not count as activity: a watched sandbox still goes to
        standby (frozen, it changes nothing; the stream resumes with it) and hibernates
        (its agent's inotify state does not survive a restore: once the sandbox runs
        again, woken by anyone, the watch is set up anew and the iteration goes on; what
        changed between the restore and that moment, a few milliseconds, is not reported).
        """
        stream, it = await self._open_watch(sid, path, recursive, user)
        return self._watch_events(sid, path, recursive, user, stream, it)

    async def _open_watch(self, sid: str, path: str, recursive: bool, user: str | int):
        client = await self.client_of(sid)
        with agent_errors(sid, None):
            stream = client.watch(path, recursive, user)
        stream.passive = True  # see Lifecycle.open_streams
        it = stream.__aiter__()
        first = await anext(it, None)
        if first is None or first.kind != "msg" or "watching" not in (first.msg or {}):
            stream.abandon()
            with agent_errors(sid, P.Op.WATCH):
                await stream.finish()
            raise from_agent(sid, AgentError("internal", "the watch did not start", {}))
        return stream, it

    async def _watch_events(self, sid: str, path: str, recursive: bool, user: str | int,
                            stream: Stream, it) -> AsyncIterator[FsEvent]:
        try:
            while True:
                async for ev in it:
                    if ev.kind != "msg":
                        continue
                    for e in (ev.msg or {}).get("events", ()):
                        yield FsEvent(e.get("type", ""), e.get("path", ""),
                                      bool(e.get("dir")), e.get("old_path"))
                try:
                    await stream.finish()
                    return  # the directory went (its `gone` event was the last)
                except AgentError as e:
                    if e.code != "channel_closed" or self.await_running is None:
                        raise from_agent(sid, e) from None
                # the sandbox hibernated (or stopped): watch again once it runs
                await self.await_running(sid)
                stream, it = await self._open_watch(sid, path, recursive, user)
        finally:
            stream.abandon()


async def _contents(sid: str, stream: Stream, it: AsyncIterator) -> AsyncIterator[bytes]:
    try:
        async for ev in it:
            if ev.kind == "stdout":
                yield ev.data
        with agent_errors(sid, P.Op.FS_READ):
            await stream.finish()
    finally:
        stream.abandon()
