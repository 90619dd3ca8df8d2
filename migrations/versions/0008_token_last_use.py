"""Last use of each token, and (on Postgres) a notice on every revocation for the API caches.

``token_usage`` is a table of its own, not a column of ``tokens``: the API records uses in
batches, and an upsert there never takes the lock of a ``tokens`` row that a revocation needs
(its foreign key check takes ``KEY SHARE``, which a revocation's ``UPDATE`` does not wait for).

On Postgres, triggers send ``NOTIFY tokenwarden_revocations`` in the very transaction that
revokes a token, ends a membership or changes a member's role, whichever code path does it
(one at a time, set-based removals, deactivations): each API process listens and drops the
answers it cached (producer/revocation_feed.py). A token marked expired by the sweep is not
announced: an answer is never served past the token's own ``expires_at`` anyway, and the sweep
would otherwise queue one notice per expired row.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "tokenwarden_revocations"

_FUNCTIONS = f"""
CREATE FUNCTION tokenwarden_notify_token_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', json_build_object('token_id', NEW.id)::text);
    RETURN NULL;
END $$;

CREATE FUNCTION tokenwarden_notify_membership_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        '{CHANNEL}', json_build_object('org_id', OLD.org_id, 'user_id', OLD.user_id)::text
    );
    RETURN NULL;
END $$;
"""

_TRIGGERS = """
CREATE TRIGGER tokenwarden_token_revoked
    AFTER UPDATE OF revoked_at ON tokens
    FOR EACH ROW
    WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL
          AND NEW.revoke_reason IS DISTINCT FROM 'expired')
    EXECUTE FUNCTION tokenwarden_notify_token_revoked();

CREATE TRIGGER tokenwarden_membership_changed
    AFTER UPDATE ON memberships
    FOR EACH ROW
    WHEN (OLD.active IS DISTINCT FROM NEW.active OR OLD.role IS DISTINCT FROM NEW.role)
    EXECUTE FUNCTION tokenwarden_notify_membership_changed();

CREATE TRIGGER tokenwarden_membership_deleted
    AFTER DELETE ON memberships
    FOR EACH ROW
    EXECUTE FUNCTION tokenwarden_notify_membership_changed();
"""


def upgrade() -> None:
    op.create_table(
        "token_usage",
        sa.Column("token_id", sa.String(length=40), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["tokens.id"],
            name=op.f("fk_token_usage_token_id_tokens"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_token_usage")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_FUNCTIONS)
        op.execute(_TRIGGERS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS tokenwarden_membership_deleted ON memberships")
        op.execute("DROP TRIGGER IF EXISTS tokenwarden_membership_changed ON memberships")
        op.execute("DROP TRIGGER IF EXISTS tokenwarden_token_revoked ON tokens")
        op.execute("DROP FUNCTION IF EXISTS tokenwarden_notify_membership_changed()")
        op.execute("DROP FUNCTION IF EXISTS tokenwarden_notify_token_revoked()")
    op.drop_table("token_usage")
