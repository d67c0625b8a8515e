"""Secrets for credential brokering: `Secret` (sync) and `AsyncSecret` (async).

    from torpor.sdk import Secret

    Secret.create("openai", os.environ["OPENAI_API_KEY"], allowed_hosts=["api.openai.com"])

A secret's value is write-only: the server keeps it encrypted and no call returns it; the
calls return `SecretInfo` (name, hosts, times). A sandbox granted the secret sees only a
placeholder, which the server's egress proxy swaps for the value on requests to the
secret's `allowed_hosts` (`api.openai.com`, `*.example.com`, `host:port`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from torpor.sdk._api import Call, _given, _model, _nothing
from torpor.sdk._http import AsyncSession, SyncSession
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT, ClientConfig
from torpor.sdk.models import Time, _Model


class SecretInfo(_Model):
    """A secret's metadata; never its value."""

    name: str
    allowed_hosts: list[str]  # canonical host patterns the value may be sent to
    inject_body: bool = False  # whether the proxy also replaces the placeholder in bodies
    created_at: Time
    updated_at: Time  # last change: value rotated, hosts or inject_body changed


# --- requests ----------------------------------------------------------------------------

class _Body(dict):
    """A request body whose repr hides the value, should a Call end up in a log."""

    def __repr__(self) -> str:
        return repr({k: "***" if k == "value" else v for k, v in self.items()})


def _path(name: str) -> str:
    return f"/v1/secrets/{quote(name, safe='')}"


def _hosts(allowed_hosts: Sequence[str] | None) -> list[str] | None:
    if isinstance(allowed_hosts, str):  # a lone "api.openai.com" would become characters
        return [allowed_hosts]
    return None if allowed_hosts is None else list(allowed_hosts)


def create_secret(name: str, value: str, allowed_hosts: Sequence[str],
                  inject_body: bool) -> Call[SecretInfo]:
    body = _Body(name=name, value=value, allowed_hosts=_hosts(allowed_hosts),
                 inject_body=inject_body)
    return Call(f"create secret {name!r}", "POST", "/v1/secrets", _model(SecretInfo),
                json=body)


def list_secrets() -> Call[list[SecretInfo]]:
    return Call("list secrets", "GET", "/v1/secrets",
                lambda r: [SecretInfo.model_validate(x) for x in r.json()["secrets"]])


def get_secret(name: str) -> Call[SecretInfo]:
    return Call(f"get secret {name!r}", "GET", _path(name), _model(SecretInfo))


def update_secret(name: str, value: str | None, allowed_hosts: Sequence[str] | None,
                  inject_body: bool | None) -> Call[SecretInfo]:
    body = _given(value=value, allowed_hosts=_hosts(allowed_hosts), inject_body=inject_body)
    if not body:
        raise ValueError("nothing to update: give value, allowed_hosts or inject_body")
    return Call(f"update secret {name!r}", "PUT", _path(name), _model(SecretInfo),
                json=_Body(body))


def delete_secret(name: str) -> Call[None]:
    return Call(f"delete secret {name!r}", "DELETE", _path(name), _nothing)


# --- clients -----------------------------------------------------------------------------

def _sync(call: Call[Any], url: str | None, api_key: str | None,
          request_timeout: float | None, transport: httpx.BaseTransport | None) -> Any:
    session = SyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)
    try:
        return session.call(call)
    finally:
        session.close()


async def _async(call: Call[Any], url: str | None, api_key: str | None,
                 request_timeout: float | None,
                 transport: httpx.AsyncBaseTransport | None) -> Any:
    session = AsyncSession(ClientConfig.resolve(url, api_key, request_timeout), transport)
    try:
        return await session.call(call)
    finally:
        await session.aclose()


class Secret:
    """Secrets on the server, through classmethods (each one request). Errors:
    ConflictError (name taken), NotFoundError (no such secret), InvalidRequestError (a
    bad name, value or host pattern; `field` says which; the message never quotes the
    value)."""

    @classmethod
    def create(cls, name: str, value: str, allowed_hosts: Sequence[str],
               inject_body: bool = False, *, url: str | None = None,
               api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> SecretInfo:
        """Store a new secret. `value`: 1 to 65536 bytes, no CR, LF or NUL. It is only
        sent to `allowed_hosts`; with `inject_body` the proxy also replaces the
        placeholder in request bodies, not only in headers. A lone string for
        `allowed_hosts` is taken as one host."""
        return _sync(create_secret(name, value, allowed_hosts, inject_body), url, api_key,
                     request_timeout, transport)

    @classmethod
    def list(cls, *, url: str | None = None, api_key: str | None = None,
             request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
             transport: httpx.BaseTransport | None = None) -> list[SecretInfo]:
        """All secrets, by name."""
        return _sync(list_secrets(), url, api_key, request_timeout, transport)

    @classmethod
    def get(cls, name: str, *, url: str | None = None, api_key: str | None = None,
            request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
            transport: httpx.BaseTransport | None = None) -> SecretInfo:
        return _sync(get_secret(name), url, api_key, request_timeout, transport)

    @classmethod
    def update(cls, name: str, value: str | None = None,
               allowed_hosts: Sequence[str] | None = None, inject_body: bool | None = None,
               *, url: str | None = None, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> SecretInfo:
        """Rotate the value and/or replace the hosts or inject_body; None keeps a field.
        ValueError if nothing is given."""
        return _sync(update_secret(name, value, allowed_hosts, inject_body), url, api_key,
                     request_timeout, transport)

    @classmethod
    def delete(cls, name: str, *, url: str | None = None, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               transport: httpx.BaseTransport | None = None) -> None:
        _sync(delete_secret(name), url, api_key, request_timeout, transport)


class AsyncSecret:
    """The async twin of `Secret`."""

    @classmethod
    async def create(cls, name: str, value: str, allowed_hosts: Sequence[str],
                     inject_body: bool = False, *, url: str | None = None,
                     api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> SecretInfo:
        return await _async(create_secret(name, value, allowed_hosts, inject_body), url,
                            api_key, request_timeout, transport)

    @classmethod
    async def list(cls, *, url: str | None = None, api_key: str | None = None,
                   request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                   transport: httpx.AsyncBaseTransport | None = None) -> list[SecretInfo]:
        return await _async(list_secrets(), url, api_key, request_timeout, transport)

    @classmethod
    async def get(cls, name: str, *, url: str | None = None, api_key: str | None = None,
                  request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                  transport: httpx.AsyncBaseTransport | None = None) -> SecretInfo:
        return await _async(get_secret(name), url, api_key, request_timeout, transport)

    @classmethod
    async def update(cls, name: str, value: str | None = None,
                     allowed_hosts: Sequence[str] | None = None,
                     inject_body: bool | None = None, *, url: str | None = None,
                     api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> SecretInfo:
        return await _async(update_secret(name, value, allowed_hosts, inject_body), url,
                            api_key, request_timeout, transport)

    @classmethod
    async def delete(cls, name: str, *, url: str | None = None, api_key: str | None = None,
                     request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                     transport: httpx.AsyncBaseTransport | None = None) -> None:
        await _async(delete_secret(name), url, api_key, request_timeout, transport)
