"""The sweep's second phase: "expired" notices, written from the sweep's audit rows.

Notices are written from the audit rows with ``action = 'expire'`` past a cursor kept in
``job_cursors``; the notices and the cursor's new position commit together, so each token is
in exactly one notice. Writing notices apart from the expire phase keeps that phase's
transactions short whatever the number of owners involved.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import notices
from tokenwarden.worker.domain.expiry.audit_rows import EXPIRED
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next
from tokenwarden.worker.domain.expiry.cursors import move_cursor, read_cursor
from tokenwarden.worker.domain.expiry.grouped_notices import (
    GROUPS_PER_TRANSACTION,
    NOTICE_ROWS,
    TOKEN_COLUMNS,
    AnyRow,
    GroupKey,
    group_of,
    new_notice_ids,
    queue_grouped,
)
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.models import AuditEntry, Token

NOTICE_CURSOR: Final = "expired_notices"


def notify_expired_batch(session: Session, *, now: datetime, limit: int) -> tuple[bool, list[str]]:
    """Queue "expired" notices for the next swept tokens; return (more left, notice ids).

    Reads the sweep's audit rows past the cursor, at most ``limit`` of them, and stops early
    at :data:`GROUPS_PER_TRANSACTION` recipients so the transaction stays short. Audit ids
    only grow from one sweep batch to the next (one sweep at a time, each batch committed
    before the next starts), so nothing the sweep wrote is ever behind the cursor.
    """
    position, _ = read_cursor(session, NOTICE_CURSOR, now=now)
    after = int(position) if position else 0
    # The first unread row comes from the partial index whatever the table's statistics say
    # (right after a large sweep they still describe an audit table without those rows),
    # and the read is then a range of ids no longer than ``limit``: a plan mistaken about
    # the row counts cannot turn it into a scan of every row the sweep wrote.
    start = _first_expire_after(session, after)
    if start is None:
        return False, []
    rows = session.execute(
        select(AuditEntry.id.label("audit_id"), *TOKEN_COLUMNS)
        .select_from(AuditEntry)
        # A token deleted by retention before its notice was written is passed over.
        .outerjoin(Token, Token.id == AuditEntry.token_id)
        .where(
            AuditEntry.action == "expire",
            AuditEntry.id >= start,
            AuditEntry.id < start + limit,
        )
        .order_by(AuditEntry.id)
    ).all()
    if not rows:
        return False, []
    taken: list[AnyRow] = []
    groups: set[GroupKey] = set()
    last = after
    cut = False
    for row in rows:
        if row.id is not None:
            key = group_of(row)
            if key not in groups and len(groups) == GROUPS_PER_TRANSACTION:
                cut = True
                break
            groups.add(key)
            taken.append(row)
        last = row.audit_id
    queued = queue_grouped(
        session,
        taken,
        kind=notices.EXPIRED,
        data={"reason": EXPIRED, "expired_at": now.isoformat()},
        now=now,
        dedupe_prefix="expired",
    )
    move_cursor(session, NOTICE_CURSOR, position=str(last), now=now)
    more = cut or _first_expire_after(session, last) is not None
    return more, new_notice_ids(session, queued)


def _first_expire_after(session: Session, after: int) -> int | None:
    # min() over the partial index: one index entry read, whatever the statistics say.
    return session.scalar(
        select(func.min(AuditEntry.id)).where(AuditEntry.action == "expire", AuditEntry.id > after)
    )


def notify_all(run: BudgetedRun[SweepResult], *, now: datetime, batch: int) -> bool:
    """Queue and publish the notices of every token swept so far; True once all are."""
    run.stats.phase = "notify"

    def notified(outcome: tuple[bool, list[str]]) -> Next:
        more, notice_ids = outcome
        run.queued(notice_ids)
        return Next.more_if(more)

    return run.batches(
        partial(notify_expired_batch, now=now, limit=min(batch, NOTICE_ROWS)), notified
    )
