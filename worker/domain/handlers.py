"""Applying inbox events: one event to the domain, or a batch of them in one transaction.

A batch runs inside the caller's transaction and is committed together (a commit per event
would cap a worker at a fraction of what the broker delivers). It is first applied inside one
SAVEPOINT for the whole batch; only if an event raises is that savepoint rolled back and the
batch applied again with a SAVEPOINT per event, so that an event that cannot be applied rolls
back only its own changes and is marked dead with the reason, while the rest are applied. (A
savepoint per event on every batch cost two round trips and a flush per event.) An error that
a retry can fix, such as a lost connection, is not the event's fault: it propagates so that
the whole batch is retried.

An event is ordered by its time, but never after it was received (``received_at``): a producer
whose clock runs a little ahead cannot place an event after events that really come later.
One more than ``TOKENWARDEN_MAX_CLOCK_SKEW_S`` ahead of its receipt is invalid (the API refuses
it; one that reached the inbox another way is marked dead here, with the reason).

A batch made only of removals of distinct, known memberships (what offboarding sends in bulk)
goes set-based instead (worker.domain.removals): a handful of statements for the whole batch rather
than some nine per event, with the same outcome. If it raises, it is rolled back and the
events are applied one savepoint each, as above; anything else in the batch (another event
type, two events about one membership, a membership not known yet) takes the general path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, TypedDict

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.config.settings import get_settings
from tokenwarden.worker.domain import (
    audit,
    bulk_revocation,
    deactivation,
    inbox,
    leaks,
    members,
    removals,
    revocation,
)
from tokenwarden.worker.domain.events import (
    CloudEvent,
    InvalidEvent,
    MembershipAdded,
    MembershipRemoved,
    MembershipRoleChanged,
    TokenLeakSuspected,
    TokenRevokeRequested,
    TokensBulkRevokeRequested,
    UserDeactivated,
    ordering_time,
    parse_event,
    too_far_ahead,
)
from tokenwarden.worker.domain.models import EventStatus, InboxEvent, TokenKind
from tokenwarden.worker.domain.notices import NEW_NOTICES
from tokenwarden.worker.domain.tokens import mask_tokens

log = structlog.get_logger(__name__)

NO_SUCH_EVENT: Final = "no such event in the inbox"
# In an event's result: it did part of its work in this transaction and stays pending for
# the rest (a bulk revocation, one batch a transaction). Its id is published again once the
# transaction commits, and the re-drive would find it anyway.
UNFINISHED: Final = "unfinished"
_UNFINISHED_EVENTS: Final = "tokenwarden.unfinished_events"


@dataclass
class BatchOutcome:
    """What happened to each id of a batch."""

    done: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    # Not in the inbox at all: each got a dead-letter row.
    missing: list[str] = field(default_factory=list)
    # Finished by an earlier delivery (or being applied by another worker right now).
    skipped: list[str] = field(default_factory=list)
    # Applied in part and still pending (see UNFINISHED): to be published again.
    unfinished: list[str] = field(default_factory=list)


def apply_event(session: Session, event: InboxEvent, *, now: datetime) -> dict[str, Any]:
    """Apply one stored event; return a JSON-safe summary of what it did.

    Raises :class:`InvalidEvent` when the stored event does not validate (an unknown type,
    data of the wrong shape, a time too far ahead of its receipt).
    """
    cloud, at = validated(event)
    return _dispatch(session, event, cloud, at=at, now=now)


def parse_stored(event: InboxEvent) -> CloudEvent:
    """The stored event, validated again; raises :class:`InvalidEvent`. Touches no table."""
    return parse_event(
        {
            "specversion": "1.0",
            "id": event.id,
            "source": event.source,
            "type": event.type,
            "time": event.time,
            "data": event.data,
        }
    )


def validated(event: InboxEvent) -> tuple[CloudEvent, datetime]:
    """The stored event validated again, and the time it is ordered by (its time, but no
    later than its receipt); raises :class:`InvalidEvent`. Touches no table."""
    cloud = parse_stored(event)
    time = cloud.time or event.time
    reason = too_far_ahead(time, received=event.received_at, max_skew=max_clock_skew())
    if reason is not None:
        raise InvalidEvent(reason, event.id)
    return cloud, ordering_time(time, received=event.received_at)


def max_clock_skew() -> timedelta:
    return timedelta(seconds=get_settings().max_clock_skew_s)


def _dispatch(
    session: Session, event: InboxEvent, cloud: CloudEvent, *, at: datetime, now: datetime
) -> dict[str, Any]:
    return _ordered(_apply_payload(session, cloud, at=at, now=now), event, at=at)


def _ordered(result: dict[str, Any], event: InboxEvent, *, at: datetime) -> dict[str, Any]:
    """``result``, saying when ``at`` is earlier than the event's own time."""
    if at < event.time:
        # Dated after its own arrival: ordered as of the arrival instead (see the module).
        result["ordered_at"] = at.isoformat()
    return result


class _Stamp(TypedDict):
    """What every domain function applying an event is told besides the event's data."""

    at: datetime
    now: datetime
    source: str
    event_id: str | None


def _apply_payload(
    session: Session, cloud: CloudEvent, *, at: datetime, now: datetime
) -> dict[str, Any]:
    stamp = _Stamp(at=at, now=now, source=cloud.source, event_id=cloud.id)
    match cloud.payload():
        case MembershipAdded() as data:
            applied = members.add_member(
                session,
                org_id=data.org_id,
                user_id=data.user_id,
                role=data.role,
                email=data.email,
                **stamp,
            )
            return {"applied": applied, "revoked": []}
        case MembershipRoleChanged() as data:
            applied = members.change_role(
                session, org_id=data.org_id, user_id=data.user_id, role=data.role, **stamp
            )
            return {"applied": applied, "revoked": []}
        case MembershipRemoved() as data:
            revoked = removals.remove_member(
                session, org_id=data.org_id, user_id=data.user_id, **stamp
            )
            return {"revoked": revoked}
        case UserDeactivated() as data:
            return {"revoked": deactivation.deactivate_user(session, user_id=data.user_id, **stamp)}
        case TokenRevokeRequested() as data:
            outcome = revocation.request_revocation(
                session, token_id=data.token_id, actor=data.actor, **stamp
            )
            return _token_result(outcome)
        case TokenLeakSuspected() as data:
            outcome = leaks.report_leak(
                session,
                token_hash=data.token_hash,
                token_id=data.token_id,
                source_url=data.source_url,
                reporter=data.reporter,
                **stamp,
            )
            return _token_result(outcome)
        case TokensBulkRevokeRequested() as data:
            return _bulk_revoke(session, data, stamp)
    raise InvalidEvent(f"no handler for event type {cloud.type!r}", cloud.id)


def _bulk_revoke(
    session: Session, data: TokensBulkRevokeRequested, stamp: _Stamp
) -> dict[str, Any]:
    """One batch of a bulk revocation; the event stays pending until a batch finds the
    selection exhausted (see worker.domain.bulk_revocation)."""
    done = bulk_revocation.step(
        session,
        selection_of(data),
        stamp=audit.Stamp(**stamp, actor=data.actor),
        reason=data.reason,
        limit=get_settings().sweep_batch,
    )
    if not done.finished:
        return {"revoked": [row.id for row in done.revoked], UNFINISHED: True}
    return {"revoked": [row.id for row in done.everything]}


def selection_of(data: TokensBulkRevokeRequested) -> bulk_revocation.Selection:
    """The tokens a bulk revocation event names."""
    return bulk_revocation.Selection(
        org_id=data.org_id,
        user_id=data.user_id,
        kind=TokenKind(data.kind) if data.kind else None,
        created_before=data.created_before,
    )


def apply_pending(
    session: Session,
    event_ids: Sequence[str],
    *,
    now: datetime,
    retryable: Callable[[Exception], bool],
    task: str | None = None,
) -> BatchOutcome:
    """Apply the still-pending events among ``event_ids``, in event time order.

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
        outcome = settle_unclaimed(session, unclaimed, known, now=now, task=task)
    # In the order the events count in (see the module), the order one at a time would take.
    claimed.sort(key=lambda e: (ordering_time(e.time, received=e.received_at), e.id))
    only_removals = _only_removals(claimed)
    if only_removals is not None:
        applied = _apply_removals(session, only_removals, now=now, retryable=retryable)
    else:
        applied = _apply_together(session, claimed, now=now, retryable=retryable)
    for event in claimed:
        with structlog.contextvars.bound_contextvars(event_id=event.id, event_type=event.type):
            if applied is not None:
                done = applied[event.id]
            else:
                done = _apply_one(session, event, now=now, retryable=retryable)
        (outcome.done if done else outcome.dead).append(event.id)
    unfinished = set(session.info.pop(_UNFINISHED_EVENTS, ()))
    outcome.unfinished = [i for i in outcome.done if i in unfinished]
    outcome.done = [i for i in outcome.done if i not in unfinished]
    return outcome


def settle_unclaimed(
    session: Session,
    event_ids: Sequence[str],
    known: Collection[str],
    *,
    now: datetime,
    task: str | None = None,
) -> BatchOutcome:
    """The outcome of ids with nothing left to apply: skipped when ``known`` to the inbox
    (finished already), else missing, each with a dead-letter row."""
    outcome = BatchOutcome(
        skipped=[i for i in event_ids if i in known],
        missing=[i for i in event_ids if i not in known],
    )
    for event_id in outcome.missing:
        inbox.dead_letter(session, reason=NO_SUCH_EVENT, now=now, event_id=event_id, task=task)
        log.warning("event.dead_letter", event_id=event_id, reason=NO_SUCH_EVENT)
    return outcome


def _finish_done(
    session: Session, event: InboxEvent, result: dict[str, Any], *, now: datetime
) -> None:
    """Mark an applied event done, or leave it pending when it did only part of its work."""
    if result.get(UNFINISHED):
        event.published_at = now  # published again after commit: the re-drive waits
        session.info.setdefault(_UNFINISHED_EVENTS, []).append(event.id)
        return
    inbox.finish(session, event, status=EventStatus.DONE, now=now, result=result)


# An event of a batch of removals: what to apply, or why it is invalid.
_Parsed = tuple[InboxEvent, removals.Removal | None, str | None]


def _only_removals(events: Sequence[InboxEvent]) -> list[_Parsed] | None:
    """The events validated, when every valid one is a removal of a membership no other
    event of the batch names; otherwise None (the general path applies them)."""
    if len(events) < 2 or any(event.type != "membership.removed" for event in events):
        return None
    parsed: list[_Parsed] = []
    seen: set[tuple[str, str]] = set()
    for event in events:
        try:
            cloud, at = validated(event)
        except InvalidEvent as error:
            parsed.append((event, None, error.reason))
            continue
        data = cloud.payload()
        assert isinstance(data, MembershipRemoved)
        if (data.org_id, data.user_id) in seen:
            return None  # the second depends on what the first did
        seen.add((data.org_id, data.user_id))
        removal = removals.Removal(
            org_id=data.org_id,
            user_id=data.user_id,
            at=at,
            source=cloud.source,
            event_id=cloud.id,
        )
        parsed.append((event, removal, None))
    return parsed


def _apply_removals(
    session: Session,
    parsed: Sequence[_Parsed],
    *,
    now: datetime,
    retryable: Callable[[Exception], bool],
) -> dict[str, bool] | None:
    """Apply a batch of removals set-based (worker.domain.removals) and mark each event.

    Falls back to :func:`_apply_together` when a membership is not known yet, and returns
    None (each event in a savepoint of its own follows) when the batch raised.
    """
    wanted = [removal for _, removal, _ in parsed if removal is not None]
    remembered = len(session.info.get(NEW_NOTICES, ()))
    try:
        with session.begin_nested():
            revoked = removals.remove_members(session, wanted, now=now)
    except Exception as error:
        if retryable(error):
            raise
        _forget_notices_since(session, remembered)
        log.info("events.batch_split", events=len(parsed), error=_failure(error))
        return None
    if revoked is None:
        return _apply_together(
            session, [event for event, _, _ in parsed], now=now, retryable=retryable
        )
    # Each removal's own line (member.removed) tells what it did: no event.applied beside it.
    outcomes = [_removal_outcome(item, revoked) for item in parsed]
    return _mark(session, outcomes, now=now, told=True)


# What became of an event of a batch: the summary of what it did, or why it is invalid.
_Outcome = tuple[InboxEvent, dict[str, Any] | None, str | None]


def _removal_outcome(item: _Parsed, revoked: dict[str | None, list[str]]) -> _Outcome:
    event, removal, reason = item
    if removal is None:
        return (event, None, reason)
    return (event, _ordered({"revoked": revoked[event.id]}, event, at=removal.at), None)


class _Abandon(Exception):
    """An event of the batch raised: roll the batch's savepoint back, go one by one."""

    def __init__(self, event_id: str) -> None:
        super().__init__(event_id)
        self.event_id = event_id


def _apply_together(
    session: Session,
    events: Sequence[InboxEvent],
    *,
    now: datetime,
    retryable: Callable[[Exception], bool],
) -> dict[str, bool] | None:
    """Apply ``events`` in one savepoint and mark each; ``None`` if one raised (then nothing
    of them is applied, and the caller applies them one savepoint each).

    An event that does not validate is marked dead here: validating touches no table.
    """
    if len(events) < 2:
        return None  # one savepoint either way, and the per-event path says why it failed
    remembered = len(session.info.get(NEW_NOTICES, ()))
    try:
        with session.begin_nested():
            outcomes = [
                _apply_in_batch(session, event, now=now, retryable=retryable) for event in events
            ]
    except _Abandon as abandoned:
        # The next attempt queues notices of its own.
        _forget_notices_since(session, remembered)
        # The per-event attempt that follows logs the failure itself, with its reason.
        log.info("events.batch_split", events=len(events), failed_event_id=abandoned.event_id)
        return None
    # The marks are written after the last event, in one statement for the batch, rather
    # than one by one before each next event's queries.
    return _mark(session, outcomes, now=now)


def _apply_in_batch(
    session: Session, event: InboxEvent, *, now: datetime, retryable: Callable[[Exception], bool]
) -> _Outcome:
    """Apply one event of a batch; raises :class:`_Abandon` when it fails for a reason a
    retry cannot fix (one that a retry can fix propagates as it is)."""
    with structlog.contextvars.bound_contextvars(event_id=event.id, event_type=event.type):
        try:
            cloud, at = validated(event)
        except InvalidEvent as error:
            return (event, None, error.reason)
        try:
            return (event, _dispatch(session, event, cloud, at=at, now=now), None)
        except Exception as error:
            if retryable(error):
                raise
            raise _Abandon(event.id) from error


def _mark(
    session: Session, outcomes: Sequence[_Outcome], *, now: datetime, told: bool = False
) -> dict[str, bool]:
    """Mark each event done with its summary, or dead with the reason it is invalid; whether
    each was applied, by id. ``told``: each event's handler logged what it did already."""
    applied: dict[str, bool] = {}
    marks: list[inbox.Mark] = []
    for event, result, reason in outcomes:
        with structlog.contextvars.bound_contextvars(event_id=event.id, event_type=event.type):
            if reason is None:
                assert result is not None
                if result.get(UNFINISHED):
                    _finish_done(session, event, result, now=now)
                else:
                    marks.append(inbox.Mark(event, EventStatus.DONE, result=result))
                _log_applied(event, result, told=told)
            else:
                marks.append(inbox.Mark(event, EventStatus.DEAD, reason=reason))
                log.warning("event.invalid", reason=reason)
        applied[event.id] = reason is None
    # One statement for the batch's marks, after its last event.
    inbox.finish_many(session, marks, now=now)
    return applied


def _apply_one(
    session: Session,
    event: InboxEvent,
    *,
    now: datetime,
    retryable: Callable[[Exception], bool],
) -> bool:
    remembered = len(session.info.get(NEW_NOTICES, ()))
    try:
        # The event's effects and its DONE mark are released together, or not at all.
        with session.begin_nested():
            result = apply_event(session, event, now=now)
            _finish_done(session, event, result, now=now)
    except InvalidEvent as error:
        reason = error.reason
        log.warning("event.invalid", reason=reason)
    except Exception as error:
        if retryable(error):
            raise
        reason = _failure(error)
        log.exception("event.failed", reason=reason)
    else:
        _log_applied(event, result)
        return True
    _forget_notices_since(session, remembered)
    inbox.finish(session, event, status=EventStatus.DEAD, now=now, reason=reason)
    # Flushed now, outside any savepoint, so that a later event's rollback cannot undo it.
    session.flush()
    return False


def _failure(error: Exception) -> str:
    """Why an event failed, as its dead mark and the log say it: the error's first line."""
    return redact(f"{type(error).__name__}: {error}".splitlines()[0])


def _log_applied(event: InboxEvent, result: dict[str, Any], *, told: bool = False) -> None:
    if "ordered_at" in result:
        log.warning(
            "event.time_clamped",
            event_time=event.time.isoformat(),
            received_at=event.received_at.isoformat(),
            ordered_at=result["ordered_at"],
        )
    if result.get(UNFINISHED):
        log.info("event.applied_in_part", revoked=len(result.get("revoked", ())))
        return
    if not told:
        log.info("event.applied", revoked=len(result.get("revoked", ())))


def _forget_notices_since(session: Session, remembered: int) -> None:
    """Notices queued after the first ``remembered`` were rolled back with their savepoint:
    publishing their ids would send the worker after rows that do not exist."""
    if NEW_NOTICES in session.info:
        del session.info[NEW_NOTICES][remembered:]


def dead_letter_message(
    session: Session, *, reason: str, now: datetime, task: str | None, body: object
) -> None:
    """Keep an unusable queue message with the reason and an excerpt of its body, redacted."""
    reason = storable(redact(reason))
    task = storable(task) if task is not None else None
    inbox.dead_letter(session, reason=reason, now=now, task=task, body=excerpt(body))
    log.warning("message.dead_letter", reason=reason, task=task)


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
    return storable(redact(text))[: inbox.BODY_EXCERPT]


def storable(text: str) -> str:
    """``text`` as a text column can hold it: Postgres refuses the NUL character.

    A binary body (a pickle, garbage) holds NUL bytes; without this its dead letter would
    fail to insert and the message would be dropped with no copy kept.
    """
    return text.replace("\x00", "\ufffd")


redact = mask_tokens


def _token_result(outcome: revocation.TokenOutcome) -> dict[str, Any]:
    revoked = [outcome.token_id] if outcome.revoked and outcome.token_id else []
    return {"revoked": revoked, "unknown_token": outcome.token_id is None}
