"""`Sandbox` and `AsyncSandbox`: one sandbox, with `commands` and `files` hanging off it.

Both are thin over `_api` (what to send) and `_http` (how); they are twins, method for
method. A Sandbox object owns one HTTP connection pool; `close()` releases it, and
leaving a `with` block deletes the sandbox too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal, Self

import httpx

from torpor.sdk import _api
from torpor.sdk import code as _code
from torpor.sdk import snapshots as _snapshots
from torpor.sdk import volumes as _volumes
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.code import CodeContext, Execution
from torpor.sdk.commands import AsyncCommands, Commands
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT, ClientConfig
from torpor.sdk.errors import NotFoundError, TorporError
from torpor.sdk.files import AsyncFiles, Files
from torpor.sdk.models import Domain, EgressEntry, Event, Port, SandboxInfo, Usage, UsageSummary
from torpor.sdk.snapshots import SnapshotInfo
from torpor.sdk.terminals import AsyncPty, Pty

ExpireAction = Literal["delete", "hibernate"]


class Sandbox:
    """A sandbox. Get one with `Sandbox.create()` or `Sandbox.connect(id)`.

    `Sandbox(id)` itself makes no request: it is a handle for a sandbox you know exists.
    Every constructor takes `url=` and `api_key=` (default: TORPOR_URL, TORPOR_API_KEY,
    then the server's api-key file), `request_timeout=` (seconds, per HTTP request) and,
    for tests, an httpx `transport=`."""

    def __init__(self, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 transport: httpx.BaseTransport | None = None,
                 _session: SyncSession | None = None):
        self.id = sandbox_id
        self._session = _session or SyncSession(_config(url, api_key, request_timeout),
                                                transport)
        self.commands = Commands(self._session, sandbox_id)
        self.files = Files(self._session, sandbox_id)
        self.pty = Pty(self._session, sandbox_id)  # terminals

    @classmethod
    def create(cls, template: str = "base", *, env: Mapping[str, str] | None = None,
               metadata: Mapping[str, str] | None = None, cpu: float | None = None,
               memory_mb: int | None = None, disk_mb: int | None = None,
               timeout: float | None = None, standby_after: float | None = None,
               hibernate_after: float | None = None, ttl: float | None = None,
               idle_ttl: float | None = None, expire_action: ExpireAction | None = None,
               network: Mapping[str, Any] | None = None,
               secrets: Mapping[str, str] | None = None, snapshot: str | None = None,
               volumes: Mapping[str, Any] | None = None,
               url: str | None = None, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> Sandbox:
        """Create a sandbox from `template` and return it once it runs. Unset resources
        come from the template. `timeout`: seconds to wait for it (default: the
        request timeout); it does not limit the sandbox's life.

        Timers, in seconds (0 turns one off; unset: the server's defaults): after
        `standby_after` idle seconds the sandbox goes to standby, after `hibernate_after`
        more it hibernates; past `ttl` seconds from creation, or `idle_ttl` idle seconds,
        it expires: `expire_action` "delete" (the default) or "hibernate".

        `network`: the egress policy, `{"egress": "allow-all" | "deny-all", "allow": [...],
        "deny": [...]}` (domains, `*.` wildcards, IPs, CIDRs, optional `:port`).
        `secrets`: `{"ENV_VAR": "secret-name"}`; the variable holds a placeholder that the
        egress proxy swaps for the secret on requests to its allowed hosts.
        `snapshot`: a snapshot's id (`sbx.snapshot()`): the sandbox starts as a copy of
        it, with its processes if it holds memory (then leave memory_mb and disk_mb out).
        `volumes`: `{"/data": "name"}` or `{"/data": {"volume": "name", "read_only": True}}`
        (`Volume.create`): mounted from its start; ConflictError if another sandbox writes
        one of them (or reads one it would write)."""
        session = SyncSession(_config(url, api_key, request_timeout), transport)
        try:
            info = session.call(_api.create_sandbox(
                template, env, metadata, cpu, memory_mb, disk_mb, timeout,
                network=network, secrets=secrets, snapshot=snapshot, volumes=volumes,
                standby_after=standby_after, hibernate_after=hibernate_after, ttl=ttl,
                idle_ttl=idle_ttl, expire_action=expire_action))
        except BaseException:
            session.close()
            raise
        return cls(info.id, _session=session)

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                transport: httpx.BaseTransport | None = None) -> Sandbox:
        """Attach to an existing sandbox; NotFoundError if there is none (or it was
        deleted)."""
        sbx = cls(sandbox_id, url=url, api_key=api_key, request_timeout=request_timeout,
                  transport=transport)
        try:
            sbx.info()
        except BaseException:
            sbx.close()
            raise
        return sbx

    @staticmethod
    def list(state: str | None = None, metadata: Mapping[str, str] | None = None, *,
             url: str | None = None, api_key: str | None = None,
             request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
             transport: httpx.BaseTransport | None = None) -> list[SandboxInfo]:
        """Sandboxes, optionally only those in `state` and with all of `metadata`.
        Deleted ones are left out unless state="deleted"."""
        session = SyncSession(_config(url, api_key, request_timeout), transport)
        try:
            return session.call(_api.list_sandboxes(state, metadata))
        finally:
            session.close()

    @staticmethod
    def usage_all(state: str | None = None, metadata: Mapping[str, str] | None = None, *,
                  url: str | None = None, api_key: str | None = None,
                  request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                  transport: httpx.BaseTransport | None = None) -> UsageSummary:
        """Usage of every sandbox (filtered as `list` does), and the total."""
        session = SyncSession(_config(url, api_key, request_timeout), transport)
        try:
            return session.call(_api.usage_all(state, metadata))
        finally:
            session.close()

    def info(self) -> SandboxInfo:
        """Its record; does not wake a sandbox in standby or hibernated."""
        return self._session.call(_api.get_sandbox(self.id))

    def delete(self) -> None:
        """Delete the sandbox and everything in it. It answers 404 afterwards."""
        self._session.call(_api.delete_sandbox(self.id))

    # --- standby, hibernation, timers -----------------------------------------------------

    def standby(self) -> SandboxInfo:
        """Freeze it now: memory stays resident, no CPU; the next request wakes it at once.
        ConflictError if streams are open on it or its state does not allow it."""
        return self._session.call(_api.standby(self.id))

    def hibernate(self) -> SandboxInfo:
        """Checkpoint it to disk and free its memory; the next request restores it.
        ConflictError as for standby; ServerUnavailableError if the checkpoint failed
        (the sandbox then stays as it was)."""
        return self._session.call(_api.hibernate(self.id))

    def resume(self) -> SandboxInfo:
        """Wake it from standby or hibernation (any request does; this only does that)."""
        return self._session.call(_api.resume(self.id))

    # --- code interpreter (torpor/sdk/code.py; the code-interpreter template) --------------
    def run_code(self, code: str, *, context: CodeContext | str | None = None,
                 language: str | None = None, env: Mapping[str, str] | None = None,
                 timeout: float | None = None, on_stdout: Callable | None = None,
                 on_stderr: Callable | None = None, on_result: Callable | None = None,
                 on_error: Callable | None = None) -> Execution:
        """Run `code` in the sandbox's code interpreter (template `code-interpreter`): in
        `context`, else the default context of `language` (python, or bash). Returns the
        Execution (results, logs.stdout/stderr, error, execution_count); an error the code
        raised is `ex.error`, not an exception. Callbacks get stdout and stderr text,
        Results and the ExecutionError as they come. Past `timeout` seconds the kernel is
        interrupted (`ex.error.name == "TimeoutError"`) and the context keeps its state.
        ConflictError if the sandbox runs no code interpreter."""
        return _code.run_sync(self._session, self.id, code, context, language, env, timeout,
                              (on_stdout, on_stderr, on_result, on_error))

    def create_code_context(self, language: str = "python", *,
                            cwd: str | None = None) -> CodeContext:
        """A new context, its own kernel: python or bash; `cwd` is made if missing."""
        return self._session.call(_code.create_context_call(self.id, language, cwd))

    def list_code_contexts(self) -> list[CodeContext]:
        return self._session.call(_code.list_contexts_call(self.id))

    def restart_code_context(self, context: CodeContext | str) -> CodeContext:
        """A fresh kernel for the context (same id and cwd); its state is lost."""
        return self._session.call(_code.restart_context_call(self.id, context))

    def delete_code_context(self, context: CodeContext | str) -> None:
        self._session.call(_code.delete_context_call(self.id, context))

    # --- snapshots, restore in place, fork (torpor/sdk/snapshots.py) ----------------------

    def snapshot(self, name: str | None = None, memory: bool = True) -> SnapshotInfo:
        """Keep it as it is now (memory and files; `memory=False`: files only); it runs on
        after a short pause. ConflictError for what cannot be captured (as for hibernate)."""
        return self._session.call(_snapshots.create_snapshot(self.id, name, memory))

    def restore(self, snapshot_id: str) -> SandboxInfo:
        """Roll it back to a snapshot (of it, or of a sandbox of the same template): same
        id; processes and files as they were then."""
        return self._session.call(_snapshots.restore(self.id, snapshot_id))

    def fork(self, count: int = 1) -> list[Sandbox]:
        """`count` copies of it as it is now (it runs on), each a sandbox of its own."""
        infos = self._session.call(_snapshots.fork(self.id, count))
        return [Sandbox(i.id, _session=SyncSession(self._session.config)) for i in infos]

    # --- drives (torpor/sdk/volumes.py) -----------------------------------------------------

    def attach_drive(self, drive: str, path: str | None = None) -> str:
        """Attach a drive (`Drive.create`) while it runs: it appears at /drives/<path>
        (default: the drive's name), shared with every sandbox it is attached to. Returns
        that path."""
        return self._session.call(_volumes.attach_drive(self.id, drive, path))

    def detach_drive(self, drive: str) -> None:
        """Take the drive away from it (nothing more of it can be reached from here)."""
        self._session.call(_volumes.detach_drive(self.id, drive))

    def update(self, *, standby_after: float | None = None,
               hibernate_after: float | None = None, ttl: float | None = None,
               idle_ttl: float | None = None,
               expire_action: ExpireAction | None = None) -> SandboxInfo:
        """Change its timers (seconds; 0 turns one off; None leaves one as it is)."""
        return self._session.call(_api.update_sandbox(
            self.id, standby_after=standby_after, hibernate_after=hibernate_after, ttl=ttl,
            idle_ttl=idle_ttl, expire_action=expire_action))

    def hold(self, seconds: float = 300) -> str:
        """Keep it out of standby for `seconds` (at most 3600), waking it if need be;
        returns the hold's id for `release`."""
        return self._session.call(_api.hold(self.id, seconds))

    def release(self, hold_id: str) -> None:
        """End a hold early; NotFoundError if it is unknown (or already gone)."""
        self._session.call(_api.release(self.id, hold_id))

    @contextmanager
    def keep_alive(self, seconds: float = 300) -> Iterator[str]:
        """`with sbx.keep_alive(600):` holds the sandbox out of standby while the block
        runs (for at most `seconds`), then releases the hold. Yields the hold id."""
        hold_id = self.hold(seconds)
        try:
            yield hold_id
        except BaseException:
            try:
                self.release(hold_id)
            except TorporError:
                pass  # the block's error is the one to see; the hold lapses by itself
            raise
        try:
            self.release(hold_id)
        except NotFoundError:
            pass  # lapsed already, or the sandbox was deleted in the block

    def usage(self) -> Usage:
        """CPU seconds, memory GiB-seconds, seconds in each state and bytes on disk."""
        return self._session.call(_api.usage(self.id))

    # --- network ---------------------------------------------------------------------
    def update_network(self, network: Mapping[str, Any] | None = None, *,
                       egress: str | None = None, allow: list[str] | None = None,
                       deny: list[str] | None = None) -> SandboxInfo:
        """Change the egress policy (keys not given stay as they are). It applies at once:
        the sandbox's open egress connections close, new ones get the new policy."""
        return self._session.call(_api.update_network(
            self.id, _policy(network, egress, allow, deny)))

    def egress_log(self, limit: int = 100, before: int | None = None) -> list[EgressEntry]:
        """Recent egress connections and requests, newest first."""
        return self._session.call(_api.egress_log(self.id, limit, before))

    def preview_url(self, port: int, expires_in: float = 3600) -> str:
        """A signed URL of `port` inside the sandbox, valid for `expires_in` seconds."""
        return self._session.call(_api.preview_url(self.id, port, expires_in)).url

    def expose(self, port: int, public: bool = True) -> Port:
        """Make `port` public (anyone with its URL) or private again (token or API key)."""
        return self._session.call(_api.expose(self.id, port, public))

    def ports(self) -> list[Port]:
        return self._session.call(_api.list_ports(self.id))

    def add_domain(self, domain: str, port: int, public: bool = False) -> Domain:
        """Route requests for `domain` on the preview listener to `port`."""
        return self._session.call(_api.add_domain(self.id, domain, port, public))

    def remove_domain(self, domain: str) -> None:
        self._session.call(_api.remove_domain(domain))

    def events(self) -> list[Event]:
        """Its history, oldest first: state changes with their reason and duration."""
        return self._session.call(_api.events(self.id))

    def close(self) -> None:
        """Release the HTTP connections (the sandbox itself lives on)."""
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.delete()
        except NotFoundError:
            pass  # already deleted
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r})"


class AsyncSandbox:
    """The async twin of Sandbox: `sbx = await AsyncSandbox.create()`,
    `async with await AsyncSandbox.create() as sbx:`."""

    def __init__(self, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None,
                 _session: AsyncSession | None = None):
        self.id = sandbox_id
        self._session = _session or AsyncSession(_config(url, api_key, request_timeout),
                                                 transport)
        self.commands = AsyncCommands(self._session, sandbox_id)
        self.files = AsyncFiles(self._session, sandbox_id)
        self.pty = AsyncPty(self._session, sandbox_id)  # terminals

    @classmethod
    async def create(cls, template: str = "base", *, env: Mapping[str, str] | None = None,
                     metadata: Mapping[str, str] | None = None, cpu: float | None = None,
                     memory_mb: int | None = None, disk_mb: int | None = None,
                     timeout: float | None = None, standby_after: float | None = None,
                     hibernate_after: float | None = None, ttl: float | None = None,
                     idle_ttl: float | None = None,
                     expire_action: ExpireAction | None = None,
                     network: Mapping[str, Any] | None = None,
                     secrets: Mapping[str, str] | None = None, url: str | None = None,
                     api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None,
                     snapshot: str | None = None,
                     volumes: Mapping[str, Any] | None = None) -> AsyncSandbox:
        session = AsyncSession(_config(url, api_key, request_timeout), transport)
        try:
            info = await session.call(_api.create_sandbox(
                template, env, metadata, cpu, memory_mb, disk_mb, timeout,
                network=network, secrets=secrets, snapshot=snapshot, volumes=volumes,
                standby_after=standby_after, hibernate_after=hibernate_after, ttl=ttl,
                idle_ttl=idle_ttl, expire_action=expire_action))
        except BaseException:
            await session.aclose()
            raise
        return cls(info.id, _session=session)

    @classmethod
    async def connect(cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                      request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                      transport: httpx.AsyncBaseTransport | None = None) -> AsyncSandbox:
        sbx = cls(sandbox_id, url=url, api_key=api_key, request_timeout=request_timeout,
                  transport=transport)
        try:
            await sbx.info()
        except BaseException:
            await sbx.close()
            raise
        return sbx

    @staticmethod
    async def list(state: str | None = None, metadata: Mapping[str, str] | None = None, *,
                   url: str | None = None, api_key: str | None = None,
                   request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                   transport: httpx.AsyncBaseTransport | None = None) -> list[SandboxInfo]:
        session = AsyncSession(_config(url, api_key, request_timeout), transport)
        try:
            return await session.call(_api.list_sandboxes(state, metadata))
        finally:
            await session.aclose()

    @staticmethod
    async def usage_all(state: str | None = None, metadata: Mapping[str, str] | None = None,
                        *, url: str | None = None, api_key: str | None = None,
                        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                        transport: httpx.AsyncBaseTransport | None = None) -> UsageSummary:
        session = AsyncSession(_config(url, api_key, request_timeout), transport)
        try:
            return await session.call(_api.usage_all(state, metadata))
        finally:
            await session.aclose()

    async def info(self) -> SandboxInfo:
        return await self._session.call(_api.get_sandbox(self.id))

    async def delete(self) -> None:
        await self._session.call(_api.delete_sandbox(self.id))

    async def standby(self) -> SandboxInfo:
        return await self._session.call(_api.standby(self.id))

    async def hibernate(self) -> SandboxInfo:
        return await self._session.call(_api.hibernate(self.id))

    # --- code interpreter (torpor/sdk/code.py) ------------------------------------------
    async def run_code(self, code: str, *, context: CodeContext | str | None = None,
                       language: str | None = None, env: Mapping[str, str] | None = None,
                       timeout: float | None = None, on_stdout: Callable | None = None,
                       on_stderr: Callable | None = None, on_result: Callable | None = None,
                       on_error: Callable | None = None) -> Execution:
        """As Sandbox.run_code; callbacks may be coroutine functions."""
        return await _code.run_async(self._session, self.id, code, context, language, env,
                                     timeout, (on_stdout, on_stderr, on_result, on_error))

    async def create_code_context(self, language: str = "python", *,
                                  cwd: str | None = None) -> CodeContext:
        return await self._session.call(_code.create_context_call(self.id, language, cwd))

    async def list_code_contexts(self) -> list[CodeContext]:
        return await self._session.call(_code.list_contexts_call(self.id))

    async def restart_code_context(self, context: CodeContext | str) -> CodeContext:
        return await self._session.call(_code.restart_context_call(self.id, context))

    async def delete_code_context(self, context: CodeContext | str) -> None:
        await self._session.call(_code.delete_context_call(self.id, context))

    async def snapshot(self, name: str | None = None, memory: bool = True) -> SnapshotInfo:
        return await self._session.call(_snapshots.create_snapshot(self.id, name, memory))

    async def restore(self, snapshot_id: str) -> SandboxInfo:
        return await self._session.call(_snapshots.restore(self.id, snapshot_id))

    async def attach_drive(self, drive: str, path: str | None = None) -> str:
        return await self._session.call(_volumes.attach_drive(self.id, drive, path))

    async def detach_drive(self, drive: str) -> None:
        await self._session.call(_volumes.detach_drive(self.id, drive))

    async def fork(self, count: int = 1) -> list[AsyncSandbox]:
        infos = await self._session.call(_snapshots.fork(self.id, count))
        return [AsyncSandbox(i.id, _session=AsyncSession(self._session.config))
                for i in infos]

    async def resume(self) -> SandboxInfo:
        return await self._session.call(_api.resume(self.id))

    async def update(self, *, standby_after: float | None = None,
                     hibernate_after: float | None = None, ttl: float | None = None,
                     idle_ttl: float | None = None,
                     expire_action: ExpireAction | None = None) -> SandboxInfo:
        return await self._session.call(_api.update_sandbox(
            self.id, standby_after=standby_after, hibernate_after=hibernate_after, ttl=ttl,
            idle_ttl=idle_ttl, expire_action=expire_action))

    async def hold(self, seconds: float = 300) -> str:
        return await self._session.call(_api.hold(self.id, seconds))

    async def release(self, hold_id: str) -> None:
        await self._session.call(_api.release(self.id, hold_id))

    @asynccontextmanager
    async def keep_alive(self, seconds: float = 300) -> AsyncIterator[str]:
        """`async with sbx.keep_alive(600):`, as Sandbox.keep_alive."""
        hold_id = await self.hold(seconds)
        try:
            yield hold_id
        except BaseException:
            try:
                await self.release(hold_id)
            except TorporError:
                pass  # the block's error is the one to see; the hold lapses by itself
            raise
        try:
            await self.release(hold_id)
        except NotFoundError:
            pass  # lapsed already, or the sandbox was deleted in the block

    async def usage(self) -> Usage:
        return await self._session.call(_api.usage(self.id))

    async def update_network(self, network: Mapping[str, Any] | None = None, *,
                             egress: str | None = None, allow: list[str] | None = None,
                             deny: list[str] | None = None) -> SandboxInfo:
        return await self._session.call(_api.update_network(
            self.id, _policy(network, egress, allow, deny)))

    async def egress_log(self, limit: int = 100,
                         before: int | None = None) -> list[EgressEntry]:
        return await self._session.call(_api.egress_log(self.id, limit, before))

    async def preview_url(self, port: int, expires_in: float = 3600) -> str:
        return (await self._session.call(_api.preview_url(self.id, port, expires_in))).url

    async def expose(self, port: int, public: bool = True) -> Port:
        return await self._session.call(_api.expose(self.id, port, public))

    async def ports(self) -> list[Port]:
        return await self._session.call(_api.list_ports(self.id))

    async def add_domain(self, domain: str, port: int, public: bool = False) -> Domain:
        return await self._session.call(_api.add_domain(self.id, domain, port, public))

    async def remove_domain(self, domain: str) -> None:
        await self._session.call(_api.remove_domain(domain))

    async def events(self) -> list[Event]:
        return await self._session.call(_api.events(self.id))

    async def close(self) -> None:
        await self._session.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.delete()
        except NotFoundError:
            pass
        finally:
            await self.close()

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r})"


def _policy(network: Mapping[str, Any] | None, egress: str | None, allow: list[str] | None,
            deny: list[str] | None) -> dict[str, Any]:
    given = dict(network or {})
    given.update({k: v for k, v in (("egress", egress), ("allow", allow), ("deny", deny))
                  if v is not None})
    return given


def _config(url: str | None, api_key: str | None,
            request_timeout: float | None) -> ClientConfig:
    return ClientConfig.resolve(url, api_key, request_timeout)
