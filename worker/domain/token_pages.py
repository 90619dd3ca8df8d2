"""Tokens as an administrator lists them: filtered, a page at a time, never a secret.

Imports nothing but the domain and SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.models import Token
from tokenwarden.worker.domain.usage import last_used

STATES: Final = ("active", "revoked", "expired")
MAX_PAGE: Final = 200


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def state_of(token: Token, now: datetime) -> tuple[str, str | None]:
    """(state, reason) of ``token`` at ``now``: a rotated-away token past its overlap is
    ``revoked`` (``rotated``) even before anything wrote that down."""
    if token.revoked_at is not None:
        return token.state, token.revoke_reason
    if token.overlap_ends_at is not None and token.overlap_ends_at <= now:
        return "revoked", "rotated"
    if token.expires_at <= now:
        return "expired", "expired"
    return "active", None


def describe(token: Token, now: datetime, used: datetime | None) -> dict[str, Any]:
    """What an administrator sees of a token: its last four characters, never more."""
    state, reason = state_of(token, now)
    return {
        "id": token.id,
        "kind": token.kind,
        "name": token.name,
        "org_id": token.org_id,
        "user_id": token.user_id,
        "app_id": token.app_id,
        "created_by": token.created_by,
        "state": state,
        "reason": reason,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "last4": token.last4,
        "last_used_at": used,
        "family_id": token.family_id or token.id,
        "replaced_by": token.replaced_by,
        "overlap_ends_at": token.overlap_ends_at,
    }


def one(session: Session, token_id: str, *, now: datetime) -> dict[str, Any] | None:
    token = session.get(Token, token_id)
    if token is None:
        return None
    return describe(token, now, last_used(session, [token.id]).get(token.id))


def _state_filter(state: str, now: datetime) -> ColumnElement[bool]:
    overlap_over = and_(Token.overlap_ends_at.is_not(None), Token.overlap_ends_at <= now)
    if state == "active":
        return and_(Token.revoked_at.is_(None), Token.expires_at > now, ~overlap_over)
    expired = or_(
        Token.revoke_reason == "expired",
        and_(Token.revoked_at.is_(None), Token.expires_at <= now, ~overlap_over),
    )
    if state == "expired":
        return expired
    return and_(or_(Token.revoked_at.is_not(None), overlap_over), ~expired)


def page(
    session: Session,
    *,
    now: datetime,
    limit: int,
    after: str | None = None,
    filters: dict[str, str | None],
) -> Page:
    """One page of tokens in id order after ``after``; ``next_cursor`` names the last one."""
    query: Select[Token] = select(Token).order_by(Token.id).limit(limit + 1)
    for column in ("org_id", "user_id", "kind"):
        if filters.get(column):
            query = query.where(getattr(Token, column) == filters[column])
    if filters.get("state"):
        query = query.where(_state_filter(str(filters["state"]), now))
    if after:
        query = query.where(Token.id > after)
    rows = list(session.scalars(query).all())
    more = len(rows) > limit
    rows = rows[:limit]
    used = last_used(session, [row.id for row in rows])
    return Page(
        [describe(row, now, used.get(row.id)) for row in rows],
        rows[-1].id if more and rows else None,
    )
