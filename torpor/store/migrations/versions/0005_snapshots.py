"""Snapshots: a live sandbox's filesystem (and memory) kept as a template in the store.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=True),
        # no foreign key: a snapshot outlives its source
        sa.Column("sandbox_id", sa.String(32), nullable=False, index=True),
        # the template in the store that holds it (its digest) and the one its source
        # started from (a restore in place is only allowed between compatible ones)
        sa.Column("template_digest", sa.String(80), nullable=False, index=True),
        sa.Column("source_digest", sa.String(80), nullable=True),
        sa.Column("memory", sa.Boolean, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("detail", sa.JSON, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("sandboxes") as b:
        # the snapshot a sandbox was created from or last restored to (None: a template)
        b.add_column(sa.Column("snapshot_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        b.drop_column("snapshot_id")
    op.drop_table("snapshots")
