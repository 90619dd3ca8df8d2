"""The event inbox: every accepted event is a row before any queue carries its id.

A ``202`` from the API means the rows are committed. The queue then carries only ids; a
worker applies each pending event once (the row lock and the status make a second delivery
a no-op), and the re-drive republishes rows that no worker finished, so an event survives a
broker that is down, a broker that loses its queue, and a worker killed mid-task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Executable,
    Select,
    Table,
    any_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.events import CloudEvent, canonical, digest
from tokenwarden.worker.domain.models import DeadLetter, EventStatus, InboxEvent, UTCDateTime

BODY_EXCERPT = 2000


class Conflict(Exception):
    """Event ids already used for other content."""

    def __init__(self, ids: Sequence[str]) -> None:
        super().__init__(f"event id already used with other content: {', '.join(ids)}")
        self.ids = list(ids)


@dataclass(frozen=True)
class Stored:
    accepted: list[str] = field(default_factory=list)
    # Ids to put on the queue: new rows, and old ones still pending (a resend after an outage).
    to_publish: list[str] = field(default_factory=list)


def store_events(session: Session, events: Sequence[CloudEvent], *, now: datetime) -> Stored:
    """Add the events to the inbox; the same id with the same content is accepted again."""
    wanted: dict[str, tuple[CloudEvent, str]] = {}
    clashes: list[str] = []
    for event in events:
        fingerprint = digest(event)
        seen = wanted.get(event.id)
        if seen is not None and seen[1] != fingerprint:
            clashes.append(event.id)
        wanted.setdefault(event.id, (event, fingerprint))
    rows = [
        {
            "id": event.id,
            "type": event.type,
            "source": event.source,
            "time": event.time or now,
            "data": canonical(event)["data"],
            "digest": fingerprint,
            "status": EventStatus.PENDING.value,
            "attempts": 0,
            "received_at": now,
            # Counted as published now: the caller publishes right after commit, and the
            # re-drive steps in only if that did not happen.
            "published_at": now,
        }
        for event, fingerprint in wanted.values()
    ]
    # Insert first and look up only the ids that were already there: one round trip fewer
    # in the usual case, where every event is new. A conflict raises, and the caller's
    # transaction then rolls the inserted rows back with it.
    inserted = set(session.execute(_insert_new(session), rows).scalars()) if rows else set()
    seen_before = [i for i in wanted if i not in inserted]
    existing = (
        {
            row.id: row
            for row in session.execute(
                select(InboxEvent.id, InboxEvent.digest, InboxEvent.status).where(
                    InboxEvent.id.in_(seen_before)
                )
            )
        }
        if seen_before
        else {}
    )
    clashes += [i for i, row in existing.items() if row.digest != wanted[i][1]]
    if clashes:
        raise Conflict(sorted(set(clashes)))
    pending = [i for i, row in existing.items() if row.status == EventStatus.PENDING]
    return Stored(accepted=list(wanted), to_publish=[i for i in wanted if i in inserted] + pending)


def _insert_new(session: Session) -> Executable:
    """``INSERT … ON CONFLICT (id) DO NOTHING RETURNING id``: the ids it did insert.

    Two producers sending the same new id at once then both succeed (the second waits for the
    first's commit, inserts nothing, and finds the row), instead of one failing on the key.
    A Core statement on the table, not the ORM's bulk insert: for the single event of a
    typical request that halves the client's CPU time of the whole transaction.
    """
    table = cast(Table, InboxEvent.__table__)
    return (
        db.insert_for(session, table)
        .on_conflict_do_nothing(index_elements=[table.c.id])
        .returning(table.c.id)
    )


def due_for_redrive(
    session: Session, *, now: datetime, older_than: timedelta, limit: int = 1000
) -> list[str]:
    """Pending events not published for ``older_than``; marks them published now."""
    cutoff = now - older_than
    ids = list(
        session.scalars(
            select(InboxEvent.id)
            .where(
                InboxEvent.status == EventStatus.PENDING,
                or_(InboxEvent.published_at.is_(None), InboxEvent.published_at < cutoff),
            )
            .order_by(InboxEvent.time, InboxEvent.id)
            .limit(limit)
        )
    )
    if ids:
        session.execute(update(InboxEvent).where(InboxEvent.id.in_(ids)).values(published_at=now))
    return ids


def hold(session: Session, event_ids: Sequence[str]) -> dict[str, str]:
    """Lock the events among ``event_ids`` that no other transaction holds; the status of each
    one locked.

    A task does this for its message's own events before it takes others along with
    :func:`pending_besides`. Neither waits for a row another worker holds, so two workers
    that take each other's events along cannot deadlock, nor wait for each other.
    """
    rows = session.execute(
        select(InboxEvent.id, InboxEvent.status)
        .where(db.among(session, InboxEvent.id, event_ids))
        .order_by(InboxEvent.time, InboxEvent.id)
        .with_for_update(skip_locked=True)
    )
    return {row.id: row.status for row in rows}


def present(session: Session, event_ids: Sequence[str]) -> list[str]:
    """The ids among ``event_ids`` that are in the inbox, locked by anyone or not."""
    return list(
        session.scalars(select(InboxEvent.id).where(db.among(session, InboxEvent.id, event_ids)))
    )


def pending_besides(session: Session, event_ids: Sequence[str], *, limit: int) -> list[str]:
    """Up to ``limit`` other pending events, oldest received first, locked for this transaction.

    Rows another worker holds are skipped, never waited for. Applying them along with a
    message's own events turns a backlog of one-event messages into a few batches; their own
    messages later find them finished and skip them.
    """
    if limit <= 0:
        return []
    return list(
        session.scalars(
            select(InboxEvent.id)
            .where(
                InboxEvent.status == EventStatus.PENDING,
                InboxEvent.id.not_in(list(event_ids)),
            )
            .order_by(InboxEvent.received_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def claim(session: Session, event_ids: Sequence[str]) -> list[InboxEvent]:
    """Lock the still-pending events among ``event_ids``, oldest event time first.

    The rows are found by their ids alone, and the finished ones left out here: with the
    status in the statement, Postgres may walk every pending event by the status index and
    test each against all the ids (a burst of ten thousand events, which the statistics do
    not know of yet, made that 14 ms a batch of 200 with 2,000 pending).
    """
    events = session.scalars(
        select(InboxEvent)
        .where(db.among(session, InboxEvent.id, event_ids))
        .order_by(InboxEvent.time, InboxEvent.id)
        .with_for_update()
    )
    return [event for event in events if event.status == EventStatus.PENDING]


def finish(
    session: Session,
    event: InboxEvent,
    *,
    status: EventStatus,
    now: datetime,
    reason: str | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    event.status = status.value
    event.reason = reason[:1000] if reason else None
    event.result = result
    event.attempts += 1
    event.finished_at = now


@dataclass(frozen=True)
class Mark:
    """An event of a batch as :func:`finish_many` marks it: done with its ``result``, or dead
    with the ``reason``."""

    event: InboxEvent
    status: EventStatus
    reason: str | None = None
    result: dict[str, Any] | None = None


# Postgres: a batch's marks in one jsonb parameter, one statement whatever their number,
# where the ORM's flush runs an UPDATE per event. The result goes as text and is cast to json
# as it is, so the column holds the very text the ORM would write. The ids are also given as
# an array, so that the events are found by their key: joined on the unpacked marks alone,
# Postgres read the whole inbox for each batch while its statistics said it was small.
_POSTGRES_FINISH: Final = text(
    "UPDATE events AS e SET status = m->>1, reason = m->>2, result = CAST(m->>3 AS json),"
    " attempts = e.attempts + 1, finished_at = :now"
    " FROM jsonb_array_elements(CAST(:marks AS jsonb)) AS m"
    " WHERE e.id = ANY(CAST(:ids AS varchar[])) AND e.id = m->>0"
).bindparams(bindparam("now", type_=UTCDateTime()))


def finish_many(session: Session, marks: Sequence[Mark], *, now: datetime) -> None:
    """Mark each event as :func:`finish` does, in one statement; the loaded events follow."""
    if not marks:
        return
    rows = [
        (
            mark.event.id,
            mark.status.value,
            mark.reason[:1000] if mark.reason else None,
            # JSON null for None, as the column type writes it (none_as_null=False).
            json.dumps(mark.result),
        )
        for mark in marks
    ]
    if session.get_bind().dialect.name == "postgresql":
        ids = [row[0] for row in rows]
        session.execute(_POSTGRES_FINISH, {"marks": json.dumps(rows), "ids": ids, "now": now})
    else:
        table = cast(Table, InboxEvent.__table__)
        session.execute(
            update(table)
            .where(table.c.id == bindparam("mark_id"))
            .values(
                status=bindparam("mark_status"),
                reason=bindparam("mark_reason"),
                result=bindparam("mark_result"),
                attempts=table.c.attempts + 1,
                finished_at=now,
            ),
            [
                {
                    "mark_id": mark.event.id,
                    "mark_status": mark.status.value,
                    "mark_reason": reason,
                    "mark_result": mark.result,
                }
                for mark, (_, _, reason, _) in zip(marks, rows, strict=True)
            ],
        )
    for mark, (_, status, reason, _) in zip(marks, rows, strict=True):
        event = mark.event
        # What the statement wrote, as if loaded: the session has nothing left to flush.
        for name, value in (
            ("status", status),
            ("reason", reason),
            ("result", mark.result),
            ("attempts", event.attempts + 1),
            ("finished_at", now),
        ):
            set_committed_value(event, name, value)


def dead_letter(
    session: Session,
    *,
    reason: str,
    now: datetime,
    event_id: str | None = None,
    task: str | None = None,
    body: str | None = None,
) -> None:
    """Keep a queue message that cannot be used, with the reason; its body is cut short."""
    session.execute(
        insert(DeadLetter).values(
            at=now,
            reason=reason[:1000],
            event_id=event_id,
            task=task,
            body=body[:BODY_EXCERPT] if body else None,
        )
    )


def purge_finished(session: Session, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` done or dead events that finished before ``before``; how many.

    A pending event is never deleted, however old: only a finished one has a ``finished_at``,
    and the status is checked as well. Once deleted, an event's id is free again: the same
    event sent again is stored and applied as a new one (the ordering rules make a replay of
    an old membership event stale, and a leak or revocation replay finds the token revoked).
    """
    due = (
        select(InboxEvent.id)
        # "Not pending" rather than "done or dead": an equality on the status would lead
        # SQLite to the (status, received_at) index, then to sorting every finished event.
        .where(InboxEvent.status != EventStatus.PENDING.value, InboxEvent.finished_at < before)
        .order_by(InboxEvent.finished_at)
        .limit(limit)
    )
    return _delete_chosen(session, InboxEvent.__table__, InboxEvent.id, due)


def purge_dead_letters(session: Session, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` dead letters kept since before ``before``; how many."""
    due = select(DeadLetter.id).where(DeadLetter.at < before).order_by(DeadLetter.at).limit(limit)
    return _delete_chosen(session, DeadLetter.__table__, DeadLetter.id, due)


def _delete_chosen(session: Session, table: Any, key: Any, due: Select[Any]) -> int:
    # On Postgres ``key = ANY(ARRAY(subquery))`` keeps the planner on the index for large
    # batches, where ``IN`` may switch to a scan of the whole table.
    chosen: ColumnElement[bool] = (
        key == any_(func.array(due.scalar_subquery()))
        if session.get_bind().dialect.name == "postgresql"
        else key.in_(due.scalar_subquery())
    )
    result = session.execute(
        delete(table).where(chosen).execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount


def list_events(
    session: Session, *, status: str | None = None, limit: int = 100
) -> list[InboxEvent]:
    query = select(InboxEvent).order_by(InboxEvent.received_at.desc(), InboxEvent.id).limit(limit)
    if status:
        query = query.where(InboxEvent.status == status)
    return list(session.scalars(query))


def list_dead_letters(session: Session, *, limit: int = 100) -> list[DeadLetter]:
    return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)))


def recent_apply_seconds(session: Session, *, now: datetime, window: timedelta) -> list[float]:
    """Seconds from receipt to done for events received within ``window`` of ``now``."""
    rows = session.execute(
        select(InboxEvent.received_at, InboxEvent.finished_at).where(
            InboxEvent.status == EventStatus.DONE,
            InboxEvent.received_at >= now - window,
            InboxEvent.finished_at.is_not(None),
        )
    )
    return [(finished - received).total_seconds() for received, finished in rows if finished]


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Events by (type, status), for metrics."""
    rows = session.execute(
        select(InboxEvent.type, InboxEvent.status, func.count()).group_by(
            InboxEvent.type, InboxEvent.status
        )
    )
    return {(kind, status): number for kind, status, number in rows}
