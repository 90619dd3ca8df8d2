"""Who hears what: the notices a revocation queues, in its own transaction, on every database."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from tests.conftest import Cli, Store
from tokenwarden.worker.domain import db, deactivation, inbox, leaks, notices, removals, revocation
from tokenwarden.worker.domain.events import parse_event
from tokenwarden.worker.domain.handlers import apply_event
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import InboxEvent, Notice, NoticeStatus, Token, TokenKind
from tokenwarden.worker.domain.notices import take_new_notices
from tokenwarden.worker.domain.tokens import hash_token

SOURCE = "hr://workday"


def join(session: Session, org_id: str, user_id: str, *, at: datetime, role: str = "user") -> None:
    assert add_member(
        session,
        org_id=org_id,
        user_id=user_id,
        role=role,
        email=f"{user_id}@{org_id}.example",
        at=at,
        now=at,
        source="test",
    )


def pat(
    session: Session, org_id: str, user_id: str, *, created: datetime, name: str = "laptop"
) -> IssuedToken:
    return create_token(
        session,
        kind=TokenKind.PERSONAL,
        org_id=org_id,
        user_id=user_id,
        name=name,
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


def all_notices(session: Session) -> list[Notice]:
    return list(session.scalars(select(Notice).order_by(Notice.created_at, Notice.id)))


def body(notice: Notice) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(notice.body)
    return parsed


def assert_no_token_text(notice: Notice, *issued: IssuedToken) -> None:
    """Neither a token, nor its random part, nor its hash appears anywhere in the row."""
    row = json.dumps({c.key: str(getattr(notice, c.key)) for c in Notice.__table__.columns})
    for token in issued:
        for secret in (token.token, token.token[7:39], hash_token(token.token)):
            assert secret not in row


def leak(session: Session, issued: IssuedToken, *, now: datetime) -> revocation.TokenOutcome:
    return leaks.report_leak(
        session,
        token_hash=hash_token(issued.token),
        source_url="https://github.com/acme/app/blob/main/.env",
        reporter="github-secret-scanning",
        at=now - timedelta(minutes=5),
        now=now,
        source="https://github.com",
        event_id="evt-leak",
    )


# -- leaks ---------------------------------------------------------------------------------


def test_a_leaked_pat_is_told_to_its_owner_with_what_to_do(session: Session, now: datetime) -> None:
    t0 = now - timedelta(days=10)
    join(session, "acme", "alice", role="admin", at=t0)
    join(session, "acme", "bob", at=t0)
    issued = pat(session, "acme", "bob", created=t0)

    assert leak(session, issued, now=now).revoked

    (notice,) = all_notices(session)
    assert (notice.kind, notice.org_id, notice.status, notice.attempts) == (
        notices.LEAKED,
        "acme",
        NoticeStatus.PENDING,
        0,
    )
    assert notice.recipients == [{"user_id": "bob", "email": "bob@acme.example"}]
    assert (notice.event_id, notice.created_at, notice.next_attempt_at) == ("evt-leak", now, now)
    sent = body(notice)
    assert (sent["type"], sent["timestamp"]) == (notices.LEAKED, now.isoformat())
    data = sent["data"]
    assert data["notice_id"] == notice.id
    assert data["recipients"] == notice.recipients
    assert data["reason"] == "leaked"
    assert data["source"] == "https://github.com"
    assert data["source_url"] == "https://github.com/acme/app/blob/main/.env"
    assert data["reporter"] == "github-secret-scanning"
    assert data["event_id"] == "evt-leak"
    assert data["event_time"] == (now - timedelta(minutes=5)).isoformat()
    assert data["revoked_at"] == now.isoformat()
    assert data["next_steps"] == notices.NEXT_STEPS[notices.LEAKED]
    assert data["tokens"] == [
        {
            "id": issued.id,
            "name": "laptop",
            "kind": "personal",
            "org_id": "acme",
            "last4": issued.token[-4:],
            "expires_at": issued.expires_at.isoformat(),
            "user_id": "bob",
        }
    ]
    assert_no_token_text(notice, issued)


def test_a_leaked_aat_is_told_to_every_active_admin_of_its_org(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=10)
    for user, role in [("alice", "admin"), ("carol", "admin"), ("dave", "admin"), ("erin", "user")]:
        join(session, "acme", user, role=role, at=t0)
    join(session, "globex", "gina", role="admin", at=t0)
    removals.remove_member(
        session,
        org_id="acme",
        user_id="dave",
        at=t0 + timedelta(days=1),
        now=t0 + timedelta(days=1),
        source=SOURCE,
        event_id=None,
    )
    issued = aat(session, "acme", created_by="erin", created=t0)

    assert leak(session, issued, now=now).revoked

    (notice,) = all_notices(session)
    assert notice.recipients == [
        {"user_id": "alice", "email": "alice@acme.example"},
        {"user_id": "carol", "email": "carol@acme.example"},
    ]
    (described,) = body(notice)["data"]["tokens"]
    assert described["kind"] == "application"
    assert (described["app_id"], described["created_by"]) == ("ci-bot", "erin")
    assert "user_id" not in described
    assert_no_token_text(notice, issued)


def test_a_second_report_of_the_same_leak_tells_nobody_again(
    session: Session, now: datetime
) -> None:
    join(session, "acme", "bob", at=now - timedelta(days=1))
    issued = pat(session, "acme", "bob", created=now - timedelta(days=1))
    assert leak(session, issued, now=now).revoked

    again = leaks.report_leak(
        session,
        token_id=issued.id,
        at=now,
        now=now + timedelta(minutes=1),
        source="operator",
        event_id="evt-again",
    )

    assert not again.revoked
    assert len(all_notices(session)) == 1


def test_a_leak_of_a_token_revoked_earlier_or_unknown_tells_nobody(
    session: Session, now: datetime
) -> None:
    join(session, "acme", "bob", at=now - timedelta(days=1))
    issued = pat(session, "acme", "bob", created=now - timedelta(days=1))
    revocation.request_revocation(
        session, token_id=issued.id, at=now, now=now, source="cli", event_id=None
    )

    assert not leak(session, issued, now=now).revoked
    unknown = leaks.report_leak(
        session, token_hash="0" * 64, at=now, now=now, source="scanner", event_id=None
    )

    assert unknown.token_id is None
    assert all_notices(session) == []


# -- offboarding ---------------------------------------------------------------------------


def test_a_leaver_is_reported_to_the_admins_in_one_notice_listing_every_revoked_pat(
    session: Session, store: Store, now: datetime
) -> None:
    t0 = now - timedelta(days=30)
    join(session, "acme", "alice", role="admin", at=t0)
    join(session, "acme", "bob", at=t0)
    join(session, "globex", "bob", at=t0)
    laptop = pat(session, "acme", "bob", created=t0, name="laptop")
    ci = pat(session, "acme", "bob", created=t0, name="ci")
    gone = pat(session, "acme", "bob", created=t0, name="old")
    revocation.request_revocation(
        session, token_id=gone.id, at=t0, now=t0, source="cli", event_id=None
    )
    kept_app = aat(session, "acme", created_by="bob", created=t0)
    elsewhere = pat(session, "globex", "bob", created=t0)
    updates: list[str] = []

    def count_updates(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TOKENS"):
            updates.append(statement)

    event.listen(store.engine, "before_cursor_execute", count_updates)
    try:
        revoked = removals.remove_member(
            session,
            org_id="acme",
            user_id="bob",
            at=now - timedelta(hours=1),
            now=now,
            source=SOURCE,
            event_id="evt-left",
        )
    finally:
        event.remove(store.engine, "before_cursor_execute", count_updates)

    assert len(updates) == 1  # the notice needs no second statement on the tokens
    assert revoked == sorted([laptop.id, ci.id])
    # The application token bob created keeps working; the admins hear of it apart.
    (notice,) = [n for n in all_notices(session) if n.kind != notices.ORPHANED]
    (orphaned,) = [n for n in all_notices(session) if n.kind == notices.ORPHANED]
    assert [token["id"] for token in body(orphaned)["data"]["tokens"]] == [kept_app.id]
    assert (notice.kind, notice.org_id, notice.event_id) == (
        notices.OFFBOARDED,
        "acme",
        "evt-left",
    )
    assert notice.recipients == [{"user_id": "alice", "email": "alice@acme.example"}]
    data = body(notice)["data"]
    assert (data["reason"], data["source"], data["user_id"]) == ("member_removed", SOURCE, "bob")
    assert data["event_time"] == (now - timedelta(hours=1)).isoformat()
    assert data["revoked_at"] == now.isoformat()
    assert data["next_steps"] == notices.NEXT_STEPS[notices.OFFBOARDED]
    listed = {token["id"]: token for token in data["tokens"]}
    assert sorted(listed) == sorted([laptop.id, ci.id])
    for issued in (laptop, ci):
        assert listed[issued.id]["last4"] == issued.token[-4:]
        assert listed[issued.id]["kind"] == "personal"
        assert listed[issued.id]["user_id"] == "bob"
    assert {token["name"] for token in data["tokens"]} == {"laptop", "ci"}
    assert_no_token_text(notice, laptop, ci, gone, kept_app, elsewhere)


def test_a_leaving_admin_is_not_told_about_their_own_tokens(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=30)
    join(session, "acme", "alice", role="admin", at=t0)
    join(session, "acme", "carol", role="admin", at=t0)
    pat(session, "acme", "alice", created=t0)

    removals.remove_member(
        session, org_id="acme", user_id="alice", at=now, now=now, source=SOURCE, event_id=None
    )

    (notice,) = all_notices(session)
    assert [r["user_id"] for r in notice.recipients] == ["carol"]


def test_a_removal_that_revokes_nothing_and_a_replay_tell_nobody(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=30)
    join(session, "acme", "alice", role="admin", at=t0)
    join(session, "acme", "bob", at=t0)
    join(session, "acme", "erin", at=t0)
    pat(session, "acme", "bob", created=t0)

    def remove(user_id: str) -> list[str]:
        return removals.remove_member(
            session, org_id="acme", user_id=user_id, at=now, now=now, source=SOURCE, event_id=None
        )

    assert remove("erin") == []  # erin held no token
    assert len(remove("bob")) == 1
    assert remove("bob") == []  # the same removal again

    assert len(all_notices(session)) == 1


def test_a_deactivated_user_is_reported_to_each_orgs_admins_separately(
    session: Session, now: datetime
) -> None:
    t0 = now - timedelta(days=30)
    join(session, "acme", "alice", role="admin", at=t0)
    join(session, "globex", "gina", role="admin", at=t0)
    join(session, "initech", "ivan", role="admin", at=t0)
    for org in ("acme", "globex", "initech"):
        join(session, org, "bob", at=t0)
    acme = [pat(session, "acme", "bob", created=t0, name=f"acme-{i}") for i in range(2)]
    globex = pat(session, "globex", "bob", created=t0)

    revoked = deactivation.deactivate_user(
        session, user_id="bob", at=now, now=now, source=SOURCE, event_id="evt-deactivated"
    )

    assert sorted(revoked) == sorted([acme[0].id, acme[1].id, globex.id])
    by_org = {str(notice.org_id): notice for notice in all_notices(session)}
    assert sorted(by_org) == ["acme", "globex"]  # initech: bob held nothing there
    assert [r["user_id"] for r in by_org["acme"].recipients] == ["alice"]
    assert [r["user_id"] for r in by_org["globex"].recipients] == ["gina"]
    acme_data, globex_data = body(by_org["acme"])["data"], body(by_org["globex"])["data"]
    assert sorted(t["id"] for t in acme_data["tokens"]) == sorted(t.id for t in acme)
    assert [t["id"] for t in globex_data["tokens"]] == [globex.id]
    assert acme_data["reason"] == globex_data["reason"] == "user_deactivated"
    assert by_org["acme"].event_id == "evt-deactivated"


def test_an_offboarding_with_no_admin_left_is_still_queued_for_the_receiver(
    session: Session, now: datetime
) -> None:
    join(session, "acme", "bob", at=now - timedelta(days=1))
    pat(session, "acme", "bob", created=now - timedelta(days=1))

    removals.remove_member(
        session, org_id="acme", user_id="bob", at=now, now=now, source=SOURCE, event_id=None
    )

    (notice,) = all_notices(session)
    assert notice.recipients == []


# -- the transaction -----------------------------------------------------------------------


def test_a_notice_commits_or_rolls_back_with_its_revocation(
    session: Session, now: datetime
) -> None:
    join(session, "acme", "alice", role="admin", at=now - timedelta(days=1))
    join(session, "acme", "bob", at=now - timedelta(days=1))
    issued = pat(session, "acme", "bob", created=now - timedelta(days=1))
    take_new_notices(session)

    savepoint = session.begin_nested()
    removals.remove_member(
        session, org_id="acme", user_id="bob", at=now, now=now, source=SOURCE, event_id=None
    )
    assert len(all_notices(session)) == 1
    savepoint.rollback()

    assert all_notices(session) == []
    assert session.scalar(select(Token.revoked_at).where(Token.id == issued.id)) is None


def test_queued_notices_are_noted_for_publishing_once_the_transaction_commits(
    session: Session, now: datetime
) -> None:
    join(session, "acme", "bob", at=now - timedelta(days=1))
    issued = pat(session, "acme", "bob", created=now - timedelta(days=1))
    take_new_notices(session)

    leak(session, issued, now=now)

    (notice,) = all_notices(session)
    assert take_new_notices(session) == [notice.id]
    assert take_new_notices(session) == []


def test_an_event_applied_by_the_worker_queues_its_notice(session: Session, now: datetime) -> None:
    join(session, "acme", "bob", at=now - timedelta(days=1))
    issued = pat(session, "acme", "bob", created=now - timedelta(days=1))
    raw = {
        "specversion": "1.0",
        "id": f"evt-{secrets.token_hex(4)}",
        "source": "https://scanner.example",
        "type": "token.leak_suspected",
        "time": now.isoformat(),
        "data": {
            "token": issued.token,
            "source_url": "https://paste.example/x",
            "reporter": "scanner",
        },
    }
    parsed = parse_event(raw)  # hashes the token, as the API does
    inbox.store_events(session, [parsed], now=now)
    row = session.get(InboxEvent, parsed.id)
    assert row is not None

    result = apply_event(session, row, now=now)

    assert result["revoked"] == [issued.id]
    (notice,) = all_notices(session)
    assert notice.event_id == parsed.id
    data = body(notice)["data"]
    assert (data["source"], data["source_url"]) == (
        "https://scanner.example",
        "https://paste.example/x",
    )
    assert_no_token_text(notice, issued)


# -- the command line ----------------------------------------------------------------------


def queue_sample(session: Session, *, now: datetime, status: NoticeStatus) -> str:
    notice_id = notices.queue(
        session,
        kind=notices.LEAKED,
        org_id="acme",
        recipients=[{"user_id": "bob", "email": "bob@acme.example"}],
        data={"reason": "leaked", "tokens": []},
        now=now,
    )
    assert notice_id is not None
    row = session.get(Notice, notice_id)
    assert row is not None
    row.status = status.value
    if status is NoticeStatus.FAILED:
        (row.attempts, row.last_error) = (1, "HTTP 400 Bad Request: the receiver refused it")
    if status is NoticeStatus.SENT:
        (row.attempts, row.sent_at) = (1, now)
    return notice_id


def test_the_cli_lists_notices_by_status_with_the_body_in_json(cli: Cli, store: Store) -> None:
    # The first call also creates the embedded store.
    assert "no notices with status sent" in cli("notices", "--status", "sent", check=True).stdout
    url = store.url if store.backend == "postgres" else f"sqlite:///{cli.home / 'tokenwarden.db'}"
    engine = db.make_engine(url)
    now = datetime.now(UTC)
    try:
        with db.transaction(engine) as session:
            ids = {
                status: queue_sample(session, now=now + timedelta(seconds=i), status=status)
                for i, status in enumerate(NoticeStatus)
            }
    finally:
        engine.dispose()

    table = cli("notices", check=True).stdout
    for notice_id in ids.values():
        assert notice_id in table
    assert "bob@acme.example" in table
    assert "HTTP 400 Bad Request" in table
    assert "TOKENWARDEN_NOTICE_WEBHOOK_URL is not set" in table

    failed = cli("notices", "--status", "failed", "--json", check=True).json()
    assert [row["id"] for row in failed] == [ids[NoticeStatus.FAILED]]
    (row,) = failed
    assert row["last_error"].startswith("HTTP 400")
    assert row["recipients"] == [{"user_id": "bob", "email": "bob@acme.example"}]
    assert row["body"]["data"]["notice_id"] == row["id"]
    newest = cli("notices", "--json", "--limit", "2", check=True).json()
    assert [r["id"] for r in newest] == [ids[NoticeStatus.FAILED], ids[NoticeStatus.SENT]]
