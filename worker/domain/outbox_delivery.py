"""The outbox's delivery rules: leases, backoff, and recording what an attempt achieved.

No transaction is held while the HTTP request runs (on SQLite that would stall every
writer). Instead a worker leases the notice by moving ``next_attempt_at`` past the request's
deadline in one conditional UPDATE, committed at once; posts; and records the outcome in a
second short transaction. A worker that dies mid-delivery leaves the lease to expire, and
the re-drive hands the notice to another.

The HTTP side (signing, the client, the POST itself) is ``worker.runtime.webhook``'s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit
from tokenwarden.worker.domain.clock import as_utc
from tokenwarden.worker.domain.models import Notice, NoticeEmail, NoticeStatus

log = structlog.get_logger(__name__)

# The longest a request may wait for the receiver (connecting, and each read or write).
TIMEOUT_S: Final = 10.0
# How long one attempt holds a notice, at most; see lease_for().
LEASE_S: Final = 60.0
MIN_LEASE_S: Final = 2.0
LEASE: Final = timedelta(seconds=LEASE_S)
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 600.0
MAX_ATTEMPTS = 30  # about four hours of retries at the cap


@dataclass(frozen=True)
class Outcome:
    status: NoticeStatus
    error: str | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Target:
    """Where and how notices are posted, and how long one attempt may take."""

    url: str
    # One Standard Webhooks secret, or several comma-separated, newest first.
    secret: str
    lease: timedelta = LEASE
    timeout_s: float = TIMEOUT_S
    # After failing this long the endpoint is disabled (worker.domain.endpoints); None: never.
    disable_after_s: float | None = None

    @property
    def receiver(self) -> str:
        """Scheme, host and port of the URL, for log lines: a webhook URL's path or query
        often carries a secret of the receiver's, so the rest is never logged."""
        try:
            parts = urlsplit(self.url)
        except ValueError:
            return "(a URL that cannot be parsed)"
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


@dataclass(frozen=True)
class Attempt:
    """What one attempt left behind: the notice's status, and when the next attempt is due.

    ``status`` is ``skipped`` when the notice was not taken (unknown, finished, not due yet,
    or leased by another worker); ``retry_in_s`` is set when another attempt is due later.
    """

    notice_id: str
    status: str
    retry_in_s: float | None = None


SKIPPED: Final = "skipped"
# Not posted: the endpoint is disabled, the notice waits in the outbox until it is resumed.
PAUSED: Final = "paused"
# Not in the outbox at all: the message that named it is dead-lettered.
MISSING: Final = "missing"


def lease_for(redrive_after_s: float) -> timedelta:
    """Twice the re-drive delay, within [MIN_LEASE_S, LEASE_S].

    The lease bounds how long a dead worker delays its notice, so it follows the re-drive
    setting down (a test stack re-drives after seconds) but never past a minute.
    """
    return timedelta(seconds=min(LEASE_S, max(MIN_LEASE_S, 2 * redrive_after_s)))


def timeout_for(lease: timedelta) -> float:
    # A request must end well inside its lease: past it, another worker may start the next
    # attempt while this one is still talking to the receiver.
    return min(TIMEOUT_S, lease.total_seconds() / 2)


def backoff_s(attempts: int, retry_after_s: float | None = None) -> float:
    """Exponential with jitter, at least what the receiver asked for, capped."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret
    return min(BACKOFF_CAP_S, max(delay, retry_after_s or 0.0))


@dataclass(frozen=True)
class Leased:
    """A notice taken for one attempt: what to post, and until when it is ours."""

    id: str
    body: str
    until: datetime


def lease(
    session: Session, notice_id: str, *, now: datetime, duration: timedelta = LEASE
) -> Leased | None:
    """Take the notice for one attempt if it is pending and due; None if not (or taken).

    One conditional UPDATE: of two workers racing for the same notice, the database lets
    exactly one match the row.
    """
    until = now + duration
    row = session.execute(
        update(Notice)
        .where(
            Notice.id == notice_id,
            Notice.status == NoticeStatus.PENDING.value,
            Notice.next_attempt_at <= now,
        )
        .values(next_attempt_at=until)
        .returning(Notice.id, Notice.body)
        .execution_options(synchronize_session=False)
    ).first()
    return None if row is None else Leased(row.id, row.body, until)


def record(
    session: Session,
    notice_id: str,
    outcome: Outcome,
    *,
    now: datetime,
    leased_until: datetime | None = None,
) -> Attempt:
    """Store an attempt's outcome: the notice's status now, and the delay before the next.

    ``leased_until`` is the end of the lease this attempt held: when the row shows a later
    one, another worker took the notice after this attempt overran its lease, and that lease
    is left alone rather than cut short.
    """
    notice = session.get(Notice, notice_id, with_for_update=True, populate_existing=True)
    if notice is None or notice.status != NoticeStatus.PENDING.value:
        return Attempt(notice_id, SKIPPED)
    delay = apply_outcome(notice, outcome, notice_id=notice_id, now=now, leased_until=leased_until)
    log.info(
        "notice.attempt",
        notice_id=notice_id,
        status=notice.status,
        attempts=notice.attempts,
        error=notice.last_error,
        retry_in_s=delay,
    )
    return Attempt(notice_id, notice.status, delay)


def apply_outcome(
    row: Notice | NoticeEmail,
    outcome: Outcome,
    *,
    notice_id: str,
    now: datetime,
    leased_until: datetime | None,
) -> float | None:
    """Count one attempt on a pending delivery (a notice's webhook, or one of its emails):
    sent, failed, or due again after a backoff, whose delay is returned."""
    row.attempts += 1
    row.last_error = outcome.error
    if outcome.status is NoticeStatus.SENT:
        row.status = NoticeStatus.SENT.value
        row.sent_at = now
    elif outcome.status is NoticeStatus.FAILED or row.attempts >= MAX_ATTEMPTS:
        row.status = NoticeStatus.FAILED.value
        if outcome.status is not NoticeStatus.FAILED:
            row.last_error = f"gave up after {row.attempts} attempts: {outcome.error}"
    elif leased_until is not None and row.next_attempt_at > leased_until:
        log.warning("notice.lease_overrun", notice_id=notice_id)
    else:
        delay = backoff_s(row.attempts, outcome.retry_after_s)
        row.next_attempt_at = now + timedelta(seconds=delay)
        return delay
    return None


def existing(session: Session, notice_ids: Sequence[str]) -> set[str]:
    """Those of ``notice_ids`` that are in the outbox, whatever their status."""
    if not notice_ids:
        return set()
    return set(session.scalars(select(Notice.id).where(Notice.id.in_(list(notice_ids)))))


def due(session: Session, *, now: datetime, limit: int = 500) -> list[str]:
    """Pending notices whose next attempt is due (a lease that ran out counts)."""
    return list(
        session.scalars(
            select(Notice.id)
            .where(Notice.status == NoticeStatus.PENDING.value, Notice.next_attempt_at <= now)
            .order_by(Notice.next_attempt_at)
            .limit(limit)
        )
    )


def mark_redriven(
    session: Session, notice_ids: Sequence[str], *, now: datetime, cutoff: datetime
) -> list[str]:
    """Of ``notice_ids``, take those still pending and due by ``cutoff`` for a re-drive.

    Their next attempt moves to ``now``: a worker can take them at once, and the re-drive
    finds them due again only once ``now`` is older than its own delay, so a notice whose
    message is still waiting on a long queue is not published again on every run. One
    conditional UPDATE: a notice leased or re-driven meanwhile no longer matches.
    """
    return mark_due(session, Notice, Notice.id, notice_ids, now=now, cutoff=cutoff)


def mark_due(
    session: Session,
    table: type[Notice] | type[NoticeEmail],
    notice_id: Any,
    notice_ids: Sequence[str],
    *,
    now: datetime,
    cutoff: datetime,
) -> list[str]:
    """:func:`mark_redriven` over a channel's ``table``, whose ``notice_id`` column names the
    notice; the ids marked, in the order given."""
    if not notice_ids:
        return []
    marked = session.scalars(
        update(table)
        .where(
            notice_id.in_(list(notice_ids)),
            table.status == NoticeStatus.PENDING.value,
            table.next_attempt_at <= cutoff,
        )
        .values(next_attempt_at=now)
        .returning(notice_id)
        .execution_options(synchronize_session=False)
    )
    taken = set(marked)
    return [each for each in notice_ids if each in taken]


REPLAYABLE: Final = (NoticeStatus.SENT.value, NoticeStatus.FAILED.value)


def replay(
    session: Session,
    *,
    since: datetime,
    status: str | None,
    now: datetime,
    actor: str | None,
    source: str = "cli",
) -> list[str]:
    """Send again the notices created since ``since`` (those ``status``, or sent and failed).

    Each keeps its id, so a receiver recognises a notice it already has (``webhook-id``);
    the attempts start afresh. One audit row says who replayed what.
    """
    statuses = [status] if status else list(REPLAYABLE)
    if not set(statuses) <= set(REPLAYABLE):
        raise ValueError(f"only {' or '.join(REPLAYABLE)} notices can be replayed")
    notice_ids = sorted(
        session.scalars(
            update(Notice)
            .where(Notice.created_at >= since, Notice.status.in_(statuses))
            .values(
                status=NoticeStatus.PENDING.value,
                attempts=0,
                last_error=None,
                sent_at=None,
                next_attempt_at=now,
            )
            .returning(Notice.id)
            .execution_options(synchronize_session=False)
        )
    )
    audit.record(
        session,
        action="notice_replay",
        reason=status or "sent_or_failed",
        source=source,
        at=now,
        actor=actor,
        detail={"since": since.isoformat(), "count": len(notice_ids), "notice_ids": notice_ids},
    )
    return notice_ids


@dataclass(frozen=True)
class Backlog:
    """One channel's outbox at a glance."""

    pending: int
    failed: int
    oldest_pending_age_s: float


def backlog(session: Session, *, now: datetime) -> dict[str, Backlog]:
    """Pending and failed deliveries per channel, and how old the oldest pending one is."""
    found: dict[str, Backlog] = {}
    for channel, table in (("webhook", Notice), ("email", NoticeEmail)):
        counts = dict(
            session.execute(
                select(table.status, func.count())
                .where(table.status.in_([NoticeStatus.PENDING.value, NoticeStatus.FAILED.value]))
                .group_by(table.status)
            ).all()
        )
        oldest = session.scalar(
            select(func.min(table.created_at)).where(table.status == NoticeStatus.PENDING.value)
        )
        found[channel] = Backlog(
            pending=counts.get(NoticeStatus.PENDING.value, 0),
            failed=counts.get(NoticeStatus.FAILED.value, 0),
            oldest_pending_age_s=max(0.0, (now - as_utc(oldest)).total_seconds())
            if oldest is not None
            else 0.0,
        )
    return found
