"""Pre-expiry reminders: owners are warned at each of ``TOKENWARDEN_REMINDER_DAYS`` before expiry.

With days 60, 30 and 7, a token is in bucket 7 while it has at most 7 days left, in bucket 30
with more than 7 and at most 30, in bucket 60 with more than 30 and at most 60. A run sends
each live token the reminder of the bucket it is in now, unless it already had that one or a
nearer one: so a token created with 20 days left gets the 30-day reminder and later the 7-day
one, never the 60-day one, and a run that missed a day sends only the nearest.

``token_reminders`` holds one row per token and bucket sent, written in the transaction that
queues the notice, so a rerun (the same day, or a second scheduler) sends nothing twice.

Per bucket, a run first reads which tokens are due, in recipient order (one query over the
bucket's window of the live-expiry index, for up to :data:`DUE_PER_READ` tokens), then sends
them in short transactions (the budgeted loop of :mod:`.budget`) of at most
:data:`~.grouped_notices.GROUPS_PER_TRANSACTION` recipients, never splitting a recipient's
tokens between two transactions (unless they are too many for one), so that a recipient gets
one notice per bucket listing up to :data:`~.grouped_notices.TOKENS_PER_NOTICE` tokens. Each
transaction checks again that its tokens are live and not yet reminded.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Final

from sqlalchemy import ColumnElement, Engine, func, insert, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import db, notices
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next, Publish, run_exclusive
from tokenwarden.worker.domain.expiry.grouped_notices import (
    GROUPS_PER_TRANSACTION,
    NOTICE_ROWS,
    TOKEN_COLUMNS,
    TOKENS_PER_NOTICE,
    AnyRow,
    group_of,
    new_notice_ids,
    queue_grouped,
)
from tokenwarden.worker.domain.expiry.results import ReminderResult
from tokenwarden.worker.domain.models import Token, TokenReminder

REMIND_LOCK: Final = "remind"
# Due tokens read at once: every token entering a bucket on a given day in one read, and a
# bounded list for the backlog of a first run on a large store.
DUE_PER_READ: Final = 20_000


def buckets(days: Sequence[int]) -> list[tuple[int, int]]:
    """``(days, previous)`` for each bucket, nearest first: bucket ``days`` covers tokens with
    more than ``previous`` and at most ``days`` days left."""
    ordered = sorted(set(days))
    return [(d, ordered[i - 1] if i else 0) for i, d in enumerate(ordered)]


def _due(*, now: datetime, days: int, previous: int) -> list[ColumnElement[bool]]:
    """Live tokens in the bucket's window without this reminder or a nearer one."""
    already = (
        select(TokenReminder.token_id)
        .where(TokenReminder.token_id == Token.id, TokenReminder.days <= days)
        .exists()
    )
    return [
        Token.revoked_at.is_(None),
        Token.expires_at > now + timedelta(days=previous),
        Token.expires_at <= now + timedelta(days=days),
        ~already,
    ]


def due_tokens(
    session: Session, *, now: datetime, days: int, previous: int, limit: int
) -> list[AnyRow]:
    """Up to ``limit`` tokens due for the ``days`` reminder, in recipient order."""
    return list(
        session.execute(
            select(Token.id, Token.kind, Token.org_id, Token.user_id)
            .where(*_due(now=now, days=days, previous=previous))
            .order_by(Token.org_id, Token.kind, func.coalesce(Token.user_id, ""), Token.id)
            .limit(limit)
        ).all()
    )


def remind_tokens(
    session: Session, *, now: datetime, days: int, previous: int, token_ids: Sequence[str]
) -> tuple[int, list[str]]:
    """Send the ``days`` reminder for those of ``token_ids`` still due; (tokens, notice ids)."""
    rows = session.execute(
        select(*TOKEN_COLUMNS)
        .where(*_due(now=now, days=days, previous=previous), Token.id.in_(token_ids))
        .order_by(Token.id)
    ).all()
    if not rows:
        return 0, []
    queued = queue_grouped(
        session,
        rows,
        kind=notices.EXPIRING,
        data={"days": days, "expires_before": (now + timedelta(days=days)).isoformat()},
        now=now,
        dedupe_prefix=f"expiring:{days}",
    )
    notice_of = {token_id: q.notice_id for q in queued for token_id in q.token_ids}
    session.execute(
        insert(TokenReminder),
        [
            {"token_id": row.id, "days": days, "sent_at": now, "notice_id": notice_of.get(row.id)}
            for row in rows
        ],
    )
    return len(rows), new_notice_ids(session, queued)


def _groups(rows: Sequence[AnyRow]) -> list[list[AnyRow]]:
    """Consecutive rows of the same recipient."""
    found: list[list[AnyRow]] = []
    for row in rows:
        if found and group_of(found[-1][-1]) == group_of(row):
            found[-1].append(row)
        else:
            found.append([row])
    return found


def transactions(rows: Sequence[AnyRow], max_tokens: int) -> Iterator[list[str]]:
    """The token ids of each transaction: whole recipients' groups, a bounded number of them.

    A group larger than ``max_tokens`` is split at multiples of the tokens per notice, so its
    notices list as many tokens as one transaction would have.
    """
    chunk: list[str] = []
    count = 0
    for group in _groups(rows):
        if len(group) > max_tokens:
            if chunk:
                yield chunk
                chunk, count = [], 0
            step = max_tokens // TOKENS_PER_NOTICE * TOKENS_PER_NOTICE or max_tokens
            for start in range(0, len(group), step):
                yield [row.id for row in group[start : start + step]]
            continue
        if chunk and (len(chunk) + len(group) > max_tokens or count == GROUPS_PER_TRANSACTION):
            yield chunk
            chunk, count = [], 0
        chunk += [row.id for row in group]
        count += 1
    if chunk:
        yield chunk


def send_reminders(
    engine: Engine,
    *,
    now: datetime,
    days: Sequence[int],
    batch: int,
    budget_s: float | None = None,
    publish: Publish | None = None,
) -> ReminderResult:
    """Send the reminders due at ``now``, unless another run holds the lock."""
    return run_exclusive(
        engine,
        partial(_remind_all, now=now, days=days, max_tokens=min(batch, NOTICE_ROWS)),
        lock=REMIND_LOCK,
        log_as="reminders",
        stats=ReminderResult,
        batch=batch,
        budget_s=budget_s,
        publish=publish,
    )


def _remind_all(
    run: BudgetedRun[ReminderResult], *, now: datetime, days: Sequence[int], max_tokens: int
) -> bool:
    finished = True
    for bucket, previous in buckets(days):
        finished &= _remind_bucket(
            run, now=now, days=bucket, previous=previous, max_tokens=max_tokens
        )
    return finished


def _remind_bucket(
    run: BudgetedRun[ReminderResult], *, now: datetime, days: int, previous: int, max_tokens: int
) -> bool:
    """One bucket's reminders; False when the budget stopped it with tokens still due.

    Each bucket gets one transaction, then more while the budget lasts, so a backlog in one
    bucket does not hold back the others.
    """
    run.stats.by_days.setdefault(days, 0)
    chunks = _chunks(run.engine, now=now, days=days, previous=previous, max_tokens=max_tokens)
    # A transaction never has an empty list of tokens: [] marks the end of the bucket.
    token_ids = next(chunks, [])
    if not token_ids:
        return True

    def send(session: Session) -> tuple[int, list[str]]:
        return remind_tokens(session, now=now, days=days, previous=previous, token_ids=token_ids)

    def sent(outcome: tuple[int, list[str]]) -> Next:
        nonlocal token_ids
        count, notice_ids = outcome
        run.stats.reminded += count
        run.stats.by_days[days] += count
        run.queued(notice_ids)
        # The next transaction's tokens; past the end of a read, the next read (whether
        # there is more is only known once it is done).
        token_ids = next(chunks, [])
        return Next.more_if(bool(token_ids))

    return run.batches(send, sent)


def _chunks(
    engine: Engine, *, now: datetime, days: int, previous: int, max_tokens: int
) -> Iterator[list[str]]:
    """The token ids of each of a bucket's transactions, read :data:`DUE_PER_READ` at a time."""
    while True:
        # A read-only transaction: on SQLite it does not hold the write lock meanwhile.
        with (
            engine.connect().execution_options(**{db.READ_ONLY: True}) as connection,
            Session(bind=connection) as reader,
        ):
            due = due_tokens(reader, now=now, days=days, previous=previous, limit=DUE_PER_READ)
        full = len(due) == DUE_PER_READ
        if full and len(_groups(due)) > 1:
            # The last recipient may have more tokens past this read: they go in the next.
            due = [row for group in _groups(due)[:-1] for row in group]
        if not due:
            return
        yield from transactions(due, max_tokens)
        if not full:
            return
