"""The expiry sweep on every store: batches, concurrency, the run lock, budgets, notices, retention.

The sweep commits one transaction per batch, so these tests write committed rows and empty
the store afterwards instead of using the rolled-back ``session`` fixture.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import celery
import pytest
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.orm import Session

import tokenwarden.config.celery
import tokenwarden.tasks.expiry
from tests.conftest import Store
from tokenwarden.worker.domain import clock, db, notices
from tokenwarden.worker.domain.expiry.lock import lock_key, single_run
from tokenwarden.worker.domain.expiry.results import SweepResult
from tokenwarden.worker.domain.expiry.sweep import run_sweep
from tokenwarden.worker.domain.expiry.table_walk import table_walk_pages
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import AuditEntry, Notice, Token, TokenKind, TokenReminder
from tokenwarden.worker.domain.revocation import revoke_token
from tokenwarden.worker.runtime import tasking
from tokenwarden.worker.runtime.celery_app import app


@pytest.fixture
def committed(store: Store) -> Iterator[Store]:
    """The store, empty before and after the test; what the test commits is removed."""
    store.truncate()
    try:
        yield store
    finally:
        clock.set_clock(None)
        store.truncate()


def member(engine: Engine, org: str, user: str, *, role: str = "user", now: datetime) -> None:
    with db.transaction(engine) as session:
        add_member(
            session,
            org_id=org,
            user_id=user,
            role=role,
            email=f"{user}@{org}.example",
            at=now - timedelta(days=400),
            now=now - timedelta(days=400),
            source="test",
        )


def add_tokens(
    engine: Engine,
    count: int,
    *,
    expires_at: datetime,
    org: str = "acme",
    user: str | None = "bob",
    app_id: str | None = None,
    created_at: datetime | None = None,
    revoked: tuple[datetime, str] | None = None,
) -> list[str]:
    """Insert ``count`` tokens directly (issuing refuses a past expiry); return their ids."""
    kind = TokenKind.APPLICATION if app_id else TokenKind.PERSONAL
    ids = [f"tok_{secrets.token_hex(8)}" for _ in range(count)]
    with db.transaction(engine) as session:
        session.execute(
            insert(Token),
            [
                {
                    "id": token_id,
                    "kind": kind.value,
                    "org_id": org,
                    "user_id": None if app_id else user,
                    "app_id": app_id,
                    "created_by": user or "alice",
                    "name": f"token {index}",
                    "token_hash": secrets.token_hex(32),
                    "last4": token_id[-4:],
                    "created_at": created_at or expires_at - timedelta(days=365),
                    "expires_at": expires_at,
                    "revoked_at": revoked[0] if revoked else None,
                    "revoke_reason": revoked[1] if revoked else None,
                }
                for index, token_id in enumerate(ids)
            ],
        )
    return ids


def states(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with Session(engine) as session:
        return {t.id: (t.state, t.revoke_reason) for t in session.scalars(select(Token))}


def expire_audits(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(
            session.scalars(
                select(AuditEntry.token_id).where(
                    AuditEntry.action == "expire",
                    AuditEntry.reason == "expired",
                    AuditEntry.source == "sweep",
                )
            )
        )


def notice_bodies(engine: Engine, kind: str) -> list[dict[str, Any]]:
    with Session(engine) as session:
        bodies = session.scalars(select(Notice.body).where(Notice.kind == kind).order_by(Notice.id))
        return [json.loads(body)["data"] for body in bodies]


def listed(bodies: list[dict[str, Any]]) -> list[str]:
    return [token["id"] for body in bodies for token in body["tokens"]]


def only_postgres(store: Store) -> None:
    if store.backend != "postgres":
        pytest.skip("row locks and advisory locks are Postgres behaviour")


# -- the sweep ------------------------------------------------------------------------------


def test_expired_tokens_are_marked_audited_and_their_owners_told(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    for user, role in (("alice", "admin"), ("carol", "admin"), ("bob", "user")):
        member(engine, "acme", user, role=role, now=now)
    past = now - timedelta(hours=1)
    bobs = add_tokens(engine, 3, expires_at=past, user="bob")
    apps = add_tokens(engine, 2, expires_at=past, app_id="ci", user="alice")
    at_now = add_tokens(engine, 1, expires_at=now, user="bob")  # expiry is exclusive
    live = add_tokens(engine, 2, expires_at=now + timedelta(days=1))
    leaked = add_tokens(engine, 1, expires_at=past, revoked=(past, "leaked"))

    published: list[str] = []
    result = run_sweep(engine, now=now, batch=1000, publish=published.extend)

    assert (result.ran, result.swept, result.finished) == (True, 6, True)
    found = states(engine)
    for token_id in bobs + apps + at_now:
        assert found[token_id] == ("expired", "expired")
    assert {found[t] for t in live} == {("active", None)}
    assert found[leaked[0]] == ("revoked", "leaked")
    assert sorted(expire_audits(engine)) == sorted(bobs + apps + at_now)

    # One notice per recipient: bob for his PATs, the org's admins for its application tokens.
    bodies = notice_bodies(engine, notices.EXPIRED)
    assert result.notices == len(bodies) == 2
    by_recipients = {tuple(r["user_id"] for r in body["recipients"]): body for body in bodies}
    assert set(by_recipients) == {("bob",), ("alice", "carol")}
    assert sorted(listed([by_recipients[("bob",)]])) == sorted(bobs + at_now)
    assert sorted(listed([by_recipients[("alice", "carol")]])) == sorted(apps)
    assert by_recipients[("bob",)]["recipients"] == [
        {"user_id": "bob", "email": "bob@acme.example"}
    ]
    token = by_recipients[("alice", "carol")]["tokens"][0]
    assert set(token) == {
        "id",
        "name",
        "kind",
        "org_id",
        "last4",
        "expires_at",
        "app_id",
        "created_by",
    }
    # Each notice is published once, after the transaction that wrote it committed.
    assert sorted(published) == sorted(_notice_ids(engine))

    # A second run finds nothing, and tells nobody twice.
    again = run_sweep(engine, now=now + timedelta(minutes=5), batch=1000)
    assert (again.ran, again.swept, again.notices, again.finished) == (True, 0, 0, True)
    assert len(notice_bodies(engine, notices.EXPIRED)) == 2


def _notice_ids(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(Notice.id)))


def test_equal_expiries_across_batch_edges_are_each_swept_once(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    same = now - timedelta(days=1)
    # Eleven tokens share one expiry: batches of 3 cut through them three times.
    tokens = add_tokens(engine, 11, expires_at=same)
    tokens += add_tokens(engine, 2, expires_at=same - timedelta(microseconds=1))
    tokens += add_tokens(engine, 2, expires_at=same + timedelta(microseconds=1))
    live = add_tokens(engine, 3, expires_at=now + timedelta(days=1))

    result = run_sweep(engine, now=now, batch=3)

    assert (result.swept, result.finished) == (15, True)
    audited = expire_audits(engine)
    assert sorted(audited) == sorted(tokens)  # each once: no duplicates, none skipped
    assert {states(engine)[t] for t in live} == {("active", None)}
    assert sorted(listed(notice_bodies(engine, notices.EXPIRED))) == sorted(tokens)
    # 15 tokens in batches of 3 is 5 full batches and an empty one, then the notices.
    assert result.transactions >= 6


def test_a_revocation_during_the_sweep_wins_and_is_not_swept(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    first = add_tokens(engine, 4, expires_at=now - timedelta(days=2))
    later = add_tokens(engine, 4, expires_at=now - timedelta(days=1))
    revoked: list[str] = []

    def revoke_one_between_batches(result: SweepResult) -> None:
        # Another connection, its own transaction: what a worker applying an event does. It
        # revokes one the first batch left (which ones it took depends on the table's layout).
        if result.phase == "expire" and not revoked:
            live = [t for t, (_, reason) in states(engine).items() if reason is None]
            assert live, "the first batch took them all"
            with db.transaction(engine) as session:
                assert revoke_token(
                    session, token_id=live[0], reason="deleted", source="test", now=now
                )
            revoked.append(live[0])

    result = run_sweep(engine, now=now, batch=4, on_progress=revoke_one_between_batches)

    (gone,) = revoked
    assert result.swept == 7
    found = states(engine)
    assert found[gone] == ("revoked", "deleted")
    assert {found[t] for t in first + later if t != gone} == {("expired", "expired")}
    assert gone not in expire_audits(engine)
    assert gone not in listed(notice_bodies(engine, notices.EXPIRED))


def test_postgres_sweep_skips_a_row_a_revocation_holds_instead_of_waiting(
    committed: Store, now: datetime
) -> None:
    only_postgres(committed)
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    tokens = add_tokens(engine, 5, expires_at=now - timedelta(days=1))
    held = sorted(tokens)[2]
    revoker = engine.connect()
    try:
        # A revocation in progress: its UPDATE holds the row lock until it commits.
        tx = revoker.begin()
        revoker.execute(
            text("UPDATE tokens SET revoked_at = :now, revoke_reason = 'deleted' WHERE id = :id"),
            {"now": now, "id": held},
        )
        outcome: list[SweepResult] = []
        sweeper = threading.Thread(
            target=lambda: outcome.append(run_sweep(engine, now=now, batch=2)), daemon=True
        )
        started = time.monotonic()
        sweeper.start()
        sweeper.join(timeout=10)
        # The sweep finished while the revocation still held its row: it skipped it.
        assert not sweeper.is_alive(), "the sweep waited for the revocation's row lock"
        assert time.monotonic() - started < 5
        assert outcome[0].swept == 4
        tx.commit()
    finally:
        revoker.close()
    found = states(engine)
    assert found[held] == ("revoked", "deleted")
    assert held not in expire_audits(engine)
    assert run_sweep(engine, now=now, batch=2).swept == 0


def test_postgres_revocation_does_not_wait_for_the_whole_sweep(
    committed: Store, now: datetime
) -> None:
    only_postgres(committed)
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    add_tokens(engine, 30, expires_at=now - timedelta(days=1))
    live = add_tokens(engine, 1, expires_at=now + timedelta(days=1))[0]
    waits: list[float] = []

    def revoke_while_sweeping(result: SweepResult) -> None:
        # Between two batches the sweep holds no row lock: a revocation goes straight through.
        if result.phase == "expire" and not waits:
            with engine.connect() as connection:
                # LOCAL: the setting ends with this transaction, not with the pooled connection.
                connection.execute(text("SET LOCAL lock_timeout = '1s'"))
                started = time.monotonic()
                connection.execute(
                    text(
                        "UPDATE tokens SET revoked_at = now(), revoke_reason = 'deleted' "
                        "WHERE id = :id AND revoked_at IS NULL"
                    ),
                    {"id": live},
                )
                connection.commit()
                waits.append(time.monotonic() - started)

    result = run_sweep(engine, now=now, batch=10, on_progress=revoke_while_sweeping)

    assert result.swept == 30
    assert waits  # went through: with the lock_timeout above, waiting on a lock is an error
    assert states(engine)[live] == ("revoked", "deleted")


def test_two_sweeps_started_at_once_one_works_the_other_returns(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    tokens = add_tokens(engine, 12, expires_at=now - timedelta(days=1))
    first_batch = threading.Event()
    second_done = threading.Event()
    results: dict[str, SweepResult] = {}

    def hold(result: SweepResult) -> None:
        first_batch.set()
        second_done.wait(timeout=10)

    def first() -> None:
        results["first"] = run_sweep(engine, now=now, batch=5, on_progress=hold)

    worker = threading.Thread(target=first, daemon=True)
    worker.start()
    assert first_batch.wait(timeout=10)
    started = time.monotonic()
    results["second"] = run_sweep(engine, now=now, batch=5)
    elapsed = time.monotonic() - started
    first_still_held = worker.is_alive()
    second_done.set()
    worker.join(timeout=20)

    assert results["second"].ran is False
    assert (results["second"].swept, results["second"].transactions) == (0, 0)
    assert first_still_held, "the second sweep waited for the first"
    assert elapsed < 5, "the second sweep waited for the first"  # which holds its batch 10 s
    assert (results["first"].ran, results["first"].swept) == (True, 12)
    assert sorted(expire_audits(engine)) == sorted(tokens)
    # The lock is released at the end: the next run goes ahead.
    assert run_sweep(engine, now=now, batch=5).ran is True


def test_the_lock_is_released_when_a_run_fails(committed: Store, now: datetime) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    add_tokens(engine, 3, expires_at=now - timedelta(days=1))

    def explode(result: SweepResult) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_sweep(engine, now=now, batch=2, on_progress=explode)
    resumed = run_sweep(engine, now=now, batch=2)
    assert (resumed.ran, resumed.swept) == (True, 1)  # the first batch had committed


def test_the_sqlite_lock_dies_with_its_process(committed: Store, tmp_path: Path) -> None:
    if committed.backend != "sqlite":
        pytest.skip("Postgres ends a dead session's advisory lock itself")
    database = committed.engine.url.database
    assert database is not None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
            f"{database}.sweep.lock",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with single_run(committed.engine, "sweep") as lock:
            assert lock is None
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        with single_run(committed.engine, "sweep") as lock:
            assert lock is not None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_postgres_lock_is_a_session_advisory_lock(committed: Store) -> None:
    only_postgres(committed)
    engine = committed.engine

    def holders() -> int:
        key = lock_key("sweep") & 0xFFFFFFFFFFFFFFFF
        with engine.connect() as connection:
            return int(
                connection.scalar(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND database = (SELECT oid FROM pg_database"
                        " WHERE datname = current_database())"
                        " AND classid::bigint = :high AND objid::bigint = :low AND objsubid = 1"
                    ),
                    {"high": key >> 32, "low": key & 0xFFFFFFFF},
                )
                or 0
            )

    with single_run(engine, "sweep") as lock:
        assert lock is not None
        assert lock.held()
        assert holders() == 1
        with single_run(engine, "sweep") as second:
            assert second is None
    assert holders() == 0


def test_a_run_cut_by_its_budget_resumes_on_the_next(committed: Store, now: datetime) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    tokens = add_tokens(engine, 25, expires_at=now - timedelta(days=1))

    # A budget of zero: one transaction per phase, then the run stops. (How many tokens each
    # takes on Postgres depends on how the table's pages hold them: at most a batch.)
    runs: list[SweepResult] = []
    while not (runs and runs[-1].finished) and len(runs) < 10:
        runs.append(run_sweep(engine, now=now, batch=10, budget_s=0))

    assert len(runs) >= 3
    assert all(r.swept <= 10 for r in runs)
    assert sum(r.swept for r in runs) == 25
    assert [r.finished for r in runs] == [False] * (len(runs) - 1) + [True]
    assert sorted(expire_audits(engine)) == sorted(tokens)
    # Each run wrote the notices of what it swept; together they list every token once.
    assert sorted(listed(notice_bodies(engine, notices.EXPIRED))) == sorted(tokens)
    assert run_sweep(engine, now=now, batch=10).swept == 0


def test_a_run_cut_by_its_budget_marks_tokens_even_when_they_lie_late_in_the_table(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    # Pages of live tokens first, the expired ones after them: on Postgres the backlog is
    # swept along the table, and each run starts that walk at its first page.
    add_tokens(engine, 400, expires_at=now + timedelta(days=30))
    tokens = add_tokens(engine, 110, expires_at=now - timedelta(days=1))

    runs: list[SweepResult] = []
    while not (runs and runs[-1].finished) and len(runs) < 10:
        runs.append(run_sweep(engine, now=now, batch=20, budget_s=0))

    assert runs[-1].finished
    assert all(r.swept > 0 for r in runs)
    assert sum(r.swept for r in runs) == 110
    assert sorted(expire_audits(engine)) == sorted(tokens)
    assert sorted(listed(notice_bodies(engine, notices.EXPIRED))) == sorted(tokens)


def _mixed_backlog(engine: Engine, now: datetime, *, rounds: int) -> tuple[list[str], list[str]]:
    """Expired, live and already revoked tokens interleaved over many pages: (due, others)."""
    due: list[str] = []
    others: list[str] = []
    past = now - timedelta(days=3)
    for index in range(rounds):
        due += add_tokens(engine, 25, expires_at=past - timedelta(minutes=index))
        others += add_tokens(engine, 40, expires_at=now + timedelta(days=index + 1))
        due += add_tokens(engine, 5, expires_at=past, app_id="ci", user="alice")
        others += add_tokens(engine, 3, expires_at=past, revoked=(past, "leaked"))
    return due, others


def test_postgres_sweeps_a_large_backlog_along_the_table_once_each_in_bounded_batches(
    committed: Store, now: datetime
) -> None:
    only_postgres(committed)
    engine = committed.engine
    for user, role in (("alice", "admin"), ("bob", "user")):
        member(engine, "acme", user, role=role, now=now)
    due, others = _mixed_backlog(engine, now, rounds=40)
    assert table_walk_pages(engine, now=now, batch=50) is not None
    before = states(engine)
    # The last expired token in the table, revoked while the walk is at the start.
    revoked_ahead = due[-6]
    steps: list[int] = []

    def watch(result: SweepResult) -> None:
        if result.phase != "expire":
            return
        steps.append(result.swept - sum(steps))
        if len(steps) == 1:
            with db.transaction(engine) as session:
                assert revoke_token(
                    session, token_id=revoked_ahead, reason="deleted", source="test", now=now
                )

    result = run_sweep(engine, now=now, batch=50, on_progress=watch)

    swept = [t for t in due if t != revoked_ahead]
    assert (result.swept, result.finished) == (len(swept), True)
    assert max(steps) == 50
    assert len(steps) >= len(swept) // 50
    found = states(engine)
    assert {found[t] for t in swept} == {("expired", "expired")}
    assert found[revoked_ahead] == ("revoked", "deleted")
    assert {t: found[t] for t in others} == {t: before[t] for t in others}
    audited = expire_audits(engine)
    assert sorted(audited) == sorted(swept)  # each once
    assert sorted(listed(notice_bodies(engine, notices.EXPIRED))) == sorted(swept)
    assert run_sweep(engine, now=now, batch=50).swept == 0


def test_postgres_walks_the_index_for_a_few_expired_tokens_and_the_table_for_a_backlog(
    committed: Store, now: datetime
) -> None:
    only_postgres(committed)
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    add_tokens(engine, 1000, expires_at=now + timedelta(days=30))
    add_tokens(engine, 3, expires_at=now - timedelta(days=1))
    # A few newly expired tokens in a large table: along the partial index.
    assert table_walk_pages(engine, now=now, batch=10) is None

    add_tokens(engine, 400, expires_at=now - timedelta(days=1))
    backlog = table_walk_pages(engine, now=now, batch=10)
    assert backlog is not None
    pages, counted = backlog
    # The count stops where the choice is made: two due tokens a page.
    assert counted == 2 * pages < 403
    # More than one batch is due, but not two per page: along the index still.
    assert table_walk_pages(engine, now=now, batch=500) is None


def test_a_recipient_with_many_tokens_gets_notices_of_up_to_100(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    tokens = add_tokens(engine, 230, expires_at=now - timedelta(days=1))

    run_sweep(engine, now=now, batch=1000)

    bodies = notice_bodies(engine, notices.EXPIRED)
    assert sorted(len(body["tokens"]) for body in bodies) == [30, 100, 100]
    assert sorted(listed(bodies)) == sorted(tokens)


def test_many_recipients_are_told_over_several_short_transactions(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    tokens: list[str] = []
    for index in range(70):
        member(engine, "acme", f"user{index:02}", now=now)
        tokens += add_tokens(engine, 2, expires_at=now - timedelta(days=1), user=f"user{index:02}")

    result = run_sweep(engine, now=now, batch=1000)

    assert result.swept == 140
    bodies = notice_bodies(engine, notices.EXPIRED)
    # Each token in exactly one notice, each notice for one recipient, and the notices
    # spread over more than one transaction.
    assert sorted(listed(bodies)) == sorted(tokens)
    assert all(
        {token["user_id"] for token in body["tokens"]} == {body["recipients"][0]["user_id"]}
        for body in bodies
    )
    assert result.transactions >= 1 + 140 // 50


def test_retention_deletes_long_dead_tokens_in_batches_and_keeps_the_audit(
    committed: Store, now: datetime
) -> None:
    engine = committed.engine
    member(engine, "acme", "bob", now=now)
    old = now - timedelta(days=400)
    ancient = add_tokens(engine, 7, expires_at=old, revoked=(old, "expired"))
    ancient += add_tokens(engine, 3, expires_at=now + timedelta(days=9), revoked=(old, "leaked"))
    recent = add_tokens(engine, 2, expires_at=now, revoked=(now - timedelta(days=10), "deleted"))
    live = add_tokens(engine, 4, expires_at=now + timedelta(days=30))
    with db.transaction(engine) as session:
        session.execute(
            insert(AuditEntry).values(
                at=old, action="revoke", reason="leaked", source="test", token_id=ancient[-1]
            )
        )
        session.execute(
            insert(TokenReminder),
            [
                {"token_id": ancient[0], "days": 7, "sent_at": old},
                {"token_id": live[0], "days": 30, "sent_at": now},
            ],
        )

    first = run_sweep(engine, now=now, batch=3, retention_days=365)

    assert (first.deleted, first.finished) == (10, True)
    assert set(states(engine)) == set(recent + live)
    with Session(engine) as session:
        deleted = session.scalars(
            select(AuditEntry.token_id).where(
                AuditEntry.action == "delete", AuditEntry.reason == "retention"
            )
        ).all()
        assert sorted(t or "" for t in deleted) == sorted(ancient)
        # What was audited before stays.
        assert session.scalar(select(AuditEntry.id).where(AuditEntry.token_id == ancient[-1]))
        assert session.scalars(select(TokenReminder.token_id)).all() == [live[0]]

    # A pass starts at most once a day; the next day's finds the newly old tokens.
    later = add_tokens(engine, 2, expires_at=old, revoked=(old, "expired"))
    assert run_sweep(engine, now=now + timedelta(hours=1), batch=3, retention_days=365).deleted == 0
    assert run_sweep(engine, now=now + timedelta(days=1), batch=3, retention_days=365).deleted == 2
    assert not set(later) & set(states(engine))


def test_retention_is_off_by_default(committed: Store, now: datetime) -> None:
    engine = committed.engine
    old = now - timedelta(days=4000)
    kept = add_tokens(engine, 2, expires_at=old, revoked=(old, "expired"))
    assert run_sweep(engine, now=now, batch=10).deleted == 0
    assert set(states(engine)) == set(kept)


def test_a_retention_pass_cut_by_the_budget_resumes(committed: Store, now: datetime) -> None:
    engine = committed.engine
    old = now - timedelta(days=400)
    dead = add_tokens(engine, 9, expires_at=old, revoked=(old, "expired"))
    runs = [run_sweep(engine, now=now, batch=3, budget_s=0, retention_days=30) for _ in range(4)]
    assert sum(r.deleted for r in runs) == 9
    assert runs[-1].finished
    assert not set(dead) & set(states(engine))


# -- the scheduled task ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [tokenwarden.config.celery.SWEEP_EXPIRED, tokenwarden.config.celery.SEND_REMINDERS]
)
def test_expiry_tasks_are_registered_with_options_celery_knows(name: str) -> None:
    task = app.tasks[name]
    assert task.name == name
    assert isinstance(task, tasking.CountedTask)
    assert task.ignore_result is True
    assert task.expires is not None
    # The next scheduled run does what a failed one left: no retries, even of brief outages.
    assert not task.autoretry_for
    known = {key for klass in celery.Task.__mro__ for key in vars(klass)}
    known |= {attribute for attribute, _setting in celery.Task.from_config}
    # Read from the task's options by celery.app.autoretry, not a Task attribute.
    known.add("autoretry_for")
    options = {key for key in vars(type(task)) if not key.startswith("_")}
    assert options - known == set()


def test_the_schedule_runs_the_sweep_every_interval_and_reminders_daily() -> None:
    schedule = app.conf.beat_schedule
    sweep = schedule["sweep-expired"]
    assert sweep["task"] == tokenwarden.config.celery.SWEEP_EXPIRED
    assert sweep["schedule"] == timedelta(seconds=300)
    remind = schedule["send-reminders"]
    assert remind["task"] == tokenwarden.config.celery.SEND_REMINDERS
    assert remind["schedule"].remaining_estimate(datetime.now(remind["schedule"].tz)) <= timedelta(
        days=1
    )
    assert tokenwarden.tasks.expiry.sweep_budget_s() < app.conf.task_soft_time_limit


def test_the_sweep_task_takes_now_from_the_clock(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = committed.engine
    monkeypatch.setattr(tasking, "store_engine", lambda: engine)
    monkeypatch.setattr(tokenwarden.tasks.expiry, "store_engine", lambda: engine)
    published: list[list[str]] = []
    monkeypatch.setattr(
        tokenwarden.tasks.expiry, "_publish", lambda ids: published.append(list(ids))
    )
    member(engine, "acme", "bob", now=now)
    token = add_tokens(engine, 1, expires_at=now + timedelta(days=3))[0]

    clock.set_clock(lambda: now + timedelta(days=2))
    assert tokenwarden.tasks.expiry.sweep_expired.run()["swept"] == 0
    clock.set_clock(lambda: now + timedelta(days=3))
    outcome = tokenwarden.tasks.expiry.sweep_expired.run()

    assert (outcome["ran"], outcome["swept"], outcome["notices"]) == (True, 1, 1)
    assert states(engine)[token] == ("expired", "expired")
    with Session(engine) as session:
        revoked_at = session.scalar(select(Token.revoked_at).where(Token.id == token))
        count = session.scalar(select(func.count()).select_from(Notice))
    assert revoked_at == now + timedelta(days=3)
    assert [len(ids) for ids in published] == [1]
    assert count == 1


def test_retention_days_setting_is_off_unless_a_positive_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenwarden.config.settings import ConfigError, load_settings

    monkeypatch.delenv("TOKENWARDEN_RETENTION_DAYS", raising=False)
    assert load_settings().retention_days is None
    for value, expected in (("", None), (" ", None), ("365", 365)):
        monkeypatch.setenv("TOKENWARDEN_RETENTION_DAYS", value)
        assert load_settings().retention_days == expected
    for value in ("0", "-3", "a year", "1.5"):
        monkeypatch.setenv("TOKENWARDEN_RETENTION_DAYS", value)
        with pytest.raises(ConfigError, match="TOKENWARDEN_RETENTION_DAYS"):
            load_settings()
