"""API keys: random tokens, stored only as SHA-256 hashes, compared in constant time.

A key has a scope: `admin` keys manage keys (and secrets), `user` keys do everything
else. The store never lets the last valid admin key be revoked; an operator who is locked
out anyway (a database from before scopes) makes one on the host with
`torpor keys create NAME --admin --offline`, which writes through this same class."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from torpor.errors import Conflict, Forbidden, NotFound, Unauthorized
from torpor.store.models import ApiKeyRow, now

PREFIX = "tpr_"
E2B_PREFIX = "e2b_"  # E2B's form (e2b_ and 40 hex digits), which E2B's SDKs check for
ADMIN, USER = "admin", "user"
SCOPES = (USER, ADMIN)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._cache: dict[str, tuple[str, bool]] = {}  # hash -> (id, admin), valid keys only

    def create(self, name: str, admin: bool = False,
               e2b: bool = False) -> tuple[ApiKeyRow, str]:
        """A new key (returned once; only its hash is kept). With `e2b`, in E2B's form
        (`e2b_` and 40 hex digits) for E2B's SDKs; it works everywhere any key does."""
        key = (E2B_PREFIX + secrets.token_hex(20)) if e2b else PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(id="key_" + secrets.token_hex(6), name=name, prefix=key[:10],
                        hash=_hash(key), admin=admin)
        with self.sessions.begin() as s:
            s.add(row)
        return row, key

    def has_any(self) -> bool:
        with self.sessions() as s:
            return s.scalar(select(ApiKeyRow.id).limit(1)) is not None

    def has_valid_admin(self) -> bool:
        with self.sessions() as s:
            return s.scalar(select(ApiKeyRow.id).where(
                ApiKeyRow.admin.is_(True), ApiKeyRow.revoked_at.is_(None)).limit(1)) is not None

    def list(self) -> list[ApiKeyRow]:
        with self.sessions() as s:
            return list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))

    def revoke(self, key_id: str) -> None:
        """Revoke a key; it is refused from then on (at once on this server: its cache entry
        goes). Refuses, with Conflict, to revoke the last valid admin key."""
        other = aliased(ApiKeyRow)
        other_admin = select(other.id).where(other.admin.is_(True), other.revoked_at.is_(None),
                                             other.id != key_id).exists()
        # one UPDATE, so two revocations racing cannot both see "another admin remains"
        stmt = (update(ApiKeyRow)
                .where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None),
                       or_(ApiKeyRow.admin.is_(False), other_admin))
                .values(revoked_at=now()))
        with self.sessions.begin() as s:
            done = s.execute(stmt).rowcount
            if not done:
                row = s.get(ApiKeyRow, key_id)
                if row is None:
                    raise NotFound(f"no API key {key_id}; `torpor keys list` shows them",
                                   key_id=key_id)
                if row.revoked_at is None:
                    raise Conflict(f"API key {key_id} is the last valid admin key and "
                                   "is kept: without one nobody can manage keys. Create "
                                   "another admin key first (`torpor keys create NAME "
                                   "--admin`), then revoke this one", key_id=key_id)
        self._cache = {h: v for h, v in self._cache.items() if v[0] != key_id}

    def check(self, presented: str | None) -> str:
        """Return the key's id, or raise Unauthorized. The lookup is by hash; the final
        comparison is constant-time, so timing says nothing about how close a guess was."""
        return self._lookup(presented)[0]

    def check_admin(self, presented: str | None, operation: str) -> str:
        """Return the key's id if it is a valid admin key; Unauthorized for a missing,
        wrong or revoked key, Forbidden for a user key."""
        key_id, admin = self._lookup(presented)
        if not admin:
            raise Forbidden(f"{operation} needs an admin API key and {key_id} has scope "
                            "user; ask an admin, or on the server's host run `torpor keys "
                            "create NAME --admin --offline`", key_id=key_id)
        return key_id

    def _lookup(self, presented: str | None) -> tuple[str, bool]:
        if not presented:
            raise Unauthorized("missing API key: send `Authorization: Bearer KEY` "
                               "or `X-API-Key: KEY`")
        h = _hash(presented)
        hit = self._cache.get(h)
        if hit is None:
            # a miss reads the database, so a key made by another process (the offline
            # `torpor keys create`) works at once
            with self.sessions() as s:
                row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.hash == h))
                if row is None or row.revoked_at is not None:
                    raise Unauthorized("invalid or revoked API key")
                if not hmac.compare_digest(row.hash, h):
                    raise Unauthorized("invalid or revoked API key")
                hit = (row.id, row.admin)
                self._cache[h] = hit
                self._touch(row.id)
        return hit

    def _touch(self, key_id: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is not None:
                row.last_used_at = datetime.now(row.created_at.tzinfo)

