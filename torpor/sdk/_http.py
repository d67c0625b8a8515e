"""Sending Calls: the sync and async HTTP sessions, twins over `_api.Call`.

They add the key, turn error answers into typed errors, and turn transport failures
(connection refused, dropped, timed out) into ServerUnavailableError / TorporTimeoutError.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx

from torpor.sdk._api import Call
from torpor.sdk.config import CONNECT_TIMEOUT, ClientConfig
from torpor.sdk.errors import (
    ServerUnavailableError,
    TorporError,
    TorporTimeoutError,
    error_from_response,
)

T = TypeVar("T")


@contextmanager
def transport_errors(url: str, call: Call[Any]) -> Iterator[None]:
    where = {"sandbox_id": call.sandbox_id, "operation": call.operation}
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        raise ServerUnavailableError(
            f"cannot reach the Torpor server at {url} ({e or type(e).__name__}); start it "
            "with `torpor serve` (or `make serve` in a checkout), or set TORPOR_URL to a "
            "running server", code="connect", **where) from None
    except httpx.TimeoutException as e:
        raise TorporTimeoutError(f"no answer from {url} in time ({type(e).__name__}); the "
                                 "server may be overloaded, or pass a larger timeout",
                                 code="timeout", **where) from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        raise ServerUnavailableError(f"the connection to {url} broke ({e or type(e).__name__})"
                                     "; is the server restarting?", code="disconnected",
                                     **where) from None
    except httpx.TransportError as e:
        raise TorporError(f"request to {url} failed: {e or type(e).__name__}",
                          code="transport", **where) from None


def _parse(resp: httpx.Response, call: Call[T]) -> T:
    try:
        return call.parse(resp)
    except (ValueError, KeyError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise TorporError(f"unexpected answer from the server (HTTP {resp.status_code}): "
                          f"{e}; is TORPOR_URL pointing at a Torpor server of this version?",
                          code="bad_answer", sandbox_id=call.sandbox_id,
                          operation=call.operation) from None


def _timeout(config: ClientConfig) -> httpx.Timeout:
    return httpx.Timeout(config.request_timeout, connect=CONNECT_TIMEOUT)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: httpx builds a new one (loading the CA bundle, ~27 ms)
    for every client otherwise, and every Sandbox holds its own client."""
    return ssl.create_default_context()


class SyncSession:
    """One httpx.Client bound to a server and key."""

    def __init__(self, config: ClientConfig, transport: httpx.BaseTransport | None = None):
        self.config = config
        self.client = httpx.Client(base_url=config.url, headers=config.headers(),
                                   timeout=_timeout(config), transport=transport,
                                   verify=_tls())

    def call(self, call: Call[T]) -> T:
        with transport_errors(self.config.url, call):
            resp = self.client.send(call.request(self.client))
        if resp.is_error:
            raise error_from_response(resp, sandbox_id=call.sandbox_id,
                                      operation=call.operation)
        return _parse(resp, call)

    def open(self, call: Call[Any]) -> httpx.Response:
        """Send and return the streaming response once its status is known to be a success.
        The caller closes it."""
        with transport_errors(self.config.url, call):
            resp = self.client.send(call.request(self.client), stream=True)
            if resp.is_error:
                try:
                    resp.read()
                finally:
                    resp.close()
                raise error_from_response(resp, sandbox_id=call.sandbox_id,
                                          operation=call.operation)
        return resp

    def iter_lines(self, resp: httpx.Response, call: Call[Any]) -> Iterator[str]:
        try:
            with transport_errors(self.config.url, call):
                yield from resp.iter_lines()
        finally:
            resp.close()

    def iter_bytes(self, resp: httpx.Response, call: Call[Any],
                   chunk_size: int | None = None) -> Iterator[bytes]:
        try:
            with transport_errors(self.config.url, call):
                yield from resp.iter_bytes(chunk_size)
        finally:
            resp.close()

    def close(self) -> None:
        self.client.close()


class AsyncSession:
    """One httpx.AsyncClient bound to a server and key; the twin of SyncSession."""

    def __init__(self, config: ClientConfig,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.client = httpx.AsyncClient(base_url=config.url, headers=config.headers(),
                                        timeout=_timeout(config), transport=transport,
                                        verify=_tls())

    async def call(self, call: Call[T]) -> T:
        with transport_errors(self.config.url, call):
            resp = await self.client.send(call.request(self.client))
        if resp.is_error:
            raise error_from_response(resp, sandbox_id=call.sandbox_id,
                                      operation=call.operation)
        return _parse(resp, call)

    async def open(self, call: Call[Any]) -> httpx.Response:
        with transport_errors(self.config.url, call):
            resp = await self.client.send(call.request(self.client), stream=True)
            if resp.is_error:
                try:
                    await resp.aread()
                finally:
                    await resp.aclose()
                raise error_from_response(resp, sandbox_id=call.sandbox_id,
                                          operation=call.operation)
        return resp

    async def iter_lines(self, resp: httpx.Response, call: Call[Any]) -> AsyncIterator[str]:
        try:
            with transport_errors(self.config.url, call):
                async for line in resp.aiter_lines():
                    yield line
        finally:
            await resp.aclose()

    async def iter_bytes(self, resp: httpx.Response, call: Call[Any],
                         chunk_size: int | None = None) -> AsyncIterator[bytes]:
        try:
            with transport_errors(self.config.url, call):
                async for chunk in resp.aiter_bytes(chunk_size):
                    yield chunk
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
