"""What the sweep writes into the audit trail: rows about tokens, in one INSERT a batch.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import insert
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.expiry.grouped_notices import AnyRow
from tokenwarden.worker.domain.models import AuditEntry

# The ``source`` of the sweep's audit rows, and the reason of a token it marks.
SOURCE: Final = "sweep"
EXPIRED: Final = "expired"


def audit_row(
    row: AnyRow, *, at: datetime, action: str, reason: str, detail: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The sweep's audit row about the token of ``row`` (its id, org_id and user_id)."""
    # Every row of one batched INSERT needs the same keys, so all are spelled out.
    return {
        "at": at,
        "action": action,
        "reason": reason,
        "source": SOURCE,
        "token_id": row.id,
        "org_id": row.org_id,
        "user_id": row.user_id,
        "actor": None,
        "event_id": None,
        "detail": detail,
    }


def insert_audit_rows(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Audit rows in one batched INSERT (rows carry the same keys as ``audit.record``).

    ``render_nulls``: without it the ORM leaves out the columns that are None in a row, so
    rows with and without a ``user_id`` (application tokens) interleave into hundreds of
    separate statements per batch instead of one.
    """
    if rows:
        session.execute(insert(AuditEntry).execution_options(render_nulls=True), rows)
