"""The sweep's idle phase (``TOKENWARDEN_IDLE_REVOKE_DAYS``): unused tokens warned, then revoked.

A token's last activity is its last recorded use (``token_usage``), else its creation. A live
token idle for ``days`` is revoked with reason ``idle``, audited in the same transaction; one
idle for ``days - 7`` is warned of once (``token.idle_warning``, to its owner, or to the
organization's admins for an application token), unless it expires before it could be
revoked as idle. ``token_idle_warnings`` keeps the activity each warning was about, so a
token used after its warning and idle again is warned again, never twice for one idle period.

A pass walks the whole token table in windows of about ``batch`` tokens
(:mod:`.idle_windows`), one short transaction each, resuming from the cursor ``idle`` when a
run's budget ends it; a window whose warnings would reach more than
:data:`~.grouped_notices.GROUPS_PER_TRANSACTION` recipients is cut there. A new pass starts at
most every :data:`PASS_EVERY`: idleness is counted in days.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import JSON, bindparam, delete, insert, select, text, update
from sqlalchemy.orm import Session

from tokenwarden.config.settings import IDLE_WARNING_DAYS
from tokenwarden.worker.domain import notices
from tokenwarden.worker.domain.expiry.audit_rows import SOURCE, audit_row, insert_audit_rows
from tokenwarden.worker.domain.expiry.budget import BudgetedRun, Next
from tokenwarden.worker.domain.expiry.cursors import move_cursor, read_cursor
from tokenwarden.worker.domain.expiry.grouped_notices import (
    GROUPS_PER_TRANSACTION,
    TOKENS_PER_NOTICE,
    AnyRow,
    GroupKey,
    group_of,
    recipients_for,
)
from tokenwarden.worker.domain.expiry.idle_windows import read_window
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.models import Token, TokenIdleWarning, TokenUsage, UTCDateTime

IDLE: Final = "idle"
# Tokens revoked in one transaction at most: a window is cut there. Each costs an UPDATE of
# its row and of every index on it, an audit row, and its share of a notice to its owner.
REVOKED_PER_TRANSACTION: Final = 150
# The fewest rows a window reads, however densely idle the tokens are.
MIN_WINDOW: Final = 50

# On Postgres one statement revokes, audits and forgets the warnings of a window's idle
# tokens, so that their rows never travel back to Python (as the expire phase does). The
# UPDATE checks again that the token is live and still idle: a use recorded since the window
# was read keeps it.
_REVOKE_IDLE = text(
    "WITH swept AS ("
    " UPDATE tokens SET revoked_at = :now, revoke_reason = :reason"
    " WHERE id = ANY(:ids) AND revoked_at IS NULL"
    " AND NOT EXISTS (SELECT 1 FROM token_usage u"
    "  WHERE u.token_id = tokens.id AND u.last_used_at > :idle_before)"
    " RETURNING id, org_id, user_id"
    "), logged AS ("
    " INSERT INTO audit (at, action, reason, source, token_id, org_id, user_id, detail)"
    " SELECT :now, 'revoke', :reason, :source, id, org_id, user_id, :detail FROM swept"
    "), forgotten AS ("
    " DELETE FROM token_idle_warnings WHERE token_id IN (SELECT id FROM swept)"
    ")"
    " SELECT id FROM swept"
).bindparams(
    bindparam("now", type_=UTCDateTime()),
    bindparam("idle_before", type_=UTCDateTime()),
    bindparam("detail", type_=JSON()),
)
IDLE_CURSOR: Final = "idle"
PASS_EVERY: Final = timedelta(hours=1)


@dataclass
class IdleBatch:
    revoked: int = 0
    warned: int = 0
    notice_ids: list[str] = field(default_factory=list)
    more: bool = False
    # Rows of the window handled when the caps cut it there; None when all of it was.
    cut_at: int | None = None


@dataclass(frozen=True)
class _Cuts:
    """Activity at or before ``revoke`` is idle; at or before ``warn``, worth a warning."""

    now: datetime
    days: int
    revoke: datetime = field(init=False)
    warn: datetime = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "revoke", self.now - timedelta(days=self.days))
        warn = self.now - timedelta(days=self.days - IDLE_WARNING_DAYS)
        object.__setattr__(self, "warn", warn)


def _live(row: AnyRow, cuts: _Cuts) -> bool:
    return bool(row.revoked_at is None and row.expires_at > cuts.now)


def _worth_warning(row: AnyRow, cuts: _Cuts) -> bool:
    """Idle long enough to be warned of, and live long enough to be revoked as idle."""
    revoked_as_idle = row.active_at + timedelta(days=cuts.days)
    return bool(cuts.revoke < row.active_at <= cuts.warn and row.expires_at > revoked_as_idle)


def _warned(session: Session, rows: list[AnyRow], cuts: _Cuts) -> dict[str, datetime]:
    """The idle period each candidate for a warning was last warned of, by token id.

    Read for those few candidates only, by primary key, rather than for every row of the
    window: a per-row look-up may be planned as a scan of the table (its statistics can say
    it is empty while a pass fills it).
    """
    wanted = [row.id for row in rows if _live(row, cuts) and _worth_warning(row, cuts)]
    if not wanted:
        return {}
    found = session.execute(
        select(TokenIdleWarning.token_id, TokenIdleWarning.idle_since).where(
            TokenIdleWarning.token_id.in_(wanted)
        )
    )
    return {str(token_id): idle_since for token_id, idle_since in found}


def _warned_of(row: AnyRow, warned: dict[str, datetime]) -> bool:
    """Whether the idle period that started at the row's last activity was warned of."""
    return bool(row.id in warned and warned[row.id] >= row.active_at)


def _sorted_out(
    rows: list[AnyRow], cuts: _Cuts, warned: dict[str, datetime]
) -> tuple[list[AnyRow], list[AnyRow], int]:
    """(to revoke, to warn, rows handled) for a window's rows: all of them, unless they hold
    more than :data:`REVOKED_PER_TRANSACTION` idle tokens or their warnings would reach more
    than :data:`GROUPS_PER_TRANSACTION` recipients."""
    revoke: list[AnyRow] = []
    warn: list[AnyRow] = []
    groups: set[GroupKey] = set()
    for index, row in enumerate(rows):
        if not _live(row, cuts):
            continue
        if row.active_at <= cuts.revoke:
            if len(revoke) == REVOKED_PER_TRANSACTION:
                return revoke, warn, index
            revoke.append(row)
        elif _worth_warning(row, cuts) and not _warned_of(row, warned):
            if group_of(row) not in groups and len(groups) == GROUPS_PER_TRANSACTION:
                return revoke, warn, index
            groups.add(group_of(row))
            warn.append(row)
    return revoke, warn, len(rows)


def idle_batch(session: Session, *, now: datetime, days: int, limit: int) -> IdleBatch:
    """Warn of and revoke the idle tokens of the next window; move the cursor past it."""
    position, started = read_cursor(session, IDLE_CURSOR, now=now)
    if position is None and started is not None and now - started < PASS_EVERY:
        return IdleBatch()  # the last pass is recent enough
    window = read_window(session, position, limit=limit)
    cuts = _Cuts(now, days)
    to_revoke, to_warn, handled = _sorted_out(
        window.rows, cuts, _warned(session, window.rows, cuts)
    )
    following = window.resume(handled) if handled < len(window.rows) else window.following
    outcome = IdleBatch(
        more=following is not None, cut_at=handled if handled < len(window.rows) else None
    )
    revoked = _revoke(session, to_revoke, cuts)
    outcome.revoked = len(revoked)
    if revoked:
        outcome.notice_ids += _tell_revoked(
            session, [r for r in to_revoke if r.id in revoked], cuts
        )
    if to_warn:
        outcome.warned = len(to_warn)
        outcome.notice_ids += _warn(session, to_warn, cuts)
    move_cursor(
        session,
        IDLE_CURSOR,
        position=following,
        now=now,
        pass_started_at=now if position is None else None,
    )
    return outcome


def _revoke(session: Session, rows: list[AnyRow], cuts: _Cuts) -> set[str]:
    """Revoke and audit the tokens of ``rows`` still idle; forget their warnings. Returns
    the ids revoked."""
    if not rows:
        return set()
    ids = [row.id for row in rows]
    if session.get_bind().dialect.name == "postgresql":
        found = session.scalars(
            _REVOKE_IDLE,
            {
                "ids": ids,
                "now": cuts.now,
                "idle_before": cuts.revoke,
                "reason": IDLE,
                "source": SOURCE,
                "detail": {"idle_days": cuts.days},
            },
        )
        return {str(token_id) for token_id in found}
    # Checked again in the UPDATE: a use recorded since the window was read keeps the token.
    used_since = (
        select(TokenUsage.token_id)
        .where(TokenUsage.token_id == Token.id, TokenUsage.last_used_at > cuts.revoke)
        .exists()
    )
    revoked = session.execute(
        update(Token)
        .where(Token.id.in_(ids), Token.revoked_at.is_(None), ~used_since)
        .values(revoked_at=cuts.now, revoke_reason=IDLE)
        .returning(Token.id, Token.org_id, Token.user_id)
        .execution_options(synchronize_session=False)
    ).all()
    session.execute(delete(TokenIdleWarning).where(TokenIdleWarning.token_id.in_(ids)))
    detail = {"idle_days": cuts.days}
    insert_audit_rows(
        session,
        [
            audit_row(row, at=cuts.now, action="revoke", reason=IDLE, detail=detail)
            for row in revoked
        ],
    )
    return {str(row.id) for row in revoked}


def _idle_until(row: AnyRow, cuts: _Cuts) -> datetime:
    """When the token is (or was) revoked as idle: its last activity and ``days`` days."""
    return row.active_at + timedelta(days=cuts.days)  # type: ignore[no-any-return]


def _grouped_notices(
    session: Session, rows: list[AnyRow], *, kind: str, data: dict[str, Any], cuts: _Cuts
) -> list[tuple[str, list[AnyRow]]]:
    """One ``kind`` notice per recipient (up to :data:`TOKENS_PER_NOTICE` tokens each), in
    one statement; each token listed with its last activity and its idle revocation date.
    ``data`` may name a date per notice: ``revoked_from``, the earliest of its tokens'.
    Returns each notice's id with the tokens it lists."""
    grouped: dict[GroupKey, list[AnyRow]] = {}
    for row in rows:
        grouped.setdefault(group_of(row), []).append(row)
    recipients = recipients_for(session, grouped)
    chunks = [
        (key, members[start : start + TOKENS_PER_NOTICE])
        for key, members in sorted(grouped.items(), key=lambda item: str(item[0]))
        for start in range(0, len(members), TOKENS_PER_NOTICE)
    ]
    wanted = [
        notices.Queued(
            kind=kind,
            org_id=key[0],
            recipients=recipients[key],
            data={
                **data,
                **(
                    {"revoked_from": min(_idle_until(r, cuts) for r in chunk).isoformat()}
                    if "revoked_from" in data
                    else {}
                ),
                "tokens": [
                    {
                        **notices.describe(row),
                        "last_active_at": row.active_at.isoformat(),
                        "idle_revocation_at": _idle_until(row, cuts).isoformat(),
                    }
                    for row in chunk
                ],
            },
        )
        for key, chunk in chunks
    ]
    notice_ids = notices.queue_many(session, wanted, now=cuts.now)
    # Published by the run once this transaction commits, not by the caller's session.
    notices.take_new_notices(session)
    return [(notice_id, chunk) for notice_id, (_, chunk) in zip(notice_ids, chunks, strict=True)]


def _tell_revoked(session: Session, rows: list[AnyRow], cuts: _Cuts) -> list[str]:
    """The ``token.idle_revoked`` notices of the tokens this window revoked as idle."""
    data = {"reason": IDLE, "idle_days": cuts.days, "revoked_at": cuts.now.isoformat()}
    told = _grouped_notices(session, rows, kind=notices.IDLE_REVOKED, data=data, cuts=cuts)
    return [notice_id for notice_id, _ in told]


def _warn(session: Session, rows: list[AnyRow], cuts: _Cuts) -> list[str]:
    """One warning per recipient (up to :data:`TOKENS_PER_NOTICE` tokens each), written in
    one statement, each token with its own idle revocation date; the ``token_idle_warnings``
    rows written with them are what keeps a token from being warned twice of one idle
    period, so the notices need no dedupe key (and none of the savepoint per notice that
    checking one costs)."""
    data = {"idle_days": cuts.days, "unused_since": cuts.warn.isoformat(), "revoked_from": None}
    told = _grouped_notices(session, rows, kind=notices.IDLE_WARNING, data=data, cuts=cuts)
    notice_of = {row.id: notice_id for notice_id, chunk in told for row in chunk}
    ids = [row.id for row in rows]
    session.execute(delete(TokenIdleWarning).where(TokenIdleWarning.token_id.in_(ids)))
    session.execute(
        insert(TokenIdleWarning),
        [
            {
                "token_id": row.id,
                "idle_since": row.active_at,
                "warned_at": cuts.now,
                "notice_id": notice_of[row.id],
            }
            for row in rows
        ],
    )
    return [notice_id for notice_id, _ in told]


def next_window(size: int, cut_at: int | None, *, most: int) -> int:
    """How many rows the next transaction reads, after one that read ``size``.

    A window cut by the caps is read again from the cut, so rows read past it are work thrown
    away: where idle tokens are dense, the next window is about what the last transaction
    could take; where they are not, it grows back to ``most`` (``TOKENWARDEN_SWEEP_BATCH``).
    """
    if cut_at is not None:
        return max(MIN_WINDOW, min(most, cut_at + cut_at // 4))
    return min(most, size * 2)


def idle_all(run: BudgetedRun[SweepResult], *, now: datetime, batch: int, days: int) -> bool:
    """Walk the tokens for idle ones, ``batch`` a transaction; True once the pass is done."""
    run.stats.phase = IDLE

    size = batch

    def handled(outcome: IdleBatch) -> Next:
        nonlocal size
        run.stats.idle_revoked += outcome.revoked
        run.stats.idle_warned += outcome.warned
        run.queued(outcome.notice_ids)
        size = next_window(size, outcome.cut_at, most=batch)
        return Next.more_if(outcome.more)

    def window(session: Session) -> IdleBatch:
        return idle_batch(session, now=now, days=days, limit=size)

    return run.batches(window, handled)
