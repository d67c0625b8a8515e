"""Built-in templates on the engine (`torpor/builtin_templates.py`): built on first use by a
create, or on purpose.

A create of a built-in's name (untagged or `:latest`) when no template of that name exists
builds it first, once: creates meanwhile wait for that same build, and so does a create
that finds an explicit build of it running. A first-use build is a build record like any
(`GET /v1/templates/builds`, its log). A build that fails is the create's error (its status
and code, its message); the next create tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from torpor.builtin_templates import BUILTINS, builtin
from torpor.engine.build_records import BuildRecords
from torpor.engine.builds import Builds
from torpor.errors import Conflict, NotFound, TorporError, Unavailable
from torpor.templates import LATEST, TemplateStore, parse_ref

log = logging.getLogger("torpor.builds")


class BuiltinBuildFailed(TorporError):
    """The build of a built-in template failed: the build's own status and code."""

    def __init__(self, message: str, status: int, code: str, **extra):
        super().__init__(message, **extra)
        self.status = status
        self.code = code


class Builtins:
    def __init__(self, builds: Builds, store: TemplateStore,
                 records: BuildRecords | None = None):
        self.builds = builds
        self.store = store
        self.records = records  # where first-use builds run, if given
        self._first: dict[str, asyncio.Task] = {}  # first-use builds, by name

    async def build(self, name: str, tag: str = LATEST,
                    network: dict | None = None) -> AsyncIterator[dict]:
        """Build a built-in template on purpose: the events of `Builds.build`."""
        if builtin(name) is None:
            raise NotFound(f"no built-in template {name!r}; the built-ins are "
                           f"{', '.join(sorted(BUILTINS))}", field="name")
        return await self.builds.build(name, tag, [], None, {}, network=network)

    async def ensure(self, ref: str) -> None:
        """If `ref` is a built-in's name (or name:latest) and no such template exists yet,
        build it and return once it exists; raises the build's error if it fails."""
        try:
            name, tag = parse_ref(ref)
        except ValueError:
            return  # (the create's own lookup says what is wrong with it)
        if tag != LATEST or builtin(name) is None or self.store.get(ref) is not None:
            return
        task = self._first.get(name)
        if task is None:
            task = asyncio.create_task(self._first_build(name), name=f"build {name}")
            self._first[name] = task
            task.add_done_callback(lambda t: self._forget(name, t))
        # a caller that goes away (a client timing out) leaves the build running for
        # the others, and for its next try
        await asyncio.shield(task)

    def _forget(self, name: str, task: asyncio.Task) -> None:
        if self._first.get(name) is task:
            del self._first[name]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters got it, if any were left

    async def _first_build(self, name: str) -> None:
        while self.store.get(name) is None:
            if self.builds.building(name):  # built on purpose right now: wait for that
                await self.builds.wait(name)
                continue
            try:
                if self.records is not None:
                    rec = await self.records.start(name, LATEST, [], None, {})
                    events = await self.records.follow(rec.id, 0, follow=True)
                else:
                    events = await self.builds.build(name, LATEST, [], None, {})
            except Conflict:
                await self.builds.wait(name)
                continue
            log.info("building the built-in template %s on its first use", name)
            t0 = time.monotonic()
            last: dict = {}
            async for ev in events:
                last = ev
            if last.get("type") == "error":
                err = dict(last["error"])
                code = err.pop("code", "internal")
                message = err.pop("message", "")
                raise BuiltinBuildFailed(
                    f"the built-in template {name} could not be built: {message}",
                    int(last.get("status") or 500), code, **{**err, "template": name})
            if last.get("type") != "done":
                raise Unavailable(f"the build of the built-in template {name} ended without "
                                  "an answer; try again", template=name)
            log.info("built-in template %s built on first use (%.1fs)", name,
                     time.monotonic() - t0)
            return

    async def close(self) -> None:
        """Stop first-use builds (their sandboxes are deleted as their builds end)."""
        tasks = list(self._first.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
