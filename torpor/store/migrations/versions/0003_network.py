"""Network: egress policy, secrets, the egress log, custom preview domains.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as b:
        b.add_column(sa.Column("network", sa.JSON, nullable=False, server_default="{}"))
        b.add_column(sa.Column("secrets", sa.JSON, nullable=False, server_default="{}"))
        b.add_column(sa.Column("ports", sa.JSON, nullable=False, server_default="{}"))
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("allowed_hosts", sa.JSON, nullable=False),
        sa.Column("inject_body", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "egress_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sandbox_id", sa.String(32), nullable=False, index=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("address", sa.String(64), nullable=True),
        sa.Column("method", sa.String(16), nullable=True),
        sa.Column("path", sa.Text, nullable=True),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("allowed", sa.Boolean, nullable=False),
        sa.Column("rule", sa.Text, nullable=False),
        sa.Column("bytes_up", sa.Integer, nullable=False),
        sa.Column("bytes_down", sa.Integer, nullable=False),
        sa.Column("secrets", sa.JSON, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
    )
    op.create_table(
        "domains",
        sa.Column("domain", sa.String(255), primary_key=True),
        sa.Column("sandbox_id", sa.String(32), nullable=False, index=True),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("domains")
    op.drop_table("egress_log")
    op.drop_table("secrets")
    with op.batch_alter_table("sandboxes") as b:
        for c in ("network", "secrets", "ports"):
            b.drop_column(c)
