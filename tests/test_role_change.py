"""Role changes: they set a member's role and never make a member, so a leaver stays out."""

from __future__ import annotations

import itertools
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenwarden.worker.domain import inbox
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.events import parse_event
from tokenwarden.worker.domain.handlers import apply_event
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import AuditEntry, InboxEvent, Membership, TokenKind
from tokenwarden.worker.domain.verification import verify_token

ADDED, ROLE_CHANGED, REMOVED, DEACTIVATED = (
    "membership.added",
    "membership.role_changed",
    "membership.removed",
    "user.deactivated",
)
_ids = itertools.count()


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def cloud(type_: str, data: dict[str, Any], *, time: Any = None, id_: str = "") -> dict[str, Any]:
    raw: dict[str, Any] = {
        "specversion": "1.0",
        "id": id_ or f"evt-{secrets.token_hex(6)}",
        "source": "hr://workday",
        "type": type_,
        "data": data,
    }
    if time is not None:
        raw["time"] = iso(time) if isinstance(time, datetime) else time
    return raw


def unique_user() -> str:
    return f"u-{next(_ids)}-{secrets.token_hex(3)}"


def join(session: Session, org_id: str, user_id: str, *, at: datetime, role: str = "user") -> None:
    assert add_member(
        session,
        org_id=org_id,
        user_id=user_id,
        role=role,
        email=None,
        at=at,
        now=at,
        source="test",
    )


def pat(session: Session, org_id: str, user_id: str, *, created: datetime) -> IssuedToken:
    return create_token(
        session,
        kind=TokenKind.PERSONAL,
        org_id=org_id,
        user_id=user_id,
        name="laptop",
        expires_at=created + timedelta(days=365),
        now=created,
    )


def received(session: Session, raw: dict[str, Any], *, at: datetime) -> InboxEvent:
    """``raw`` as an inbox row received at ``at``, without the API's checks (as another door,
    or an older release, would have stored it)."""
    inbox.store_events(session, [parse_event(raw)], now=at)
    row = session.get(InboxEvent, raw["id"])
    assert row is not None
    return row


def no_pat_for(session: Session, org_id: str, user_id: str, *, at: datetime) -> bool:
    """Whether issuing a PAT to ``user_id`` in ``org_id`` is refused (nothing is kept)."""
    try:
        with session.begin_nested():
            pat(session, org_id, user_id, created=at)
    except Refused:
        return True
    return False


def member_of(session: Session, org_id: str, user_id: str) -> Membership:
    found = session.get(Membership, (org_id, user_id))
    assert found is not None
    return found


def test_a_role_change_after_the_removal_leaves_the_leaver_out(
    session: Session, now: datetime
) -> None:
    user = unique_user()
    joined, left, changed = (now - timedelta(hours=h) for h in (3, 2, 1))
    join(session, "acme", user, at=joined)
    token = pat(session, "acme", user, created=joined)
    removal = received(
        session, cloud(REMOVED, {"org_id": "acme", "user_id": user}, time=left), at=left
    )
    change = received(
        session,
        cloud(ROLE_CHANGED, {"org_id": "acme", "user_id": user, "role": "admin"}, time=changed),
        at=changed,
    )

    apply_event(session, removal, now=now)
    result = apply_event(session, change, now=now)

    assert result == {"applied": True, "revoked": []}
    found = member_of(session, "acme", user)
    assert (found.active, found.role, found.last_event_at) == (False, "admin", left)
    assert no_pat_for(session, "acme", user, at=now)
    assert verify_token(session, token.token, now=now).reason == "revoked"
    (row,) = session.scalars(
        select(AuditEntry).where(AuditEntry.event_id == change.id, AuditEntry.action == "member")
    )
    assert row.detail == {"role": "admin", "previous_role": "user", "active": False}


def test_a_role_change_newer_than_a_late_removal_does_not_make_it_stale(
    session: Session, now: datetime
) -> None:
    user = unique_user()
    joined, left, changed = (now - timedelta(hours=h) for h in (3, 2, 1))
    join(session, "acme", user, at=joined)
    token = pat(session, "acme", user, created=joined)
    change = received(
        session,
        cloud(ROLE_CHANGED, {"org_id": "acme", "user_id": user, "role": "admin"}, time=changed),
        at=changed,
    )
    removal = received(
        session, cloud(REMOVED, {"org_id": "acme", "user_id": user}, time=left), at=now
    )

    apply_event(session, change, now=now)
    assert member_of(session, "acme", user).role == "admin"
    result = apply_event(session, removal, now=now)

    assert result == {"revoked": [token.id]}
    assert not member_of(session, "acme", user).active
    assert no_pat_for(session, "acme", user, at=now)
    stale = session.scalars(
        select(AuditEntry).where(AuditEntry.user_id == user, AuditEntry.action == "stale")
    ).all()
    assert stale == []


def test_a_role_change_older_than_the_removal_is_stale(session: Session, now: datetime) -> None:
    user = unique_user()
    joined, changed, left = (now - timedelta(hours=h) for h in (3, 2, 1))
    join(session, "acme", user, at=joined)
    removal = received(
        session, cloud(REMOVED, {"org_id": "acme", "user_id": user}, time=left), at=left
    )
    change = received(
        session,
        cloud(ROLE_CHANGED, {"org_id": "acme", "user_id": user, "role": "admin"}, time=changed),
        at=now,
    )

    apply_event(session, removal, now=now)
    result = apply_event(session, change, now=now)

    assert result == {"applied": False, "revoked": []}
    found = member_of(session, "acme", user)
    assert (found.active, found.role) == (False, "user")
    (stale,) = session.scalars(
        select(AuditEntry).where(AuditEntry.user_id == user, AuditEntry.action == "stale")
    )
    assert stale.reason == ROLE_CHANGED
    assert stale.detail == {"event_time": changed.isoformat(), "applied_time": left.isoformat()}
