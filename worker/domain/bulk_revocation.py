"""Break-glass revocation: every live token of an organization matching a selection, at once.

One selection function (:func:`select_tokens`) answers both the dry run ("what would be
revoked") and each batch of the real run, so the two cannot disagree.

A real run is always a ``tokens.bulk_revoke_requested`` event in the inbox, whether a producer
sent it or ``tokenwarden revoke`` stored it, and goes by :func:`step`: each step is one short
transaction that revokes the next batch (reason ``bulk``, the stated reason in each audit row's
detail, the event's id on each audit row). The event stays pending between steps. The step that
finds the selection exhausted also queues the notices, one per recipient listing every token
revoked under the event (read back from its audit rows): a personal token's owner, or the
organization's admins for its application tokens. So an interrupted run loses nothing: what
was revoked is committed with its audit rows, and whoever takes the pending event up again (the
worker's re-drive, or the same command) goes on from there and tells everyone once at the end.

Only tokens issued at or before the request count (``as_of``): a token issued while the
revocation runs, or after the time of the event, is left alone.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import structlog
from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit, notices
from tokenwarden.worker.domain.expiry.grouped_notices import (
    TOKEN_COLUMNS,
    AnyRow,
    GroupKey,
    group_of,
    recipients_for,
)
from tokenwarden.worker.domain.models import AuditEntry, Token, TokenKind

log = structlog.get_logger(__name__)

BULK: Final = "bulk"
# What the command line asks for before revoking for real.
CONFIRM_WORD: Final = "REVOKE"
REASON_MAX: Final = 500


@dataclass(frozen=True)
class Selection:
    """Which tokens: an organization's, optionally only a user's (owned or created by them),
    one kind, or those created before a time."""

    org_id: str
    user_id: str | None = None
    kind: TokenKind | None = None
    created_before: datetime | None = None

    def criteria(self, *, as_of: datetime) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = [
            Token.org_id == self.org_id,
            Token.revoked_at.is_(None),
            Token.created_at <= as_of,
        ]
        if self.user_id is not None:
            found.append(or_(Token.user_id == self.user_id, Token.created_by == self.user_id))
        if self.kind is not None:
            found.append(Token.kind == self.kind.value)
        if self.created_before is not None:
            found.append(Token.created_at < self.created_before)
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "user_id": self.user_id,
            "kind": self.kind.value if self.kind else None,
            "created_before": self.created_before.isoformat() if self.created_before else None,
        }


def select_tokens(
    session: Session, selection: Selection, *, as_of: datetime, limit: int | None = None
) -> list[AnyRow]:
    """The live tokens ``selection`` names, by id: what a dry run lists, and (``limit`` at a
    time) what the real run revokes."""
    query = select(*TOKEN_COLUMNS).where(*selection.criteria(as_of=as_of)).order_by(Token.id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.execute(query).all())


def revoke_selected(
    session: Session,
    selection: Selection,
    *,
    stamp: audit.Stamp,
    reason: str | None,
    limit: int | None = None,
) -> list[AnyRow]:
    """Revoke the next ``limit`` tokens of ``selection`` (all with None), audit them with
    reason ``bulk`` and the stated ``reason``; return the tokens revoked."""
    chosen = [row.id for row in select_tokens(session, selection, as_of=stamp.at, limit=limit)]
    if not chosen:
        return []
    rows = list(
        session.execute(
            update(Token)
            .where(Token.id.in_(chosen), Token.revoked_at.is_(None))
            .values(revoked_at=stamp.now, revoke_reason=BULK)
            .returning(*TOKEN_COLUMNS)
            .execution_options(synchronize_session="fetch")
        ).all()
    )
    detail = {"reason": reason, "selection": selection.as_dict()}
    audit.record_many(
        session,
        [
            stamp.row(
                "revoke",
                BULK,
                token_id=row.id,
                org_id=row.org_id,
                user_id=row.user_id,
                detail=detail,
            )
            for row in rows
        ],
    )
    log.info("tokens.bulk_revoked", org_id=selection.org_id, revoked=len(rows))
    return sorted(rows, key=lambda row: str(row.id))


@dataclass(frozen=True)
class Step:
    """One transaction of a bulk revocation: what it revoked, and whether the run is over."""

    revoked: list[AnyRow]
    finished: bool
    # When finished: every token revoked under the event, and the notices queued for them.
    everything: list[AnyRow]
    notices: list[str]


def step(
    session: Session,
    selection: Selection,
    *,
    stamp: audit.Stamp,
    reason: str | None,
    limit: int,
) -> Step:
    """Revoke the next ``limit`` tokens of ``selection`` under the event ``stamp`` names; once
    none is left, queue one notice per recipient for everything the event revoked."""
    if stamp.event_id is None:
        raise ValueError("a bulk revocation runs as an event: its stamp names the event")
    rows = revoke_selected(session, selection, stamp=stamp, reason=reason, limit=limit)
    if len(rows) >= limit:
        return Step(rows, finished=False, everything=[], notices=[])
    everything = revoked_under(session, stamp.event_id)
    queued = notify_revoked(session, everything, stamp=stamp, reason=reason)
    return Step(rows, finished=True, everything=everything, notices=queued)


def revoked_under(session: Session, event_id: str) -> list[AnyRow]:
    """The tokens a bulk revocation event has revoked so far, by id (from its audit rows)."""
    return list(
        session.execute(
            select(*TOKEN_COLUMNS)
            .join(AuditEntry, AuditEntry.token_id == Token.id)
            .where(
                AuditEntry.event_id == event_id,
                AuditEntry.action == "revoke",
                AuditEntry.reason == BULK,
            )
            .order_by(Token.id)
        ).all()
    )


def notify_revoked(
    session: Session,
    rows: Sequence[AnyRow],
    *,
    stamp: audit.Stamp,
    reason: str | None,
) -> list[str]:
    """One notice per recipient listing every token of ``rows`` that concerns them; once per
    event (a recipient already told about the event is not told again)."""
    grouped: dict[GroupKey, list[AnyRow]] = {}
    for row in rows:
        grouped.setdefault(group_of(row), []).append(row)
    recipients = recipients_for(session, grouped)
    wanted = [
        notices.Queued(
            kind=notices.BULK_REVOKED,
            org_id=key[0],
            recipients=recipients[key],
            data={
                "reason": BULK,
                "stated_reason": reason,
                "source": stamp.source,
                "actor": stamp.actor,
                "event_id": stamp.event_id,
                "revoked_at": stamp.now.isoformat(),
                "tokens": [notices.describe(row) for row in grouped[key]],
            },
            event_id=stamp.event_id,
            dedupe_key=f"bulk:{stamp.event_id}:{key[0]}:{key[1]}:{key[2] or ''}"[:300],
        )
        for key in sorted(grouped, key=lambda k: (k[0], k[1], k[2] or ""))
    ]
    return notices.queue_many(session, wanted, now=stamp.now)


def new_event_id() -> str:
    """The id of a bulk revocation the command line stores as an event."""
    return "cli-bulk-" + secrets.token_hex(8)
