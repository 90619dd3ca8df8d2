"""The email channel of the notice outbox: one row per notice and recipient address.

A notice's email rows are written with the notice, in the same transaction, one per
distinct recipient address, when notices are emailed at all; a recipient without an address
gets no email. Each row has its own
status, attempts and lease, under the same rules as the webhook's notice row
(``worker.domain.outbox_delivery``): a worker leases a notice's due rows in one conditional
UPDATE, sends with no transaction open, and records each recipient's outcome after.

The SMTP side (the templates, the connection, the message) is ``worker.runtime.mail``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session

from tokenwarden.config.settings import get_settings
from tokenwarden.worker.domain.models import Notice, NoticeEmail, NoticeStatus
from tokenwarden.worker.domain.outbox_delivery import LEASE, Outcome, apply_outcome, mark_due

log = structlog.get_logger(__name__)

ADDRESS_LENGTH = 320  # notice_emails.address


def first_attempt(now: datetime) -> dict[str, Any]:
    """The delivery columns of a new outbox row (a notice or an email): pending, due now."""
    return {
        "status": NoticeStatus.PENDING.value,
        "attempts": 0,
        "last_error": None,
        "created_at": now,
        "next_attempt_at": now,
        "sent_at": None,
    }


def email_rows(
    notice_id: str, recipients: Sequence[dict[str, Any]], *, now: datetime
) -> list[dict[str, Any]]:
    """The email rows of a new notice: one per distinct address among ``recipients``."""
    rows: dict[str, dict[str, Any]] = {}
    for recipient in recipients:
        address = recipient.get("email")
        if not isinstance(address, str) or not address or len(address) > ADDRESS_LENGTH:
            continue
        rows.setdefault(
            address.lower(),
            {
                "notice_id": notice_id,
                "address": address,
                "user_id": recipient.get("user_id"),
                **first_attempt(now),
            },
        )
    return list(rows.values())


def mailing() -> bool:
    """Whether notices are emailed (``TOKENWARDEN_SMTP_URL`` is set).

    Only then are email rows written: a server configured later mails the notices from then
    on, not every notice of the past.
    """
    return get_settings().smtp_url is not None


def add_emails(
    session: Session,
    notices: Iterable[tuple[str, Sequence[dict[str, Any]]]],
    *,
    now: datetime,
) -> None:
    """The email rows of new ``(notice id, recipients)``, inserted in one statement, when
    notices are emailed."""
    if not mailing():
        return
    rows = [row for notice_id, people in notices for row in email_rows(notice_id, people, now=now)]
    if rows:
        session.execute(insert(cast(Table, NoticeEmail.__table__)), rows)


@dataclass(frozen=True)
class LeasedEmails:
    """A notice's due emails, taken for one attempt: the notice's body and the addresses."""

    notice_id: str
    body: str
    recipients: list[tuple[str, str | None]]  # (address, user_id)
    until: datetime


def lease_emails(
    session: Session, notice_id: str, *, now: datetime, duration: timedelta = LEASE
) -> LeasedEmails | None:
    """Take the notice's pending, due emails for one attempt; None if none is (or all taken)."""
    until = now + duration
    taken = session.execute(
        update(NoticeEmail)
        .where(
            NoticeEmail.notice_id == notice_id,
            NoticeEmail.status == NoticeStatus.PENDING.value,
            NoticeEmail.next_attempt_at <= now,
        )
        .values(next_attempt_at=until)
        .returning(NoticeEmail.address, NoticeEmail.user_id)
        .execution_options(synchronize_session=False)
    ).all()
    if not taken:
        return None
    body = session.scalar(select(Notice.body).where(Notice.id == notice_id))
    if body is None:
        return None
    recipients = sorted((row.address, row.user_id) for row in taken)
    return LeasedEmails(notice_id, body, recipients, until)


def record_email(
    session: Session,
    notice_id: str,
    address: str,
    outcome: Outcome,
    *,
    now: datetime,
    leased_until: datetime,
) -> float | None:
    """Store one recipient's outcome; the delay before its next attempt, if one is due."""
    row = session.get(
        NoticeEmail, (notice_id, address), with_for_update=True, populate_existing=True
    )
    if row is None or row.status != NoticeStatus.PENDING.value:
        return None
    delay = apply_outcome(row, outcome, notice_id=notice_id, now=now, leased_until=leased_until)
    log.info(
        "notice.email_attempt",
        notice_id=notice_id,
        status=row.status,
        attempts=row.attempts,
        error=row.last_error,
        retry_in_s=delay,
    )
    return delay


def due_notice_ids(session: Session, *, now: datetime, limit: int = 500) -> list[str]:
    """Notices with a pending email whose next attempt is due (a lease that ran out counts)."""
    return list(
        session.scalars(
            select(NoticeEmail.notice_id)
            .distinct()
            .where(
                NoticeEmail.status == NoticeStatus.PENDING.value,
                NoticeEmail.next_attempt_at <= now,
            )
            .limit(limit)
        )
    )


def mark_redriven(
    session: Session, notice_ids: Sequence[str], *, now: datetime, cutoff: datetime
) -> list[str]:
    """Of ``notice_ids``, those with emails still pending and due by ``cutoff``, moved to
    ``now`` (see ``outbox_delivery.mark_redriven``)."""
    return mark_due(session, NoticeEmail, NoticeEmail.notice_id, notice_ids, now=now, cutoff=cutoff)


def emails_of(session: Session, notice_ids: Sequence[str]) -> dict[str, list[NoticeEmail]]:
    """The email rows of each of ``notice_ids`` (a notice without any maps to [])."""
    found: dict[str, list[NoticeEmail]] = {notice_id: [] for notice_id in notice_ids}
    if not notice_ids:
        return found
    rows = session.scalars(
        select(NoticeEmail)
        .where(NoticeEmail.notice_id.in_(list(notice_ids)))
        .order_by(NoticeEmail.notice_id, NoticeEmail.address)
    )
    for row in rows:
        found[row.notice_id].append(row)
    return found
