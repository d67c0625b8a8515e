"""Small clients for what is not one sandbox: API keys and templates.

`Keys` / `Templates` (sync) and `AsyncKeys` / `AsyncTemplates` (async) take the same
`url=`, `api_key=`, `request_timeout=`, `transport=` as Sandbox, and are context managers
that release their connections.
"""

from __future__ import annotations

from typing import Literal, Self

import httpx

from torpor.sdk import _api
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT, ClientConfig
from torpor.sdk.models import ApiKey, Domain, TemplateInfo


class _Client:
    def __init__(self, *, url: str | None = None, api_key: str | None = None,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 transport: httpx.BaseTransport | None = None):
        self._s = SyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)

    def close(self) -> None:
        self._s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncClient:
    def __init__(self, *, url: str | None = None, api_key: str | None = None,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None):
        self._s = AsyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)

    async def close(self) -> None:
        await self._s.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Keys(_Client):
    """API keys: `Keys().create("ci").key` is the secret, shown only then. Managing keys
    needs an admin key (403 AuthError otherwise)."""

    def create(self, name: str, scope: Literal["user", "admin"] | None = None,
               e2b: bool = False) -> ApiKey:
        """A new key of `scope`: "user" (the default: sandboxes, files, commands, network)
        or "admin" (that, plus managing keys and secrets). With `e2b`, in E2B's form
        (`e2b_` and 40 hex digits), for E2B's SDKs as E2B_API_KEY."""
        return self._s.call(_api.create_key(name, scope, e2b))

    def list(self) -> list[ApiKey]:
        return self._s.call(_api.list_keys())

    def revoke(self, key_id: str) -> None:
        """Revoke a key by id; it gets 401 from then on. The last valid admin key cannot be
        revoked (409 ConflictError): create another admin key first."""
        self._s.call(_api.revoke_key(key_id))


class Templates(_Client):
    """The templates sandboxes are created from (build one with `Template`)."""

    def list(self) -> list[TemplateInfo]:
        return self._s.call(_api.list_templates())

    def get(self, ref: str) -> TemplateInfo:
        """By name, name:tag or digest; NotFoundError lists the known ones."""
        return self._s.call(_api.get_template(ref))

    def delete(self, ref: str, force: bool = False) -> None:
        """ConflictError (naming them) while sandboxes or templates use it, unless
        `force`."""
        self._s.call(_api.delete_template(ref, force))


class AsyncKeys(_AsyncClient):
    async def create(self, name: str, scope: Literal["user", "admin"] | None = None,
                     e2b: bool = False) -> ApiKey:
        return await self._s.call(_api.create_key(name, scope, e2b))

    async def list(self) -> list[ApiKey]:
        return await self._s.call(_api.list_keys())

    async def revoke(self, key_id: str) -> None:
        await self._s.call(_api.revoke_key(key_id))


class AsyncTemplates(_AsyncClient):
    async def list(self) -> list[TemplateInfo]:
        return await self._s.call(_api.list_templates())

    async def get(self, ref: str) -> TemplateInfo:
        return await self._s.call(_api.get_template(ref))

    async def delete(self, ref: str, force: bool = False) -> None:
        await self._s.call(_api.delete_template(ref, force))


class Domains(_Client):
    """Custom domains of the preview listener (add one with `Sandbox.add_domain`)."""

    def list(self) -> list[Domain]:
        return self._s.call(_api.list_domains())

    def remove(self, domain: str) -> None:
        self._s.call(_api.remove_domain(domain))


class AsyncDomains(_AsyncClient):
    async def list(self) -> list[Domain]:
        return await self._s.call(_api.list_domains())

    async def remove(self, domain: str) -> None:
        await self._s.call(_api.remove_domain(domain))
