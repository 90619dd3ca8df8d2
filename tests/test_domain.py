"""The token store's domain, called directly with a real session on every configured database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, event, func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from tests.conftest import Store
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.deactivation import deactivate_user
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import (
    AuditEntry,
    Base,
    Membership,
    Token,
    TokenKind,
    UserDeactivation,
)
from tokenwarden.worker.domain.revocation import revoke_token
from tokenwarden.worker.domain.tokens import generate, hash_token
from tokenwarden.worker.domain.verification import verify_token

ORG = "acme"


def member(
    session: Session, user_id: str, *, role: str = "user", at: datetime, org_id: str = ORG
) -> bool:
    return add_member(
        session,
        org_id=org_id,
        user_id=user_id,
        role=role,
        email=f"{user_id}@example.com",
        at=at,
        now=at,
        source="test",
    )


def pat(
    session: Session, user_id: str, *, now: datetime, expires_at: datetime, name: str = "ci"
) -> IssuedToken:
    return create_token(
        session,
        kind=TokenKind.PERSONAL,
        org_id=ORG,
        user_id=user_id,
        name=name,
        expires_at=expires_at,
        now=now,
    )


def aat(
    session: Session, *, created_by: str, now: datetime, expires_at: datetime, app_id: str = "ci"
) -> IssuedToken:
    return create_token(
        session,
        kind=TokenKind.APPLICATION,
        org_id=ORG,
        app_id=app_id,
        created_by=created_by,
        name="deploy bot",
        expires_at=expires_at,
        now=now,
    )


def deactivate(session: Session, user_id: str) -> None:
    """What a later removal leaves behind: the membership row, inactive."""
    found = session.get(Membership, (ORG, user_id))
    assert found is not None
    found.active = False
    session.flush()


def count(session: Session, model: type[Base]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def audit_rows(session: Session, **where: Any) -> list[AuditEntry]:
    query = select(AuditEntry).filter_by(**where).order_by(AuditEntry.id)
    return list(session.scalars(query))


@contextmanager
def statements(session: Session) -> Iterator[list[str]]:
    """Every SQL statement the session's connection sends while the block runs."""
    connection = session.connection()  # begin the savepoint before counting
    sent: list[str] = []

    def record(_conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(connection, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(connection, "before_cursor_execute", record)


# --- issuing -------------------------------------------------------------------------------


def test_pat_for_an_active_member_stores_only_the_hash(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "alice", at=now)

    issued = pat(session, "alice", now=now, expires_at=later)

    assert issued.kind is TokenKind.PERSONAL
    assert issued.token.startswith("sm_pat_")
    row = session.execute(text("SELECT * FROM tokens")).mappings().one()
    assert row["id"] == issued.id
    assert row["token_hash"] == hash_token(issued.token)
    assert row["last4"] == issued.token[-4:]
    body = issued.token[7:39]
    for column, value in row.items():
        assert issued.token not in str(value), column
        assert body not in str(value), column
    (created,) = audit_rows(session, action="create")
    assert created.token_id == issued.id
    assert issued.token not in str(created.detail)


@pytest.mark.parametrize("case", ["non_member", "removed_member", "past_expiry", "empty_name"])
def test_refused_pat_writes_nothing(
    session: Session, now: datetime, later: datetime, case: str
) -> None:
    member(session, "alice", at=now - timedelta(days=1))
    member(session, "bob", at=now - timedelta(days=1))
    deactivate(session, "bob")
    before = count(session, AuditEntry)
    user, expires_at, name, reason = {
        "non_member": ("mallory", later, "ci", "not_member"),
        "removed_member": ("bob", later, "ci", "not_member"),
        "past_expiry": ("alice", now - timedelta(seconds=1), "ci", "expiry_in_past"),
        "empty_name": ("alice", later, "  ", "bad_name"),
    }[case]

    with pytest.raises(Refused) as refused:
        pat(session, user, now=now, expires_at=expires_at, name=name)

    assert refused.value.reason == reason
    assert count(session, Token) == 0
    assert count(session, AuditEntry) == before


def test_expiry_equal_to_now_is_refused(session: Session, now: datetime) -> None:
    member(session, "alice", at=now)

    with pytest.raises(Refused):
        pat(session, "alice", now=now, expires_at=now)

    assert count(session, Token) == 0


@pytest.mark.parametrize(
    ("app_id", "created_by", "reason"),
    [(None, "alice", "no_owner"), ("", "alice", "no_owner"), ("ci", None, "no_creator")],
)
def test_aat_needs_an_app_and_a_creator(
    session: Session,
    now: datetime,
    later: datetime,
    app_id: str | None,
    created_by: str | None,
    reason: str,
) -> None:
    member(session, "alice", at=now)

    with pytest.raises(Refused) as refused:
        create_token(
            session,
            kind=TokenKind.APPLICATION,
            org_id=ORG,
            app_id=app_id,
            created_by=created_by,
            name="bot",
            expires_at=later,
            now=now,
        )

    assert refused.value.reason == reason
    assert count(session, Token) == 0


# --- verification --------------------------------------------------------------------------


def test_usable_pat_acts_with_the_members_current_role(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "alice", role="user", at=now)
    issued = pat(session, "alice", now=now, expires_at=later)

    first = verify_token(session, issued.token, now=now)
    assert first.usable
    assert first.principal["role"] == "user"
    assert first.principal["user_id"] == "alice"
    assert first.principal["org_id"] == ORG
    assert first.principal["token_id"] == issued.id
    assert first.principal["kind"] == "personal"

    assert member(session, "alice", role="admin", at=now + timedelta(hours=1))
    second = verify_token(session, issued.token, now=now + timedelta(hours=2))
    assert second.usable
    assert second.principal["role"] == "admin"


def test_revoked_token_is_refused_and_the_refusal_audited(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "alice", at=now)
    issued = pat(session, "alice", now=now, expires_at=later)
    revoke_token(session, token_id=issued.id, reason="deleted", source="test", now=now)

    verdict = verify_token(session, issued.token, now=now + timedelta(minutes=1))

    assert (verdict.usable, verdict.reason, verdict.token_id) == (False, "revoked", issued.id)
    (refusal,) = audit_rows(session, action="refuse")
    assert (refusal.reason, refusal.token_id) == ("revoked", issued.id)


def test_token_past_its_expiry_is_expired_without_a_sweep(session: Session, now: datetime) -> None:
    member(session, "alice", at=now)
    issued = pat(session, "alice", now=now, expires_at=now + timedelta(days=1))
    assert verify_token(session, issued.token, now=now + timedelta(hours=23)).usable

    verdict = verify_token(session, issued.token, now=now + timedelta(days=2))

    assert (verdict.usable, verdict.reason) == (False, "expired")
    token = session.get(Token, issued.id)
    assert token is not None
    assert token.revoked_at is None  # nothing swept it: verification decides by the clock
    (refusal,) = audit_rows(session, action="refuse")
    assert refusal.reason == "expired"


def test_pat_of_an_inactive_member_is_refused_though_not_revoked(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "alice", at=now)
    issued = pat(session, "alice", now=now, expires_at=later)
    deactivate(session, "alice")

    verdict = verify_token(session, issued.token, now=now)

    assert (verdict.usable, verdict.reason) == (False, "not_member")
    token = session.get(Token, issued.id)
    assert token is not None
    assert token.revoked_at is None
    (refusal,) = audit_rows(session, action="refuse")
    assert (refusal.reason, refusal.token_id) == ("not_member", issued.id)


def test_aat_outlives_its_creators_membership(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "bob", role="admin", at=now)
    issued = aat(session, created_by="bob", now=now, expires_at=later)
    deactivate(session, "bob")

    verdict = verify_token(session, issued.token, now=now)

    assert verdict.usable
    assert verdict.principal["kind"] == "application"
    assert verdict.principal["app_id"] == "ci"
    assert verdict.principal["created_by"] == "bob"
    assert "role" not in verdict.principal


def test_verifying_a_known_token_does_not_warn(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "alice", at=now)
    issued = pat(session, "alice", now=now, expires_at=later)

    assert verify_token(session, issued.token, now=now).usable


def test_unknown_well_formed_token_is_unknown_and_not_audited(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "alice", at=now)
    pat(session, "alice", now=now, expires_at=later)
    before = count(session, AuditEntry)

    verdict = verify_token(session, generate(TokenKind.PERSONAL), now=now)

    assert (verdict.usable, verdict.reason, verdict.token_id) == (False, "unknown", None)
    assert count(session, AuditEntry) == before


def _typo(token: str) -> str:
    last = "0" if token[-1] != "0" else "1"
    return token[:-1] + last


@pytest.mark.parametrize(
    "malformed",
    [
        pytest.param("", id="empty"),
        pytest.param("hello", id="word"),
        pytest.param(_typo(generate(TokenKind.PERSONAL)), id="bad-checksum"),
        pytest.param(generate(TokenKind.APPLICATION)[:-1], id="truncated"),
        pytest.param(generate(TokenKind.PERSONAL) + "x", id="too-long"),
        pytest.param(" " + generate(TokenKind.PERSONAL), id="padded"),
    ],
)
def test_malformed_token_is_refused_without_a_database_look_up(
    session: Session, now: datetime, malformed: str
) -> None:
    with statements(session) as sent:
        verdict = verify_token(session, malformed, now=now)

    assert (verdict.usable, verdict.reason) == (False, "malformed")
    assert sent == []
    # Even with no database at all:
    assert verify_token(Session(), malformed, now=now).reason == "malformed"


def test_well_formed_token_is_looked_up(session: Session, now: datetime) -> None:
    """The counterpart of the malformed case, so that the statement count can tell."""
    with statements(session) as sent:
        verify_token(session, generate(TokenKind.PERSONAL), now=now)

    assert len(sent) >= 1


# --- revocation ----------------------------------------------------------------------------


def test_revoking_twice_changes_and_audits_once(
    session: Session, now: datetime, later: datetime
) -> None:
    member(session, "alice", at=now)
    issued = pat(session, "alice", now=now, expires_at=later)

    first = revoke_token(
        session, token_id=issued.id, reason="deleted", source="cli", now=now, actor="alice"
    )
    second = revoke_token(
        session,
        token_id=issued.id,
        reason="leaked",
        source="cli",
        now=now + timedelta(hours=1),
    )

    assert first is not None
    assert first.id == issued.id
    assert second is None
    (revocation,) = audit_rows(session, action="revoke")
    assert (revocation.reason, revocation.source, revocation.actor) == ("deleted", "cli", "alice")
    session.expire_all()
    token = session.get(Token, issued.id)
    assert token is not None
    assert (token.revoked_at, token.revoke_reason, token.state) == (now, "deleted", "revoked")


def test_revoking_an_unknown_id_returns_none(session: Session, now: datetime) -> None:
    assert (
        revoke_token(session, token_id="tok_nope", reason="deleted", source="cli", now=now) is None
    )
    assert audit_rows(session, action="revoke") == []


# --- memberships ---------------------------------------------------------------------------


def test_older_membership_event_is_stale(session: Session, now: datetime) -> None:
    assert member(session, "alice", role="admin", at=now)

    applied = member(session, "alice", role="user", at=now - timedelta(minutes=5))

    assert applied is False
    session.expire_all()
    found = session.get(Membership, (ORG, "alice"))
    assert found is not None
    assert (found.role, found.last_event_at) == ("admin", now)
    (stale,) = audit_rows(session, action="stale")
    assert (stale.org_id, stale.user_id) == (ORG, "alice")


def test_unknown_role_is_refused(session: Session, now: datetime) -> None:
    with pytest.raises(Refused):
        member(session, "alice", role="owner", at=now)

    assert count(session, Membership) == 0


# --- time ----------------------------------------------------------------------------------


def test_times_round_trip_as_aware_utc(session: Session, now: datetime) -> None:
    tokyo = timezone(timedelta(hours=9))
    expiry = datetime(2027, 3, 1, 9, 30, 15, 123456, tzinfo=tokyo)
    joined = datetime(2026, 11, 27, 8, 0, tzinfo=timezone(timedelta(hours=-5)))
    member(session, "alice", at=joined)
    issued = pat(session, "alice", now=now, expires_at=expiry)
    session.expire_all()

    token = session.get(Token, issued.id)
    membership = session.get(Membership, (ORG, "alice"))
    (created,) = audit_rows(session, action="create")

    assert token is not None
    assert membership is not None
    for value, expected in [
        (token.expires_at, expiry),
        (token.created_at, now),
        (membership.last_event_at, joined),
        (membership.active_since, joined),
        (created.at, now),
    ]:
        assert value is not None
        assert value.utcoffset() == timedelta(0)
        assert value == expected
    assert token.expires_at.astimezone(UTC).hour == 0  # 09:30 in Tokyo
    # Comparisons in SQL use the same instants.
    assert session.scalar(select(Token.id).where(Token.expires_at > expiry - timedelta(seconds=1)))
    assert not session.scalar(select(Token.id).where(Token.expires_at > expiry))


# --- schema --------------------------------------------------------------------------------


def test_migrations_create_what_the_models_describe(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == db.head_revision()


def test_downgrade_to_base_and_upgrade_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    tables = set(Base.metadata.tables)

    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        assert tables <= set(inspect(engine).get_table_names())
        command.downgrade(db.alembic_config(url), "base")
        engine.dispose()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert db.current_revision(engine) is None

        db.upgrade(url)
        engine.dispose()
        assert tables <= set(inspect(engine).get_table_names())
        assert db.schema_is_current(engine)
    finally:
        engine.dispose()


# --- a deactivation racing the first event of a new membership ---------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("first", ["deactivation", "join"])
def test_a_deactivation_and_an_older_join_applied_at_once_end_inactive(
    store: Store, now: datetime, first: str
) -> None:
    """Whichever transaction gets in first, the other one waits for it and sees its work."""
    if store.backend != "postgres":
        pytest.skip("SQLite runs one writing transaction at a time")
    user = f"u-race-{first}"
    joined, deactivated = now - timedelta(hours=2), now - timedelta(hours=1)

    def join(session: Session) -> None:
        add_member(
            session,
            org_id=ORG,
            user_id=user,
            role="user",
            email=None,
            at=joined,
            now=now,
            source="test",
        )

    def deactivate(session: Session) -> None:
        deactivate_user(
            session, user_id=user, at=deactivated, now=now, source="test", event_id=None
        )

    steps = [join, deactivate] if first == "join" else [deactivate, join]
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with db.transaction(store.engine) as session:
                steps[1](session)
        except BaseException as error:  # reported below
            errors.append(error)

    try:
        with db.transaction(store.engine) as session:
            steps[0](session)
            waiting = threading.Thread(target=second)
            waiting.start()
            waiting.join(timeout=0.5)
            assert waiting.is_alive(), "the second transaction must wait for the first"
        waiting.join(timeout=30)
        assert not errors, errors
        with db.transaction(store.engine) as session:
            found = session.get(Membership, (ORG, user))
            assert found is not None
            assert (found.active, found.last_event_at) == (False, deactivated)
    finally:
        with store.engine.begin() as connection:
            for table in (Membership, UserDeactivation, AuditEntry):
                connection.execute(delete(table).where(table.user_id == user))
