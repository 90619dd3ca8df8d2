"""The sweep's idle phase (``TOKENWARDEN_IDLE_REVOKE_DAYS``): unused tokens warned, then revoked.

A token's last activity is its last recorded use (``token_usage``), else its creation. A live
token idle for ``days`` is revoked with reason ``idle``, audited in the same transaction; one
idle for ``days - 7`` is warned of once (``token.idle_warning``, to its owner, or to the
organization's admins for an application token), unless it expires before it could be
revoked as idle. ``token_idle_warnings`` keeps the activity each warning was about, so a
token used after its warning and idle again is warned again, never twice for one idle period.

A pass walks the whole token table by id in windows of ``batch`` rows, one short transaction
each (a window costs the same however many of its tokens are revoked or live), resuming from
the cursor ``idle`` when a run's budget ends it; a window whose warnings would reach more than
:data:`~.grouped_notices.GROUPS_PER_TRANSACTION` recipients is cut there. A new pass starts at
most every :data:`PASS_EVERY`: idleness is counted in days.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from tokenwarden.config.settings import IDLE_WARNING_DAYS
from tokenwarden.worker.domain import notices
from tokenwarden.worker.domain.expiry.audit_rows import audit_row, insert_audit_rows
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next
from tokenwarden.worker.domain.expiry.cursors import move_cursor, read_cursor
from tokenwarden.worker.domain.expiry.grouped_notices import (
    GROUPS_PER_TRANSACTION,
    TOKEN_COLUMNS,
    AnyRow,
    GroupKey,
    group_of,
    new_notice_ids,
    queue_grouped,
)
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.models import Token, TokenIdleWarning, TokenUsage

IDLE: Final = "idle"
IDLE_CURSOR: Final = "idle"
PASS_EVERY: Final = timedelta(hours=1)


@dataclass
class IdleBatch:
    revoked: int = 0
    warned: int = 0
    notice_ids: list[str] = field(default_factory=list)
    more: bool = False


@dataclass(frozen=True)
class _Cuts:
    """Activity at or before ``revoke`` is idle; at or before ``warn``, worth a warning."""

    now: datetime
    days: int

    @property
    def revoke(self) -> datetime:
        return self.now - timedelta(days=self.days)

    @property
    def warn(self) -> datetime:
        return self.now - timedelta(days=self.days - IDLE_WARNING_DAYS)


def _window(session: Session, *, after: str | None, limit: int) -> list[AnyRow]:
    """The next ``limit`` tokens by id, live or not, with their activity and warning."""
    query = (
        select(
            *TOKEN_COLUMNS,
            Token.revoked_at,
            func.coalesce(TokenUsage.last_used_at, Token.created_at).label("active_at"),
            TokenIdleWarning.idle_since,
        )
        .select_from(Token)
        .outerjoin(TokenUsage, TokenUsage.token_id == Token.id)
        .outerjoin(TokenIdleWarning, TokenIdleWarning.token_id == Token.id)
        .order_by(Token.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(Token.id > after)
    return list(session.execute(query).all())


def _sorted_out(
    rows: list[AnyRow], cuts: _Cuts
) -> tuple[list[AnyRow], list[AnyRow], str | None, bool]:
    """(to revoke, to warn, last id handled, cut short) for a window's rows."""
    revoke: list[AnyRow] = []
    warn: list[AnyRow] = []
    groups: set[GroupKey] = set()
    last: str | None = None
    for row in rows:
        if row.revoked_at is None and row.expires_at > cuts.now:
            if row.active_at <= cuts.revoke:
                revoke.append(row)
            elif (
                row.active_at <= cuts.warn
                and (row.idle_since is None or row.idle_since < row.active_at)
                and row.expires_at > row.active_at + timedelta(days=cuts.days)
            ):
                if group_of(row) not in groups and len(groups) == GROUPS_PER_TRANSACTION:
                    return revoke, warn, last, True
                groups.add(group_of(row))
                warn.append(row)
        last = row.id
    return revoke, warn, last, False


def idle_batch(session: Session, *, now: datetime, days: int, limit: int) -> IdleBatch:
    """Warn of and revoke the idle tokens of the next window; move the cursor past it."""
    position, started = read_cursor(session, IDLE_CURSOR, now=now)
    if position is None and started is not None and now - started < PASS_EVERY:
        return IdleBatch()  # the last pass is recent enough
    rows = _window(session, after=position, limit=limit)
    cuts = _Cuts(now, days)
    to_revoke, to_warn, last, cut = _sorted_out(rows, cuts)
    outcome = IdleBatch(more=cut or len(rows) >= limit)
    outcome.revoked = _revoke(session, to_revoke, cuts)
    if to_warn:
        outcome.warned = len(to_warn)
        outcome.notice_ids = _warn(session, to_warn, cuts)
    move_cursor(
        session,
        IDLE_CURSOR,
        position=last if outcome.more else None,
        now=now,
        pass_started_at=now if position is None else None,
    )
    return outcome


def _revoke(session: Session, rows: list[AnyRow], cuts: _Cuts) -> int:
    if not rows:
        return 0
    # Checked again in the UPDATE: a use recorded since the window was read keeps the token.
    used_since = (
        select(TokenUsage.token_id)
        .where(TokenUsage.token_id == Token.id, TokenUsage.last_used_at > cuts.revoke)
        .exists()
    )
    revoked = session.execute(
        update(Token)
        .where(Token.id.in_([row.id for row in rows]), Token.revoked_at.is_(None), ~used_since)
        .values(revoked_at=cuts.now, revoke_reason=IDLE)
        .returning(Token.id, Token.org_id, Token.user_id)
        .execution_options(synchronize_session=False)
    ).all()
    detail = {"idle_days": cuts.days}
    rows_audited = [
        audit_row(row, at=cuts.now, action="revoke", reason=IDLE, detail=detail) for row in revoked
    ]
    insert_audit_rows(session, rows_audited)
    return len(revoked)


def _warn(session: Session, rows: list[AnyRow], cuts: _Cuts) -> list[str]:
    queued = queue_grouped(
        session,
        rows,
        kind=notices.IDLE_WARNING,
        data={
            "idle_days": cuts.days,
            "unused_since": cuts.warn.isoformat(),
            "revoked_from": (cuts.now + timedelta(days=IDLE_WARNING_DAYS)).isoformat(),
        },
        now=cuts.now,
        dedupe_prefix=f"idle:{cuts.now.date().isoformat()}",
    )
    notice_of = {token_id: q.notice_id for q in queued for token_id in q.token_ids}
    ids = [row.id for row in rows]
    session.execute(delete(TokenIdleWarning).where(TokenIdleWarning.token_id.in_(ids)))
    session.execute(
        insert(TokenIdleWarning),
        [
            {
                "token_id": row.id,
                "idle_since": row.active_at,
                "warned_at": cuts.now,
                "notice_id": notice_of.get(row.id),
            }
            for row in rows
        ],
    )
    return new_notice_ids(session, queued)


def idle_all(run: BudgetedRun[SweepResult], *, now: datetime, batch: int, days: int) -> bool:
    """Walk the tokens for idle ones, ``batch`` a transaction; True once the pass is done."""
    run.stats.phase = IDLE

    def handled(outcome: IdleBatch) -> Next:
        run.stats.idle_revoked += outcome.revoked
        run.stats.idle_warned += outcome.warned
        run.queued(outcome.notice_ids)
        return Next.more_if(outcome.more)

    def window(session: Session) -> IdleBatch:
        return idle_batch(session, now=now, days=days, limit=batch)

    return run.batches(window, handled)
