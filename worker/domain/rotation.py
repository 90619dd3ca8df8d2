"""Rotating a token, and what happens when a rotated-away token comes back.

A rotation issues a successor through :func:`worker.domain.issuing.create_token` (the same
rules as any issue) with the old token's kind, owner, organization and name, and in the same
transaction marks the old token rotated: ``replaced_by`` the successor, ``overlap_ends_at``
when it stops. Every token of one chain shares ``family_id`` (the chain's first token's id).

The old token is claimed with a conditional ``UPDATE ... WHERE replaced_by IS NULL``: of two
rotations racing, one wins and the other is refused (:data:`ALREADY_ROTATED`, a 409 over
HTTP) with nothing issued and nothing revoked.

**Reuse.** A rotated-away token presented after its overlap (to verification, introspection,
forward-auth or another rotation) means that someone still holds a token that should be gone:
every live token of its family is revoked (``reuse_detected``), audited, and its owner (PAT)
or its organization's admins (AAT) get one notice. A token inside its overlap is never reuse;
a rotation that arrives within :data:`RACE_WINDOW` of the one that won is treated as the
loser of a race, not as reuse.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit, notices
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.families import REUSE_DETECTED, ROTATED, is_reuse
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.models import Token, TokenKind

log = structlog.get_logger(__name__)

MAX_OVERLAP: Final = timedelta(hours=24)
# A second rotation of one token this soon after the first is taken for a racing duplicate.
RACE_WINDOW: Final = timedelta(seconds=5)
ALREADY_ROTATED: Final = "already_rotated"
NOT_ROTATABLE: Final = "not_rotatable"
UNKNOWN_TOKEN: Final = "unknown_token"  # noqa: S105 - a reason, no secret
REUSE_NOTICE: Final = notices.REUSED


class ReuseDetected(Refused):
    """A rotation asked of a token rotated away before, after its overlap."""


@dataclass(frozen=True)
class Rotation:
    """A successor issued (its text shown once) and the predecessor's overlap."""

    successor: IssuedToken
    name: str
    predecessor_id: str
    family_id: str
    overlap_ends_at: datetime


def rotate_token(
    session: Session,
    token_id: str,
    *,
    now: datetime,
    overlap: timedelta = timedelta(0),
    expires_at: datetime | None = None,
    source: str = "cli",
    actor: str | None = None,
) -> Rotation:
    """Issue the successor of ``token_id`` and start its predecessor's overlap.

    Refuses (:class:`Refused`) an unknown, revoked or expired token, an overlap outside 0 to
    24 hours, and a token already rotated; the last one, after the overlap and outside the
    race window, is reuse (:class:`ReuseDetected`): :func:`rotate_in` then revokes its family.
    """
    if overlap < timedelta(0) or overlap > MAX_OVERLAP:
        raise Refused("bad_overlap", "overlap_s must be between 0 and 86400 seconds")
    old = session.get(Token, token_id)
    if old is None:
        raise Refused(UNKNOWN_TOKEN, f"no token {token_id!r}")
    if old.replaced_by is not None:
        _refuse_rotated_again(session, old, now=now, source=source)
    if old.revoked_at is not None or old.expires_at <= now:
        raise Refused(NOT_ROTATABLE, f"token {token_id!r} is {old.state}: nothing to rotate")
    family_id = old.family_id or old.id
    successor = create_token(
        session,
        kind=TokenKind(old.kind),
        org_id=old.org_id,
        name=old.name,
        expires_at=expires_at or now + (old.expires_at - old.created_at),
        now=now,
        user_id=old.user_id,
        app_id=old.app_id,
        created_by=old.created_by if old.kind == TokenKind.APPLICATION else None,
        source=source,
        actor=actor,
    )
    ends = now + overlap
    _claim(session, old.id, successor.id, family_id=family_id, ends=ends, now=now)
    audit.record_token(
        session,
        old,
        action="rotate",
        reason=ROTATED,
        source=source,
        at=now,
        actor=actor,
        detail={"successor": successor.id, "overlap_ends_at": ends.isoformat()},
    )
    return Rotation(successor, old.name, old.id, family_id, ends)


def _claim(
    session: Session,
    token_id: str,
    successor_id: str,
    *,
    family_id: str,
    ends: datetime,
    now: datetime,
) -> None:
    """Mark ``token_id`` replaced by ``successor_id`` (revoked at once with no overlap), unless
    another rotation claimed it first; both tokens join ``family_id``."""
    claimed = session.scalar(
        update(Token)
        .where(Token.id == token_id, Token.replaced_by.is_(None), Token.revoked_at.is_(None))
        .values(
            replaced_by=successor_id,
            overlap_ends_at=ends,
            family_id=family_id,
            **({"revoked_at": now, "revoke_reason": ROTATED} if ends <= now else {}),
        )
        .returning(Token.id)
        .execution_options(synchronize_session=False)
    )
    if claimed is None:
        # Another rotation won the race: the caller rolls back this successor.
        raise Refused(ALREADY_ROTATED, f"token {token_id!r} was rotated by another request")
    session.execute(
        update(Token)
        .where(Token.id == successor_id)
        .values(family_id=family_id)
        .execution_options(synchronize_session=False)
    )


def rotate_in(
    transaction: Callable[[], AbstractContextManager[Session]],
    token_id: str,
    *,
    now: datetime,
    **options: Any,
) -> Rotation:
    """:func:`rotate_token` in a transaction of its own; on reuse, the family's revocation is
    committed in another before the refusal is raised (a refusal rolls the first one back)."""
    source = options.get("source", "cli")
    try:
        with transaction() as session:
            return rotate_token(session, token_id, now=now, **options)
    except ReuseDetected:
        with transaction() as session:
            revoked = detect_reuse(session, token_id, now=now, source=source)
        raise Refused(
            REUSE_DETECTED,
            f"token {token_id!r} was rotated away and presented again: "
            f"{len(revoked)} live token(s) of its family revoked",
        ) from None


def _refuse_rotated_again(session: Session, old: Token, *, now: datetime, source: str) -> None:
    rotated_at = session.scalar(select(Token.created_at).where(Token.id == old.replaced_by))
    assert old.overlap_ends_at is not None
    raced = rotated_at is not None and now < rotated_at + RACE_WINDOW
    if now >= old.overlap_ends_at and not raced:
        raise ReuseDetected(REUSE_DETECTED, f"token {old.id!r} was rotated away before")
    raise Refused(ALREADY_ROTATED, f"token {old.id!r} was already rotated")


def detect_reuse(session: Session, token_id: str, *, now: datetime, source: str) -> list[str]:
    """If ``token_id`` is a rotated-away token past its overlap, revoke its family's live
    tokens, audit them and queue one notice; the ids revoked (none on a repeat)."""
    token = session.get(Token, token_id)
    if token is None or not is_reuse(token, now):
        return []
    family_id = token.family_id or token.id
    if token.revoked_at is None:
        session.execute(
            update(Token)
            .where(Token.id == token.id, Token.revoked_at.is_(None))
            .values(revoked_at=token.overlap_ends_at, revoke_reason=ROTATED)
            .execution_options(synchronize_session=False)
        )
    revoked = list(
        session.scalars(
            update(Token)
            .where(Token.family_id == family_id, Token.revoked_at.is_(None))
            .values(revoked_at=now, revoke_reason=REUSE_DETECTED)
            .returning(Token)
            .execution_options(synchronize_session=False)
        ).all()
    )
    if not revoked:
        return []
    revoked.sort(key=lambda row: row.id)
    detail = {"presented": token.id, "family_id": family_id}
    for row in revoked:
        audit.record_token(
            session,
            row,
            action="revoke",
            reason=REUSE_DETECTED,
            source=source,
            at=now,
            detail=detail,
        )
    notices.queue(
        session,
        kind=REUSE_NOTICE,
        org_id=token.org_id,
        recipients=notices.owner(session, token),
        data={
            "reason": REUSE_DETECTED,
            "presented": notices.describe(token),
            "revoked_at": now.isoformat(),
            "tokens": [notices.describe(row) for row in revoked],
        },
        now=now,
        dedupe_key=f"reuse:{family_id}",
    )
    log.warning(
        "rotation.reuse_detected", token_id=token.id, family_id=family_id, revoked=len(revoked)
    )
    return [row.id for row in revoked]
