"""API keys: random tokens, stored only as SHA-256 hashes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from torpor.errors import NotFound, Unauthorized
from torpor.store.models import ApiKeyRow, now

PREFIX = "tpr_"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._cache: dict[str, tuple[str, bool]] = {}  # hash -> (id, admin), valid keys only

    def create(self, name: str, admin: bool = False) -> tuple[ApiKeyRow, str]:
        key = PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(id="key_" + secrets.token_hex(6), name=name, prefix=key[:10],
                        hash=_hash(key), admin=admin)
        with self.sessions.begin() as s:
            s.add(row)
        return row, key

    def has_any(self) -> bool:
        with self.sessions() as s:
            return s.scalar(select(ApiKeyRow.id).limit(1)) is not None

    def list(self) -> list[ApiKeyRow]:
        with self.sessions() as s:
            return list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))

    def revoke(self, key_id: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"no API key {key_id}; `torpor keys list` shows them")
            row.revoked_at = row.revoked_at or now()
        self._cache = {h: v for h, v in self._cache.items() if v[0] != key_id}

    def check(self, presented: str | None) -> str:
        """Return the key's id, or raise Unauthorized. The lookup is by hash; the final
        comparison is constant-time, so timing says nothing about how close a guess was."""
        if not presented:
            raise Unauthorized("missing API key: send `Authorization: Bearer KEY` "
                               "or `X-API-Key: KEY`")
        h = _hash(presented)
        hit = self._cache.get(h)
        if hit is None:
            with self.sessions() as s:
                row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.hash == h))
                if row is None or row.revoked_at is not None:
                    raise Unauthorized("invalid or revoked API key")
                if not hmac.compare_digest(row.hash, h):
                    raise Unauthorized("invalid or revoked API key")
                hit = (row.id, row.admin)
                self._cache[h] = hit
                self._touch(row.id)
        return hit[0]

    def _touch(self, key_id: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is not None:
                row.last_used_at = datetime.now(row.created_at.tzinfo)
