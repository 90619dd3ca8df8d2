"""How the idle pass walks the token table: windows of about ``batch`` tokens, resumable.

On Postgres a pass walks the table in physical order, in windows of pages (a TID range scan,
as :mod:`.table_walk` does for a backlog of expired tokens): the tokens of a window share
their pages, so revoking many of them writes each page once, where a walk by id would touch
a page per token (ids are random) and, on a table larger than the buffer cache, read each of
those pages from disk. Elsewhere (SQLite) a pass walks the primary key in keyset windows.

A position in ``job_cursors`` says where the next window starts: ``page:N`` or ``id:ID``
(after that id; ``id:`` from the first one). A row updated during a pass may move to a page
the walk has not reached and be seen twice; what the idle pass does with a row is guarded in
the database (a token revoked once, a warning once per idle period), so that changes nothing.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.expiry.grouped_notices import TOKEN_COLUMNS, AnyRow
from tokenwarden.worker.domain.expiry.table_walk import MAX_WINDOW_PAGES, table_pages
from tokenwarden.worker.domain.models import Token, TokenUsage, UTCDateTime

# Pages a window spans while the table has no statistics yet.
DEFAULT_WINDOW_PAGES: Final = 32

# The activity is looked up per row (a scalar subquery), never joined: a join may make the
# planner hash all of ``token_usage`` for a window of a thousand rows.
_PAGE_WINDOW = text(
    "SELECT t.id, t.kind, t.org_id, t.user_id, t.app_id, t.created_by, t.name, t.last4,"
    " t.expires_at, t.revoked_at,"
    " coalesce((SELECT u.last_used_at FROM token_usage u WHERE u.token_id = t.id),"
    "  t.created_at) AS active_at,"
    " CAST((CAST(CAST(t.ctid AS text) AS point))[0] AS bigint) AS page"
    " FROM tokens t"
    " WHERE t.ctid >= CAST(:start AS tid) AND t.ctid < CAST(:stop AS tid)"
    " AND t.revoked_at IS NULL"
    " ORDER BY t.ctid"
).columns(
    expires_at=UTCDateTime(),
    revoked_at=UTCDateTime(),
    active_at=UTCDateTime(),
)


@dataclass(frozen=True)
class Window:
    """A window's live and dead tokens, in walk order, and where the walk goes on."""

    rows: list[AnyRow]
    # Where the next window starts once every row is handled; None when the pass is done.
    following: str | None

    def resume(self, handled: int) -> str:
        """Where to go on when only the first ``handled`` rows were handled."""
        row = self.rows[handled]
        if hasattr(row, "page"):
            return f"page:{row.page}"
        # "id:" starts before every id: nothing sorts before "".
        return f"id:{self.rows[handled - 1].id}" if handled else "id:"


def read_window(session: Session, position: str | None, *, limit: int) -> Window:
    """The window at ``position`` (None: a new pass)."""
    if session.get_bind().dialect.name == "postgresql":
        start = int(position.removeprefix("page:")) if position else 0
        return _page_window(session, start=start, limit=limit)
    after = position.removeprefix("id:") if position else ""
    return _id_window(session, after=after, limit=limit)


def _page_window(session: Session, *, start: int, limit: int) -> Window:
    pages = table_pages(session)
    if start >= pages:
        return Window([], None)
    stop = min(start + _width(session, limit), pages)
    rows = list(session.execute(_PAGE_WINDOW, {"start": f"({start},0)", "stop": f"({stop},0)"}))
    return Window(rows, f"page:{stop}" if stop < pages else None)


def _width(session: Session, limit: int) -> int:
    """Pages holding about ``limit`` tokens, by the table's statistics."""
    row = session.execute(
        text("SELECT reltuples, relpages FROM pg_class WHERE oid = CAST('tokens' AS regclass)")
    ).one()
    if row.reltuples <= 0 or row.relpages <= 0:
        return DEFAULT_WINDOW_PAGES
    return max(1, min(int(limit * row.relpages / row.reltuples) + 1, MAX_WINDOW_PAGES))


def _id_window(session: Session, *, after: str, limit: int) -> Window:
    # The window is cut first, along the primary key, and only its rows are looked up in the
    # other tables.
    ids = select(Token.id).where(Token.id > after).order_by(Token.id).limit(limit).subquery()
    rows = list(
        session.execute(
            select(
                *TOKEN_COLUMNS,
                Token.revoked_at,
                func.coalesce(TokenUsage.last_used_at, Token.created_at).label("active_at"),
            )
            .select_from(ids)
            .join(Token, Token.id == ids.c.id)
            .outerjoin(TokenUsage, TokenUsage.token_id == Token.id)
            .order_by(Token.id)
        ).all()
    )
    return Window(rows, f"id:{rows[-1].id}" if len(rows) >= limit else None)
