"""What a front door keeps of a sandbox of its own (the E2B door's access token, its
pause and resume settings): one JSON object per door, on the sandbox's record.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        b.add_column(sa.Column("doors", sa.JSON, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        b.drop_column("doors")
