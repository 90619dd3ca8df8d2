"""The audit trail: one row for every revocation, refusal and membership change.

It holds the rows and how an applied event stamps them (:class:`Stamp`). It must not import
Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``, ``producer`` or
``worker.runtime``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

import structlog
from sqlalchemy import Connection, Table, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.clock import as_utc
from tokenwarden.worker.domain.models import AuditEntry, Token

log = structlog.get_logger(__name__)

_COPY: Final = (
    "COPY audit (at, action, reason, source, token_id, org_id, user_id, actor, event_id, detail)"
    " FROM STDIN"
)


@dataclass(frozen=True)
class Stamp:
    """What an applied event writes on the audit rows of what it changes: its time ``at``
    (in their detail), its ``source``, ``actor`` and id, and ``now``, when it is applied."""

    at: datetime
    now: datetime
    source: str
    event_id: str | None
    actor: str | None = None

    def record(
        self,
        session: Session,
        action: str,
        reason: str,
        *,
        org_id: str | None,
        user_id: str | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Add one audit row about this event, and say the same in a log line."""
        record(session, **self.row(action, reason, org_id=org_id, user_id=user_id, detail=detail))

    def row(
        self,
        action: str,
        reason: str,
        *,
        org_id: str | None,
        user_id: str | None,
        detail: dict[str, Any] | None,
        token_id: str | None = None,
    ) -> dict[str, Any]:
        """One row about this event for :func:`record_many`."""
        # Every row of one bulk insert needs the same keys, so all are spelled out.
        return {
            "at": self.now,
            "action": action,
            "reason": reason,
            "source": self.source,
            "token_id": token_id,
            "org_id": org_id,
            "user_id": user_id,
            "actor": self.actor,
            "event_id": self.event_id,
            "detail": detail,
        }


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
    named = {
        "token_id": token_id,
        "org_id": org_id,
        "user_id": user_id,
        "actor": actor,
        "event_id": event_id,
    }
    stored = dict(detail) if detail else None
    session.execute(
        insert(AuditEntry).values(
            at=at, action=action, reason=reason, source=source, detail=stored, **named
        )
    )
    log.info(f"audit.{action}", reason=reason, source=source, **named)


def record_token(
    session: Session,
    token: Token,
    *,
    action: str,
    reason: str,
    source: str,
    at: datetime,
    actor: str | None = None,
    event_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """:func:`record` a row about ``token``, naming its organization and user."""
    record(
        session,
        action=action,
        reason=reason,
        source=source,
        at=at,
        token_id=token.id,
        org_id=token.org_id,
        user_id=token.user_id,
        actor=actor,
        event_id=event_id,
        detail=detail,
    )


def record_many(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add many audit rows in one statement.

    Each row carries every keyword of :func:`record` but ``session``, ``None`` included. On
    Postgres they are streamed with ``COPY``; elsewhere they go as one ``INSERT`` executed for
    many rows (a multi-row ``VALUES`` is slower for hundreds of rows: the driver parses the long
    statement again each time).
    """
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        _copy(connection, rows)
    else:
        session.execute(insert(cast(Table, AuditEntry.__table__)), list(rows))


def _copy(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """The rows through ``COPY``, in the transaction (or savepoint) of ``connection``.

    A message of a hundred removals writes seven hundred rows; streaming them rather than
    executing an ``INSERT`` per row (even pipelined) saves about a sixth of the worker's CPU
    time per removal, and Postgres parses and plans no statement per row. Ids follow the
    rows' order, as with the ``INSERT``. A driver error comes out as SQLAlchemy's
    (a lost connection as an ``OperationalError`` with the connection invalidated), as from
    any other statement, so callers tell a transient failure from a bad row the same way.
    """
    # Only a Postgres connection gets here; psycopg stays unloaded on the embedded default.
    import psycopg

    driver = connection.connection.driver_connection
    assert driver is not None
    # The rows of one event share one detail (its time): each is written out once. The text
    # is json.dumps', as psycopg's Json writes it; JSON null for None, as the column type
    # stores it (none_as_null=False).
    details: dict[int, str] = {}
    try:
        with driver.cursor() as cursor, cursor.copy(_COPY) as copy:
            for row in rows:
                detail = details.get(id(row["detail"]))
                if detail is None:
                    detail = details[id(row["detail"])] = json.dumps(row["detail"])
                copy.write_row(
                    (
                        as_utc(row["at"]),
                        row["action"],
                        row["reason"],
                        row["source"],
                        row["token_id"],
                        row["org_id"],
                        row["user_id"],
                        row["actor"],
                        row["event_id"],
                        detail,
                    )
                )
    except psycopg.Error as error:
        lost = connection.dialect.is_disconnect(cast(Any, error), driver, None)
        if lost and not connection.invalidated:
            connection.invalidate(error)
        raise DBAPIError.instance(
            _COPY,
            None,
            error,
            psycopg.Error,
            connection_invalidated=lost,
            dialect=connection.dialect,
        ) from error


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
