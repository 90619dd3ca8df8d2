"""Delivering notices: one signed POST per attempt, retried with backoff, never lost.

No transaction is held while the HTTP request runs (on SQLite that would stall every
writer). Instead a worker leases the notice by moving ``next_attempt_at`` past the request's
deadline in one conditional UPDATE; a worker that dies mid-delivery leaves the lease to
expire, and the re-drive hands the notice to another.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from worker.models import Notice, NoticeStatus

log = structlog.get_logger(__name__)

TIMEOUT_S = 10.0
LEASE = timedelta(seconds=60)
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 600.0
MAX_ATTEMPTS = 30  # about four hours of retries at the cap
RETRYABLE = {408, 429}
USER_AGENT = "tokenwarden-notices/1"


@dataclass(frozen=True)
class Outcome:
    status: NoticeStatus
    error: str | None = None
    retry_after_s: float | None = None


def signed_headers(secret: str, notice_id: str, body: str, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers for one attempt; the id stays the notice's own."""
    signature = Webhook(secret).sign(notice_id, now, body)
    return {
        "webhook-id": notice_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def post(client: httpx.Client, url: str, secret: str, notice: Notice, now: datetime) -> Outcome:
    headers = signed_headers(secret, notice.id, notice.body, now)
    try:
        response = client.post(
            url, content=notice.body.encode(), headers=headers, timeout=TIMEOUT_S
        )
    except httpx.HTTPError as error:
        return Outcome(NoticeStatus.PENDING, f"{type(error).__name__}: {error}"[:300])
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(NoticeStatus.SENT)
    reason = f"HTTP {code} {response.reason_phrase}".strip()
    if code >= 500 or code in RETRYABLE:
        return Outcome(NoticeStatus.PENDING, reason, _retry_after(response, now))
    return Outcome(NoticeStatus.FAILED, f"{reason}: the receiver refused the notice")


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - now).total_seconds())
    except (TypeError, ValueError):
        return None


def backoff_s(attempts: int, retry_after_s: float | None = None) -> float:
    """Exponential with full jitter, at least what the receiver asked for, capped."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret
    return min(BACKOFF_CAP_S, max(delay, retry_after_s or 0.0))


def lease(session: Session, notice_id: str, *, now: datetime) -> Notice | None:
    """Take the notice for one attempt if it is pending and due; None if another has it."""
    taken: Notice | None = session.scalar(
        update(Notice)
        .where(
            Notice.id == notice_id,
            Notice.status == NoticeStatus.PENDING.value,
            Notice.next_attempt_at <= now,
        )
        .values(next_attempt_at=now + LEASE)
        .returning(Notice)
    )
    return taken


def record(session: Session, notice_id: str, outcome: Outcome, *, now: datetime) -> float | None:
    """Store an attempt's outcome; return the delay before the next attempt, if any."""
    notice = session.get(Notice, notice_id, with_for_update=True)
    if notice is None or notice.status != NoticeStatus.PENDING.value:
        return None
    notice.attempts += 1
    notice.last_error = outcome.error
    delay = None
    if outcome.status is NoticeStatus.SENT:
        notice.status = NoticeStatus.SENT.value
        notice.sent_at = now
    elif outcome.status is NoticeStatus.FAILED or notice.attempts >= MAX_ATTEMPTS:
        notice.status = NoticeStatus.FAILED.value
        if outcome.status is not NoticeStatus.FAILED:
            notice.last_error = f"gave up after {notice.attempts} attempts: {outcome.error}"
    else:
        delay = backoff_s(notice.attempts, outcome.retry_after_s)
        notice.next_attempt_at = now + timedelta(seconds=delay)
    log.info(
        "notice.attempt",
        notice_id=notice_id,
        status=notice.status,
        attempts=notice.attempts,
        error=notice.last_error,
        retry_in_s=delay,
    )
    return delay


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
