"""Memberships of users in organizations, with the time of the last event applied."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Executable, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker import audit
from worker.errors import Refused
from worker.models import Membership, Role


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

    Returns False, and audits the event as stale, when the membership already reflects an
    event newer than ``at``.
    """
    parsed = parse_role(role)
    member, created = membership_for_update(
        session, org_id=org_id, user_id=user_id, role=parsed.value, at=at, now=now
    )
    if not created and member.last_event_at > at:
        audit.record(
            session,
            action="stale",
            reason="membership.added",
            source=source,
            at=now,
            org_id=org_id,
            user_id=user_id,
            actor=actor,
            event_id=event_id,
            detail={"event_time": at.isoformat(), "applied_time": member.last_event_at.isoformat()},
        )
        return False
    if not member.active:
        member.active_since = at
    member.active = True
    member.role = parsed.value
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
        detail={"role": parsed.value},
    )
    return True


def membership_for_update(
    session: Session, *, org_id: str, user_id: str, role: str, at: datetime, now: datetime
) -> tuple[Membership, bool]:
    """The membership row, locked; inserted inactive as of ``at`` when missing.

    Returns the row and whether this call inserted it. ``SELECT … FOR UPDATE`` cannot lock a
    row that does not exist yet, so a missing one is inserted with ``ON CONFLICT DO NOTHING``
    and read again: two workers creating the same membership then wait for each other instead
    of one failing on the primary key.
    """
    member = lock_membership(session, org_id=org_id, user_id=user_id)
    if member is not None:
        return member, False
    values = {
        "org_id": org_id,
        "user_id": user_id,
        "role": role,
        "email": None,
        "active": False,
        "active_since": None,
        "last_event_at": at,
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


def lock_membership(session: Session, *, org_id: str, user_id: str) -> Membership | None:
    # populate_existing: after waiting for the lock, use what the other writer committed,
    # not a copy this session loaded before.
    return session.scalar(
        select(Membership)
        .where(Membership.org_id == org_id, Membership.user_id == user_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
