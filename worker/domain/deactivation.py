"""Deactivation: a user is deactivated platform-wide, in every organization at once.

In each organization the rules of a removal hold (worker.domain.removals): a membership that
saw a newer event is left alone, and only the PATs the user held at the deactivation's time
are revoked there. The deactivation is also kept per user (``user_deactivations``, newest time
wins): a membership that appears after it through an older event starts out inactive as of the
deactivation (see worker.domain.members), so an older join cannot make the user active again.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import structlog
from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit, db, members, orphans
from tokenwarden.worker.domain.models import Membership, Token, UserDeactivation
from tokenwarden.worker.domain.revocation import revoke_leaver_tokens

log = structlog.get_logger(__name__)

USER_DEACTIVATED = "user_deactivated"


def deactivate_user(
    session: Session,
    *,
    user_id: str,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
    actor: str | None = None,
) -> list[str]:
    """Record that ``user_id`` was deactivated platform-wide at ``at``; revoke their PATs.

    Per organization the rules of :func:`worker.domain.removals.remove_member` hold: where the
    membership saw a newer event, only the PATs held at ``at`` are revoked. Returns the
    revoked token ids.
    """
    stamp = audit.Stamp(at=at, now=now, source=source, event_id=event_id, actor=actor)
    # A membership that does not exist yet is started from the record instead (see
    # worker.domain.members); the user lock keeps one being created right now from slipping
    # between.
    members.lock_user(session, user_id)
    _record_deactivation(session, user_id=user_id, at=at, now=now, event_id=event_id)
    memberships = _lock_memberships(session, user_id)
    stale = [m for m in memberships if members.after(m.last_event_at, at)]
    ended = [m.org_id for m in memberships if not members.after(m.last_event_at, at) and m.active]
    if len(stale) < len(memberships):
        _end_memberships(session, user_id=user_id, at=at, now=now)
    revoked = revoke_leaver_tokens(
        session,
        [Token.user_id == user_id, ~_spared(at)],
        user_id=user_id,
        reason=USER_DEACTIVATED,
        stamp=stamp,
    )
    _audit(session, user_id=user_id, ended=ended, stale=stale, stamp=stamp)
    orphans.tell_admins(session, [(org_id, user_id) for org_id in ended], stamp=stamp)
    log.info(
        "user.deactivated",
        user_id=user_id,
        revoked=len(revoked),
        token_ids=revoked,
        memberships=len(ended),
        stale=len(stale),
        event_id=event_id,
    )
    return revoked


def _record_deactivation(
    session: Session, *, user_id: str, at: datetime, now: datetime, event_id: str | None
) -> None:
    """Keep the newest deactivation of ``user_id``; an older one arriving late changes nothing."""
    values = {"user_id": user_id, "deactivated_at": at, "event_id": event_id, "updated_at": now}
    table = UserDeactivation.__table__
    statement = db.insert_for(session, UserDeactivation).values(values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.user_id],
            set_={
                "deactivated_at": statement.excluded.deactivated_at,
                "event_id": statement.excluded.event_id,
                "updated_at": statement.excluded.updated_at,
            },
            where=table.c.deactivated_at < statement.excluded.deactivated_at,
        )
    )


def _lock_memberships(session: Session, user_id: str) -> Sequence[Membership]:
    # Lock in a fixed order, the same one every deactivation uses, so two of them cannot
    # deadlock; a removal locks a single row, which cannot form a cycle with this.
    return session.scalars(
        select(Membership)
        .where(Membership.user_id == user_id)
        .order_by(Membership.org_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()


def _end_memberships(session: Session, *, user_id: str, at: datetime, now: datetime) -> None:
    """End every membership of ``user_id`` that saw no event newer than ``at``."""
    session.execute(
        update(Membership)
        .where(
            Membership.user_id == user_id,
            or_(Membership.last_event_at.is_(None), Membership.last_event_at <= at),
        )
        .values(active=False, last_event_at=at, updated_at=now)
    )


def _spared(at: datetime) -> ColumnElement[bool]:
    """The tokens a deactivation at ``at`` leaves alone, in every organization in one clause:
    where the membership saw a newer event and the token was issued after ``at`` and within
    the current active period."""
    return (
        select(Membership.org_id)
        .where(
            Membership.org_id == Token.org_id,
            Membership.user_id == Token.user_id,
            Membership.last_event_at > at,
            Token.created_at > at,
            or_(Membership.active_since.is_(None), Token.created_at >= Membership.active_since),
        )
        .exists()
    )


def _audit(
    session: Session,
    *,
    user_id: str,
    ended: list[str],
    stale: Sequence[Membership],
    stamp: audit.Stamp,
) -> None:
    """One row per membership ended, then one per membership that saw a newer event."""
    member_rows = [
        stamp.row("member", "deactivated", org_id=org_id, user_id=user_id, detail=None)
        for org_id in ended
    ]
    stale_rows = [
        stamp.row(
            "stale",
            "user.deactivated",
            org_id=m.org_id,
            user_id=user_id,
            detail=_stale_detail(stamp.at, m.last_event_at),
        )
        for m in stale
    ]
    audit.record_many(session, member_rows + stale_rows)


def _stale_detail(at: datetime, applied: datetime | None) -> dict[str, str | None]:
    # ``applied`` is set on a stale membership: None would not have been newer.
    return {"event_time": at.isoformat(), "applied_time": applied.isoformat() if applied else None}
