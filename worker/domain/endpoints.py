"""Webhook endpoint health: an endpoint that keeps failing is paused, not hammered.

Every attempt's outcome is noted against the endpoint (keyed by a hash of its URL, which may
carry the receiver's secrets): the first failure starts the clock, a delivery clears it. Once
an endpoint has failed for ``disable_after_s`` it is disabled: nothing more is posted, the
notices stay pending, and ``tokenwarden notices resume`` enables it again.

Only changes are written: a healthy endpoint costs one primary-key read per attempt.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain.db import insert_for
from tokenwarden.worker.domain.models import WebhookEndpoint

log = structlog.get_logger(__name__)


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def is_disabled(session: Session, url: str) -> bool:
    endpoint = session.get(WebhookEndpoint, url_key(url))
    return endpoint is not None and endpoint.disabled_at is not None


def note(
    session: Session,
    *,
    url: str,
    receiver: str,
    error: str | None,
    now: datetime,
    disable_after_s: float,
) -> bool:
    """Note one attempt's outcome (``error`` None: delivered); True if this disabled it."""
    key = url_key(url)
    if error is None:
        # Most deliveries find a healthy endpoint: a plain read, no row lock between workers.
        endpoint = session.get(WebhookEndpoint, key)
        if endpoint is not None and endpoint.failing_since is not None:
            session.refresh(endpoint, with_for_update=True)
        if endpoint is not None and endpoint.failing_since is not None:
            endpoint.failing_since = None
            endpoint.last_error = None
            endpoint.updated_at = now
            log.info("webhook.endpoint_recovered", receiver=receiver)
        return False
    # Two workers failing at once both find no row: the insert lets either go first.
    session.execute(
        insert_for(session, WebhookEndpoint)
        .values(url_hash=key, receiver=receiver, updated_at=now)
        .on_conflict_do_nothing(index_elements=["url_hash"])
    )
    endpoint = session.get(WebhookEndpoint, key, with_for_update=True, populate_existing=True)
    assert endpoint is not None
    endpoint.last_error = error[:1000]
    endpoint.updated_at = now
    if endpoint.failing_since is None:
        endpoint.failing_since = now
    failing_for = now - endpoint.failing_since
    if endpoint.disabled_at is None and failing_for >= timedelta(seconds=disable_after_s):
        endpoint.disabled_at = now
        log.warning(
            "webhook.endpoint_disabled",
            receiver=receiver,
            failing_for_s=round(failing_for.total_seconds()),
            error=endpoint.last_error,
            detail="tokenwarden notices resume enables it again",
        )
        return True
    return False


def resume(session: Session, *, url: str, now: datetime) -> bool:
    """Enable the endpoint again, its failures forgotten; False if it was not disabled."""
    endpoint = session.get(WebhookEndpoint, url_key(url), with_for_update=True)
    if endpoint is None or endpoint.disabled_at is None:
        return False
    endpoint.disabled_at = None
    endpoint.failing_since = None
    endpoint.updated_at = now
    log.info("webhook.endpoint_resumed", receiver=endpoint.receiver)
    return True


def endpoint_of(session: Session, url: str) -> WebhookEndpoint | None:
    return session.get(WebhookEndpoint, url_key(url))


def disabled_endpoints(session: Session) -> int:
    """How many endpoints are disabled (any URL ever configured)."""
    return len(
        session.scalars(
            select(WebhookEndpoint.url_hash).where(WebhookEndpoint.disabled_at.is_not(None))
        ).all()
    )
