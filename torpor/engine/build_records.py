"""Template builds as records every door can see: an id, a state, the steps, the events.

`BuildRecords.start` checks a build (`Builds.build` raises Invalid/NotFound/Conflict before
anything runs), then runs it as a task of its own that feeds the record: a client that
started it and went away does not stop it. Anyone may follow a build's events from any
offset (`follow`), live until it ends, like `tail -f`.

What a record keeps in memory is bounded (MAX_EVENTS events, MAX_BYTES of their JSON; the
oldest go first, `first` counts them). Every event is also appended to
`<data>/builds/<id>.ndjson` (up to LOG_FILE_MAX bytes) and the record to `<id>.json`, so a
finished build's status and log outlive a restart; the newest KEEP builds stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import string
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from torpor.engine.builds import Builds
from torpor.errors import NotFound, TorporError

log = logging.getLogger("torpor.builds")

MAX_EVENTS = 5000  # events a record keeps in memory
MAX_BYTES = 4 << 20  # bytes of their JSON
LOG_FILE_MAX = 16 << 20  # bytes of a build's log file
KEEP = 100  # finished builds kept (in memory and on disk)
_ALPHABET = string.ascii_lowercase + string.digits


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class BuildRecord:
    id: str
    name: str
    tag: str
    steps: list[dict]
    state: str = "running"  # running | succeeded | failed
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None
    digest: str | None = None
    error: dict | None = None  # the engine error's dict, with "status"
    progress: list[dict] = field(default_factory=list)  # one per step started: index, cached
    events: deque = field(default_factory=deque)  # the newest events (dicts)
    first: int = 0  # the offset of events[0]: how many were dropped
    size: int = 0  # bytes of JSON held in `events`
    log_path: Path | None = None
    log_bytes: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def next_offset(self) -> int:
        return self.first + len(self.events)

    @property
    def done(self) -> bool:
        return self.state != "running"

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "tag": self.tag, "state": self.state,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "steps": self.steps, "progress": self.progress, "digest": self.digest,
                "error": self.error, "events": self.next_offset}

    def add(self, ev: dict) -> None:
        line = json.dumps(ev, separators=(",", ":"))
        self.events.append(ev)
        self.size += len(line)
        while len(self.events) > MAX_EVENTS or (self.size > MAX_BYTES and len(self.events) > 1):
            old = self.events.popleft()
            self.size -= len(json.dumps(old, separators=(",", ":")))
            self.first += 1
        kind = ev.get("type")
        if kind == "step":
            self.progress.append({"index": ev["index"], "type": ev["step"].get("type"),
                                  "cached": ev["cached"]})
        elif kind == "done":
            self.state, self.digest = "succeeded", ev["template"].get("digest")
        elif kind == "error":
            self.state, self.error = "failed", {**ev["error"], "status": ev["status"]}
        if self.done:
            self.finished_at = _now()
        if self.log_path is not None and self.log_bytes < LOG_FILE_MAX:
            try:
                with open(self.log_path, "a") as f:
                    f.write(line + "\n")
                self.log_bytes += len(line) + 1
            except OSError as e:  # the log on disk is a copy; the build goes on
                log.warning("build %s: cannot write its log: %s", self.id, e)
                self.log_path = None
        self.changed.set()
        self.changed = asyncio.Event()


class BuildRecords:
    def __init__(self, builds: Builds, log_dir: Path):
        self.builds = builds
        self.dir = Path(log_dir)
        self.records: dict[str, BuildRecord] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    async def start(self, name: str, tag: str, steps: list[dict],
                    context: bytes | str | None, resources: dict,
                    network: dict | None = None) -> BuildRecord:
        """Check the build (engine errors raised here, before anything runs) and start it;
        its record, running. No steps and a built-in's name: that built-in (Builds.build).
        `network` narrows the build's egress policy."""
        extra = {"network": network} if network is not None else {}
        events = await self.builds.build(name, tag, steps, context, resources, **extra)
        rec = BuildRecord(id="bld" + "".join(secrets.choice(_ALPHABET) for _ in range(13)),
                          name=name, tag=tag, steps=steps)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            rec.log_path = self.dir / f"{rec.id}.ndjson"
            self._save(rec)
        except OSError as e:
            log.warning("build %s: its record stays in memory only: %s", rec.id, e)
            rec.log_path = None
        self.records[rec.id] = rec
        self.tasks[rec.id] = asyncio.create_task(self._feed(rec, events),
                                                 name=f"build {rec.id}")
        self._trim()
        return rec

    async def _feed(self, rec: BuildRecord, events: AsyncIterator[dict]) -> None:
        try:
            async for ev in events:
                rec.add(ev)
        except asyncio.CancelledError:
            rec.add({"type": "error", "status": 503, "error": {
                "code": "unavailable",
                "message": "the server stopped during the build; build it again"}})
            raise
        except Exception as e:  # a bug: the record says so instead of running for ever
            log.exception("build %s failed", rec.id)
            err = TorporError(f"the build failed: internal error ({type(e).__name__}); the "
                              "server's log has the details")
            rec.add({"type": "error", "error": err.to_dict(), "status": err.status})
        finally:
            if not rec.done:  # the iterator ended without saying how
                rec.add({"type": "error", "status": 500, "error": {
                    "code": "internal", "message": "the build ended without a result"}})
            self.tasks.pop(rec.id, None)
            with contextlib.suppress(OSError):
                self._save(rec)

    def _save(self, rec: BuildRecord) -> None:
        path = self.dir / f"{rec.id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec.to_dict()))
        tmp.replace(path)

    def _trim(self) -> None:
        done = [r for r in self.records.values() if r.done]
        for r in sorted(done, key=lambda r: r.started_at)[:max(len(done) - KEEP, 0)]:
            del self.records[r.id]
        if self.dir.is_dir():
            files = sorted(self.dir.glob("bld*.json"), key=lambda p: p.stat().st_mtime)
            for p in files[:max(len(files) - KEEP, 0)]:
                if p.stem not in self.tasks:
                    p.unlink(missing_ok=True)
                    p.with_suffix(".ndjson").unlink(missing_ok=True)

    # --- reading ------------------------------------------------------------------------
    def get(self, build_id: str) -> BuildRecord:
        rec = self.records.get(build_id)
        if rec is None:
            rec = self._load(build_id)
        if rec is None:
            raise NotFound(f"no build {build_id!r}; GET /v1/templates/builds lists them",
                           field="build_id")
        return rec

    def list(self) -> list[BuildRecord]:
        """Builds, newest first: those of this run, and the finished ones on disk."""
        seen = dict(self.records)
        if self.dir.is_dir():
            for p in self.dir.glob("bld*.json"):
                if p.stem not in seen:
                    rec = self._load(p.stem)
                    if rec is not None:
                        seen[rec.id] = rec
        return sorted(seen.values(), key=lambda r: r.started_at, reverse=True)

    def _load(self, build_id: str) -> BuildRecord | None:
        if not build_id.isalnum():
            return None
        try:
            d = json.loads((self.dir / f"{build_id}.json").read_text())
        except (OSError, ValueError):
            return None
        rec = BuildRecord(id=d["id"], name=d["name"], tag=d["tag"], steps=d["steps"],
                          state=d["state"], started_at=d["started_at"],
                          finished_at=d.get("finished_at"), digest=d.get("digest"),
                          error=d.get("error"), progress=d.get("progress") or [])
        log_path = self.dir / f"{build_id}.ndjson"
        try:
            with open(log_path) as f:
                for line in f:
                    if line.strip():
                        rec.events.append(json.loads(line))
        except (OSError, ValueError):
            pass
        rec.first = max(d.get("events", 0) - len(rec.events), 0)
        if rec.state == "running":  # the server stopped while it ran
            rec.state, rec.finished_at = "failed", rec.finished_at or d["started_at"]
            rec.error = {"code": "unavailable", "status": 503,
                         "message": "the server stopped during the build; build it again"}
        return rec

    async def follow(self, build_id: str, offset: int = 0,
                     follow: bool = False) -> AsyncIterator[dict]:
        """A build's events from `offset` (a count of events; events dropped from memory
        before it are announced as {"type": "truncated", "lost": n}), and with `follow`
        the new ones as they come, until the build ends."""
        rec = self.get(build_id)

        async def events() -> AsyncIterator[dict]:
            pos = max(offset, 0)
            while True:
                changed = rec.changed
                while pos < rec.next_offset:
                    if pos < rec.first:  # dropped from memory meanwhile
                        yield {"type": "truncated", "lost": rec.first - pos}
                        pos = rec.first
                        continue
                    ev = rec.events[pos - rec.first]
                    pos += 1
                    yield ev
                if rec.done or not follow:
                    return
                await changed.wait()

        return events()

    async def close(self) -> None:
        """Stop the builds that run (server stop): each deletes its build sandboxes."""
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 30)
