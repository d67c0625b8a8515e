"""Where the SDK finds the server and its API key.

Order: explicit `url=` / `api_key=` arguments, then `TORPOR_URL` / `TORPOR_API_KEY`, then
(for the key) the file `torpor serve` writes, `<TORPOR_DATA or /var/lib/torpor>/api-key`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torpor._version import __version__

DEFAULT_URL = "http://127.0.0.1:7070"
DEFAULT_REQUEST_TIMEOUT = 120.0  # seconds; a create may boot a sandbox
CONNECT_TIMEOUT = 10.0


def resolve_url(url: str | None = None) -> str:
    return (url or os.environ.get("TORPOR_URL") or DEFAULT_URL).rstrip("/")


def key_file() -> Path:
    return Path(os.environ.get("TORPOR_DATA") or "/var/lib/torpor") / "api-key"


def resolve_api_key(api_key: str | None = None) -> str | None:
    if api_key:
        return api_key
    if os.environ.get("TORPOR_API_KEY"):
        return os.environ["TORPOR_API_KEY"].strip()
    try:
        return key_file().read_text().strip() or None
    except OSError:  # absent or not readable by this user: the server will answer 401
        return None


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str | None
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT

    @classmethod
    def resolve(cls, url: str | None = None, api_key: str | None = None,
                request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> ClientConfig:
        return cls(resolve_url(url), resolve_api_key(api_key), request_timeout)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"torpor-sdk-python/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers
