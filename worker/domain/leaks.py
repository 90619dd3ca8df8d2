"""Leak reports: a token seen where it must not be is revoked, whatever its kind.

The owner's organization hears of it through a leak notice, queued in the same transaction
as the revocation, and only when this report revoked the token: a second report of the same
token tells nobody anything twice.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import notices
from tokenwarden.worker.domain.models import Token
from tokenwarden.worker.domain.revocation import TokenOutcome, revoke_token

log = structlog.get_logger(__name__)

LEAKED = "leaked"


def report_leak(
    session: Session,
    *,
    token_hash: str | None = None,
    token_id: str | None = None,
    source_url: str | None = None,
    reporter: str | None = None,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
) -> TokenOutcome:
    """Revoke a leaked token, whatever its kind, named by the hash of its text or by its id.

    A second report of the same token changes nothing. An unknown token is not audited: the
    leak endpoints must not reveal whether a token exists, and the trail is readable by more
    people than the event inbox.
    """
    found = _find(session, token_hash=token_hash, token_id=token_id)
    if found is None:
        log.info("leak.unknown_token", event_id=event_id, event_time=at.isoformat())
        return TokenOutcome(None, revoked=False)
    token = revoke_token(
        session,
        token_id=found,
        reason=LEAKED,
        source=source,
        now=now,
        actor=reporter,
        event_id=event_id,
        detail=_detail(source_url=source_url, reporter=reporter),
    )
    if token is not None:
        notices.leak_notice(
            session,
            token,
            now=now,
            source=source,
            source_url=source_url,
            reporter=reporter,
            event_id=event_id,
            at=at,
        )
    return TokenOutcome(found, revoked=token is not None)


def _find(session: Session, *, token_hash: str | None, token_id: str | None) -> str | None:
    """The id of the token named by exactly one of ``token_hash`` and ``token_id``, if any."""
    if (token_hash is None) == (token_id is None):
        raise ValueError("name the leaked token by exactly one of token_hash and token_id")
    named = Token.token_hash == token_hash if token_hash is not None else Token.id == token_id
    found: str | None = session.scalar(select(Token.id).where(named))
    return found


def _detail(*, source_url: str | None, reporter: str | None) -> dict[str, str] | None:
    """What the revocation's audit row says of the report: where the token was seen, by whom."""
    given = (("source_url", source_url), ("reporter", reporter))
    return {key: value for key, value in given if value is not None} or None
