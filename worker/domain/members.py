"""Memberships of users in organizations, with the time of the last event applied.

Two times per membership: ``last_event_at``, of the newest join, removal or deactivation
applied (it decides whether the user is a member), and ``role_at``, of the newest join or role
change (it decides the role). Only a join makes a member: a role change sets the role of a
membership, active or not, and an event older than what decides the same thing is stale.

A user's platform-wide deactivation is kept per user (``user_deactivations``): it ends the
memberships that exist when it is applied, and a membership that first appears later through
an event older than the deactivation starts out as the deactivation left it (inactive, as of
the deactivation's time). So a ``membership.added`` older than the deactivation is stale
whichever arrives first, and one at or after it is a re-join.

A removal (worker.domain.removals) or deactivation (worker.domain.deactivation) older than
what the membership reflects is stale too, and leaves the membership alone; it still revokes
the personal tokens the leaver held at its time. A role change never makes a removal or
deactivation stale. Memberships are read ``FOR UPDATE``, so two workers applying events about
the same membership take turns instead of both acting on what they read first.

It holds joins (:func:`add_member`), role changes (:func:`change_role`) and what every
membership event shares: the locked row, the ordering rules, the audit of a stale event. It
must not import Celery, kombu, httpx, FastAPI, Starlette or standardwebhooks, nor ``tasks``,
``producer`` or ``worker.runtime``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import audit, db
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.models import Membership, Role, UserDeactivation

log = structlog.get_logger(__name__)


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise Refused("bad_role", f"role must be 'admin' or 'user', not {role!r}") from None


def get(session: Session, *, org_id: str, user_id: str) -> Membership | None:
    return session.get(Membership, (org_id, user_id))


def add_member(
    session: Session,
    *,
    org_id: str,
    user_id: str,
    role: str,
    email: str | None,
    at: datetime,
    now: datetime,
    source: str,
    actor: str | None = None,
    event_id: str | None = None,
) -> bool:
    """Record that ``user_id`` is an active member of ``org_id`` as of ``at``.

    Returns False, and audits the event as stale, when the membership already reflects a
    join, removal or deactivation newer than ``at``. A role change newer than ``at`` keeps
    its role.
    """
    parsed = parse_role(role)
    stamp = audit.Stamp(at=at, now=now, source=source, event_id=event_id, actor=actor)
    member, _created = membership_for_update(
        session, org_id=org_id, user_id=user_id, role=parsed.value, at=at, now=now
    )
    if audit_if_stale(
        session, member, kind="membership.added", newest=member.last_event_at, stamp=stamp
    ):
        return False
    if not member.active:
        member.active_since = at
    member.active = True
    detail = _take_role(member, parsed, at=at)
    member.email = email if email is not None else member.email
    member.last_event_at = at
    member.updated_at = now
    stamp.record(session, "member", "added", org_id=org_id, user_id=user_id, detail=detail)
    return True


def _take_role(member: Membership, role: Role, *, at: datetime) -> dict[str, Any]:
    """Give ``member`` the role of a join at ``at`` unless a newer role change set one;
    returns what the join's audit row says of the role."""
    if after(member.role_at, at):
        assert member.role_at is not None
        # Overtaken by a role change: the newer role stays.
        return {"role": member.role, "role_changed_at": member.role_at.isoformat()}
    member.role = role.value
    member.role_at = at
    return {"role": role.value}


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
    stamp = audit.Stamp(at=at, now=now, source=source, event_id=event_id, actor=actor)
    member, created = membership_for_update(
        session, org_id=org_id, user_id=user_id, role=parsed, at=None, now=now
    )
    newest = latest(member.last_event_at, member.role_at)
    if audit_if_stale(session, member, kind="membership.role_changed", newest=newest, stamp=stamp):
        return False
    previous = None if created else member.role
    changed = created or member.role != parsed
    member.role = parsed
    member.role_at = at
    member.updated_at = now
    if changed:
        detail = {"role": parsed, "previous_role": previous, "active": member.active}
        stamp.record(
            session, "member", "role_changed", org_id=org_id, user_id=user_id, detail=detail
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


def after(stamp: datetime | None, at: datetime) -> bool:
    """Whether ``stamp`` (None: nothing seen yet) is later than ``at``."""
    return stamp is not None and stamp > at


def membership_for_update(
    session: Session,
    *,
    org_id: str,
    user_id: str,
    role: str,
    at: datetime | None,
    now: datetime,
) -> tuple[Membership, bool]:
    """The membership row, locked; inserted inactive as of ``at`` when missing.

    ``at`` is the time of a join, removal or deactivation; None for a role change, which
    inserts the row without a time of its own (so that an older join arriving later still
    makes the member).

    Returns the row and whether this call inserted it. ``SELECT … FOR UPDATE`` cannot lock a
    row that does not exist yet, so a missing one is inserted with ``ON CONFLICT DO NOTHING``
    and read again: two workers creating the same membership then wait for each other instead
    of one failing on the primary key.
    """
    member = lock_membership(session, org_id=org_id, user_id=user_id)
    if member is not None:
        return member, False
    inserted = _insert_inactive(session, org_id=org_id, user_id=user_id, role=role, at=at, now=now)
    member = lock_membership(session, org_id=org_id, user_id=user_id)
    assert member is not None
    return member, inserted


def _insert_inactive(
    session: Session, *, org_id: str, user_id: str, role: str, at: datetime | None, now: datetime
) -> bool:
    """Insert the missing membership, inactive; False when another writer inserted it first.

    A user deactivated after ``at`` gets the row as the deactivation would have left it had
    the row existed then: inactive as of the deactivation, so that this older event is stale.
    """
    # Taken before reading the deactivation: a deactivation being applied right now either
    # committed first (and is read here) or waits, and then finds the row inserted here.
    lock_user(session, user_id)
    values = {
        "org_id": org_id,
        "user_id": user_id,
        "role": role,
        "email": None,
        "active": False,
        "active_since": None,
        "last_event_at": latest(at, deactivated_at(session, user_id)),
        "role_at": None,
        "updated_at": now,
    }
    statement = (
        db.insert_for(session, Membership)
        .values(values)
        .on_conflict_do_nothing()
        .returning(Membership.org_id)
    )
    return session.execute(statement).first() is not None


def latest(*stamps: datetime | None) -> datetime | None:
    """The latest of ``stamps`` that are set; None when none is."""
    return max((stamp for stamp in stamps if stamp is not None), default=None)


def lock_membership(session: Session, *, org_id: str, user_id: str) -> Membership | None:
    # populate_existing: after waiting for the lock, use what the other writer committed,
    # not a copy this session loaded before.
    return session.scalar(
        select(Membership)
        .where(Membership.org_id == org_id, Membership.user_id == user_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def lock_user(session: Session, user_id: str) -> None:
    """Serialize, per user, a deactivation with the first event of a new membership.

    Neither can lock a row of the other (the deactivation does not know the new membership's
    organization, and the membership does not know of a deactivation not yet committed), so
    on Postgres both take a transaction-scoped advisory lock on the user. SQLite runs one
    writing transaction at a time anyway.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.blake2b(f"tokenwarden.user:{user_id}".encode(), digest_size=8).digest()
    session.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest, signed=True))))


def deactivated_at(session: Session, user_id: str) -> datetime | None:
    """When ``user_id`` was last deactivated platform-wide, if ever."""
    return session.scalar(
        select(UserDeactivation.deactivated_at).where(UserDeactivation.user_id == user_id)
    )


def audit_if_stale(
    session: Session,
    member: Membership,
    *,
    kind: str,
    newest: datetime | None,
    stamp: audit.Stamp,
) -> bool:
    """Whether the event ``kind`` of ``stamp`` is older than ``newest``, the time of the newer
    event the row of ``member`` reflects; if so, audits (and logs) it as stale.

    When the user's deactivation is what the event is older than, the row says so, with the
    deactivation's time: the event is not applied because the user was deactivated after it.
    """
    if newest is None or newest <= stamp.at:
        return False
    detail = stale_detail(
        kind=kind,
        org_id=member.org_id,
        user_id=member.user_id,
        at=stamp.at,
        applied=newest,
        deactivated=deactivated_at(session, member.user_id),
        event_id=stamp.event_id,
    )
    stamp.record(
        session, "stale", kind, org_id=member.org_id, user_id=member.user_id, detail=detail
    )
    return True


def stale_detail(
    *,
    kind: str,
    org_id: str,
    user_id: str,
    at: datetime,
    applied: datetime,
    deactivated: datetime | None,
    event_id: str | None,
) -> dict[str, Any]:
    """The detail of a ``stale`` audit row; logs the cause when it is the user's deactivation."""
    detail: dict[str, Any] = {"event_time": at.isoformat(), "applied_time": applied.isoformat()}
    if deactivated is not None and deactivated > at:
        detail["cause"] = "user_deactivated"
        detail["deactivated_at"] = deactivated.isoformat()
        log.info(
            "membership.stale",
            kind=kind,
            org_id=org_id,
            user_id=user_id,
            event_id=event_id,
            event_time=at.isoformat(),
            cause="user_deactivated",
            deactivated_at=deactivated.isoformat(),
        )
    return detail
