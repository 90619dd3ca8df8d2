"""The sweep's first phase: live tokens past their expiry are marked expired and audited.

Tokens with ``expires_at <= now`` get ``revoked_at=now, revoke_reason='expired'`` in batches,
with one ``expire`` audit row per token in the same transaction. A routine run walks the
partial index ``ix_tokens_live_expiry`` in keyset batches on ``(expires_at, id)``; a large
backlog on Postgres is swept along the table instead (:mod:`.table_walk`). On Postgres one
statement marks and audits a batch, so its rows never reach Python; on SQLite only their ids
and owners do.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, Select, any_, func, insert, literal, select, tuple_, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.expiry.audit_rows import (
    EXPIRED,
    SOURCE,
    audit_row,
    insert_audit_rows,
)
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.expiry.table_walk import expire_along_table, table_walk_pages
from tokenwarden.worker.domain.models import AuditEntry, Token, UTCDateTime


@dataclass(frozen=True)
class ExpiredBatch:
    count: int
    # The greatest (expires_at, id) marked: where the next batch's keyset starts.
    last: tuple[datetime, str] | None


def expire_batch(
    session: Session, *, now: datetime, after: tuple[datetime, str] | None, limit: int
) -> ExpiredBatch:
    """Mark the next ``limit`` live tokens past their expiry as expired; audit them.

    The keyset ``after`` starts the index scan past the previous batch instead of re-walking
    the entries that batch left behind (on Postgres the index keeps them until vacuum).
    """
    due = select(Token.id).where(Token.revoked_at.is_(None), Token.expires_at <= now)
    if after is not None:
        due = due.where(tuple_(Token.expires_at, Token.id) > after)
    due = due.order_by(Token.expires_at, Token.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        return _expire_batch_postgres(session, due, now=now)
    # SQLite: every write transaction holds the database's one write lock (BEGIN IMMEDIATE),
    # so nothing else changes these rows meanwhile.
    rows = session.execute(
        update(Token)
        .where(Token.id.in_(due), Token.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=EXPIRED)
        .returning(Token.id, Token.org_id, Token.user_id, Token.expires_at)
        .execution_options(synchronize_session=False)
    ).all()
    insert_audit_rows(
        session, [audit_row(row, at=now, action="expire", reason=EXPIRED) for row in rows]
    )
    last = max(((row.expires_at, row.id) for row in rows), default=None)
    return ExpiredBatch(len(rows), last)


def _expire_batch_postgres(session: Session, due: Select[str], *, now: datetime) -> ExpiredBatch:
    # SKIP LOCKED: a row that a concurrent revocation holds is left to it (or to the next
    # run) instead of making the sweep wait. The other way round, a revocation of a row in
    # this batch waits only for this one short transaction, never for the whole run.
    # ``id = ANY(ARRAY(subquery))`` keeps the planner on the index for large batches, where
    # ``IN`` or a join switches to a full scan.
    chosen = Token.id == any_(func.array(due.with_for_update(skip_locked=True).scalar_subquery()))
    swept = (
        update(Token)
        .where(chosen, Token.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=EXPIRED)
        .returning(Token.id, Token.org_id, Token.user_id, Token.expires_at)
        .cte("swept")
    )
    # The audit rows are written by the same statement, from the UPDATE's RETURNING: the
    # batch's rows never travel to Python and back.
    logged = insert(AuditEntry).from_select(
        ["at", "action", "reason", "source", "token_id", "org_id", "user_id"],
        select(
            literal(now, UTCDateTime()),
            literal("expire"),
            literal(EXPIRED),
            literal(SOURCE),
            swept.c.id,
            swept.c.org_id,
            swept.c.user_id,
        ),
    )
    row = session.execute(
        select(swept.c.expires_at, swept.c.id, func.count().over().label("total"))
        .add_cte(logged.cte("logged"))
        .order_by(swept.c.expires_at.desc(), swept.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return ExpiredBatch(0, None)
    return ExpiredBatch(row.total, (row.expires_at, row.id))


def count_due(engine: Engine, *, now: datetime) -> int:
    """Live tokens past their expiry (for progress displays)."""
    with engine.connect().execution_options(**{db.READ_ONLY: True}) as connection:
        return int(
            connection.scalar(
                select(func.count())
                .select_from(Token)
                .where(Token.revoked_at.is_(None), Token.expires_at <= now)
            )
            or 0
        )


def expire_all(run: BudgetedRun[SweepResult], *, now: datetime, batch: int) -> bool:
    """Mark the tokens due at ``now``, ``batch`` a transaction; True once none is left."""
    run.stats.phase = "expire"
    if run.engine.dialect.name == "postgresql":
        backlog = table_walk_pages(run.engine, now=now, batch=batch)
        if backlog is not None:
            pages, due = backlog
            return expire_along_table(run, now=now, batch=batch, pages=pages, due=due)
    after: tuple[datetime, str] | None = None

    def mark(session: Session) -> ExpiredBatch:
        return expire_batch(session, now=now, after=after, limit=batch)

    def marked(outcome: ExpiredBatch) -> Next:
        nonlocal after
        run.stats.swept += outcome.count
        after = outcome.last
        return Next.more_if(outcome.count >= batch)

    return run.batches(mark, marked)
