"""`Sandbox` and `AsyncSandbox`: one sandbox, with `commands` and `files` hanging off it.

Both are thin over `_api` (what to send) and `_http` (how); they are twins, method for
method. A Sandbox object owns one HTTP connection pool; `close()` releases it, and
leaving a `with` block deletes the sandbox too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

import httpx

from torpor.sdk import _api
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.commands import AsyncCommands, Commands
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT, ClientConfig
from torpor.sdk.errors import NotFoundError
from torpor.sdk.files import AsyncFiles, Files
from torpor.sdk.models import SandboxInfo


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

    @classmethod
    def create(cls, template: str = "base", *, env: Mapping[str, str] | None = None,
               metadata: Mapping[str, str] | None = None, cpu: float | None = None,
               memory_mb: int | None = None, disk_mb: int | None = None,
               timeout: float | None = None, url: str | None = None, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> Sandbox:
        """Create a sandbox from `template` and return it once it runs. Unset resources
        come from the template. `timeout`: seconds to wait for it (default: the
        request timeout); it does not limit the sandbox's life, which has no cap."""
        session = SyncSession(_config(url, api_key, request_timeout), transport)
        try:
            info = session.call(_api.create_sandbox(template, env, metadata, cpu, memory_mb,
                                                    disk_mb, timeout))
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

    def info(self) -> SandboxInfo:
        return self._session.call(_api.get_sandbox(self.id))

    def delete(self) -> None:
        """Delete the sandbox and everything in it. It answers 404 afterwards."""
        self._session.call(_api.delete_sandbox(self.id))

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

    @classmethod
    async def create(cls, template: str = "base", *, env: Mapping[str, str] | None = None,
                     metadata: Mapping[str, str] | None = None, cpu: float | None = None,
                     memory_mb: int | None = None, disk_mb: int | None = None,
                     timeout: float | None = None, url: str | None = None, api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> AsyncSandbox:
        session = AsyncSession(_config(url, api_key, request_timeout), transport)
        try:
            info = await session.call(_api.create_sandbox(template, env, metadata, cpu,
                                                          memory_mb, disk_mb, timeout))
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

    async def info(self) -> SandboxInfo:
        return await self._session.call(_api.get_sandbox(self.id))

    async def delete(self) -> None:
        await self._session.call(_api.delete_sandbox(self.id))

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


def _config(url: str | None, api_key: str | None,
            request_timeout: float | None) -> ClientConfig:
    return ClientConfig.resolve(url, api_key, request_timeout)
