"""Applying inbox events: one event to the domain, or a batch of them in one transaction.

A batch runs inside the caller's transaction, each event in its own SAVEPOINT: an event that
cannot be applied rolls back only its own changes and is marked dead with the reason, while
the rest of the batch is applied and committed together (a commit per event would cap a
worker at a fraction of what the broker delivers). An error that a retry can fix, such as a
lost connection, is not the event's fault: it propagates so that the whole batch is retried.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import inbox, members, offboarding
from worker.events import (
    InvalidEvent,
    MembershipAdded,
    MembershipRemoved,
    MembershipRoleChanged,
    TokenLeakSuspected,
    TokenRevokeRequested,
    UserDeactivated,
    parse_event,
)
from worker.models import EventStatus, InboxEvent
from worker.tokens import mask_tokens

log = structlog.get_logger(__name__)

NO_SUCH_EVENT: Final = "no such event in the inbox"


@dataclass
class BatchOutcome:
    """What happened to each id of a batch."""

    done: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    # Not in the inbox at all: each got a dead-letter row.
    missing: list[str] = field(default_factory=list)
    # Finished by an earlier delivery (or being applied by another worker right now).
    skipped: list[str] = field(default_factory=list)


def apply_event(session: Session, event: InboxEvent, *, now: datetime) -> dict[str, Any]:
    """Apply one stored event; return a JSON-safe summary of what it did.

    Raises :class:`InvalidEvent` when the stored event does not validate (an unknown type,
    data of the wrong shape).
    """
    cloud = parse_event(
        {
            "specversion": "1.0",
            "id": event.id,
            "source": event.source,
            "type": event.type,
            "time": event.time,
            "data": event.data,
        }
    )
    at, source, event_id = cloud.time or event.time, cloud.source, cloud.id
    match cloud.payload():
        case MembershipAdded() as data:
            applied = members.add_member(
                session,
                org_id=data.org_id,
                user_id=data.user_id,
                role=data.role,
                email=data.email,
                at=at,
                now=now,
                source=source,
                event_id=event_id,
            )
            return {"applied": applied, "revoked": []}
        case MembershipRoleChanged() as data:
            applied = offboarding.change_role(
                session,
                org_id=data.org_id,
                user_id=data.user_id,
                role=data.role,
                at=at,
                now=now,
                source=source,
                event_id=event_id,
            )
            return {"applied": applied, "revoked": []}
        case MembershipRemoved() as data:
            revoked = offboarding.remove_member(
                session,
                org_id=data.org_id,
                user_id=data.user_id,
                at=at,
                now=now,
                source=source,
                event_id=event_id,
            )
            return {"revoked": revoked}
        case UserDeactivated() as data:
            revoked = offboarding.deactivate_user(
                session, user_id=data.user_id, at=at, now=now, source=source, event_id=event_id
            )
            return {"revoked": revoked}
        case TokenRevokeRequested() as data:
            outcome = offboarding.request_revocation(
                session,
                token_id=data.token_id,
                at=at,
                now=now,
                source=source,
                event_id=event_id,
                actor=data.actor,
            )
            return _token_result(outcome)
        case TokenLeakSuspected() as data:
            outcome = offboarding.report_leak(
                session,
                token_hash=data.token_hash,
                token_id=data.token_id,
                source_url=data.source_url,
                reporter=data.reporter,
                at=at,
                now=now,
                source=source,
                event_id=event_id,
            )
            return _token_result(outcome)
    raise InvalidEvent(f"no handler for event type {cloud.type!r}", cloud.id)


def apply_pending(
    session: Session,
    event_ids: Sequence[str],
    *,
    now: datetime,
    retryable: Callable[[Exception], bool],
    task: str | None = None,
) -> BatchOutcome:
    """Apply the still-pending events among ``event_ids``, each in its own savepoint.

    An event that fails validation or raises is marked dead with the reason; the others are
    applied. An error for which ``retryable`` is true propagates, and the caller's transaction
    must then roll back as a whole. Ids not in the inbox at all are dead-lettered.
    """
    wanted = list(dict.fromkeys(event_ids))
    outcome = BatchOutcome()
    # Row locks on the claimed events: a second delivery of the same ids waits here, then
    # finds them finished and skips them.
    claimed = inbox.claim(session, wanted)
    claimed_ids = {event.id for event in claimed}
    unclaimed = [i for i in wanted if i not in claimed_ids]
    if unclaimed:
        known = set(session.scalars(select(InboxEvent.id).where(InboxEvent.id.in_(unclaimed))))
        outcome.skipped = [i for i in unclaimed if i in known]
        outcome.missing = [i for i in unclaimed if i not in known]
    for event_id in outcome.missing:
        inbox.dead_letter(session, reason=NO_SUCH_EVENT, now=now, event_id=event_id, task=task)
        log.warning("event.dead_letter", event_id=event_id, reason=NO_SUCH_EVENT)
    for event in claimed:
        with structlog.contextvars.bound_contextvars(event_id=event.id, event_type=event.type):
            if _apply_one(session, event, now=now, retryable=retryable):
                outcome.done.append(event.id)
            else:
                outcome.dead.append(event.id)
    return outcome


def _apply_one(
    session: Session,
    event: InboxEvent,
    *,
    now: datetime,
    retryable: Callable[[Exception], bool],
) -> bool:
    try:
        # The event's effects and its DONE mark are released together, or not at all.
        with session.begin_nested():
            result = apply_event(session, event, now=now)
            inbox.finish(session, event, status=EventStatus.DONE, now=now, result=result)
    except InvalidEvent as error:
        reason = error.reason
        log.warning("event.invalid", reason=reason)
    except Exception as error:
        if retryable(error):
            raise
        reason = redact(f"{type(error).__name__}: {error}".splitlines()[0])
        log.exception("event.failed", reason=reason)
    else:
        log.info("event.applied", revoked=len(result.get("revoked", ())))
        return True
    inbox.finish(session, event, status=EventStatus.DEAD, now=now, reason=reason)
    # Flushed now, outside any savepoint, so that a later event's rollback cannot undo it.
    session.flush()
    return False


def dead_letter_message(
    session: Session, *, reason: str, now: datetime, task: str | None, body: object
) -> None:
    """Keep an unusable queue message with the reason and an excerpt of its body, redacted."""
    inbox.dead_letter(session, reason=redact(reason), now=now, task=task, body=excerpt(body))
    log.warning("message.dead_letter", reason=redact(reason), task=task)


def excerpt(body: object) -> str:
    """A body as text fit for storing: tokens masked first, then cut to the stored length.

    Masking before cutting: a cut through a token could leave a fragment too short for the
    pattern to recognise.
    """
    if isinstance(body, bytes | bytearray | memoryview):
        text = bytes(body).decode("utf-8", errors="replace")
    elif isinstance(body, str):
        text = body
    else:
        text = json.dumps(body, default=repr)
    return redact(text)[: inbox.BODY_EXCERPT]


redact = mask_tokens


def _token_result(outcome: offboarding.TokenOutcome) -> dict[str, Any]:
    revoked = [outcome.token_id] if outcome.revoked and outcome.token_id else []
    return {"revoked": revoked, "unknown_token": outcome.token_id is None}
