"""Removals: a member leaves an organization, one event at a time or many together.

:func:`remove_member` applies one ``membership.removed`` event: it ends the membership (see
worker.domain.members for the ordering rules: a stale removal leaves the membership alone),
revokes the leaver's PATs in that organization that they held at its time, audits it all and
tells the organization's admins. Application tokens and the user's tokens in other
organizations are never touched.

:func:`remove_members` applies many of them set-based. One at a time costs about nine
statements; a message of a hundred of them costs a handful here, whatever their number: lock
the memberships, end them, revoke every matching PAT with one ``UPDATE … RETURNING``, one bulk
insert of audit rows and one of notices. The outcome is the one of applying them one by one
in the order given (the inbox's order, by event time): the same rows, audit trail, notices and
log lines, stale removals included. Removals of the same membership depend on each other's
outcome, and a membership not known yet must be recorded first; both are left to the
one-at-a-time path.

It must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from itertools import groupby
from typing import Any, NamedTuple, cast

import structlog
from sqlalchemy import ColumnElement, Table, and_, or_, select, true, update
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit, db, members, notices, orphans
from tokenwarden.worker.domain.models import Membership, Role, Token, UserDeactivation
from tokenwarden.worker.domain.revocation import held_at, revoke_leaver_tokens, revoke_statement

log = structlog.get_logger(__name__)

MEMBER_REMOVED = "member_removed"


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

    Returns the ids of the tokens revoked. An unknown membership is recorded as inactive, so
    a ``membership.added`` older than this removal arriving later is stale.
    """
    stamp = audit.Stamp(at=at, now=now, source=source, event_id=event_id, actor=actor)
    member, created = members.membership_for_update(
        session, org_id=org_id, user_id=user_id, role=Role.USER.value, at=at, now=now
    )
    stale = members.audit_if_stale(
        session, member, kind="membership.removed", newest=member.last_event_at, stamp=stamp
    )
    ended = not stale and (created or member.active)
    if stale:
        held = held_at(at, member.active_since)
    else:
        member.active = False
        member.last_event_at = at
        member.updated_at = now
        held = true()
    revoked = revoke_leaver_tokens(
        session,
        [Token.org_id == org_id, Token.user_id == user_id, held],
        user_id=user_id,
        reason=MEMBER_REMOVED,
        stamp=stamp,
    )
    # A replay of a removal already applied changes nothing, so it leaves no second row.
    if ended:
        detail = {"revoked": len(revoked)}
        stamp.record(session, "member", "removed", org_id=org_id, user_id=user_id, detail=detail)
        orphans.tell_admins(session, [(org_id, user_id)], stamp=stamp)
    _log_removed(org_id, user_id, revoked, stale=stale, event_id=event_id)
    return revoked


def _log_removed(
    org_id: str, user_id: str, revoked: list[str], *, stale: bool, event_id: str | None
) -> None:
    log.info(
        "member.removed",
        org_id=org_id,
        user_id=user_id,
        revoked=len(revoked),
        token_ids=revoked,
        stale=stale,
        event_id=event_id,
    )


@dataclass(frozen=True)
class Removal:
    """One ``membership.removed`` event."""

    org_id: str
    user_id: str
    at: datetime
    source: str
    event_id: str | None
    actor: str | None = None

    def stamp(self, now: datetime) -> audit.Stamp:
        return audit.Stamp(
            at=self.at, now=now, source=self.source, event_id=self.event_id, actor=self.actor
        )


class _Held(NamedTuple):
    """A membership as :func:`_lock` locked it, before the batch changed it."""

    org_id: str
    user_id: str
    active: bool
    active_since: datetime | None
    last_event_at: datetime | None
    role: str
    email: str | None


_HELD_COLUMNS = tuple(getattr(Membership, name) for name in _Held._fields)


@dataclass(frozen=True)
class _Leaver:
    removal: Removal
    before: _Held

    @cached_property
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
    ended = [leaver for leaver in leavers if not leaver.stale and leaver.before.active]
    orphaned = orphans.orphaned_tokens(session, [leaver.key for leaver in ended])
    offboarded = {key for key, tokens in revoked.items() if tokens}
    # Read once the whole batch is applied (see _recipients), for both kinds of notice.
    admins = notices.admins_of(session, {org_id for org_id, _ in offboarded | orphaned.keys()})
    recipients = _recipients(leavers, offboarded, admins)
    audit_rows: list[dict[str, Any]] = []
    queued: list[notices.Queued] = []
    for leaver, told in zip(leavers, recipients, strict=True):
        tokens = revoked.get(leaver.key, [])
        audit_rows += _audit_rows(
            leaver, tokens, now=now, deactivated=deactivations.get(leaver.removal.user_id)
        )
        if tokens:
            queued.append(_notice(leaver.removal, tokens, told, now=now))
        removal = leaver.removal
        token_ids = [token.id for token in tokens]
        _log_removed(
            removal.org_id,
            removal.user_id,
            token_ids,
            stale=leaver.stale,
            event_id=removal.event_id,
        )
    audit.record_many(session, audit_rows)
    notices.queue_many(session, queued, now=now)
    if orphaned:
        _tell_orphans(session, leavers, ended, orphaned, admins, now=now)
    return {
        leaver.removal.event_id: [token.id for token in revoked.get(leaver.key, [])]
        for leaver in leavers
    }


def _tell_orphans(
    session: Session,
    leavers: list[_Leaver],
    ended: list[_Leaver],
    found: dict[tuple[str, str], list[notices.TokenFacts]],
    admins: dict[str, list[dict[str, Any]]],
    *,
    now: datetime,
) -> None:
    """The orphaned-AAT notices of the memberships this batch ended (``found``: what
    orphans.orphaned_tokens found for ``ended``), in the batch's order, to the admins
    :func:`_recipients` names (as one removal at a time would)."""
    told = _recipients(leavers, set(found), admins)
    orphaned = {leaver.key: found[leaver.key] for leaver in ended if leaver.key in found}
    orphans.queue_notices(
        session,
        orphaned,
        stamps={leaver.key: leaver.removal.stamp(now) for leaver in ended},
        recipients={leaver.key: told[i] for i, leaver in enumerate(leavers)},
    )


def _lock(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], _Held]:
    # In a fixed order, as deactivate_user locks a user's memberships, so that two batches
    # (or a batch and a deactivation) take their locks in the same order.
    rows = session.execute(
        select(*_HELD_COLUMNS)
        .where(db.one_of(session, [Membership.org_id, Membership.user_id], keys))
        .order_by(Membership.org_id, Membership.user_id)
        .with_for_update()
    )
    return {(row.org_id, row.user_id): row for row in map(_Held._make, rows)}


def _end(session: Session, fresh: list[_Leaver], *, now: datetime) -> None:
    """End the memberships, as of each removal's time: one statement per distinct time."""
    for at, same_time in groupby(sorted(fresh, key=_time), key=_time):
        session.execute(
            update(cast(Table, Membership.__table__))
            .where(
                db.one_of(
                    session,
                    [Membership.org_id, Membership.user_id],
                    [leaver.key for leaver in same_time],
                )
            )
            .values(active=False, last_event_at=at, updated_at=now)
            # On the table, not the mapped class: a batch of removals loads no Membership
            # object (_lock and notices.admins_of read rows), so there is none to keep in step.
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
        criteria.append(db.one_of(session, [Token.org_id, Token.user_id], fresh))
    # A batch of removals loads no Token object: the rows RETURNING brings back are enough.
    rows = revoke_statement(session, [or_(*criteria)], reason=MEMBER_REMOVED, now=now, loaded=False)
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
    leavers: list[_Leaver],
    told: set[tuple[str, str]],
    remaining: dict[str, list[dict[str, Any]]],
) -> list[list[dict[str, Any]]]:
    """Who hears about each leaver in ``told``: their organization's admins when it was
    applied.

    ``remaining`` (notices.admins_of) is read once the whole batch is applied; an admin whom
    a later removal of the batch ends was still an admin when an earlier one was applied, and
    hears about it, as with one event at a time.
    """
    # The admins the batch itself removes, by organization, with their place in it: few,
    # so each leaver looks only at its own organization's, not at every later leaver.
    leaving_admins: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for index, other in enumerate(leavers):
        if not other.stale and other.before.active and other.before.role == Role.ADMIN:
            leaving_admins.setdefault(other.removal.org_id, []).append(
                (index, {"user_id": other.removal.user_id, "email": other.before.email})
            )
    recipients: list[list[dict[str, Any]]] = []
    for index, leaver in enumerate(leavers):
        if leaver.key not in told:
            recipients.append([])
            continue
        org_id = leaver.removal.org_id
        later = [admin for place, admin in leaving_admins.get(org_id, []) if place > index]
        everyone = remaining.get(org_id, []) + later
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
    stamp = removal.stamp(now)
    org_id, user_id = removal.org_id, removal.user_id
    rows = []
    applied = leaver.before.last_event_at
    if leaver.stale and applied is not None:  # stale: a later event was applied
        detail = members.stale_detail(
            kind="membership.removed",
            org_id=org_id,
            user_id=user_id,
            at=removal.at,
            applied=applied,
            deactivated=deactivated,
            event_id=removal.event_id,
        )
        rows.append(
            stamp.row("stale", "membership.removed", org_id=org_id, user_id=user_id, detail=detail)
        )
    event_time = {"event_time": removal.at.isoformat()}
    rows += [
        stamp.row(
            "revoke",
            MEMBER_REMOVED,
            org_id=org_id,
            user_id=user_id,
            detail=event_time,
            token_id=token.id,
        )
        for token in tokens
    ]
    # A replay of a removal already applied changes nothing, so it leaves no second row.
    if not leaver.stale and leaver.before.active:
        detail = {"revoked": len(tokens)}
        rows.append(stamp.row("member", "removed", org_id=org_id, user_id=user_id, detail=detail))
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
