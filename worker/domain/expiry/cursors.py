"""Where a pass of the sweep resumes: named positions in ``job_cursors``.

A cursor moves in the transaction that did the work up to it, so a run cut short (by its
budget, a crash) resumes exactly where the last committed batch left off.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.models import JobCursor


def read_cursor(
    session: Session, name: str, *, now: datetime
) -> tuple[str | None, datetime | None]:
    """(position, when the current pass started) of cursor ``name``, created if missing."""
    row = session.execute(
        select(JobCursor.position, JobCursor.pass_started_at).where(JobCursor.name == name)
    ).first()
    if row is None:
        session.execute(insert(JobCursor).values(name=name, position=None, updated_at=now))
        return None, None
    return row.position, row.pass_started_at


def move_cursor(
    session: Session,
    name: str,
    *,
    position: str | None,
    now: datetime,
    pass_started_at: datetime | None = None,
) -> None:
    values: dict[str, Any] = {"position": position, "updated_at": now}
    if pass_started_at is not None:
        values["pass_started_at"] = pass_started_at
    session.execute(update(JobCursor).where(JobCursor.name == name).values(**values))
