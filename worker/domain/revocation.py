"""Revoking tokens: one at a time on request, in bulk when a member leaves."""

from __future__ import annotations

from datetime import datetime

import structlog
from sqlalchemy import update
from sqlalchemy.orm import Session

from worker.domain import audit
from worker.domain.models import Token

log = structlog.get_logger(__name__)


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
    audit.record(
        session,
        action="revoke",
        reason=reason,
        source=source,
        at=now,
        token_id=token.id,
        org_id=token.org_id,
        user_id=token.user_id,
        actor=actor,
        event_id=event_id,
        detail=detail,
    )
    return token
