"""Many ``membership.removed`` events applied together, set-based.

One removal at a time (:func:`worker.domain.offboarding.remove_member`) costs about nine statements;
a message of a hundred of them costs a handful here, whatever their number: lock the
memberships, end them, revoke every matching PAT with one ``UPDATE … RETURNING``, one bulk
insert of audit rows and one of notices. The outcome is the one of applying them one by one
in the order given (the inbox's order, by event time): the same rows, audit trail, notices and
log lines, stale removals included (see :mod:`worker.domain.offboarding` for the ordering rules).

Removals of the same membership depend on each other's outcome, and a membership not known
yet must be recorded first; both are left to the one-at-a-time path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any

import structlog
from sqlalchemy import ColumnElement, and_, or_, select, tuple_, update
from sqlalchemy.orm import Session

from worker.domain import audit, members, notices
from worker.domain.models import Membership, Role, Token, UserDeactivation
from worker.domain.offboarding import MEMBER_REMOVED, audit_row, held_at, revoke_statement

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Removal:
    """One ``membership.removed`` event."""

    org_id: str
    user_id: str
    at: datetime
    source: str
    event_id: str | None
    actor: str | None = None


@dataclass(frozen=True)
class _Leaver:
    removal: Removal
    # The membership as locked (a row of _lock), before this batch changed it.
    before: Any

    @property
    def stale(self) -> bool:
        return members.after(self.before.last_event_at, self.removal.at)

    @property
    def key(self) -> tuple[str, str]:
        return (self.removal.org_id, self.removal.user_id)


def remove_members(
    session: Session, removals: Sequence[Removal], *, now: datetime
) -> dict[str | None, list[str]] | None:
    """Apply ``removals`` together; return the ids of the tokens each revoked, by event id.

    Returns None, having changed nothing, when one of the memberships is not known yet. Two
    removals of the same membership are refused with ``ValueError``.
    """
    keys = [(r.org_id, r.user_id) for r in removals]
    if len(set(keys)) != len(keys):
        raise ValueError("each removal of a batch must name another membership")
    if not removals:
        return {}
    found = _lock(session, keys)
    if len(found) != len(keys):
        return None
    leavers = [_Leaver(r, found[(r.org_id, r.user_id)]) for r in removals]
    _end(session, [leaver for leaver in leavers if not leaver.stale], now=now)
    revoked = _revoke(session, leavers, now=now)
    deactivations = _deactivations(session, [leaver for leaver in leavers if leaver.stale])
    recipients = _recipients(session, leavers, {key for key, tokens in revoked.items() if tokens})
    audit_rows: list[dict[str, Any]] = []
    queued: list[notices.Queued] = []
    for leaver, told in zip(leavers, recipients, strict=True):
        tokens = revoked.get(leaver.key, [])
        audit_rows += _audit_rows(
            leaver, tokens, now=now, deactivated=deactivations.get(leaver.removal.user_id)
        )
        if tokens:
            queued.append(_notice(leaver.removal, tokens, told, now=now))
        log.info(
            "member.removed",
            org_id=leaver.removal.org_id,
            user_id=leaver.removal.user_id,
            revoked=len(tokens),
            token_ids=[token.id for token in tokens],
            stale=leaver.stale,
            event_id=leaver.removal.event_id,
        )
    audit.record_many(session, audit_rows)
    notices.queue_many(session, queued, now=now)
    return {
        leaver.removal.event_id: [token.id for token in revoked.get(leaver.key, [])]
        for leaver in leavers
    }


def _lock(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    # In a fixed order, as deactivate_user locks a user's memberships, so that two batches
    # (or a batch and a deactivation) take their locks in the same order.
    rows = session.execute(
        select(
            Membership.org_id,
            Membership.user_id,
            Membership.active,
            Membership.active_since,
            Membership.last_event_at,
            Membership.role,
            Membership.email,
        )
        .where(tuple_(Membership.org_id, Membership.user_id).in_(keys))
        .order_by(Membership.org_id, Membership.user_id)
        .with_for_update()
    )
    return {(row.org_id, row.user_id): row for row in rows}


def _end(session: Session, fresh: list[_Leaver], *, now: datetime) -> None:
    """End the memberships, as of each removal's time: one statement per distinct time."""
    for at, same_time in groupby(sorted(fresh, key=_time), key=_time):
        session.execute(
            update(Membership)
            .where(
                tuple_(Membership.org_id, Membership.user_id).in_(
                    [leaver.key for leaver in same_time]
                )
            )
            .values(active=False, last_event_at=at, updated_at=now)
            # Membership objects already loaded in this session see the change.
            .execution_options(synchronize_session="fetch")
        )


def _time(leaver: _Leaver) -> datetime:
    return leaver.removal.at


def _revoke(
    session: Session, leavers: list[_Leaver], *, now: datetime
) -> dict[tuple[str, str], list[notices.TokenFacts]]:
    """Revoke every leaver's PATs in one statement; the revoked ones by membership, by id.

    All of them in the organization left, or for a stale removal only those held at its time.
    """
    criteria: list[ColumnElement[bool]] = [
        and_(
            Token.org_id == leaver.removal.org_id,
            Token.user_id == leaver.removal.user_id,
            held_at(leaver.removal.at, leaver.before.active_since),
        )
        for leaver in leavers
        if leaver.stale
    ]
    fresh = [leaver.key for leaver in leavers if not leaver.stale]
    if fresh:
        criteria.append(tuple_(Token.org_id, Token.user_id).in_(fresh))
    rows = revoke_statement(session, [or_(*criteria)], reason=MEMBER_REMOVED, now=now)
    revoked: dict[tuple[str, str], list[notices.TokenFacts]] = {}
    for row in sorted(rows, key=lambda row: str(row.id)):
        revoked.setdefault((row.org_id, str(row.user_id)), []).append(row)
    return revoked


def _deactivations(session: Session, stale: list[_Leaver]) -> dict[str, datetime]:
    """When the stale leavers were deactivated, if they were: a stale row names that cause."""
    if not stale:
        return {}
    rows = session.execute(
        select(UserDeactivation.user_id, UserDeactivation.deactivated_at).where(
            UserDeactivation.user_id.in_({leaver.removal.user_id for leaver in stale})
        )
    )
    return {row.user_id: row.deactivated_at for row in rows}


def _recipients(
    session: Session, leavers: list[_Leaver], told: set[tuple[str, str]]
) -> list[list[dict[str, Any]]]:
    """Who hears about each leaver: their organization's admins when it was applied.

    Read once the whole batch is applied; an admin whom a later removal of the batch ends
    was still an admin when an earlier one was applied, and hears about it, as with one
    event at a time.
    """
    remaining = notices.admins_of(session, {org_id for org_id, _ in told})
    recipients: list[list[dict[str, Any]]] = []
    for index, leaver in enumerate(leavers):
        if leaver.key not in told:
            recipients.append([])
            continue
        later = [
            {"user_id": other.removal.user_id, "email": other.before.email}
            for other in leavers[index + 1 :]
            if other.removal.org_id == leaver.removal.org_id
            and not other.stale
            and other.before.active
            and other.before.role == Role.ADMIN
        ]
        everyone = remaining.get(leaver.removal.org_id, []) + later
        recipients.append(sorted(everyone, key=lambda admin: str(admin["user_id"])))
    return recipients


def _audit_rows(
    leaver: _Leaver,
    tokens: list[notices.TokenFacts],
    *,
    now: datetime,
    deactivated: datetime | None,
) -> list[dict[str, Any]]:
    """The rows remove_member writes, in its order: stale, revocations, the removal itself."""
    removal = leaver.removal
    # Hundreds of rows a batch: built from one template rather than call by call.
    template = audit_row(
        action="",
        reason="",
        at=now,
        source=removal.source,
        org_id=removal.org_id,
        user_id=removal.user_id,
        actor=removal.actor,
        event_id=removal.event_id,
        detail=None,
    )

    def row(
        action: str, reason: str, detail: dict[str, Any], token_id: str | None = None
    ) -> dict[str, Any]:
        return {
            **template,
            "action": action,
            "reason": reason,
            "detail": detail,
            "token_id": token_id,
        }

    rows = []
    if leaver.stale:
        detail = members.stale_detail(
            kind="membership.removed",
            org_id=removal.org_id,
            user_id=removal.user_id,
            at=removal.at,
            applied=leaver.before.last_event_at,
            deactivated=deactivated,
            event_id=removal.event_id,
        )
        rows.append(row("stale", "membership.removed", detail))
    event_time = {"event_time": removal.at.isoformat()}
    rows += [row("revoke", MEMBER_REMOVED, event_time, token.id) for token in tokens]
    # A replay of a removal already applied changes nothing, so it leaves no second row.
    if not leaver.stale and leaver.before.active:
        rows.append(row("member", "removed", {"revoked": len(tokens)}))
    return rows


def _notice(
    removal: Removal,
    tokens: list[notices.TokenFacts],
    recipients: list[dict[str, Any]],
    *,
    now: datetime,
) -> notices.Queued:
    return notices.Queued(
        kind=notices.OFFBOARDED,
        org_id=removal.org_id,
        recipients=recipients,
        data=notices.offboarding_data(
            user_id=removal.user_id,
            described=[notices.describe(token) for token in tokens],
            now=now,
            source=removal.source,
            event_id=removal.event_id,
            reason=MEMBER_REMOVED,
            at=removal.at,
        ),
        event_id=removal.event_id,
    )
