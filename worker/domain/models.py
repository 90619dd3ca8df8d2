"""The token store: memberships, tokens and the audit trail.

The schema is created and changed only by the Alembic migrations in ``migrations/``; these
models describe it for queries. Times are stored as UTC on both SQLite and Postgres.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tokenwarden.worker.domain.clock import as_utc

# The enums live in worker.domain.kinds (no SQLAlchemy); the modules that name them with the
# models import them from here.
from tokenwarden.worker.domain.kinds import EventStatus as EventStatus  # noqa: PLC0414
from tokenwarden.worker.domain.kinds import NoticeStatus as NoticeStatus  # noqa: PLC0414
from tokenwarden.worker.domain.kinds import Role as Role  # noqa: PLC0414
from tokenwarden.worker.domain.kinds import TokenKind as TokenKind  # noqa: PLC0414


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; UTC in the database whatever its time zone support."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(DateTime(timezone=False))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


# The predicates of the partial indexes, by index name, for Postgres (see partial_index).
_POSTGRES_WHERE: dict[str, str] = {}


def partial_index(name: str, *columns: Any, where: str) -> Index:
    """An index of the rows ``where`` holds, on SQLite and Postgres alike.

    The migrations create these indexes; the models describe them. SQLite's predicate is
    declared here, Postgres's by :func:`describe_postgres_indexes` when a Postgres engine is
    made: declaring it here would load SQLAlchemy's Postgres dialect (some 40 ms) in every
    command on the embedded default, which never uses it.
    """
    _POSTGRES_WHERE[name] = where
    return Index(name, *columns, sqlite_where=text(where))


def describe_postgres_indexes() -> None:
    """Give the partial indexes their Postgres predicates (once; later calls change nothing)."""
    for table in Base.metadata.tables.values():
        for index in table.indexes:
            where = _POSTGRES_WHERE.get(str(index.name))
            if where is None:
                continue
            options = index.dialect_options["postgresql"]
            if options["where"] is None:
                options["where"] = text(where)


class Membership(Base):
    __tablename__ = "memberships"

    org_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    email: Mapped[str | None] = mapped_column(String(320))
    active: Mapped[bool] = mapped_column(Boolean)
    # Start of the current active period: a late removal spares tokens issued from then on.
    active_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Time of the newest join, removal or deactivation applied to this row; an older one is
    # stale. None while only role changes are known: a role change never makes a member.
    last_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Time of the event that set ``role`` (a join or a role change); an older one leaves it.
    role_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index(None, "user_id"),
        # An organization's admins, whom its notices name (notices.admins_of).
        Index(None, "org_id", "role"),
    )


class UserDeactivation(Base):
    """The newest platform-wide deactivation of a user.

    ``user.deactivated`` ends the memberships that exist when it is applied; this row keeps
    its time for the ones that appear later, so that an older ``membership.added`` or
    ``membership.role_changed`` arriving after it is stale instead of making the user
    active again.
    """

    __tablename__ = "user_deactivations"

    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    deactivated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    event_id: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    org_id: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[str | None] = mapped_column(String(200))
    app_id: Mapped[str | None] = mapped_column(String(200))
    created_by: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last4: Mapped[str] = mapped_column(String(4))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoke_reason: Mapped[str | None] = mapped_column(String(32))
    # Rotation (worker/domain/rotation.py): the chain's first token, the successor, and when
    # this token stops working once rotated away.
    family_id: Mapped[str | None] = mapped_column(String(40))
    replaced_by: Mapped[str | None] = mapped_column(String(40))
    overlap_ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index(None, "org_id", "user_id"),
        # The application tokens a departing member created (worker.domain.orphans).
        Index(None, "org_id", "created_by"),
        Index(None, "family_id"),
        Index(None, "user_id"),
        # Live tokens by expiry: what the sweep and the reminders walk.
        partial_index(
            "ix_tokens_live_expiry",
            "expires_at",
            "id",
            where="revoked_at IS NULL",
        ),
    )

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "expired" if self.revoke_reason == "expired" else "revoked"
        return "active"


class TokenUsage(Base):
    """When a token was last seen in use, to the minute (written in batches by the API).

    A table of its own so that recording a use never locks the ``tokens`` row a revocation
    updates.
    """

    __tablename__ = "token_usage"

    token_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("tokens.id", ondelete="CASCADE"), primary_key=True
    )
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TokenIdleWarning(Base):
    """The idle warning sent for a token, and the last use (or creation) it was about: a use
    after that starts a new idle period, which is warned of again."""

    __tablename__ = "token_idle_warnings"

    token_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("tokens.id", ondelete="CASCADE"), primary_key=True
    )
    idle_since: Mapped[datetime] = mapped_column(UTCDateTime())
    warned_at: Mapped[datetime] = mapped_column(UTCDateTime())
    notice_id: Mapped[str | None] = mapped_column(String(40))


def _serial_key() -> Mapped[int]:
    """A 64-bit key numbered by the database; on SQLite an INTEGER, the only type it
    numbers itself."""
    return mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )


class AuditEntry(Base):
    __tablename__ = "audit"

    id: Mapped[int] = _serial_key()
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    action: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(64))
    token_id: Mapped[str | None] = mapped_column(String(40))
    org_id: Mapped[str | None] = mapped_column(String(200))
    user_id: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(500))
    actor: Mapped[str | None] = mapped_column(String(200))
    event_id: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (
        Index(None, "token_id"),
        Index(None, "org_id", "user_id"),
        Index(None, "user_id"),
        Index(None, "event_id"),
    )


class InboxEvent(Base):
    """One accepted CloudEvent; stored before the queue carries its id (the outbox pattern)."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(500))
    time: Mapped[datetime] = mapped_column(UTCDateTime())
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    digest: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(1000))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        # Pending events by last publication: what the re-drive walks.
        partial_index(
            "ix_events_pending",
            "published_at",
            where="status = 'pending'",
        ),
        Index(None, "status", "received_at"),
        # Finished (done or dead) events by when they finished: what the retention deletes.
        partial_index(
            "ix_events_finished",
            "finished_at",
            where="finished_at IS NOT NULL",
        ),
    )


class DeadLetter(Base):
    """A queue message the worker could not use, kept with the reason."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = _serial_key()
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[str] = mapped_column(String(1000))
    event_id: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[str | None] = mapped_column(String(4000))

    # By age: what the retention deletes.
    __table_args__ = (Index(None, "at"),)


class Notice(Base):
    """One message a person must hear about, written in the transaction that caused it.

    The id is the Standard Webhooks ``webhook-id`` of every delivery attempt, and ``body``
    the exact bytes posted, so a receiver can drop a duplicate delivery.
    """

    __tablename__ = "notices"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    org_id: Mapped[str | None] = mapped_column(String(200))
    recipients: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # When the next attempt may start; also the lease a delivering worker holds.
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    event_id: Mapped[str | None] = mapped_column(String(200))
    # Keeps a cause from producing the same notice twice (e.g. one reminder bucket per token).
    dedupe_key: Mapped[str | None] = mapped_column(String(300), unique=True)

    __table_args__ = (
        partial_index(
            "ix_notices_due",
            "next_attempt_at",
            where="status = 'pending'",
        ),
        Index(None, "status", "created_at"),
    )


class NoticeEmail(Base):
    """The email channel of one notice for one recipient: its own status, attempts and lease.

    Written with the notice, one row per recipient that has an address. The webhook channel's
    state is the notice row itself.
    """

    __tablename__ = "notice_emails"

    notice_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("notices.id", ondelete="CASCADE"), primary_key=True
    )
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # When the next attempt may start; also the lease a sending worker holds.
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        partial_index(
            "ix_notice_emails_due",
            "next_attempt_at",
            where="status = 'pending'",
        ),
        Index(None, "status", "created_at"),
    )


class WebhookEndpoint(Base):
    """How a webhook URL has been answering: failing since when, and disabled or not.

    Keyed by a hash of the URL (which may hold the receiver's secrets); a new URL starts
    afresh.
    """

    __tablename__ = "webhook_endpoints"

    url_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    receiver: Mapped[str] = mapped_column(String(300))
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(1000))
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TokenReminder(Base):
    """A pre-expiry reminder sent for a token at one of the reminder days; sent once only."""

    __tablename__ = "token_reminders"

    token_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    days: Mapped[int] = mapped_column(Integer, primary_key=True)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime())
    notice_id: Mapped[str | None] = mapped_column(String(40))


class JobCursor(Base):
    """Where a resumable job stopped, so that its next run continues from there."""

    __tablename__ = "job_cursors"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The last key processed; None when no pass is under way.
    position: Mapped[str | None] = mapped_column(String(200))
    pass_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


# The sweep's audit rows in order: the "expired" notices are written from them, after the
# sweep's batches, so notices never lengthen a batch's transaction.
partial_index(
    "ix_audit_expire",
    AuditEntry.id,
    where="action = 'expire'",
)


class ScimUser(Base):
    """A user as an identity provider provisioned it over SCIM (producer/scim/).

    ``user_id`` is tokenwarden's user id, the ``userName`` at creation; it never changes, so a
    rename in the identity provider keeps the user's memberships and tokens.
    """

    __tablename__ = "scim_users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(200))
    # userName is unique case-insensitively (RFC 7643 §4.1.1): its lower-case form is the key.
    user_name_key: Mapped[str] = mapped_column(String(200), unique=True)
    external_id: Mapped[str | None] = mapped_column(String(300), index=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    active: Mapped[bool] = mapped_column(Boolean)
    resource: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ScimGroup(Base):
    __tablename__ = "scim_groups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(300))
    display_name_key: Mapped[str] = mapped_column(String(300), unique=True)
    external_id: Mapped[str | None] = mapped_column(String(300), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ScimMember(Base):
    __tablename__ = "scim_members"

    group_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("scim_groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_scim_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("scim_users.id", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index(None, "user_scim_id"),)
