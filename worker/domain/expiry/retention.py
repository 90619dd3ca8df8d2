"""The sweep's retention phase (``TOKENWARDEN_RETENTION_DAYS``): dead tokens deleted.

Tokens that stopped working more than that many days ago are deleted, audited, in windows of
``batch`` primary keys; a pass over the table resumes where the previous run stopped, and
starts at most once a day.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Final

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.expiry.audit_rows import audit_row, insert_audit_rows
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next
from tokenwarden.worker.domain.expiry.cursors import move_cursor, read_cursor
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.models import Token, TokenReminder

RETENTION_CURSOR: Final = "retention"
# A retention pass over the whole table starts at most this often.
RETENTION_PASS_EVERY: Final = timedelta(days=1)


def purge_batch(
    session: Session, *, now: datetime, retention_days: int, limit: int
) -> tuple[int, bool]:
    """Delete dead tokens older than the retention in the next window of ids.

    Returns (deleted, more): ``more`` is False once the current pass reached the end of the
    table, or when no pass is due. Windows of primary keys keep each transaction to ``limit``
    rows without an index on ``revoked_at`` that every revocation would have to maintain.
    """
    position, started = read_cursor(session, RETENTION_CURSOR, now=now)
    if position is None:
        if started is not None and now - started < RETENTION_PASS_EVERY:
            return 0, False
        position, started = "", now
    window = select(Token.id).where(Token.id > position).order_by(Token.id)
    upper = session.scalar(window.offset(limit - 1).limit(1))
    in_window = [Token.id > position] + ([Token.id <= upper] if upper is not None else [])
    cutoff = now - timedelta(days=retention_days)
    rows = session.execute(
        delete(Token)
        .where(*in_window, Token.revoked_at.is_not(None), Token.revoked_at < cutoff)
        .returning(Token.id, Token.org_id, Token.user_id, Token.revoked_at, Token.revoke_reason)
        .execution_options(synchronize_session=False)
    ).all()
    if rows:
        session.execute(
            delete(TokenReminder).where(TokenReminder.token_id.in_([row.id for row in rows]))
        )
        insert_audit_rows(
            session,
            [
                audit_row(
                    row,
                    at=now,
                    action="delete",
                    reason="retention",
                    detail={
                        "revoke_reason": row.revoke_reason,
                        "revoked_at": row.revoked_at.isoformat(),
                        "retention_days": retention_days,
                    },
                )
                for row in rows
            ],
        )
    move_cursor(session, RETENTION_CURSOR, position=upper, now=now, pass_started_at=started)
    return len(rows), upper is not None


def purge_all(
    run: BudgetedRun[SweepResult], *, now: datetime, batch: int, retention_days: int
) -> bool:
    """Go on with the retention pass, ``batch`` ids a transaction; True once it is over."""
    run.stats.phase = "retain"

    def purged(outcome: tuple[int, bool]) -> Next:
        deleted, more = outcome
        run.stats.deleted += deleted
        return Next.more_if(more)

    return run.batches(
        partial(purge_batch, now=now, retention_days=retention_days, limit=batch), purged
    )
