"""Standby and hibernation: idle timers, expiry, metering counters.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        b.add_column(sa.Column("standby_after", sa.Float, nullable=False, server_default="15"))
        b.add_column(sa.Column("hibernate_after", sa.Float, nullable=False,
                               server_default="600"))
        b.add_column(sa.Column("ttl", sa.Float, nullable=True))
        b.add_column(sa.Column("idle_ttl", sa.Float, nullable=True))
        b.add_column(sa.Column("expire_action", sa.String(16), nullable=False,
                               server_default="delete"))
        b.add_column(sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("cpu_seconds", sa.Float, nullable=False, server_default="0"))
        b.add_column(sa.Column("memory_gib_seconds", sa.Float, nullable=False,
                               server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        for c in ("standby_after", "hibernate_after", "ttl", "idle_ttl", "expire_action",
                  "last_active_at", "cpu_seconds", "memory_gib_seconds"):
            b.drop_column(c)
