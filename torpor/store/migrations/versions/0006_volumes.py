"""Volumes and drives, and the sandboxes that use them (attachments).

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size_mb", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        # a volume and a drive may share a name; two of one kind may not
        sa.UniqueConstraint("kind", "name", name="uq_volumes_kind_name"),
    )
    op.create_table(
        "attachments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sandbox_id", sa.String(32), sa.ForeignKey("sandboxes.id"),
                  nullable=False, index=True),
        sa.Column("volume_id", sa.String(32), sa.ForeignKey("volumes.id"), nullable=False,
                  index=True),
        sa.Column("path", sa.String(255), nullable=False),
        sa.Column("read_only", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("attachments")
    op.drop_table("volumes")
