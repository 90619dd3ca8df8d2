"""Notices about many tokens at once: one per recipient, listing up to 100 of their tokens.

The "expired" notices of the sweep and the "expiring" reminders are both written from plain
rows (never loaded tokens), grouped by who is told: a personal token's owner in its
organization, or the organization's admins for its application tokens.

Imports no Celery, kombu, httpx or web framework.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeAlias

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import notices
from tokenwarden.worker.domain.models import Membership, Token, TokenKind

# Tokens listed in one notice.
TOKENS_PER_NOTICE: Final = 100
# Recipients served by one notice transaction. notices.queue() costs a few round trips per
# notice (about 0.5 ms on an idle machine, 2 ms on a busy one), so this, not the batch size,
# bounds the length of a transaction that writes notices.
GROUPS_PER_TRANSACTION: Final = 25
# Tokens read per notice transaction: enough to gather a recipient's tokens from around the
# same expiry into one notice.
NOTICE_ROWS: Final = 200

# A result row of any shape: expiry works with plain rows, never with loaded tokens.
AnyRow: TypeAlias = "Row[*tuple[Any, ...]]"
# Who a notice about a token goes to: (org, kind, user), the user None for an org's admins.
GroupKey = tuple[str, str, str | None]

TOKEN_COLUMNS: Final = (
    Token.id,
    Token.kind,
    Token.org_id,
    Token.user_id,
    Token.app_id,
    Token.created_by,
    Token.name,
    Token.last4,
    Token.expires_at,
)


def group_of(row: AnyRow) -> GroupKey:
    if row.kind == TokenKind.PERSONAL.value and row.user_id:
        return (row.org_id, TokenKind.PERSONAL.value, row.user_id)
    return (row.org_id, TokenKind.APPLICATION.value, None)


def recipients_for(
    session: Session, groups: Iterable[GroupKey]
) -> dict[GroupKey, list[dict[str, Any]]]:
    """The recipients of each group, in two queries whatever the number of groups."""
    groups = set(groups)
    users = {user for _, _, user in groups if user is not None}
    orgs = {org for org, _, user in groups if user is None}
    emails: dict[tuple[str, str], str | None] = {}
    if users:
        for org_id, user_id, email in session.execute(
            select(Membership.org_id, Membership.user_id, Membership.email).where(
                Membership.user_id.in_(users)
            )
        ):
            emails[(org_id, user_id)] = email
    admins = notices.admins_of(session, orgs)
    found: dict[GroupKey, list[dict[str, Any]]] = {}
    for key in groups:
        org, _, user = key
        found[key] = (
            [{"user_id": user, "email": emails.get((org, user))}]
            if user is not None
            else admins[org]
        )
    return found


@dataclass(frozen=True)
class QueuedNotice:
    notice_id: str | None
    token_ids: list[str]


def queue_grouped(
    session: Session,
    rows: Sequence[AnyRow],
    *,
    kind: str,
    data: dict[str, Any],
    now: datetime,
    dedupe_prefix: str,
) -> list[QueuedNotice]:
    """One notice per recipient group and up to :data:`TOKENS_PER_NOTICE` of its tokens."""
    grouped: dict[GroupKey, list[AnyRow]] = {}
    for row in rows:
        grouped.setdefault(group_of(row), []).append(row)
    recipients = recipients_for(session, grouped)
    queued: list[QueuedNotice] = []
    for key in sorted(grouped, key=lambda k: (k[0], k[1], k[2] or "")):
        members = grouped[key]
        for start in range(0, len(members), TOKENS_PER_NOTICE):
            chunk = members[start : start + TOKENS_PER_NOTICE]
            notice_id = notices.queue(
                session,
                kind=kind,
                org_id=key[0],
                recipients=recipients[key],
                data={**data, "tokens": [notices.describe(row) for row in chunk]},
                now=now,
                # A token is listed in one notice of a kind (and bucket) only: the first
                # token of a notice names it.
                dedupe_key=f"{dedupe_prefix}:{chunk[0].id}",
            )
            queued.append(QueuedNotice(notice_id, [row.id for row in chunk]))
    return queued


def new_notice_ids(session: Session, queued: Iterable[QueuedNotice]) -> list[str]:
    """The notices queued in this transaction, to publish once it has committed."""
    ids = [q.notice_id for q in queued if q.notice_id is not None]
    # notices.queue() may also note them on the session for the caller's transaction; they
    # are published here instead, once each.
    return list(dict.fromkeys([*ids, *notices.take_new_notices(session)]))
