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
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Executable, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.domain import audit
from worker.domain.errors import Refused
from worker.domain.models import Membership, Role, UserDeactivation

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
    member, _created = membership_for_update(
        session, org_id=org_id, user_id=user_id, role=parsed.value, at=at, now=now
    )
    if after(member.last_event_at, at):
        assert member.last_event_at is not None
        audit_stale(
            session,
            member,
            kind="membership.added",
            at=at,
            applied=member.last_event_at,
            now=now,
            source=source,
            actor=actor,
            event_id=event_id,
        )
        return False
    if not member.active:
        member.active_since = at
    member.active = True
    detail: dict[str, Any] = {"role": parsed.value}
    if after(member.role_at, at):
        assert member.role_at is not None
        # Overtaken by a role change: the newer role stays.
        detail = {"role": member.role, "role_changed_at": member.role_at.isoformat()}
    else:
        member.role = parsed.value
        member.role_at = at
    member.email = email if email is not None else member.email
    member.last_event_at = at
    member.updated_at = now
    audit.record(
        session,
        action="member",
        reason="added",
        source=source,
        at=now,
        org_id=org_id,
        user_id=user_id,
        actor=actor,
        event_id=event_id,
        detail=detail,
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

    A user deactivated after ``at`` gets the row as the deactivation would have left it had
    the row existed then: inactive as of the deactivation, so that this older event is stale.
    """
    member = lock_membership(session, org_id=org_id, user_id=user_id)
    if member is not None:
        return member, False
    # Taken before reading the deactivation: a deactivation being applied right now either
    # committed first (and is read here) or waits, and then finds the row inserted here.
    lock_user(session, user_id)
    deactivated = deactivated_at(session, user_id)
    values = {
        "org_id": org_id,
        "user_id": user_id,
        "role": role,
        "email": None,
        "active": False,
        "active_since": None,
        "last_event_at": latest(at, deactivated),
        "role_at": None,
        "updated_at": now,
    }
    statement: Executable = (
        postgresql.insert(Membership).values(values).on_conflict_do_nothing()
        if session.get_bind().dialect.name == "postgresql"
        else sqlite.insert(Membership).values(values).on_conflict_do_nothing()
    ).returning(Membership.org_id)
    inserted = session.execute(statement).first()
    member = lock_membership(session, org_id=org_id, user_id=user_id)
    assert member is not None
    return member, inserted is not None


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


def audit_stale(
    session: Session,
    member: Membership,
    *,
    kind: str,
    at: datetime,
    applied: datetime,
    now: datetime,
    source: str,
    actor: str | None,
    event_id: str | None,
) -> None:
    """Audit (and log) an event about ``member`` older than ``applied``, the time of the
    newer event the row reflects.

    When the user's deactivation is what the event is older than, the row says so, with the
    deactivation's time: the event is not applied because the user was deactivated after it.
    """
    detail = stale_detail(
        kind=kind,
        org_id=member.org_id,
        user_id=member.user_id,
        at=at,
        applied=applied,
        deactivated=deactivated_at(session, member.user_id),
        event_id=event_id,
    )
    audit.record(
        session,
        action="stale",
        reason=kind,
        source=source,
        at=now,
        org_id=member.org_id,
        user_id=member.user_id,
        actor=actor,
        event_id=event_id,
        detail=detail,
    )


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
