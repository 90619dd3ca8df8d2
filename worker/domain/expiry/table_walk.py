"""The expire phase on Postgres for a large backlog: along the table rather than the index.

A backlog of at least :data:`TABLE_WALK_MIN_DUE_PER_PAGE` due tokens per page of the table is
swept in table order, in windows of pages holding about ``batch`` due tokens each, so that
each page is changed once per run rather than once per due token on it.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import Engine, bindparam, func, select, text
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.expiry.audit_rows import EXPIRED, SOURCE
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.models import Token, UTCDateTime

# A backlog of at least this many due tokens per page of the table is swept in table order.
# Walked along the index, such a backlog reaches each page once per due token on it, in
# batches far apart, and a table larger than the buffer cache is written back and read again
# for each of those visits; in table order each page is read, changed and written once.
TABLE_WALK_MIN_DUE_PER_PAGE: Final = 2
# The most pages one table-walk batch reads: about 10 ms of scanning where few tokens
# are due, or none are left (a run after one the budget cut short starts at the first page).
MAX_WINDOW_PAGES: Final = 1024

# One statement per batch, so that no row travels to Python and back: lock the next due rows
# of a window of pages in table order (a TID range scan: the partial index is not read),
# mark them through their row addresses (a TID scan: no primary-key look-up) and audit them
# from the UPDATE's RETURNING. The UPDATE checks the conditions again: a row changed by a
# transaction that committed after this statement's snapshot is left to the next run.
_EXPIRE_WINDOW = text(
    "WITH chosen AS ("
    " SELECT ctid AS place FROM tokens"
    " WHERE ctid >= CAST(:start AS tid) AND ctid < CAST(:stop AS tid)"
    " AND revoked_at IS NULL AND expires_at <= :now"
    " ORDER BY ctid LIMIT :limit FOR UPDATE SKIP LOCKED"
    "), swept AS ("
    " UPDATE tokens SET revoked_at = :now, revoke_reason = :reason"
    " WHERE ctid = ANY(ARRAY(SELECT place FROM chosen))"
    " AND revoked_at IS NULL AND expires_at <= :now"
    " RETURNING id, org_id, user_id"
    "), logged AS ("
    " INSERT INTO audit (at, action, reason, source, token_id, org_id, user_id)"
    " SELECT :now, 'expire', :reason, :source, id, org_id, user_id FROM swept"
    ")"
    " SELECT (SELECT count(*) FROM swept) AS swept,"
    " (SELECT count(*) FROM chosen) AS taken,"
    " (SELECT CAST(max(place) AS text) FROM chosen) AS last"
).bindparams(bindparam("now", type_=UTCDateTime()))

# A row address: (page, item on the page). Items are numbered from 1, so (page, 0) is where
# a page starts.
Place = tuple[int, int]


@dataclass(frozen=True)
class WindowBatch:
    count: int
    # Rows locked for this batch (those a concurrent change got to first are not marked).
    taken: int
    # The greatest address locked: the next batch starts after it.
    last: Place | None


def _place(value: str) -> Place:
    page, item = value.strip("()").split(",")
    return int(page), int(item)


def expire_window(
    session: Session, *, now: datetime, start: Place, stop_page: int, limit: int
) -> WindowBatch:
    """Mark the first ``limit`` due tokens from ``start`` up to page ``stop_page`` (Postgres)."""
    row = session.execute(
        _EXPIRE_WINDOW,
        {
            "start": f"({start[0]},{start[1]})",
            "stop": f"({stop_page},0)",
            "now": now,
            "limit": limit,
            "reason": EXPIRED,
            "source": SOURCE,
        },
    ).one()
    return WindowBatch(row.swept, row.taken, _place(row.last) if row.last else None)


def table_pages(session: Session) -> int:
    """The token table's size in pages, as the walk starts."""
    return int(
        session.scalar(
            text("SELECT pg_relation_size('tokens') / current_setting('block_size')::int")
        )
        or 0
    )


def due_at_least(session: Session, *, now: datetime, cap: int) -> int:
    """Due tokens, counted along the partial index up to ``cap`` (a bounded read)."""
    due = (
        select(Token.id)
        .where(Token.revoked_at.is_(None), Token.expires_at <= now)
        .limit(cap)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(due)) or 0)


def next_width(width: int, batch: WindowBatch, *, start: Place, limit: int) -> int:
    """Pages for the next window, aiming at ``limit`` due rows a batch.

    A full batch tells how many pages ``limit`` rows took; a short one how dense the window
    was. Growth is bounded so that one sparse window does not make the next one huge.
    """
    if batch.taken >= limit and batch.last is not None:
        wanted = (batch.last[0] - start[0] + 1) * 5 // 4 + 1
    elif batch.taken:
        wanted = -(-width * limit // batch.taken)
    else:
        wanted = width * 4
    return max(1, min(wanted, width * 4, MAX_WINDOW_PAGES))


def table_walk_pages(engine: Engine, *, now: datetime, batch: int) -> tuple[int, int] | None:
    """(pages, due tokens counted) when the backlog is to be swept in table order, else None.

    That is when at least :data:`TABLE_WALK_MIN_DUE_PER_PAGE` tokens per page are due, and
    more than one batch. The count stops there, so it costs at most that many index entries:
    a routine run, with a few newly expired tokens, counts those and walks the index.
    """
    with (
        engine.connect().execution_options(**{db.READ_ONLY: True}) as connection,
        Session(bind=connection) as reader,
    ):
        pages = table_pages(reader)
        wanted = max(TABLE_WALK_MIN_DUE_PER_PAGE * pages, batch + 1)
        due = due_at_least(reader, now=now, cap=wanted)
    return (pages, due) if due >= wanted else None


def expire_along_table(
    run: BudgetedRun[SweepResult], *, now: datetime, batch: int, pages: int, due: int
) -> bool:
    """Sweep pages ``0 .. pages`` in windows of about ``batch`` due tokens.

    Due tokens a concurrent change moved behind the walk, or that it skipped because a
    revocation held them, are left live and due: the next run finds them. Each run walks
    from the first page: pages an earlier run swept hold no due token any more, and a window
    that finds none costs a few milliseconds, so the walk goes on past those whatever the
    budget, and every run marks tokens while any are due.
    """
    start: Place = (0, 0)
    # Windows start at the table's mean density of due tokens and adapt as they go.
    width = max(1, min(-(-batch * pages // due), MAX_WINDOW_PAGES))
    stop = 0

    def mark(session: Session) -> WindowBatch:
        nonlocal stop
        stop = min(start[0] + width, pages)
        return expire_window(session, now=now, start=start, stop_page=stop, limit=batch)

    def marked(window: WindowBatch) -> Next:
        nonlocal start, width
        run.stats.swept += window.count
        width = next_width(width, window, start=start, limit=batch)
        if window.taken >= batch and window.last is not None:
            start = (window.last[0], window.last[1] + 1)
        else:
            start = (stop, 0)
        if start[0] >= pages:
            return Next.DONE
        return Next.MORE if window.taken else Next.MORE_UNCHARGED

    return run.batches(mark, marked)
