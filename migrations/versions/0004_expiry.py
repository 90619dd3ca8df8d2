"""Expiry: reminders sent per token and bucket, job cursors, the sweep's audit index.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "token_reminders",
        sa.Column("token_id", sa.String(length=40), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notice_id", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("token_id", "days", name=op.f("pk_token_reminders")),
    )
    op.create_table(
        "job_cursors",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("position", sa.String(length=200), nullable=True),
        sa.Column("pass_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_cursors")),
    )
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.create_index(
            "ix_audit_expire",
            ["id"],
            unique=False,
            postgresql_where=sa.text("action = 'expire'"),
            sqlite_where=sa.text("action = 'expire'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_audit_expire",
            postgresql_where=sa.text("action = 'expire'"),
            sqlite_where=sa.text("action = 'expire'"),
        )
    op.drop_table("job_cursors")
    op.drop_table("token_reminders")
