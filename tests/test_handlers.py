"""Events applied to the token store: who loses which token, in what order, audited how."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import structlog
import structlog.testing
from sqlalchemy import event, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from tests.conftest import Store
from tokenwarden.worker.domain import audit, inbox
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.events import InvalidEvent, parse_event
from tokenwarden.worker.domain.handlers import apply_event, apply_pending
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import (
    AuditEntry,
    EventStatus,
    InboxEvent,
    Membership,
    Notice,
    Token,
    TokenKind,
)
from tokenwarden.worker.domain.tokens import hash_token
from tokenwarden.worker.domain.verification import verify_token
from tokenwarden.worker.runtime.tasking import is_transient

SOURCE = "hr://workday"


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
        name=f"{user_id}-{org_id}",
        expires_at=created + timedelta(days=365),
        now=created,
    )


def aat(session: Session, org_id: str, *, created_by: str, created: datetime) -> IssuedToken:
    return create_token(
        session,
        kind=TokenKind.APPLICATION,
        org_id=org_id,
        app_id="ci-bot",
        created_by=created_by,
        name="deploys",
        expires_at=created + timedelta(days=365),
        now=created,
    )


def stored(
    session: Session, type_: str, data: dict[str, Any], *, time: datetime, event_id: str = ""
) -> InboxEvent:
    """The event as the API stores it: validated, canonical, a pending inbox row."""
    raw = {
        "specversion": "1.0",
        "id": event_id or f"evt-{secrets.token_hex(4)}",
        "source": SOURCE,
        "type": type_,
        "time": time.isoformat(),
        "data": data,
    }
    parsed = parse_event(raw)
    inbox.store_events(session, [parsed], now=time)
    row = session.get(InboxEvent, parsed.id)
    assert row is not None
    return row


def apply(
    session: Session, type_: str, data: dict[str, Any], *, time: datetime, now: datetime
) -> dict[str, Any]:
    return apply_event(session, stored(session, type_, data, time=time), now=now)


def reason_of(session: Session, token_id: str) -> str | None:
    return session.execute(select(Token.revoke_reason).where(Token.id == token_id)).scalar_one()


def audit_rows(session: Session, **where: Any) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.id)
    for name, value in where.items():
        query = query.where(getattr(AuditEntry, name) == value)
    return list(session.scalars(query))


@contextmanager
def token_updates(store: Store) -> Iterator[list[str]]:
    """The UPDATE statements on the tokens table issued inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TOKENS"):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def test_a_leaver_loses_their_pats_in_that_org_and_nothing_else(
    session: Session, store: Store, now: datetime
) -> None:
    t0 = now - timedelta(days=30)
    join(session, "acme", "u-42", at=t0)
    join(session, "globex", "u-42", at=t0)
    first = pat(session, "acme", "u-42", created=t0 + timedelta(hours=1))
    second = pat(session, "acme", "u-42", created=t0 + timedelta(hours=2))
    elsewhere = pat(session, "globex", "u-42", created=t0 + timedelta(hours=1))
    app_token = aat(session, "acme", created_by="u-42", created=t0 + timedelta(hours=1))
    left = stored(
        session,
        "membership.removed",
        {"org_id": "acme", "user_id": "u-42"},
        time=now - timedelta(minutes=5),
        event_id="evt-leave",
    )

    with token_updates(store) as updates:
        result = apply_event(session, left, now=now)

    assert len(updates) == 1, "one statement revokes every PAT of the leaver"
    assert sorted(result["revoked"]) == sorted([first.id, second.id])
    assert reason_of(session, first.id) == reason_of(session, second.id) == "member_removed"
    assert reason_of(session, elsewhere.id) is None
    assert reason_of(session, app_token.id) is None
    (revoked_row,) = audit_rows(session, token_id=first.id, action="revoke")
    assert (revoked_row.reason, revoked_row.source, revoked_row.event_id) == (
        "member_removed",
        SOURCE,
        "evt-leave",
    )
    assert (revoked_row.org_id, revoked_row.user_id, revoked_row.at) == ("acme", "u-42", now)
    (member_row,) = audit_rows(session, event_id="evt-leave", action="member")
    assert member_row.reason == "removed"
    membership = session.get(Membership, ("acme", "u-42"))
    assert membership is not None
    assert not membership.active
    assert verify_token(session, first.token, now=now).reason == "revoked"
    assert verify_token(session, app_token.token, now=now).usable
    assert verify_token(session, elsewhere.token, now=now).usable


def test_a_role_change_is_what_verification_reports_and_revokes_nothing(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=3)
    join(session, "acme", "u-7", at=t0)
    token = pat(session, "acme", "u-7", created=t0 + timedelta(minutes=1))

    result = apply(
        session,
        "membership.role_changed",
        {"org_id": "acme", "user_id": "u-7", "role": "admin"},
        time=now - timedelta(minutes=1),
        now=now,
    )

    assert result == {"applied": True, "revoked": []}
    verdict = verify_token(session, token.token, now=now)
    assert verdict.usable
    assert verdict.principal["role"] == "admin"


def test_a_role_change_before_the_join_makes_no_member_but_its_role_is_kept(
    session: Session, now: datetime
) -> None:
    changed_at = now - timedelta(minutes=10)
    joined_at = changed_at - timedelta(minutes=1)
    changed = apply(
        session,
        "membership.role_changed",
        {"org_id": "acme", "user_id": "u-8", "role": "admin"},
        time=changed_at,
        now=now,
    )

    assert changed["applied"] is True
    assert membership(session, "acme", "u-8") == (False, None)
    with pytest.raises(Refused):
        pat(session, "acme", "u-8", created=now)

    # The membership.added it overtook arrives afterwards, older: it makes the member, and
    # the newer role stays.
    added = apply(
        session,
        "membership.added",
        {"org_id": "acme", "user_id": "u-8", "role": "user"},
        time=joined_at,
        now=now,
    )

    found = session.get(Membership, ("acme", "u-8"))
    assert found is not None
    assert (found.active, found.role, found.active_since) == (True, "admin", joined_at)
    assert added["applied"] is True
    assert pat(session, "acme", "u-8", created=now).kind is TokenKind.PERSONAL


def test_a_late_removal_spares_the_pat_issued_after_the_rejoin(
    session: Session, now: datetime
) -> None:
    joined, left, rejoined = (now - timedelta(days=d) for d in (10, 6, 2))
    join(session, "acme", "u-5", at=joined)
    old = pat(session, "acme", "u-5", created=joined + timedelta(hours=1))
    join(session, "acme", "u-5", at=rejoined)  # delivered before the removal
    new = pat(session, "acme", "u-5", created=rejoined + timedelta(hours=1))

    result = apply(
        session,
        "membership.removed",
        {"org_id": "acme", "user_id": "u-5"},
        time=left,
        now=now,
    )

    assert result["revoked"] == [old.id]
    assert reason_of(session, old.id) == "member_removed"
    assert reason_of(session, new.id) is None
    membership = session.get(Membership, ("acme", "u-5"))
    assert membership is not None
    assert membership.active, "the stale removal does not undo the later re-join"
    assert membership.last_event_at == rejoined
    (stale,) = audit_rows(session, action="stale", user_id="u-5")
    assert stale.reason == "membership.removed"


def test_a_stale_membership_added_changes_nothing(session: Session, now: datetime) -> None:
    removed_at = now - timedelta(hours=1)
    apply(
        session,
        "membership.removed",
        {"org_id": "acme", "user_id": "u-9"},
        time=removed_at,
        now=now,
    )

    result = apply(
        session,
        "membership.added",
        {"org_id": "acme", "user_id": "u-9", "role": "admin"},
        time=removed_at - timedelta(minutes=1),
        now=now,
    )

    assert result["applied"] is False
    membership = session.get(Membership, ("acme", "u-9"))
    assert membership is not None
    assert (membership.active, membership.last_event_at) == (False, removed_at)
    with pytest.raises(Refused):
        pat(session, "acme", "u-9", created=now)
    assert [row.action for row in audit_rows(session, user_id="u-9")] == ["member", "stale"]


def test_a_deactivated_user_loses_every_pat_in_every_org_but_no_aat(
    session: Session, store: Store, now: datetime
) -> None:
    t0 = now - timedelta(days=30)
    deactivated_at = now - timedelta(days=1)
    tokens = {}
    for org in ("acme", "globex", "initech"):
        join(session, org, "u-1", at=t0)
        tokens[org] = pat(session, org, "u-1", created=t0 + timedelta(hours=1))
    app_token = aat(session, "acme", created_by="u-1", created=t0 + timedelta(hours=1))
    join(session, "acme", "u-2", at=t0)
    other_user = pat(session, "acme", "u-2", created=t0 + timedelta(hours=1))
    # initech already saw a newer event (the user joined there again after the deactivation),
    # and a PAT was issued since: the deactivation arriving late spares that one.
    apply(
        session,
        "membership.added",
        {"org_id": "initech", "user_id": "u-1", "role": "admin"},
        time=deactivated_at + timedelta(hours=2),
        now=now,
    )
    since = pat(session, "initech", "u-1", created=deactivated_at + timedelta(hours=3))

    with token_updates(store) as updates:
        result = apply(
            session, "user.deactivated", {"user_id": "u-1"}, time=deactivated_at, now=now
        )

    assert len(updates) == 1
    assert sorted(result["revoked"]) == sorted(token.id for token in tokens.values())
    for token in tokens.values():
        assert reason_of(session, token.id) == "user_deactivated"
    assert reason_of(session, since.id) is None
    assert reason_of(session, app_token.id) is None
    assert reason_of(session, other_user.id) is None
    active = {
        m.org_id: m.active
        for m in session.scalars(select(Membership).where(Membership.user_id == "u-1"))
    }
    assert active == {"acme": False, "globex": False, "initech": True}
    assert len(audit_rows(session, action="revoke", reason="user_deactivated")) == 3


def test_the_same_event_applied_twice_revokes_and_audits_once(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=2)
    join(session, "acme", "u-3", at=t0)
    token = pat(session, "acme", "u-3", created=t0 + timedelta(minutes=5))
    left = stored(
        session,
        "membership.removed",
        {"org_id": "acme", "user_id": "u-3"},
        time=now - timedelta(hours=1),
    )

    first = apply_event(session, left, now=now)
    second = apply_event(session, left, now=now + timedelta(seconds=5))

    assert (first["revoked"], second["revoked"]) == ([token.id], [])
    assert len(audit_rows(session, token_id=token.id, action="revoke")) == 1
    assert len(audit_rows(session, event_id=left.id)) == 2  # the revocation, the removal


def test_a_revoke_request_deletes_the_token_once_and_refuses_an_unknown_one(
    session: Session, now: datetime
) -> None:
    join(session, "acme", "u-4", at=now - timedelta(days=1))
    token = pat(session, "acme", "u-4", created=now - timedelta(hours=1))
    data = {"token_id": token.id, "actor": "admin-1"}

    first = apply(session, "token.revoke_requested", data, time=now, now=now)
    again = apply(session, "token.revoke_requested", data, time=now, now=now)
    unknown = apply(session, "token.revoke_requested", {"token_id": "tok_nope"}, time=now, now=now)

    assert first == {"revoked": [token.id], "unknown_token": False}
    assert again == {"revoked": [], "unknown_token": False}
    assert unknown == {"revoked": [], "unknown_token": True}
    assert reason_of(session, token.id) == "deleted"
    (revoked,) = audit_rows(session, token_id=token.id, action="revoke")
    assert revoked.actor == "admin-1"
    (refused,) = audit_rows(session, action="refuse", reason="unknown_token")
    assert refused.token_id == "tok_nope"


def test_a_leak_revokes_any_kind_by_hash_or_id_once(session: Session, now: datetime) -> None:
    join(session, "acme", "u-6", at=now - timedelta(days=1))
    personal = pat(session, "acme", "u-6", created=now - timedelta(hours=2))
    application = aat(session, "acme", created_by="u-6", created=now - timedelta(hours=2))
    by_text = {"token": application.token, "source_url": "https://gist.example/x"}
    by_id = {"token_id": personal.id, "reporter": "scanner"}

    results = [
        apply(session, "token.leak_suspected", by_text, time=now, now=now),
        apply(session, "token.leak_suspected", by_id, time=now, now=now),
        apply(session, "token.leak_suspected", by_text, time=now, now=now),
        apply(session, "token.leak_suspected", by_id, time=now, now=now),
    ]
    unknown = apply(
        session,
        "token.leak_suspected",
        {"token_hash": hash_token("sm_pat_not-a-real-one")},
        time=now,
        now=now,
    )

    assert [r["revoked"] for r in results] == [[application.id], [personal.id], [], []]
    assert unknown == {"revoked": [], "unknown_token": True}
    assert reason_of(session, application.id) == reason_of(session, personal.id) == "leaked"
    (app_row,) = audit_rows(session, token_id=application.id, action="revoke")
    assert app_row.detail == {"source_url": "https://gist.example/x"}
    (pat_row,) = audit_rows(session, token_id=personal.id, action="revoke")
    assert (pat_row.detail, pat_row.actor) == ({"reporter": "scanner"}, "scanner")
    assert len(audit_rows(session, action="revoke")) == 2


@pytest.mark.parametrize(
    ("type_", "data", "reason"),
    [
        ("membership.removed", {"org_id": "acme"}, "data.user_id"),
        ("membership.added", {"org_id": "a", "user_id": "u", "role": "owner"}, "data.role"),
        ("user.deleted", {"user_id": "u"}, "unknown event type"),
    ],
)
def test_an_event_whose_data_does_not_validate_is_invalid(
    session: Session, now: datetime, type_: str, data: dict[str, Any], reason: str
) -> None:
    row = InboxEvent(
        id="evt-bad",
        type=type_,
        source=SOURCE,
        time=now,
        data=data,
        digest="0" * 64,
        status=EventStatus.PENDING.value,
        attempts=0,
        received_at=now,
    )

    with pytest.raises(InvalidEvent) as raised:
        apply_event(session, row, now=now)

    assert reason in raised.value.reason
    assert raised.value.event_id == "evt-bad"


# --- a deactivation and the memberships it could not see --------------------------------


def deactivate(session: Session, user_id: str, *, time: datetime, now: datetime) -> None:
    apply(session, "user.deactivated", {"user_id": user_id}, time=time, now=now)


def joined_event(
    session: Session, org_id: str, user_id: str, *, time: datetime, now: datetime
) -> dict[str, Any]:
    return apply(
        session,
        "membership.added",
        {"org_id": org_id, "user_id": user_id, "role": "admin"},
        time=time,
        now=now,
    )


def membership(session: Session, org_id: str, user_id: str) -> tuple[bool, datetime | None]:
    found = session.get(Membership, (org_id, user_id))
    assert found is not None
    return found.active, found.last_event_at


def test_a_join_older_than_the_deactivation_arriving_after_it_is_stale(
    session: Session, now: datetime
) -> None:
    joined_at, deactivated_at = now - timedelta(hours=2), now - timedelta(hours=1)
    deactivate(session, "u-20", time=deactivated_at, now=now)

    added = joined_event(session, "acme", "u-20", time=joined_at, now=now)
    changed = apply(
        session,
        "membership.role_changed",
        {"org_id": "globex", "user_id": "u-20", "role": "admin"},
        time=joined_at,
        now=now,
    )

    assert (added["applied"], changed["applied"]) == (False, False)
    # As if applied in time order: the join, then the deactivation that ended it.
    assert membership(session, "acme", "u-20") == (False, deactivated_at)
    assert membership(session, "globex", "u-20") == (False, deactivated_at)
    with pytest.raises(Refused):
        pat(session, "acme", "u-20", created=now)
    stale = audit_rows(session, action="stale", user_id="u-20")
    assert [(row.org_id, row.reason) for row in stale] == [
        ("acme", "membership.added"),
        ("globex", "membership.role_changed"),
    ]
    for row in stale:
        assert row.detail is not None
        assert row.detail["cause"] == "user_deactivated"
        assert row.detail["deactivated_at"] == deactivated_at.isoformat()
        assert row.detail["event_time"] == joined_at.isoformat()


def test_a_join_after_the_deactivation_is_a_rejoin_whatever_the_order(
    session: Session, now: datetime
) -> None:
    deactivated_at, rejoined_at = now - timedelta(hours=2), now - timedelta(hours=1)
    # The re-join arrives first in one organization, last in the other.
    joined_event(session, "acme", "u-21", time=rejoined_at, now=now)
    deactivate(session, "u-21", time=deactivated_at, now=now)
    added = joined_event(session, "globex", "u-21", time=rejoined_at, now=now)

    assert added["applied"] is True
    assert membership(session, "acme", "u-21") == (True, rejoined_at)
    assert membership(session, "globex", "u-21") == (True, rejoined_at)
    issued = pat(session, "globex", "u-21", created=now)
    assert verify_token(session, issued.token, now=now).usable
    assert audit_rows(session, action="stale", user_id="u-21", org_id="globex") == []


def test_the_newest_deactivation_counts_when_they_arrive_out_of_order(
    session: Session, now: datetime
) -> None:
    first, joined_at, second = (now - timedelta(hours=h) for h in (3, 2, 1))
    deactivate(session, "u-22", time=second, now=now)
    deactivate(session, "u-22", time=first, now=now)  # older, arriving late

    # Between the two deactivations: the second one ends it.
    added = joined_event(session, "acme", "u-22", time=joined_at, now=now)

    assert added["applied"] is False
    assert membership(session, "acme", "u-22") == (False, second)


def test_a_late_older_removal_of_an_unseen_membership_keeps_the_deactivation_time(
    session: Session, now: datetime
) -> None:
    removed_at, joined_at, deactivated_at = (now - timedelta(hours=h) for h in (3, 2, 1))
    deactivate(session, "u-23", time=deactivated_at, now=now)
    apply(
        session,
        "membership.removed",
        {"org_id": "acme", "user_id": "u-23"},
        time=removed_at,
        now=now,
    )

    # Newer than the removal but older than the deactivation: still stale.
    added = joined_event(session, "acme", "u-23", time=joined_at, now=now)

    assert added["applied"] is False
    assert membership(session, "acme", "u-23") == (False, deactivated_at)


# --- a message of removals, applied together --------------------------------------------


def removal_scenario(session: Session, prefix: str, *, now: datetime) -> list[str]:
    """Leavers of every kind in one organization; the ids of their removal events, in order.

    Fresh removals (one of them an admin), a late removal after a re-join (the old PAT goes,
    the new one stays), a leaver without tokens, a removal of an unknown membership, and an
    event whose stored data no longer validates.
    """
    org, other = f"{prefix}-acme", f"{prefix}-globex"
    t0, left, rejoined = now - timedelta(days=10), now - timedelta(days=5), now - timedelta(days=2)
    for user, role in [("boss", "admin"), ("admin2", "admin"), ("a", "user"), ("b", "user")]:
        join(session, org, f"{prefix}-{user}", at=t0, role=role)
    join(session, org, f"{prefix}-c", at=t0)
    join(session, org, f"{prefix}-empty", at=t0)
    join(session, other, f"{prefix}-a", at=t0)
    for user in ("a", "b", "admin2"):
        pat(session, org, f"{prefix}-{user}", created=t0 + timedelta(hours=1))
        pat(session, org, f"{prefix}-{user}", created=t0 + timedelta(hours=2))
    pat(session, other, f"{prefix}-a", created=t0 + timedelta(hours=1))
    aat(session, org, created_by=f"{prefix}-a", created=t0 + timedelta(hours=1))
    pat(session, org, f"{prefix}-c", created=t0 + timedelta(hours=1))
    join(session, org, f"{prefix}-c", at=rejoined)  # delivered before the late removal
    pat(session, org, f"{prefix}-c", created=rejoined + timedelta(hours=1))

    def removal(user: str, time: datetime, suffix: str) -> str:
        data = {"org_id": org, "user_id": f"{prefix}-{user}"}
        return stored(
            session, "membership.removed", data, time=time, event_id=f"{prefix}-{suffix}"
        ).id

    ids = [
        removal("a", now - timedelta(minutes=5), "e1"),
        removal("c", left, "e2"),
        removal("admin2", now - timedelta(minutes=4), "e3"),
        removal("empty", now - timedelta(minutes=3), "e4"),
        removal("b", now - timedelta(minutes=2), "e5"),
        removal("bad", now - timedelta(minutes=1), "e6"),
    ]
    session.execute(
        update(InboxEvent).where(InboxEvent.id == f"{prefix}-e6").values(data={"org_id": org})
    )
    return ids


def removal_outcome(session: Session, prefix: str) -> dict[str, Any]:
    """What a user would see of the scenario, with the prefix and generated ids taken out."""

    def plain(value: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(json.dumps(value, default=str).replace(prefix, "P"))
        return found

    tokens = {
        token.id: f"{token.org_id}/{token.user_id or token.app_id}/{token.created_at}"
        for token in session.scalars(select(Token).where(Token.org_id.like(f"{prefix}-%")))
    }
    session.expire_all()
    events = {
        e.id: (e.status, e.reason, sorted(tokens[t] for t in (e.result or {}).get("revoked", [])))
        for e in session.scalars(
            select(InboxEvent).where(InboxEvent.id.like(f"{prefix}-%")).order_by(InboxEvent.id)
        )
    }
    revoked = sorted(
        (label, t.revoke_reason)
        for t in session.scalars(select(Token).where(Token.org_id.like(f"{prefix}-%")))
        for label in [tokens[t.id]]
    )
    rows = list(
        session.scalars(
            select(AuditEntry)
            .where(AuditEntry.event_id.like(f"{prefix}-%"))
            .order_by(AuditEntry.id)
        )
    )
    # Revocations of one event come in token id order, and ids are random: sorted here.
    trail = sorted(
        (r.event_id, r.action, r.reason, r.user_id, tokens.get(r.token_id or ""), r.detail)
        for r in rows
    )
    order = [(r.event_id, r.action) for r in rows]
    told = sorted(
        (
            n.event_id,
            n.kind,
            n.org_id,
            n.recipients,
            {k: v for k, v in data.items() if k not in ("notice_id", "tokens")},
            sorted(tokens[t["id"]] for t in data["tokens"]),
        )
        for n in session.scalars(select(Notice).where(Notice.event_id.like(f"{prefix}-%")))
        for data in [json.loads(n.body)["data"]]
    )
    members = sorted(
        (m.org_id, m.user_id, m.active, m.last_event_at)
        for m in session.scalars(select(Membership).where(Membership.org_id.like(f"{prefix}-%")))
    )
    return plain(
        {
            "events": events,
            "tokens": revoked,
            "audit": trail,
            "order": order,
            "notices": told,
            "members": members,
        }
    )


def test_a_message_of_removals_is_applied_together_as_each_would_be_alone(
    session: Session, store: Store, now: datetime
) -> None:
    together = removal_scenario(session, "zqtog", now=now)
    alone = removal_scenario(session, "zqone", now=now)

    with structlog.testing.capture_logs() as logged:
        with token_updates(store) as updates:
            outcome = apply_pending(session, together, now=now, retryable=lambda _: False)
        # One message each, in the order the inbox hands them out: by event time.
        for event_id in sorted(alone, key=lambda i: str(session.get(InboxEvent, i).time)):  # type: ignore[union-attr]
            apply_pending(session, [event_id], now=now, retryable=lambda _: False)

    assert len(updates) == 1, "one statement revokes the PATs of every leaver of the message"
    assert sorted(outcome.done) == together[:5]
    assert outcome.dead == together[5:]
    seen = removal_outcome(session, "zqtog")
    assert seen == removal_outcome(session, "zqone")
    # And what that is, spelled out:
    assert [status for status, _, _ in seen["events"].values()] == ["done"] * 5 + ["dead"]
    assert seen["events"]["P-e6"][1] == "data.user_id: Field required"
    assert [len(revoked) for _, _, revoked in seen["events"].values()] == [2, 1, 2, 0, 2, 0]
    # Each removal's line names the tokens it revoked, as its audit rows do, on both paths.
    removed = [line for line in logged if line["event"] == "member.removed"]
    assert len(removed) == 10
    for line in removed:
        revoke_rows = audit_rows(session, event_id=line["event_id"], action="revoke")
        assert line["token_ids"] == sorted(str(row.token_id) for row in revoke_rows)
        assert line["revoked"] == len(revoke_rows)
    # The batch writes its notices in one statement and says so in one line naming each
    # (a line a notice cost more than writing it); no event.applied beside member.removed.
    batched = [line for line in logged if line["event"] == "notices.queued"]
    assert batched
    assert all(line["count"] == len(line["notice_ids"]) > 1 for line in batched)
    queued_ids = [i for line in batched for i in line["notice_ids"]] + [
        line["notice_id"] for line in logged if line["event"] == "notice.queued"
    ]
    assert len(queued_ids) == len(set(queued_ids)), "each notice is named once"
    assert {str(n.id) for n in session.scalars(select(Notice))} <= set(queued_ids)
    # (the five removals applied one at a time each log theirs; the batch's five none)
    assert len([line for line in logged if line["event"] == "event.applied"]) == 5
    kept = [label for label, reason in seen["tokens"] if reason is None]
    assert len(kept) == 1 + 1 + 1  # the AAT, the PAT elsewhere, the PAT issued after re-join
    assert seen["order"] == [
        ["P-e2", "stale"],
        ["P-e2", "revoke"],
        ["P-e1", "revoke"],
        ["P-e1", "revoke"],
        ["P-e1", "member"],
        ["P-e3", "revoke"],
        ["P-e3", "revoke"],
        ["P-e3", "member"],
        ["P-e4", "member"],
        ["P-e5", "revoke"],
        ["P-e5", "revoke"],
        ["P-e5", "member"],
    ]
    boss, admin2 = {"user_id": "P-boss", "email": None}, {"user_id": "P-admin2", "email": None}
    # admin2 leaves after e2 and e1, so hears about those and not about e5; P-a leaves an
    # application token behind, which the admins hear of once, apart.
    assert [[e, kind, recipients] for e, kind, _, recipients, *_ in seen["notices"]] == [
        ["P-e1", "application_tokens.orphaned", [admin2, boss]],
        ["P-e1", "member.offboarded", [admin2, boss]],
        ["P-e2", "member.offboarded", [admin2, boss]],
        ["P-e3", "member.offboarded", [boss]],
        ["P-e5", "member.offboarded", [boss]],
    ]
    active = {f"{org}/{user}": is_active for org, user, is_active, _ in seen["members"]}
    assert active == {
        "P-acme/P-boss": True,
        "P-acme/P-a": False,
        "P-acme/P-admin2": False,
        "P-acme/P-b": False,
        "P-acme/P-c": True,  # the late removal does not undo the re-join
        "P-acme/P-empty": False,
        "P-globex/P-a": True,
    }


def test_a_removal_batch_delivered_again_changes_nothing(session: Session, now: datetime) -> None:
    ids = removal_scenario(session, "zqagain", now=now)
    apply_pending(session, ids, now=now, retryable=lambda _: False)
    first = removal_outcome(session, "zqagain")

    again = apply_pending(session, ids, now=now + timedelta(minutes=1), retryable=lambda _: False)

    assert again.skipped == ids
    assert removal_outcome(session, "zqagain") == first


def test_removals_of_one_membership_or_of_unknown_ones_in_one_message_still_apply(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=3)
    join(session, "acme", "u-30", at=t0)
    join(session, "acme", "u-31", at=t0)
    first = pat(session, "acme", "u-30", created=t0)
    other = pat(session, "acme", "u-31", created=t0)
    twice = [
        stored(session, "membership.removed", {"org_id": "acme", "user_id": "u-30"}, time=at).id
        for at in (now - timedelta(hours=2), now - timedelta(hours=1))
    ]
    unknown = [
        stored(session, "membership.removed", {"org_id": "acme", "user_id": user}, time=now).id
        for user in ("u-31", "u-never")
    ]

    a = apply_pending(session, twice, now=now, retryable=lambda _: False)
    b = apply_pending(session, unknown, now=now, retryable=lambda _: False)

    assert (a.done, sorted(b.done)) == (twice, sorted(unknown))
    assert reason_of(session, first.id) == reason_of(session, other.id) == "member_removed"
    assert membership(session, "acme", "u-30") == (False, now - timedelta(hours=1))
    assert membership(session, "acme", "u-never") == (False, now)


@contextmanager
def all_statements(store: Store) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def test_a_message_of_removals_costs_the_same_statements_whatever_its_size(
    session: Session, store: Store, now: datetime
) -> None:
    t0 = now - timedelta(days=1)
    join(session, "acme", "boss", at=t0, role="admin")
    sent = {}
    for size in (3, 30):
        users = [f"u-{size}-{n}" for n in range(size)]
        for user in users:
            join(session, "acme", user, at=t0)
            pat(session, "acme", user, created=t0)
            pat(session, "acme", user, created=t0)
        ids = [
            stored(session, "membership.removed", {"org_id": "acme", "user_id": u}, time=now).id
            for u in users
        ]
        session.flush()
        with all_statements(store) as statements:
            outcome = apply_pending(session, ids, now=now, retryable=lambda _: False)
            session.flush()  # the inbox marks
        assert len(outcome.done) == size
        sent[size] = len(statements)

    assert sent[30] == sent[3]
    assert sent[3] <= 12


def bulk_audit_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "at": datetime(2026, 11, 27, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        "action": "revoke",
        "reason": "member_removed",
        "source": SOURCE,
        "token_id": "tok-1",
        "org_id": "acme",
        "user_id": "bob",
        "actor": None,
        "event_id": "evt-bulk",
        "detail": {"event_time": "2026-11-27T11:00:00+00:00", "note": "café"},
    }
    return {**row, **changes}


def test_audit_rows_added_in_bulk_read_back_as_given_in_order(session: Session) -> None:
    rows = [bulk_audit_row(), bulk_audit_row(token_id=None, action="member", detail=None)]

    audit.record_many(session, rows)

    first, second = audit_rows(session, event_id="evt-bulk")
    assert first.at == datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert (first.action, first.token_id, first.actor) == ("revoke", "tok-1", None)
    assert first.detail == {"event_time": "2026-11-27T11:00:00+00:00", "note": "café"}
    assert (second.action, second.token_id, second.detail) == ("member", None, None)
    assert first.id < second.id


def test_a_bad_audit_row_in_bulk_fails_like_any_statement_and_rolls_back_alone(
    session: Session,
) -> None:
    audit.record_many(session, [bulk_audit_row(event_id="evt-kept")])

    with pytest.raises(DBAPIError) as raised, session.begin_nested():
        audit.record_many(session, [bulk_audit_row(), bulk_audit_row(action=None)])

    assert not is_transient(raised.value)
    assert audit_rows(session, event_id="evt-bulk") == []
    assert len(audit_rows(session, event_id="evt-kept")) == 1


@pytest.mark.postgres
def test_a_connection_lost_while_adding_audit_rows_in_bulk_is_transient(store: Store) -> None:
    if store.backend != "postgres":
        pytest.skip("the bulk path that streams rows is Postgres's")
    with Session(store.engine) as victim:
        pid = victim.scalar(text("SELECT pg_backend_pid()"))
        with store.engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        with pytest.raises(DBAPIError) as raised:
            audit.record_many(victim, [bulk_audit_row()])

    assert is_transient(raised.value)
    assert raised.value.connection_invalidated
    with store.engine.connect() as connection:  # the pool hands out a live connection again
        assert connection.scalar(text("SELECT 1")) == 1
