"""Inbox retention: finished events and dead letters go after N days, pending events never.

The sweep commits one transaction per batch, so these tests commit their rows and empty the
store afterwards instead of using the rolled-back ``session`` fixture.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session

import tokenwarden.tasks.expiry
from tests.conftest import Cli, Store
from tokenwarden.worker.domain import clock, db
from tokenwarden.worker.domain.errors import Refused
from tokenwarden.worker.domain.events import parse_event
from tokenwarden.worker.domain.expiry.sweep import run_sweep
from tokenwarden.worker.domain.handlers import apply_pending
from tokenwarden.worker.domain.inbox import store_events
from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import (
    AuditEntry,
    DeadLetter,
    EventStatus,
    InboxEvent,
    Membership,
    Notice,
    Token,
    TokenKind,
)
from tokenwarden.worker.domain.tokens import hash_token
from tokenwarden.worker.domain.verification import verify_token
from tokenwarden.worker.runtime import tasking

DAYS = 30


@pytest.fixture
def committed(store: Store) -> Iterator[Store]:
    """The store, empty before and after the test; what the test commits is removed."""
    store.truncate()
    try:
        yield store
    finally:
        clock.set_clock(None)
        store.truncate()


def add_events(
    engine: Engine,
    count: int,
    *,
    status: EventStatus,
    received_at: datetime,
    finished_at: datetime | None = None,
) -> list[str]:
    ids = [f"evt-{status.value}-{secrets.token_hex(6)}" for _ in range(count)]
    with db.transaction(engine) as session:
        session.execute(
            insert(InboxEvent),
            [
                {
                    "id": event_id,
                    "type": "membership.removed",
                    "source": "hr://test",
                    "time": received_at,
                    "data": {"org_id": "acme", "user_id": event_id},
                    "digest": "0" * 64,
                    "status": status.value,
                    "reason": "bad data" if status is EventStatus.DEAD else None,
                    "result": None,
                    "attempts": 0 if status is EventStatus.PENDING else 1,
                    "received_at": received_at,
                    "published_at": received_at,
                    "finished_at": finished_at,
                }
                for event_id in ids
            ],
        )
    return ids


def add_dead_letters(engine: Engine, count: int, *, at: datetime) -> list[int]:
    with db.transaction(engine) as session:
        return list(
            session.scalars(
                insert(DeadLetter).returning(DeadLetter.id),
                [{"at": at, "reason": "bad arguments", "task": "t"} for _ in range(count)],
            )
        )


def event_ids(engine: Engine) -> set[str]:
    with Session(engine) as session:
        return set(session.scalars(select(InboxEvent.id)))


def letter_ids(engine: Engine) -> set[int]:
    with Session(engine) as session:
        return set(session.scalars(select(DeadLetter.id)))


def test_finished_events_and_dead_letters_older_than_the_retention_go_in_batches(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    old, recent = now - timedelta(days=DAYS + 1), now - timedelta(days=DAYS - 1)
    gone = add_events(engine, 7, status=EventStatus.DONE, received_at=old, finished_at=old)
    gone += add_events(engine, 4, status=EventStatus.DEAD, received_at=old, finished_at=old)
    # Received long ago but finished recently: the age counts from when it finished.
    kept = add_events(engine, 2, status=EventStatus.DONE, received_at=old, finished_at=recent)
    kept += add_events(engine, 1, status=EventStatus.DEAD, received_at=recent, finished_at=recent)
    kept += add_events(engine, 3, status=EventStatus.PENDING, received_at=old)
    old_letters = add_dead_letters(engine, 5, at=old)
    new_letters = add_dead_letters(engine, 2, at=recent)

    # With no time left a run still does one batch of each phase: three rows here.
    first = run_sweep(engine, now=now, batch=3, budget_s=0, inbox_retention_days=DAYS)
    assert (first.inbox_deleted, first.dead_letters_deleted, first.finished) == (3, 0, False)
    assert len(event_ids(engine)) == len(gone) + len(kept) - 3

    rest = run_sweep(engine, now=now, batch=3, inbox_retention_days=DAYS)
    assert (rest.inbox_deleted, rest.dead_letters_deleted, rest.finished) == (8, 5, True)
    # 13 rows at most 3 a transaction, after one transaction each for expiry and notices.
    assert rest.transactions >= 2 + 5
    assert event_ids(engine) == set(kept)
    assert letter_ids(engine) == set(new_letters)
    assert not set(old_letters) & letter_ids(engine)

    again = run_sweep(engine, now=now, batch=3, inbox_retention_days=DAYS)
    assert (again.inbox_deleted, again.dead_letters_deleted) == (0, 0)


def test_pending_events_are_never_deleted_whatever_their_age(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    ancient = now - timedelta(days=3650)
    pending = add_events(engine, 4, status=EventStatus.PENDING, received_at=ancient)
    # Even a pending row that somehow carries an old finish time stays.
    pending += add_events(
        engine, 1, status=EventStatus.PENDING, received_at=ancient, finished_at=ancient
    )
    done = add_events(engine, 2, status=EventStatus.DONE, received_at=ancient, finished_at=ancient)

    result = run_sweep(engine, now=now, batch=2, inbox_retention_days=1)

    assert result.inbox_deleted == len(done)
    assert event_ids(engine) == set(pending)


def test_each_run_logs_and_reports_how_many_rows_it_deleted(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    old = now - timedelta(days=DAYS + 5)
    add_events(engine, 3, status=EventStatus.DONE, received_at=old, finished_at=old)
    add_dead_letters(engine, 2, at=old)

    with structlog.testing.capture_logs() as logs:
        result = run_sweep(engine, now=now, batch=100, inbox_retention_days=DAYS)
        idle = run_sweep(engine, now=now, batch=100, inbox_retention_days=DAYS)

    lines = [line for line in logs if line["event"] == "inbox.retention"]
    assert [(line["events"], line["dead_letters"], line["finished"]) for line in lines] == [
        (3, 2, True),
        (0, 0, True),
    ]
    assert lines[0]["retention_days"] == DAYS
    assert (result.as_dict()["inbox_deleted"], result.as_dict()["dead_letters_deleted"]) == (3, 2)
    assert (idle.as_dict()["inbox_deleted"], idle.as_dict()["dead_letters_deleted"]) == (0, 0)


def test_without_an_inbox_retention_nothing_is_deleted(committed: Store, now: datetime) -> None:
    engine = committed.engine
    ancient = now - timedelta(days=3650)
    kept = add_events(engine, 2, status=EventStatus.DONE, received_at=ancient, finished_at=ancient)
    add_dead_letters(engine, 1, at=ancient)
    result = run_sweep(engine, now=now, batch=10)
    assert (result.inbox_deleted, result.dead_letters_deleted) == (0, 0)
    assert event_ids(engine) == set(kept)
    assert len(letter_ids(engine)) == 1


def test_the_scheduled_sweep_keeps_finished_events_30_days_by_default(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = committed.engine
    monkeypatch.setattr(tasking, "store_engine", lambda: engine)
    monkeypatch.setattr(tokenwarden.tasks.expiry, "store_engine", lambda: engine)
    finished = now - timedelta(days=10)
    ids = add_events(engine, 2, status=EventStatus.DONE, received_at=finished, finished_at=finished)

    clock.set_clock(lambda: finished + timedelta(days=29))
    assert tokenwarden.tasks.expiry.sweep_expired.run()["inbox_deleted"] == 0
    assert event_ids(engine) == set(ids)
    clock.set_clock(lambda: finished + timedelta(days=30, seconds=1))
    assert tokenwarden.tasks.expiry.sweep_expired.run()["inbox_deleted"] == 2
    assert event_ids(engine) == set()


def test_the_sweep_command_reports_what_the_inbox_retention_deleted(cli: Cli, store: Store) -> None:
    cli("db", "upgrade", check=True)
    engine = store.engine if store.backend == "postgres" else None
    if engine is None:
        engine = db.make_engine(f"sqlite:///{cli.home / 'tokenwarden.db'}")
    try:
        old = clock.now() - timedelta(days=DAYS + 1)
        add_events(engine, 3, status=EventStatus.DONE, received_at=old, finished_at=old)
        add_dead_letters(engine, 1, at=old)
        report = cli("sweep", "--json", check=True).json()
        assert (report["inbox_deleted"], report["dead_letters_deleted"]) == (3, 1)
        add_events(engine, 2, status=EventStatus.DEAD, received_at=old, finished_at=old)
        text = cli("sweep", check=True).stdout
        assert (
            "deleted 2 finished events and 0 dead letters past the 30-day inbox retention" in text
        )
        assert event_ids(engine) == set()
    finally:
        if store.backend != "postgres":
            engine.dispose()


def test_the_inbox_retention_setting_is_30_days_empty_to_keep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenwarden.config.settings import ConfigError, load_settings

    monkeypatch.delenv("TOKENWARDEN_INBOX_RETENTION_DAYS", raising=False)
    assert load_settings().inbox_retention_days == DAYS
    for value, expected in (("", None), (" ", None), ("7", 7), ("365", 365)):
        monkeypatch.setenv("TOKENWARDEN_INBOX_RETENTION_DAYS", value)
        assert load_settings().inbox_retention_days == expected
    for value in ("0", "-3", "a month", "1.5"):
        monkeypatch.setenv("TOKENWARDEN_INBOX_RETENTION_DAYS", value)
        with pytest.raises(ConfigError, match=r"^TOKENWARDEN_INBOX_RETENTION_DAYS: "):
            load_settings()


# -- an event sent again once its row is gone ------------------------------------------------


def cloud(event_id: str, kind: str, at: datetime, data: dict[str, Any]) -> Any:
    return parse_event(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "hr://workday",
            "type": kind,
            "time": at.isoformat(),
            "data": data,
        }
    )


def deliver(engine: Engine, events: list[Any], *, now: datetime) -> list[str]:
    """Store the events as the API does, then apply what was new or still pending."""
    with db.transaction(engine) as session:
        stored = store_events(session, events, now=now)
    if stored.to_publish:
        with db.transaction(engine) as session:
            outcome = apply_pending(session, stored.to_publish, now=now, retryable=lambda _: False)
        assert outcome.dead == []
    return stored.to_publish


def audit_rows(engine: Engine, **where: Any) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).order_by(AuditEntry.id)
        for name, value in where.items():
            query = query.where(getattr(AuditEntry, name) == value)
        return list(session.scalars(query))


def test_a_late_join_replayed_after_retention_does_not_readmit_the_leaver(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    joined, left = now - timedelta(days=90), now - timedelta(days=60)
    join = cloud(
        "evt-join",
        "membership.added",
        joined,
        {"org_id": "acme", "user_id": "eve", "role": "admin"},
    )
    leave = cloud("evt-leave", "membership.removed", left, {"org_id": "acme", "user_id": "eve"})
    deliver(engine, [join], now=joined)
    with db.transaction(engine) as session:
        issued = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="eve",
            name="laptop",
            expires_at=now + timedelta(days=200),
            now=joined + timedelta(days=1),
        )
    deliver(engine, [leave], now=left)

    # Within the retention the same event is recognised and not even stored again.
    assert deliver(engine, [join], now=left + timedelta(days=1)) == []
    swept = run_sweep(engine, now=now, batch=10, inbox_retention_days=DAYS)
    assert swept.inbox_deleted == 2
    assert event_ids(engine) == set()

    # Past it the join is a new event to the inbox, applied as one: stale, so nothing changes.
    assert deliver(engine, [join], now=now) == ["evt-join"]
    assert deliver(engine, [leave], now=now) == ["evt-leave"]

    with db.transaction(engine) as session:
        member = session.get_one(Membership, ("acme", "eve"))
        assert (member.active, member.last_event_at) == (False, left)
        verdict = verify_token(session, issued.token, now=now)
        assert (verdict.usable, verdict.reason) == (False, "revoked")
        with pytest.raises(Refused, match="not an active member"):
            create_token(
                session,
                kind=TokenKind.PERSONAL,
                org_id="acme",
                user_id="eve",
                name="again",
                expires_at=now + timedelta(days=30),
                now=now,
            )
    # The join is audited as stale; the removal, replayed too, finds nothing left to revoke.
    assert [row.event_id for row in audit_rows(engine, action="stale")] == ["evt-join"]
    assert len(audit_rows(engine, action="revoke", token_id=issued.id)) == 1
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Notice)) == 1


def test_a_leak_replayed_after_retention_revokes_and_tells_nothing_more(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    reported = now - timedelta(days=45)
    with db.transaction(engine) as session:
        add_member(
            session,
            org_id="acme",
            user_id="bob",
            role="user",
            email="bob@acme.example",
            at=reported - timedelta(days=5),
            now=reported - timedelta(days=5),
            source="test",
        )
        issued = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="bob",
            name="ci",
            expires_at=now + timedelta(days=200),
            now=reported - timedelta(days=4),
        )
    leak = cloud(
        "evt-leak",
        "token.leak_suspected",
        reported,
        {"token_hash": hash_token(issued.token), "source_url": "https://paste.example/1"},
    )
    revoke = cloud("evt-revoke", "token.revoke_requested", reported, {"token_id": issued.id})
    deliver(engine, [leak, revoke], now=reported)

    def outcome() -> tuple[Any, ...]:
        with Session(engine) as session:
            token = session.get_one(Token, issued.id)
            notices = session.scalar(select(func.count()).select_from(Notice))
        return token.revoked_at, token.revoke_reason, notices, len(audit_rows(engine))

    before = outcome()
    assert before[1:3] == ("leaked", 1)
    assert run_sweep(engine, now=now, batch=10, inbox_retention_days=DAYS).inbox_deleted == 2

    assert sorted(deliver(engine, [leak, revoke], now=now)) == ["evt-leak", "evt-revoke"]
    assert outcome() == before


def test_an_old_deactivation_replayed_after_retention_spares_a_later_rejoin(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    gone, back = now - timedelta(days=80), now - timedelta(days=70)
    member = {"org_id": "acme", "user_id": "dan", "role": "user"}
    deactivation = cloud("evt-deactivated", "user.deactivated", gone, {"user_id": "dan"})
    deliver(
        engine,
        [cloud("evt-first-join", "membership.added", gone - timedelta(days=9), member)],
        now=gone - timedelta(days=9),
    )
    deliver(engine, [deactivation], now=gone)
    deliver(engine, [cloud("evt-rejoin", "membership.added", back, member)], now=back)
    with db.transaction(engine) as session:
        issued = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="dan",
            name="new laptop",
            expires_at=now + timedelta(days=200),
            now=back + timedelta(days=1),
        )
    assert run_sweep(engine, now=now, batch=10, inbox_retention_days=DAYS).inbox_deleted == 3

    assert deliver(engine, [deactivation], now=now) == ["evt-deactivated"]

    with db.transaction(engine) as session:
        verdict = verify_token(session, issued.token, now=now)
        assert verdict.usable, verdict.reason
        assert session.get_one(Membership, ("acme", "dan")).active
    assert audit_rows(engine, action="revoke", token_id=issued.id) == []
