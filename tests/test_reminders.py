"""Pre-expiry reminders on every store, with a clock that moves instead of tests that sleep."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import tokenwarden.tasks.expiry
from tests.conftest import Store
from tests.test_sweep import add_tokens, listed, member, notice_bodies
from tokenwarden.worker.domain import clock, db, notices
from tokenwarden.worker.domain.expiry.reminders import buckets, send_reminders
from tokenwarden.worker.domain.expiry.results import ReminderResult
from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.models import TokenKind, TokenReminder
from tokenwarden.worker.domain.revocation import revoke_token

DAYS = (60, 30, 7)


@pytest.fixture
def committed(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """The store, empty before and after; the reminder task reads it at the test's clock."""
    monkeypatch.setattr(tokenwarden.tasks.expiry, "store_engine", lambda: store.engine)
    monkeypatch.setattr(tokenwarden.tasks.expiry, "_publish", lambda ids: None)
    store.truncate()
    try:
        yield store
    finally:
        clock.set_clock(None)
        store.truncate()


def remind(store: Store, at: datetime, *, batch: int = 1000) -> ReminderResult:
    return send_reminders(store.engine, now=at, days=DAYS, batch=batch)


def sent(store: Store) -> dict[str, list[int]]:
    """The buckets recorded per token."""
    with Session(store.engine) as session:
        found: dict[str, list[int]] = {}
        for row in session.execute(
            select(TokenReminder.token_id, TokenReminder.days).order_by(TokenReminder.days.desc())
        ):
            found.setdefault(row.token_id, []).append(row.days)
        return found


def expiring(store: Store) -> list[dict[str, Any]]:
    return notice_bodies(store.engine, notices.EXPIRING)


def test_buckets_run_nearest_first_each_after_the_next_nearer() -> None:
    assert buckets((60, 30, 7)) == [(7, 0), (30, 7), (60, 30)]
    assert buckets((7, 7, 30)) == [(7, 0), (30, 7)]


def test_a_token_is_warned_once_per_bucket_as_the_clock_moves(
    committed: Store, now: datetime
) -> None:
    member(committed.engine, "acme", "bob", now=now)
    expiry = now + timedelta(days=90)
    token = add_tokens(committed.engine, 1, expires_at=expiry, created_at=now)[0]
    runs: dict[int, int] = {}
    # Daily runs from the day of issue to past expiry, through the scheduled task.
    for day in range(0, 92):
        clock.set_clock(lambda day=day: now + timedelta(days=day, hours=-4))  # type: ignore[misc]
        outcome = tokenwarden.tasks.expiry.send_expiry_reminders.run()
        assert outcome["ran"] is True
        if outcome["reminded"]:
            runs[day] = outcome["notices"]

    # 60, 30 and 7 days before expiry at 12:00, seen by the 08:00 run of the next day.
    assert runs == {31: 1, 61: 1, 84: 1}
    assert sent(committed) == {token: [60, 30, 7]}
    bodies = expiring(committed)
    assert sorted(body["days"] for body in bodies) == [7, 30, 60]
    assert all(listed([body]) == [token] for body in bodies)
    assert all(
        body["recipients"] == [{"user_id": "bob", "email": "bob@acme.example"}] for body in bodies
    )


def test_bucket_edges_are_inclusive_and_the_expiry_instant_ends_reminders(
    committed: Store, now: datetime
) -> None:
    member(committed.engine, "acme", "bob", now=now)
    expiry = now + timedelta(days=100)
    token = add_tokens(committed.engine, 1, expires_at=expiry, created_at=now)[0]
    assert remind(committed, expiry - timedelta(days=60, seconds=1)).reminded == 0
    assert remind(committed, expiry - timedelta(days=60)).by_days == {7: 0, 30: 0, 60: 1}
    assert remind(committed, expiry - timedelta(days=30)).by_days == {7: 0, 30: 1, 60: 0}
    assert remind(committed, expiry - timedelta(days=7)).by_days == {7: 1, 30: 0, 60: 0}
    assert remind(committed, expiry).reminded == 0
    assert sent(committed) == {token: [60, 30, 7]}


def test_a_token_created_inside_a_bucket_gets_only_the_nearest(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    with db.transaction(engine) as session:
        in_30 = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="bob",
            name="twenty days",
            expires_at=now + timedelta(days=20),
            now=now,
        ).id
        in_7 = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="bob",
            name="five days",
            expires_at=now + timedelta(days=5),
            now=now,
        ).id

    first = remind(committed, now)
    assert first.by_days == {7: 1, 30: 1, 60: 0}
    assert first.notices == 2  # one per bucket for bob, not three reminders at once
    assert sent(committed) == {in_30: [30], in_7: [7]}

    # Later the twenty-day token reaches the 7-day bucket; the five-day one hears nothing more.
    later = remind(committed, now + timedelta(days=13))
    assert later.by_days == {7: 1, 30: 0, 60: 0}
    assert sent(committed) == {in_30: [30, 7], in_7: [7]}
    assert len(expiring(committed)) == 3


def test_reruns_on_the_same_day_send_nothing_twice(committed: Store, now: datetime) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    tokens = add_tokens(engine, 5, expires_at=now + timedelta(days=5), created_at=now)
    first = remind(committed, now)
    assert (first.reminded, first.notices) == (5, 1)
    for hours in (0, 1, 6, 23):
        again = remind(committed, now + timedelta(hours=hours))
        assert (again.ran, again.reminded, again.notices) == (True, 0, 0)
    bodies = expiring(committed)
    assert len(bodies) == 1
    assert sorted(listed(bodies)) == sorted(tokens)


def test_one_notice_per_recipient_per_bucket_listing_up_to_100_tokens(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    for user, role in (("alice", "admin"), ("carol", "admin"), ("bob", "user"), ("dan", "user")):
        member(engine, "acme", user, role=role, now=now)
    soon = now + timedelta(days=3)
    bobs = add_tokens(engine, 130, expires_at=soon, user="bob", created_at=now)
    dans = add_tokens(engine, 2, expires_at=soon + timedelta(hours=1), user="dan", created_at=now)
    apps = add_tokens(engine, 3, expires_at=soon, app_id="ci", user="alice", created_at=now)
    later = add_tokens(engine, 2, expires_at=now + timedelta(days=20), user="bob", created_at=now)

    result = remind(committed, now)

    assert result.by_days == {7: 135, 30: 2, 60: 0}
    bodies = expiring(committed)
    shape = sorted(
        (body["days"], tuple(r["user_id"] for r in body["recipients"]), len(body["tokens"]))
        for body in bodies
    )
    assert shape == [
        (7, ("alice", "carol"), 3),
        (7, ("bob",), 30),
        (7, ("bob",), 100),
        (7, ("dan",), 2),
        (30, ("bob",), 2),
    ]
    assert sorted(listed(bodies)) == sorted(bobs + dans + apps + later)


def test_a_batch_never_splits_a_recipients_group(committed: Store, now: datetime) -> None:
    engine = committed.engine
    for user in ("bob", "dan", "eve"):
        member(engine, "acme", user, now=now)
    soon = now + timedelta(days=3)
    add_tokens(engine, 30, expires_at=soon, user="bob", created_at=now)
    add_tokens(engine, 30, expires_at=soon, user="dan", created_at=now)
    add_tokens(engine, 250, expires_at=soon, user="eve", created_at=now)

    # Batches of 40 would cut dan's tokens in two, and 120 would cut eve's at 120: each batch
    # ends before a recipient's group instead, or at a multiple of 100 within one.
    result = remind(committed, now, batch=120)

    assert result.reminded == 310
    sizes = sorted(
        (body["recipients"][0]["user_id"], len(body["tokens"])) for body in expiring(committed)
    )
    assert sizes == [("bob", 30), ("dan", 30), ("eve", 50), ("eve", 100), ("eve", 100)]


def test_dead_tokens_get_no_reminder(committed: Store, now: datetime) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    revoked = add_tokens(engine, 1, expires_at=now + timedelta(days=5), created_at=now)[0]
    with db.transaction(engine) as session:
        revoke_token(session, token_id=revoked, reason="deleted", source="test", now=now)
    add_tokens(engine, 1, expires_at=now - timedelta(days=1), created_at=now - timedelta(days=9))
    assert remind(committed, now).reminded == 0


def test_two_reminder_runs_at_once_one_works_the_other_returns(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    add_tokens(engine, 3, expires_at=now + timedelta(days=5), created_at=now)
    inside = threading.Event()
    release = threading.Event()
    import tokenwarden.worker.domain.expiry.reminders

    original = tokenwarden.worker.domain.expiry.reminders.remind_tokens

    def slow_batch(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        release.wait(timeout=10)
        return original(*args, **kwargs)

    monkeypatch.setattr(tokenwarden.worker.domain.expiry.reminders, "remind_tokens", slow_batch)
    results: list[ReminderResult] = []
    first = threading.Thread(target=lambda: results.append(remind(committed, now)), daemon=True)
    first.start()
    assert inside.wait(timeout=10)
    started = time.monotonic()
    monkeypatch.setattr(tokenwarden.worker.domain.expiry.reminders, "remind_tokens", original)
    second = remind(committed, now)
    elapsed = time.monotonic() - started
    first_still_held = first.is_alive()
    release.set()
    first.join(timeout=20)

    assert (second.ran, second.reminded) == (False, 0)
    assert first_still_held, "the second run waited for the first"
    assert elapsed < 5  # a second run that waited for the first would wait out its 10 s hold
    assert (results[0].ran, results[0].reminded, results[0].notices) == (True, 3, 1)
    assert len(expiring(committed)) == 1


def test_a_reminder_run_cut_by_its_budget_resumes(committed: Store, now: datetime) -> None:
    engine = committed.engine
    for user in ("bob", "dan", "eve"):
        member(engine, "acme", user, now=now)
    for user in ("bob", "dan", "eve"):
        add_tokens(engine, 2, expires_at=now + timedelta(days=5), user=user, created_at=now)
    runs = [send_reminders(engine, now=now, days=DAYS, batch=2, budget_s=0) for _ in range(4)]
    assert [r.reminded for r in runs] == [2, 2, 2, 0]
    assert [r.finished for r in runs][-1] is True
    assert len(expiring(committed)) == 3


def test_many_recipients_each_get_one_notice_across_transactions(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    users = [f"user{index:02}" for index in range(60)]
    expected: dict[str, list[str]] = {}
    for user in users:
        member(engine, "acme", user, now=now)
        expected[user] = add_tokens(
            engine, 3, expires_at=now + timedelta(days=5), user=user, created_at=now
        )

    result = remind(committed, now)

    # More recipients than one transaction serves: the run goes on in the next ones.
    assert result.transactions > 2
    assert (result.reminded, result.notices) == (180, 60)
    by_user = {body["recipients"][0]["user_id"]: body for body in expiring(committed)}
    assert {user: sorted(listed([body])) for user, body in by_user.items()} == {
        user: sorted(tokens) for user, tokens in expected.items()
    }


def test_a_recipient_split_across_two_reads_still_gets_one_notice(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tokenwarden.worker.domain.expiry.reminders

    engine = committed.engine
    for user in ("bob", "dan"):
        member(engine, "acme", user, now=now)
    bobs = add_tokens(engine, 4, expires_at=now + timedelta(days=5), user="bob", created_at=now)
    dans = add_tokens(engine, 4, expires_at=now + timedelta(days=5), user="dan", created_at=now)
    # Reads of 6 due tokens: the first read ends inside dan's tokens.
    monkeypatch.setattr(tokenwarden.worker.domain.expiry.reminders, "DUE_PER_READ", 6)

    result = remind(committed, now)

    assert (result.reminded, result.notices) == (8, 2)
    by_user = {
        body["recipients"][0]["user_id"]: sorted(listed([body])) for body in expiring(committed)
    }
    assert by_user == {"bob": sorted(bobs), "dan": sorted(dans)}
