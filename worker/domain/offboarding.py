"""Offboarding: role changes, removals, deactivations, revocation requests and leak reports.

Each function applies one event as of its time ``at`` and stamps what it changes with ``now``.

Ordering: a membership row keeps the time of the newest join, removal or deactivation applied
to it (``last_event_at``); an older one is stale and leaves the membership alone. A role
change has a time of its own (``role_at``, see worker.domain.members): it never makes a member, and
never makes a removal or deactivation stale. A stale
removal still revokes the personal tokens that the leaver held at ``at`` (created at or before
it, or before the current active period began), but never one issued at or after a later
re-join. Memberships are read ``FOR UPDATE`` so two workers applying events about the same
membership take turns instead of both acting on what they read first.

A deactivation is also kept per user (``user_deactivations``, newest time wins): a
membership that appears after it through an older event starts out inactive as of the
deactivation (see worker.domain.members), so an older join cannot make the user active again.

Notices are queued in the same transaction as the revocations they report, and only for
tokens revoked by this very call: a replayed event or a second leak report revokes nothing,
so it tells nobody anything twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any

import structlog
from sqlalchemy import ColumnElement, and_, false, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.domain import audit, members, notices
from worker.domain.members import parse_role
from worker.domain.models import Membership, Role, Token, TokenKind, UserDeactivation
from worker.domain.revocation import revoke_token

log = structlog.get_logger(__name__)

MEMBER_REMOVED = "member_removed"
USER_DEACTIVATED = "user_deactivated"
DELETED = "deleted"
LEAKED = "leaked"
# audit.token_id is as wide as tokens.id; a longer requested id cannot name a token.
TOKEN_ID_MAX = 40


@dataclass(frozen=True)
class TokenOutcome:
    """What a request about one token did: ``token_id`` is None when no such token exists."""

    token_id: str | None
    revoked: bool


def change_role(
    session: Session,
    *,
    org_id: str,
    user_id: str,
    role: str,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
    actor: str | None = None,
) -> bool:
    """Give ``user_id`` the role ``role`` in ``org_id`` as of ``at``; False when stale.

    A role change never makes a member: only a join does. On a membership that is inactive
    (the user left) or not known yet (the join may still be on its way) the role is recorded
    and the membership stays inactive; a later join makes the member, with this role if this
    change is the newer. Stale: older than the newest event the membership reflects. No token
    is revoked; a PAT acts with whatever role the membership holds when it is verified.
    """
    parsed = parse_role(role).value
    member, created = members.membership_for_update(
        session, org_id=org_id, user_id=user_id, role=parsed, at=None, now=now
    )
    newest = members.latest(member.last_event_at, member.role_at)
    if newest is not None and newest > at:
        members.audit_stale(
            session,
            member,
            kind="membership.role_changed",
            at=at,
            applied=newest,
            now=now,
            source=source,
            actor=actor,
            event_id=event_id,
        )
        return False
    previous = None if created else member.role
    changed = created or member.role != parsed
    member.role = parsed
    member.role_at = at
    member.updated_at = now
    if changed:
        audit.record(
            session,
            action="member",
            reason="role_changed",
            source=source,
            at=now,
            org_id=org_id,
            user_id=user_id,
            actor=actor,
            event_id=event_id,
            detail={"role": parsed, "previous_role": previous, "active": member.active},
        )
    if not member.active:
        log.info(
            "member.role_recorded_inactive",
            org_id=org_id,
            user_id=user_id,
            role=parsed,
            event_id=event_id,
        )
    return True


def remove_member(
    session: Session,
    *,
    org_id: str,
    user_id: str,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
    actor: str | None = None,
) -> list[str]:
    """Record that ``user_id`` left ``org_id`` at ``at``; revoke their PATs there.

    Returns the ids of the tokens revoked. Application tokens and the user's tokens in other
    organizations are never touched. An unknown membership is recorded as inactive, so a
    ``membership.added`` older than this removal arriving later is stale.
    """
    member, created = members.membership_for_update(
        session, org_id=org_id, user_id=user_id, role=Role.USER.value, at=at, now=now
    )
    stale = members.after(member.last_event_at, at)
    ended = False
    if stale:
        assert member.last_event_at is not None
        members.audit_stale(
            session,
            member,
            kind="membership.removed",
            at=at,
            applied=member.last_event_at,
            now=now,
            source=source,
            actor=actor,
            event_id=event_id,
        )
        held = held_at(at, member.active_since)
    else:
        ended = created or member.active
        member.active = False
        member.last_event_at = at
        member.updated_at = now
        held = true()
    rows = _revoke_personal_tokens(
        session,
        [Token.org_id == org_id, Token.user_id == user_id, held],
        reason=MEMBER_REMOVED,
        at=at,
        now=now,
        source=source,
        actor=actor,
        event_id=event_id,
    )
    revoked = [row.id for row in rows]
    notices.offboarding_notice(
        session,
        org_id=org_id,
        user_id=user_id,
        tokens=rows,
        now=now,
        source=source,
        event_id=event_id,
        reason=MEMBER_REMOVED,
        at=at,
    )
    # A replay of a removal already applied changes nothing, so it leaves no second row.
    if not stale and ended:
        audit.record(
            session,
            action="member",
            reason="removed",
            source=source,
            at=now,
            org_id=org_id,
            user_id=user_id,
            actor=actor,
            event_id=event_id,
            detail={"revoked": len(revoked)},
        )
    log.info(
        "member.removed",
        org_id=org_id,
        user_id=user_id,
        revoked=len(revoked),
        token_ids=revoked,
        stale=stale,
        event_id=event_id,
    )
    return revoked


def deactivate_user(
    session: Session,
    *,
    user_id: str,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
    actor: str | None = None,
) -> list[str]:
    """Record that ``user_id`` was deactivated platform-wide at ``at``; revoke their PATs.

    Per organization the rules of :func:`remove_member` hold: where the membership saw a
    newer event, only the PATs held at ``at`` are revoked. Returns the revoked token ids.
    """
    # A membership that does not exist yet is started from the record instead (see
    # worker.domain.members); the user lock keeps one being created right now from slipping between.
    members.lock_user(session, user_id)
    _record_deactivation(session, user_id=user_id, at=at, now=now, event_id=event_id)
    # Lock in a fixed order, the same one every deactivation uses, so two of them cannot
    # deadlock; a removal locks a single row, which cannot form a cycle with this.
    memberships = session.scalars(
        select(Membership)
        .where(Membership.user_id == user_id)
        .order_by(Membership.org_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    stale = [m for m in memberships if members.after(m.last_event_at, at)]
    ended = [m.org_id for m in memberships if not members.after(m.last_event_at, at) and m.active]
    if len(stale) < len(memberships):
        session.execute(
            update(Membership)
            .where(
                Membership.user_id == user_id,
                or_(Membership.last_event_at.is_(None), Membership.last_event_at <= at),
            )
            .values(active=False, last_event_at=at, updated_at=now)
        )
    # One statement for every organization: a token is spared only where its membership saw
    # a newer event and the token was issued after ``at`` and within the current active period.
    spared = (
        select(Membership.org_id)
        .where(
            Membership.org_id == Token.org_id,
            Membership.user_id == Token.user_id,
            Membership.last_event_at > at,
            Token.created_at > at,
            or_(Membership.active_since.is_(None), Token.created_at >= Membership.active_since),
        )
        .exists()
    )
    rows = _revoke_personal_tokens(
        session,
        [Token.user_id == user_id, ~spared],
        reason=USER_DEACTIVATED,
        at=at,
        now=now,
        source=source,
        actor=actor,
        event_id=event_id,
    )
    revoked = [row.id for row in rows]
    # One notice per organization, to that organization's admins only: what a user held in
    # one organization is none of another's business.
    for org_id, in_org in groupby(sorted(rows, key=_org_then_id), key=lambda row: row.org_id):
        notices.offboarding_notice(
            session,
            org_id=org_id,
            user_id=user_id,
            tokens=in_org,
            now=now,
            source=source,
            event_id=event_id,
            reason=USER_DEACTIVATED,
            at=at,
        )
    member_rows = [
        audit_row(
            action="member",
            reason="deactivated",
            at=now,
            source=source,
            org_id=org_id,
            user_id=user_id,
            actor=actor,
            event_id=event_id,
            detail=None,
        )
        for org_id in ended
    ]
    stale_rows = [
        audit_row(
            action="stale",
            reason="user.deactivated",
            at=now,
            source=source,
            org_id=m.org_id,
            user_id=user_id,
            actor=actor,
            event_id=event_id,
            detail=_stale_detail(at, m.last_event_at),
        )
        for m in stale
    ]
    audit.record_many(session, member_rows + stale_rows)
    log.info(
        "user.deactivated",
        user_id=user_id,
        revoked=len(revoked),
        token_ids=revoked,
        memberships=len(ended),
        stale=len(stale),
        event_id=event_id,
    )
    return revoked


def request_revocation(
    session: Session,
    *,
    token_id: str,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
    actor: str | None = None,
) -> TokenOutcome:
    """Delete (revoke) one token on request; an unknown or already revoked token is a no-op.

    An unknown id is audited as a refusal rather than treated as a bad event: the token may
    have been named by mistake, and retrying would never make it exist.
    """
    token = revoke_token(
        session,
        token_id=token_id,
        reason=DELETED,
        source=source,
        now=now,
        actor=actor,
        event_id=event_id,
    )
    if token is not None:
        return TokenOutcome(token.id, revoked=True)
    if session.scalar(select(Token.id).where(Token.id == token_id)) is not None:
        return TokenOutcome(token_id, revoked=False)
    audit.record(
        session,
        action="refuse",
        reason="unknown_token",
        source=source,
        at=now,
        token_id=token_id if len(token_id) <= TOKEN_ID_MAX else None,
        actor=actor,
        event_id=event_id,
        detail={"requested_token_id": token_id, "event_time": at.isoformat()},
    )
    return TokenOutcome(None, revoked=False)


def report_leak(
    session: Session,
    *,
    token_hash: str | None = None,
    token_id: str | None = None,
    source_url: str | None = None,
    reporter: str | None = None,
    at: datetime,
    now: datetime,
    source: str,
    event_id: str | None,
) -> TokenOutcome:
    """Revoke a leaked token, whatever its kind, named by the hash of its text or by its id.

    A second report of the same token changes nothing. An unknown token is not audited: the
    leak endpoints must not reveal whether a token exists, and the trail is readable by more
    people than the event inbox.
    """
    if (token_hash is None) == (token_id is None):
        raise ValueError("name the leaked token by exactly one of token_hash and token_id")
    found = session.scalar(
        select(Token.id).where(
            Token.token_hash == token_hash if token_hash is not None else Token.id == token_id
        )
    )
    if found is None:
        log.info("leak.unknown_token", event_id=event_id, event_time=at.isoformat())
        return TokenOutcome(None, revoked=False)
    detail = {
        key: value
        for key, value in (("source_url", source_url), ("reporter", reporter))
        if value is not None
    }
    token = revoke_token(
        session,
        token_id=found,
        reason=LEAKED,
        source=source,
        now=now,
        actor=reporter,
        event_id=event_id,
        detail=detail or None,
    )
    if token is not None:
        notices.leak_notice(
            session,
            token,
            now=now,
            source=source,
            source_url=source_url,
            reporter=reporter,
            event_id=event_id,
            at=at,
        )
    return TokenOutcome(found, revoked=token is not None)


def _record_deactivation(
    session: Session, *, user_id: str, at: datetime, now: datetime, event_id: str | None
) -> None:
    """Keep the newest deactivation of ``user_id``; an older one arriving late changes nothing."""
    values = {"user_id": user_id, "deactivated_at": at, "event_id": event_id, "updated_at": now}
    table = UserDeactivation.__table__
    statement = (
        postgresql.insert(UserDeactivation)
        if session.get_bind().dialect.name == "postgresql"
        else sqlite.insert(UserDeactivation)
    ).values(values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.user_id],
            set_={
                "deactivated_at": statement.excluded.deactivated_at,
                "event_id": statement.excluded.event_id,
                "updated_at": statement.excluded.updated_at,
            },
            where=table.c.deactivated_at < statement.excluded.deactivated_at,
        )
    )


def held_at(at: datetime, active_since: datetime | None) -> ColumnElement[bool]:
    """PATs the member held at ``at``: issued by then, or before the current active period."""
    before_rejoin = Token.created_at < active_since if active_since is not None else false()
    return or_(Token.created_at <= at, before_rejoin)


def _revoke_personal_tokens(
    session: Session,
    criteria: Sequence[ColumnElement[bool]],
    *,
    reason: str,
    at: datetime,
    now: datetime,
    source: str,
    actor: str | None,
    event_id: str | None,
) -> list[notices.TokenFacts]:
    """Revoke the live PATs matching ``criteria`` in one statement; audit them in another.

    Returns the revoked tokens, by id, with what their audit rows and notices name.
    """
    rows = revoke_statement(session, criteria, reason=reason, now=now)
    audit.record_many(
        session,
        [
            audit_row(
                action="revoke",
                reason=reason,
                token_id=row.id,
                org_id=row.org_id,
                user_id=row.user_id,
                at=now,
                source=source,
                actor=actor,
                event_id=event_id,
                detail={"event_time": at.isoformat()},
            )
            for row in rows
        ],
    )
    revoked: list[notices.TokenFacts] = sorted(rows, key=lambda row: str(row.id))
    return revoked


def revoke_statement(
    session: Session, criteria: Sequence[ColumnElement[bool]], *, reason: str, now: datetime
) -> list[notices.TokenFacts]:
    """Revoke the live PATs matching ``criteria`` in one statement; the rows it revoked."""
    rows: list[notices.TokenFacts] = []
    rows += session.execute(
        update(Token)
        .where(
            Token.kind == TokenKind.PERSONAL.value,
            Token.revoked_at.is_(None),
            and_(*criteria),
        )
        .values(revoked_at=now, revoke_reason=reason)
        # Everything a notice names (worker.domain.notices.describe), so no second query is needed.
        .returning(
            Token.id,
            Token.org_id,
            Token.user_id,
            Token.kind,
            Token.name,
            Token.app_id,
            Token.created_by,
            Token.last4,
            Token.expires_at,
        )
        # Keeps Token objects already loaded in this session in step, using the ids that
        # RETURNING brings back rather than a second query.
        .execution_options(synchronize_session="fetch")
    ).all()
    return rows


def _org_then_id(token: notices.TokenFacts) -> tuple[str, str]:
    return (token.org_id, token.id)


def audit_row(
    *,
    action: str,
    reason: str,
    at: datetime,
    source: str,
    org_id: str | None,
    user_id: str | None,
    actor: str | None,
    event_id: str | None,
    detail: dict[str, Any] | None,
    token_id: str | None = None,
) -> dict[str, Any]:
    # Every row of one bulk insert needs the same keys, so all are spelled out.
    return {
        "at": at,
        "action": action,
        "reason": reason,
        "source": source,
        "token_id": token_id,
        "org_id": org_id,
        "user_id": user_id,
        "actor": actor,
        "event_id": event_id,
        "detail": detail,
    }


def _stale_detail(at: datetime, applied: datetime | None) -> dict[str, Any]:
    # ``applied`` is set on a stale membership: None would not have been newer.
    return {"event_time": at.isoformat(), "applied_time": applied.isoformat() if applied else None}
