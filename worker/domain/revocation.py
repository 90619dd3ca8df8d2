"""Revoking tokens: one on request, or a member's PATs in bulk when they leave.

A revocation is guarded by ``revoked_at IS NULL``, so a replayed event revokes nothing a
second time and audits nothing twice. The callers queue their notices in the same transaction
as the revocations they report, and only for the tokens revoked by this very call: a replay
tells nobody anything twice.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import cast

import structlog
from sqlalchemy import ColumnElement, Table, and_, false, or_, select, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit, notices
from tokenwarden.worker.domain.models import Token, TokenKind

log = structlog.get_logger(__name__)

DELETED = "deleted"
# audit.token_id is as wide as tokens.id; a longer requested id cannot name a token.
TOKEN_ID_MAX = 40


@dataclass(frozen=True)
class TokenOutcome:
    """What a request about one token did: ``token_id`` is None when no such token exists."""

    token_id: str | None
    revoked: bool


def revoke_token(
    session: Session,
    *,
    token_id: str,
    reason: str,
    source: str,
    now: datetime,
    actor: str | None = None,
    event_id: str | None = None,
    detail: dict[str, str] | None = None,
) -> Token | None:
    """Revoke one live token; return it, or ``None`` if it was unknown or already dead.

    The ``revoked_at IS NULL`` guard makes a second revocation a no-op, so a redelivered
    event or a repeated leak report changes nothing and audits nothing.
    """
    token: Token | None = session.scalar(
        update(Token)
        .where(Token.id == token_id, Token.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
        .returning(Token)
    )
    if token is None:
        log.info("revoke.noop", token_id=token_id, reason=reason, source=source, event_id=event_id)
        return None
    audit.record_token(
        session,
        token,
        action="revoke",
        reason=reason,
        source=source,
        at=now,
        actor=actor,
        event_id=event_id,
        detail=detail,
    )
    return token


def request_revocation(
    session: Session,
    *,
    token_id: str,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
    actor: str | None = None,
) -> TokenOutcome:
    """Delete (revoke) one token on request; an unknown or already revoked token is a no-op.

    An unknown id is audited as a refusal rather than treated as a bad event: the token may
    have been named by mistake, and retrying would never make it exist.
    """
    token = revoke_token(
        session,
        token_id=token_id,
        reason=DELETED,
        source=source,
        now=now,
        actor=actor,
        event_id=event_id,
    )
    if token is not None:
        return TokenOutcome(token.id, revoked=True)
    if session.scalar(select(Token.id).where(Token.id == token_id)) is not None:
        return TokenOutcome(token_id, revoked=False)
    audit.record(
        session,
        action="refuse",
        reason="unknown_token",
        source=source,
        at=now,
        token_id=token_id if len(token_id) <= TOKEN_ID_MAX else None,
        actor=actor,
        event_id=event_id,
        detail={"requested_token_id": token_id, "event_time": at.isoformat()},
    )
    return TokenOutcome(None, revoked=False)


def held_at(at: datetime, active_since: datetime | None) -> ColumnElement[bool]:
    """PATs the member held at ``at``: issued by then, or before the current active period."""
    before_rejoin = Token.created_at < active_since if active_since is not None else false()
    return or_(Token.created_at <= at, before_rejoin)


def revoke_leaver_tokens(
    session: Session,
    criteria: Sequence[ColumnElement[bool]],
    *,
    user_id: str,
    reason: str,
    stamp: audit.Stamp,
) -> list[str]:
    """Revoke the live PATs of ``user_id`` matching ``criteria``, audit them, and tell each
    organization's admins which of theirs were revoked; returns the revoked ids, in order."""
    rows = _revoke_personal_tokens(session, criteria, reason=reason, stamp=stamp)
    # One notice per organization, to that organization's admins only: what a user held in
    # one organization is none of another's business.
    for org_id, in_org in groupby(sorted(rows, key=_org_then_id), key=lambda row: row.org_id):
        notices.offboarding_notice(
            session,
            org_id=org_id,
            user_id=user_id,
            tokens=in_org,
            now=stamp.now,
            source=stamp.source,
            event_id=stamp.event_id,
            reason=reason,
            at=stamp.at,
        )
    return [row.id for row in rows]


def _revoke_personal_tokens(
    session: Session,
    criteria: Sequence[ColumnElement[bool]],
    *,
    reason: str,
    stamp: audit.Stamp,
) -> list[notices.TokenFacts]:
    """Revoke the live PATs matching ``criteria`` in one statement; audit them in another.

    Returns the revoked tokens, by id, with what their audit rows and notices name.
    """
    rows = revoke_statement(session, criteria, reason=reason, now=stamp.now)
    event_time = {"event_time": stamp.at.isoformat()}
    audit.record_many(
        session,
        [
            stamp.row(
                "revoke",
                reason,
                token_id=row.id,
                org_id=row.org_id,
                user_id=row.user_id,
                detail=event_time,
            )
            for row in rows
        ],
    )
    revoked: list[notices.TokenFacts] = sorted(rows, key=lambda row: str(row.id))
    return revoked


def _org_then_id(token: notices.TokenFacts) -> tuple[str, str]:
    return (token.org_id, token.id)


def revoke_statement(
    session: Session,
    criteria: Sequence[ColumnElement[bool]],
    *,
    reason: str,
    now: datetime,
    loaded: bool = True,
) -> list[notices.TokenFacts]:
    """Revoke the live PATs matching ``criteria`` in one statement; the rows it revoked.

    ``loaded=False``: the caller loaded no Token object in this session, so there is none to
    keep in step, and the statement skips the ORM's bookkeeping (a tenth of a batch of
    removals).
    """
    statement = (
        update(Token if loaded else cast(Table, Token.__table__))
        .where(
            Token.kind == TokenKind.PERSONAL.value,
            Token.revoked_at.is_(None),
            and_(*criteria),
        )
        .values(revoked_at=now, revoke_reason=reason)
        .returning(*notices.TOKEN_COLUMNS)
    )
    if loaded:
        # Keeps Token objects already loaded in this session in step, using the ids that
        # RETURNING brings back rather than a second query.
        statement = statement.execution_options(synchronize_session="fetch")
    rows: list[notices.TokenFacts] = []
    rows += notices.token_rows(session.execute(statement))
    return rows
