"""Posting notices to the webhook receiver: one signed POST per attempt.

Every attempt carries the notice's id as its ``webhook-id``, so a receiver can drop the rare
second delivery of the same notice. :func:`deliver` wraps one POST in the outbox's rules
(``worker.domain.outbox_delivery``): lease, post, record, each database step in its own short
transaction.

Each worker process posts through one HTTP client (:func:`shared_client`), so consecutive
notices reuse a connection to the receiver instead of opening one (and a TLS session) each.
"""

from __future__ import annotations

import binascii
import os
import threading
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Final

import httpx
import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import clock, db, endpoints
from tokenwarden.worker.domain.models import NoticeStatus
from tokenwarden.worker.domain.outbox_delivery import (
    MISSING,
    PAUSED,
    SKIPPED,
    TIMEOUT_S,
    Attempt,
    Outcome,
    Target,
    existing,
    lease,
    lease_for,
    record,
    timeout_for,
)

log = structlog.get_logger(__name__)


RETRYABLE: Final = frozenset({408, 429})
USER_AGENT: Final = "tokenwarden-notices/1"
ERROR_LENGTH: Final = 300
# A prefork child posts one notice at a time and needs one connection; a threads pool needs
# one per thread. Idle connections are dropped before a typical receiver's own keep-alive
# timeout would close them under a request.
LIMITS: Final = httpx.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=30.0)


def target_from(settings: Settings) -> Target | None:
    """The delivery target the settings name; None when notices must stay in the outbox.

    That is the case without ``TOKENWARDEN_NOTICE_WEBHOOK_URL``, and with a signing secret
    that cannot sign (a receiver would reject every attempt, so none is made).
    """
    if not settings.notice_webhook_url:
        return None
    secret = settings.signing_secret()
    try:
        for each in secret.split(","):
            Webhook(each)
    except (binascii.Error, ValueError, EmptyWebhookSecretError):
        log.error(
            "notices.unusable_secret",
            detail="TOKENWARDEN_NOTICE_SIGNING_SECRET must be whsec_ followed by base64",
        )
        return None
    lease = lease_for(settings.redrive_after_s)
    return Target(
        url=settings.notice_webhook_url,
        secret=secret,
        lease=lease,
        timeout_s=timeout_for(lease),
        disable_after_s=settings.webhook_disable_after_s,
    )


def signed_headers(secret: str, notice_id: str, body: str, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers for one attempt; the id stays the notice's own.

    ``secret`` may name several secrets, comma-separated, newest first: the header then
    carries one signature for each, space-separated, so each receiver switches to the new
    secret at its own pace (the spec accepts a delivery when any signature verifies).
    """
    signature = " ".join(
        Webhook(each.strip()).sign(notice_id, now, body) for each in secret.split(",")
    )
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


def deliver(engine: Engine, notice_id: str, *, target: Target, client: httpx.Client) -> Attempt:
    """Lease, post and record one notice, each database step in its own short transaction.

    The lease is committed before the request starts and the outcome after it ends, so no
    transaction (and on SQLite no write lock) is held while the receiver takes its time.
    """
    with db.transaction(engine) as session:
        if target.disable_after_s is not None and endpoints.is_disabled(session, target.url):
            known = bool(existing(session, [notice_id]))
            return Attempt(notice_id, PAUSED if known else MISSING)
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
        now = clock.now()
        attempt = record(session, notice_id, outcome, now=now, leased_until=leased.until)
        if target.disable_after_s is not None and _note(session, target, outcome, now):
            return Attempt(notice_id, attempt.status)  # no retry: the endpoint is paused
        return attempt


def _note(session: Session, target: Target, outcome: Outcome, now: datetime) -> bool:
    """Note the outcome against the endpoint; True if it is disabled from now on."""
    assert target.disable_after_s is not None
    error = None if outcome.status is NoticeStatus.SENT else (outcome.error or "failed")
    # Logs webhook.endpoint_disabled; /metrics shows tokenwarden_webhook_endpoints_disabled.
    return endpoints.note(
        session,
        url=target.url,
        receiver=target.receiver,
        error=error,
        now=now,
        disable_after_s=target.disable_after_s,
    )
