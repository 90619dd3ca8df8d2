"""Delivering notices: one signed POST per attempt, retried with backoff, never lost.

No transaction is held while the HTTP request runs (on SQLite that would stall every
writer). Instead a worker leases the notice by moving ``next_attempt_at`` past the request's
deadline in one conditional UPDATE, committed at once; posts; and records the outcome in a
second short transaction. A worker that dies mid-delivery leaves the lease to expire, and
the re-drive hands the notice to another. Every attempt carries the notice's id as its
``webhook-id``, so a receiver can drop the rare second delivery of the same notice.

Each worker process posts through one HTTP client (:func:`shared_client`), so consecutive
notices reuse a connection to the receiver instead of opening one (and a TLS session) each.
"""

from __future__ import annotations

import binascii
import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import urlsplit

import httpx
import structlog
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from config.settings import Settings
from worker.domain import clock, db
from worker.domain.models import Notice, NoticeStatus

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
RETRYABLE: Final = frozenset({408, 429})
USER_AGENT: Final = "tokenwarden-notices/1"
ERROR_LENGTH: Final = 300
# A prefork child posts one notice at a time and needs one connection; a threads pool needs
# one per thread. Idle connections are dropped before a typical receiver's own keep-alive
# timeout would close them under a request.
LIMITS: Final = httpx.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=30.0)


@dataclass(frozen=True)
class Outcome:
    status: NoticeStatus
    error: str | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Target:
    """Where and how notices are posted, and how long one attempt may take."""

    url: str
    secret: str
    lease: timedelta = LEASE
    timeout_s: float = TIMEOUT_S

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


def target_from(settings: Settings) -> Target | None:
    """The delivery target the settings name; None when notices must stay in the outbox.

    That is the case without ``TOKENWARDEN_NOTICE_WEBHOOK_URL``, and with a signing secret
    that cannot sign (a receiver would reject every attempt, so none is made).
    """
    if not settings.notice_webhook_url:
        return None
    secret = settings.signing_secret()
    try:
        Webhook(secret)
    except (binascii.Error, ValueError, EmptyWebhookSecretError):
        log.error(
            "notices.unusable_secret",
            detail="TOKENWARDEN_NOTICE_SIGNING_SECRET must be whsec_ followed by base64",
        )
        return None
    lease = lease_for(settings.redrive_after_s)
    return Target(
        url=settings.notice_webhook_url, secret=secret, lease=lease, timeout_s=timeout_for(lease)
    )


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


class _ProcessClient:
    """The HTTP client of this process: made on first use, never shared across a fork.

    A forked child (Celery's prefork pool) inherits the parent's client and its sockets;
    using them from two processes would mix up their requests, so the child forgets the
    inherited client without closing it (closing would shut the parent's connections) and
    makes its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._pid = 0

    def get(self) -> httpx.Client:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = new_client()
                self._pid = os.getpid()
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close()

    def forget_after_fork(self) -> None:
        # The lock may have been held by another thread of the parent at the fork.
        self._lock = threading.Lock()
        self._client = None


_PROCESS_CLIENT: Final = _ProcessClient()
os.register_at_fork(after_in_child=_PROCESS_CLIENT.forget_after_fork)


def new_client() -> httpx.Client:
    """A client for posting notices: pooled connections, no redirects followed."""
    return httpx.Client(
        headers={"user-agent": USER_AGENT},
        timeout=httpx.Timeout(TIMEOUT_S),
        limits=LIMITS,
        follow_redirects=False,
    )


def shared_client() -> httpx.Client:
    """This process's client for posting notices, made on first use (and again after a fork)."""
    return _PROCESS_CLIENT.get()


def close_shared_client() -> None:
    """Close this process's client and its connections; the next use makes a new one."""
    _PROCESS_CLIENT.close()


def post(
    client: httpx.Client,
    target: Target,
    *,
    notice_id: str,
    body: str,
    now: datetime,
) -> Outcome:
    """One attempt; never raises for what the network or the receiver does."""
    headers = signed_headers(target.secret, notice_id, body, now)
    try:
        response = client.post(
            target.url, content=body.encode(), headers=headers, timeout=target.timeout_s
        )
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        # A URL httpx cannot use stays pending too: fixing the setting lets it through.
        return Outcome(NoticeStatus.PENDING, f"{type(error).__name__}: {error}"[:ERROR_LENGTH])
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(NoticeStatus.SENT)
    reason = f"HTTP {code} {response.reason_phrase}".strip()
    if code >= 500 or code in RETRYABLE:
        return Outcome(NoticeStatus.PENDING, reason, _retry_after(response, now))
    if 300 <= code < 400:
        # A redirect is not followed: the signed body must go to the configured URL only.
        return Outcome(NoticeStatus.FAILED, f"{reason}: redirects are not followed")
    return Outcome(NoticeStatus.FAILED, f"{reason}: the receiver refused the notice")


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - now).total_seconds())
    except (TypeError, ValueError):
        return None


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
    elif leased_until is not None and notice.next_attempt_at > leased_until:
        log.warning("notice.lease_overrun", notice_id=notice_id)
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
    return Attempt(notice_id, notice.status, delay)


def deliver(engine: Engine, notice_id: str, *, target: Target, client: httpx.Client) -> Attempt:
    """Lease, post and record one notice, each database step in its own short transaction.

    The lease is committed before the request starts and the outcome after it ends, so no
    transaction (and on SQLite no write lock) is held while the receiver takes its time.
    """
    with db.transaction(engine) as session:
        leased = lease(session, notice_id, now=clock.now(), duration=target.lease)
        # Only a message that takes nothing pays for this look-up (a duplicate, or poison).
        known = leased is not None or bool(existing(session, [notice_id]))
    if not known:
        return Attempt(notice_id, MISSING)
    if leased is None:
        log.info("notice.not_taken", notice_id=notice_id)
        return Attempt(notice_id, SKIPPED)
    outcome = post(client, target, notice_id=leased.id, body=leased.body, now=clock.now())
    with (
        structlog.contextvars.bound_contextvars(receiver=target.receiver),
        db.transaction(engine) as session,
    ):
        return record(session, notice_id, outcome, now=clock.now(), leased_until=leased.until)


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
    if not notice_ids:
        return []
    marked = session.scalars(
        update(Notice)
        .where(
            Notice.id.in_(list(notice_ids)),
            Notice.status == NoticeStatus.PENDING.value,
            Notice.next_attempt_at <= cutoff,
        )
        .values(next_attempt_at=now)
        .returning(Notice.id)
        .execution_options(synchronize_session=False)
    )
    taken = set(marked)
    return [notice_id for notice_id in notice_ids if notice_id in taken]
