"""Tokens by their creator in an organization: the application tokens a leaver leaves behind.

A departure (``membership.removed``, ``user.deactivated``) looks up the live application
tokens its user created in the organization left. Without this index each departure, and each
batch of them, read the whole token table.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_tokens_org_id_created_by", "tokens", ["org_id", "created_by"])


def downgrade() -> None:
    op.drop_index("ix_tokens_org_id_created_by", table_name="tokens")
