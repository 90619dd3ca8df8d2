"""The audit trail: one row for every revocation, refusal and membership change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import structlog
from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from worker.models import AuditEntry

log = structlog.get_logger(__name__)


def record(
    session: Session,
    *,
    action: str,
    reason: str,
    source: str,
    at: datetime,
    token_id: str | None = None,
    org_id: str | None = None,
    user_id: str | None = None,
    actor: str | None = None,
    event_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Add one audit row, and say the same in a log line."""
    session.execute(
        insert(AuditEntry).values(
            at=at,
            action=action,
            reason=reason,
            source=source,
            token_id=token_id,
            org_id=org_id,
            user_id=user_id,
            actor=actor,
            event_id=event_id,
            detail=dict(detail) if detail else None,
        )
    )
    log.info(
        f"audit.{action}",
        reason=reason,
        source=source,
        token_id=token_id,
        org_id=org_id,
        user_id=user_id,
        actor=actor,
        event_id=event_id,
    )


def record_many(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add many audit rows in one statement.

    Each row carries every keyword of :func:`record` but ``session``, ``None`` included, so
    that all of them go as one statement (executed for many rows; psycopg pipelines it). A
    multi-row ``VALUES`` is slower for hundreds of rows: the driver parses the long statement
    again each time.
    """
    if rows:
        session.execute(insert(cast(Table, AuditEntry.__table__)), list(rows))


def trail(
    session: Session,
    *,
    token_id: str | None = None,
    user_id: str | None = None,
    org_id: str | None = None,
    limit: int | None = None,
) -> Iterable[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.id)
    if token_id:
        query = query.where(AuditEntry.token_id == token_id)
    if user_id:
        query = query.where(AuditEntry.user_id == user_id)
    if org_id:
        query = query.where(AuditEntry.org_id == org_id)
    if limit:
        query = query.limit(limit)
    return session.scalars(query)
