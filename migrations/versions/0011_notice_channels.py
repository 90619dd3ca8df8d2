"""Notice channels: each notice's emails per recipient, and the webhook endpoint's health.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_table(
        "notice_emails",
        sa.Column("notice_id", sa.String(length=40), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["notice_id"],
            ["notices.id"],
            name=op.f("fk_notice_emails_notice_id_notices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("notice_id", "address", name=op.f("pk_notice_emails")),
    )
    with op.batch_alter_table("notice_emails", schema=None) as batch_op:
        batch_op.create_index(
            "ix_notice_emails_due",
            ["next_attempt_at"],
            unique=False,
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        )
        batch_op.create_index(
            batch_op.f("ix_notice_emails_status_created_at"),
            ["status", "created_at"],
            unique=False,
        )
    op.create_table(
        "webhook_endpoints",
        sa.Column("url_hash", sa.String(length=64), nullable=False),
        sa.Column("receiver", sa.String(length=300), nullable=False),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("url_hash", name=op.f("pk_webhook_endpoints")),
    )


def downgrade() -> None:
    op.drop_table("webhook_endpoints")
    with op.batch_alter_table("notice_emails", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notice_emails_status_created_at"))
        batch_op.drop_index("ix_notice_emails_due", postgresql_where=PENDING, sqlite_where=PENDING)
    op.drop_table("notice_emails")
