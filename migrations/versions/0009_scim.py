"""SCIM 2.0: the users and groups that identity providers provision (producer/scim/).

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scim_users",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_name", sa.String(200), nullable=False),
        sa.Column("user_name_key", sa.String(200), nullable=False),
        sa.Column("external_id", sa.String(300), nullable=True),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("resource", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scim_users"),
        sa.UniqueConstraint("user_name_key", name="uq_scim_users_user_name_key"),
    )
    op.create_index("ix_scim_users_external_id", "scim_users", ["external_id"])
    op.create_index("ix_scim_users_user_id", "scim_users", ["user_id"])
    op.create_table(
        "scim_groups",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("display_name", sa.String(300), nullable=False),
        sa.Column("display_name_key", sa.String(300), nullable=False),
        sa.Column("external_id", sa.String(300), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scim_groups"),
        sa.UniqueConstraint("display_name_key", name="uq_scim_groups_display_name_key"),
    )
    op.create_index("ix_scim_groups_external_id", "scim_groups", ["external_id"])
    op.create_table(
        "scim_members",
        sa.Column("group_id", sa.String(36), nullable=False),
        sa.Column("user_scim_id", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["scim_groups.id"],
            name="fk_scim_members_group_id_scim_groups",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_scim_id"],
            ["scim_users.id"],
            name="fk_scim_members_user_scim_id_scim_users",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "user_scim_id", name="pk_scim_members"),
    )
    op.create_index("ix_scim_members_user_scim_id", "scim_members", ["user_scim_id"])


def downgrade() -> None:
    op.drop_table("scim_members")
    op.drop_table("scim_groups")
    op.drop_table("scim_users")
