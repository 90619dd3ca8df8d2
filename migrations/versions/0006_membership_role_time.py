"""Memberships: the time of the event that set the role, apart from the time of the last
join, removal or deactivation, so that a role change neither makes a member nor outdates a
removal; that time is empty until a join, removal or deactivation is seen.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column(
            "last_event_at", existing_type=sa.DateTime(timezone=True), nullable=True
        )
    # Until now one time served both: the role dates from the last event applied at most.
    op.execute("UPDATE memberships SET role_at = last_event_at")


def downgrade() -> None:
    # A membership known only from a role change has no join, removal or deactivation time.
    op.execute(
        "UPDATE memberships SET last_event_at = role_at "
        "WHERE last_event_at IS NULL AND role_at IS NOT NULL"
    )
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.alter_column(
            "last_event_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )
        batch_op.drop_column("role_at")
