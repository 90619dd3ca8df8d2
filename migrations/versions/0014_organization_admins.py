"""Memberships by organization and role: the admins a notice goes to.

Every offboarding and orphaned-token notice names its organization's active admins. Found
through the primary key, that read every membership of the organization, each batch of
removals every membership of each organization it touched.

Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_memberships_org_id_role", "memberships", ["org_id", "role"])


def downgrade() -> None:
    op.drop_index("ix_memberships_org_id_role", table_name="memberships")
