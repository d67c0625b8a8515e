"""Database models: sandboxes, their events, API keys, secrets, egress log, domains,
snapshots, volumes and drives and their attachments."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime as _DateTime
from sqlalchemy.types import TypeDecorator


def now() -> datetime:
    return datetime.now(UTC)


class DateTime(TypeDecorator):
    """UTC timestamps that come back timezone-aware (SQLite keeps no offset)."""

    impl = _DateTime
    cache_ok = True

    def __init__(self, timezone: bool = True):
        super().__init__(timezone=timezone)

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    template: Mapped[str] = mapped_column(String(64))
    # the template's content address it started from (None: before templates had one)
    template_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    # the snapshot it was created from or last restored to (None: from a template)
    snapshot_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    cpu: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_mb: Mapped[int] = mapped_column(Integer)
    env: Mapped[dict] = mapped_column(JSON, default=dict)
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    pooled: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # standby: seconds without activity before standby, then before hibernation; 0 = never
    standby_after: Mapped[float] = mapped_column(Float, default=15.0)
    hibernate_after: Mapped[float] = mapped_column(Float, default=600.0)
    ttl: Mapped[float | None] = mapped_column(Float, nullable=True)  # maximum age, seconds
    idle_ttl: Mapped[float | None] = mapped_column(Float, nullable=True)
    expire_action: Mapped[str] = mapped_column(String(16), default="delete")
    last_active_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                            nullable=True)
    # metering carried across cgroup lifetimes (a restore makes a new cgroup)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    memory_gib_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # egress policy ({"egress", "allow", "deny"}), granted secrets ({env: {secret,
    # placeholder}}) and exposed ports ({"8000": {"public": bool}})
    network: Mapped[dict] = mapped_column(JSON, default=dict)
    secrets: Mapped[dict] = mapped_column(JSON, default=dict)
    ports: Mapped[dict] = mapped_column(JSON, default=dict)
    # what each front door keeps of the sandbox ({"e2b": {...}}), set through the engine
    doors: Mapped[dict] = mapped_column(JSON, default=dict)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(ForeignKey("sandboxes.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def scope(self) -> str:
        """"admin" (manages keys and secrets) or "user"; the `admin` column holds it."""
        return "admin" if self.admin else "user"


class SecretRow(Base):
    """A credential the egress proxy injects; the value is encrypted (see engine/secrets.py)
    and never leaves the server through the API."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    allowed_hosts: Mapped[list] = mapped_column(JSON, default=list)
    inject_body: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class EgressRow(Base):
    """One egress connection (or one HTTP request, when the proxy sees requests)."""

    __tablename__ = "egress_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    protocol: Mapped[str] = mapped_column(String(16))  # http | connect | socks | dns | tls
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    allowed: Mapped[bool] = mapped_column(Boolean)
    rule: Mapped[str] = mapped_column(Text)
    bytes_up: Mapped[int] = mapped_column(Integer, default=0)
    bytes_down: Mapped[int] = mapped_column(Integer, default=0)
    secrets: Mapped[list] = mapped_column(JSON, default=list)  # names injected
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)


class DomainRow(Base):
    """A custom domain routed to a sandbox port by the preview listener."""

    __tablename__ = "domains"

    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    sandbox_id: Mapped[str] = mapped_column(String(32), index=True)
    port: Mapped[int] = mapped_column(Integer)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class SnapshotRow(Base):
    """A live sandbox's state kept as a template in the store (engine/snapshots.py)."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    sandbox_id: Mapped[str] = mapped_column(String(32), index=True)  # no FK: outlives it
    template_digest: Mapped[str] = mapped_column(String(80), index=True)
    source_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    memory: Mapped[bool] = mapped_column(Boolean)
    bytes: Mapped[int] = mapped_column(BigInteger)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class VolumeRow(Base):
    """A volume (kind "volume": one writer or many readers, mounted at a sandbox's start)
    or a drive (kind "drive": read-write in many sandboxes, attached to running ones): an
    ext4 image of `size_mb` on the host, outliving every sandbox that used it."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("kind", "name", name="uq_volumes_kind_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # volume | drive
    size_mb: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class AttachmentRow(Base):
    """A volume or drive a sandbox uses, at `path` inside it; gone with the sandbox."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(ForeignKey("sandboxes.id"), index=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"), index=True)
    path: Mapped[str] = mapped_column(String(255))
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
