"""Application tokens stay somebody's: their creator's departure is told, and they are handed over.

An application access token keeps working when the user who created it leaves the
organization (``membership.removed``) or is deactivated (``user.deactivated``); the
organization's admins then receive one ``application_tokens.orphaned`` notice per departure
listing the live AATs that user created there, and any of them can be handed to an active
member with :func:`reassign`. Only a departure that ends an active membership is told: a
repeated or stale event ends nothing and tells nobody again.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit, db, notices
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.issuing import active_member
from tokenwarden.worker.domain.models import Token, TokenKind

log = structlog.get_logger(__name__)

CREATOR_LEFT = "creator_left"
# A membership: (org_id, user_id).
Departure = tuple[str, str]


def orphaned_tokens(
    session: Session, departures: Sequence[Departure]
) -> dict[Departure, list[notices.TokenFacts]]:
    """The live application tokens each departing user created in the organization left:
    what a notice names of them (rows, not loaded objects; nothing here changes them)."""
    if not departures:
        return {}
    found: dict[Departure, list[notices.TokenFacts]] = {}
    rows = session.execute(
        select(*notices.TOKEN_COLUMNS)
        .where(
            Token.kind == TokenKind.APPLICATION.value,
            Token.revoked_at.is_(None),
            db.one_of(session, [Token.org_id, Token.created_by], departures),
        )
        .order_by(Token.org_id, Token.created_by, Token.id)
    )
    for token in notices.token_rows(rows):
        found.setdefault((token.org_id, token.created_by), []).append(token)
    return found


def tell_admins(
    session: Session,
    departures: Sequence[Departure],
    *,
    stamp: audit.Stamp,
    recipients: Mapping[Departure, list[dict[str, Any]]] | None = None,
) -> list[str]:
    """Queue one notice per departure that leaves live AATs behind; return the notice ids.

    ``recipients`` by departure, when the caller knows them; otherwise each organization's
    active admins now, after the departure was applied.
    """
    orphaned = orphaned_tokens(session, departures)
    if not orphaned:
        return []
    if recipients is None:
        admins = notices.admins_of(session, {org_id for org_id, _ in orphaned})
        recipients = {key: admins[key[0]] for key in orphaned}
    return queue_notices(
        session, orphaned, stamps=dict.fromkeys(orphaned, stamp), recipients=recipients
    )


def queue_notices(
    session: Session,
    orphaned: Mapping[Departure, list[notices.TokenFacts]],
    *,
    stamps: Mapping[Departure, audit.Stamp],
    recipients: Mapping[Departure, list[dict[str, Any]]],
) -> list[str]:
    """The ``application_tokens.orphaned`` notices of ``orphaned``, in one statement.

    Each departure's notice is stamped with the cause that ended it (``stamps``); a
    departure already told (the same membership ended at the same time) is not told again.
    """
    wanted: list[notices.Queued] = []
    told: list[dict[str, Any]] = []
    for (org_id, user_id), tokens in orphaned.items():
        stamp = stamps[(org_id, user_id)]
        wanted.append(
            notices.Queued(
                kind=notices.ORPHANED,
                org_id=org_id,
                recipients=recipients.get((org_id, user_id), []),
                data={
                    "reason": CREATOR_LEFT,
                    "org_id": org_id,
                    "user_id": user_id,
                    "source": stamp.source,
                    "event_id": stamp.event_id,
                    "event_time": stamp.at.isoformat(),
                    "tokens": [notices.describe(token) for token in tokens],
                },
                event_id=stamp.event_id,
                dedupe_key=f"orphaned:{org_id}:{user_id}:{stamp.at.isoformat()}",
            )
        )
        told.append({"org_id": org_id, "user_id": user_id, "tokens": len(tokens)})
    if len(told) == 1:
        log.info("application_tokens.orphaned", **told[0])
    elif told:
        # A batch of removals: one line naming every departure, not a line each.
        log.info("application_tokens.orphaned", count=len(told), departures=told)
    now = next(iter(stamps.values())).now
    return notices.queue_many(session, wanted, now=now)


def reassign(
    session: Session,
    *,
    token_id: str,
    created_by: str,
    now: datetime,
    source: str = "cli",
    actor: str | None = None,
) -> tuple[Token, str]:
    """Hand a live application token to ``created_by``, an active member of its
    organization; audited. Returns the token and who answered for it before."""
    token = session.get(Token, token_id, with_for_update=True)
    if token is None:
        raise Refused("unknown_token", f"no token with id {token_id!r}")
    if token.kind != TokenKind.APPLICATION.value:
        raise Refused(
            "not_application",
            f"{token_id} is a personal token: it belongs to its user and cannot be handed over",
        )
    if token.revoked_at is not None:
        raise Refused("not_live", f"{token_id} is {token.state}: there is nothing to hand over")
    if not active_member(session, org_id=token.org_id, user_id=created_by):
        raise Refused(
            "not_member", f"user {created_by!r} is not an active member of {token.org_id!r}"
        )
    previous = token.created_by
    token.created_by = created_by
    session.flush()
    audit.record(
        session,
        action="reassign",
        reason="reassigned",
        source=source,
        at=now,
        token_id=token.id,
        org_id=token.org_id,
        user_id=created_by,
        actor=actor,
        detail={"from": previous, "to": created_by},
    )
    return token, previous
