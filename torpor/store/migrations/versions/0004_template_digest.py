"""Templates addressed by content: the digest a sandbox started from.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        # NULL: a sandbox from before (its template is the `template` name, as then)
        b.add_column(sa.Column("template_digest", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        b.drop_column("template_digest")
