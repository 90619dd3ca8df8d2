"""Rotation: tokens of one rotation chain form a family; a rotated-away token keeps working
until the end of its overlap, then stops (reason ``rotated``).

``family_id`` names the chain (the first token's id), ``replaced_by`` the successor,
``overlap_ends_at`` when the predecessor stops. They are written in the transaction that
issues the successor, so no successor exists without its predecessor's overlap recorded. On
Postgres a rotation also sends ``NOTIFY tokenwarden_revocations``: an API process that cached
the old token's answer forgets it and reads the overlap's end.

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TRIGGER = """
CREATE TRIGGER tokenwarden_token_rotated
    AFTER UPDATE OF replaced_by ON tokens
    FOR EACH ROW
    WHEN (OLD.replaced_by IS NULL AND NEW.replaced_by IS NOT NULL)
    EXECUTE FUNCTION tokenwarden_notify_token_revoked();
"""


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("family_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("replaced_by", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("overlap_ends_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_tokens_family_id", ["family_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS tokenwarden_token_rotated ON tokens")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_index("ix_tokens_family_id")
        batch.drop_column("overlap_ends_at")
        batch.drop_column("replaced_by")
        batch.drop_column("family_id")
