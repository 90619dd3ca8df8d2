"""Every event delivered three times, in shuffled order: the same end state as once, in order.

The live run (Postgres + RabbitMQ) posts each event three times in random batches and random
order, and puts each id on the queue twice more straight from the test, also shuffled, so
the worker sees every event at least three times and mostly out of order. A reference run
applies the same events once each, in time order, through the very function the worker calls
(``handlers.apply_pending``), on a database of its own. Both are judged by the oracle, and
compared with each other: tokens, memberships, and audit counts. Only the ``stale`` rows
(an older event arriving after a newer one) and the ``member`` rows they replace may differ,
since those record the order of arrival, not its outcome.

A small universe makes many events touch the same membership, so that the ordering rules
(``last_event_at``, ``active_since``) decide most outcomes.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tests.conftest import fresh_postgres_database, service_url
from tests.reliability.conftest import SeededRandom
from tests.reliability.evidence import Evidence
from tests.reliability.figures import Figures
from tests.reliability.harness import WebhookReceiver, chaos_stack
from tests.reliability.workload import (
    ADDED,
    DEACTIVATED,
    LEAK,
    REMOVED,
    REVOKE,
    ROLE_CHANGED,
    Oracle,
    Universe,
    event_time,
    judge,
    make_events,
    notices_wired,
)
from tokenwarden.producer.intake import validate
from tokenwarden.worker.domain import db, handlers, inbox
from tokenwarden.worker.domain.deactivation import deactivate_user
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import AuditEntry, Membership, Token

EVENTS = 1_200
COPIES = 3
# Membership churn mostly, so that many events about one membership arrive out of order; few
# enough revoking events that a good part of the tokens stays live.
MIX = {
    ADDED: 0.44,
    ROLE_CHANGED: 0.40,
    REMOVED: 0.08,
    DEACTIVATED: 0.01,
    LEAK: 0.04,
    REVOKE: 0.03,
}


def _apply_in_order(engine: Engine, events: list[dict[str, Any]]) -> None:
    """The reference: each event once, in time order, one transaction each."""
    with db.transaction(engine) as session:
        inbox.store_events(session, validate(events), now=datetime.now(UTC))
    for event in sorted(events, key=event_time):
        with db.transaction(engine) as session:
            outcome = handlers.apply_pending(
                session, [event["id"]], now=datetime.now(UTC), retryable=lambda _: False
            )
        assert outcome.done == [event["id"]], (event, outcome)


def _snapshot(session: Session, universe: Universe) -> dict[str, Any]:
    """What must not depend on the order of arrival."""
    tokens = {
        row.id: row.revoked_at is not None
        for row in session.execute(
            select(Token.id, Token.revoked_at).where(Token.id.in_([t.id for t in universe.tokens]))
        )
    }
    members = {
        (m.org_id, m.user_id): (m.active, m.role if m.active else None, m.last_event_at)
        for m in session.scalars(
            select(Membership).where(Membership.org_id.like(f"{universe.prefix}-%"))
        )
    }
    audit = Counter(
        {
            (action, reason): count
            for action, reason, count in session.execute(
                select(AuditEntry.action, AuditEntry.reason, func.count())
                .where(AuditEntry.action.in_(["revoke", "refuse", "create"]))
                .where(
                    (AuditEntry.event_id.like(f"{universe.prefix}-%"))
                    | (AuditEntry.source == "seed")
                )
                .group_by(AuditEntry.action, AuditEntry.reason)
            )
        }
    )
    revokes = Counter(
        session.scalars(
            select(AuditEntry.token_id).where(
                AuditEntry.action == "revoke", AuditEntry.token_id.in_(list(tokens))
            )
        )
    )
    order_rows = Counter(
        {
            (action, reason): count
            for action, reason, count in session.execute(
                select(AuditEntry.action, AuditEntry.reason, func.count())
                .where(
                    AuditEntry.action.in_(["stale", "member"]),
                    AuditEntry.event_id.like(f"{universe.prefix}-%"),
                )
                .group_by(AuditEntry.action, AuditEntry.reason)
            )
        }
    )
    return {
        "tokens": tokens,
        "members": members,
        "audit": audit,
        "revokes": revokes,
        "order_rows": order_rows,
    }


def _stale(rows: Counter[tuple[str, str]]) -> int:
    return sum(count for (action, _), count in rows.items() if action == "stale")


def _revocations_total(audit: Counter[tuple[str, str]]) -> int:
    return sum(count for (action, _), count in audit.items() if action == "revoke")


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.rabbitmq
@pytest.mark.timeout(300)
def test_three_shuffled_deliveries_equal_one_in_order(
    tmp_path: Path, evidence: Evidence, rng: SeededRandom
) -> None:
    figures = Figures("redelivery[postgres-rabbitmq]", {"seed": rng.seed_value})
    wired = notices_wired()
    universe = Universe.build(rng, orgs=4, users=60, deactivatable=4)
    seed_rng = random.Random(rng.seed_value)
    with (
        fresh_postgres_database() as reference_url,
        fresh_postgres_database() as live_url,
        WebhookReceiver() as receiver,
        chaos_stack(
            tmp_path / "home",
            evidence=evidence,
            label="redelivery",
            database_url=live_url,
            broker_url=service_url("rabbitmq"),
            webhook_url=receiver.url,
        ) as stack,
    ):
        reference = db.make_engine(reference_url)
        try:
            # The same universe in both stores: same ids, same texts, same times.
            with db.transaction(reference) as session:
                universe.seed(session, seed_rng, pat_ratio=1.0, aats=10)
            issued = list(universe.tokens)
            with stack.session() as session:
                _copy_seed(session, universe, reference)
            events = make_events(universe, rng, count=EVENTS, mix=MIX)
            evidence.add_tokens(t.text for t in issued)
            evidence.add_tokens(e["data"]["token"] for e in events if "token" in e["data"])
            oracle = Oracle.compute(universe, events)

            started = time.monotonic()
            _apply_in_order(reference, events)
            reference_s = time.monotonic() - started

            copies = [event for event in events for _ in range(COPIES)]
            rng.shuffle(copies)
            accepted: set[str] = set()
            posts = 0
            while copies:
                size = rng.randint(1, 60)
                part, copies = copies[:size], copies[size:]
                accepted.update(stack.send(*part))
                posts += 1
            ids = [event["id"] for event in events for _ in range(COPIES - 1)]
            rng.shuffle(ids)
            raw = 0
            with stack.connection() as connection:
                while ids:
                    size = rng.randint(1, 100)
                    chunk, ids = ids[:size], ids[size:]
                    stack.publish_ids(chunk, connection=connection)
                    raw += 1
            counts = stack.wait_settled(len(events), timeout=180)
            if wired:
                stack.wait_for(stack.notices_settled, timeout=120, message="notices delivered")

            with stack.session() as session:
                verdict = judge(session, universe, oracle, accepted=accepted, check_notices=wired)
                live = _snapshot(session, universe)
            with db.transaction(reference) as session:
                in_order = judge(session, universe, oracle, accepted=oracle.event_ids)
                once = _snapshot(session, universe)
        finally:
            reference.dispose()

        differences = []
        for key in ("tokens", "members", "revokes"):
            if live[key] != once[key]:
                changed = [
                    k
                    for k in set(live[key]) | set(once[key])
                    if live[key].get(k) != once[key].get(k)
                ]
                differences.append(f"{key}: {len(changed)} differ, e.g. {changed[:5]}")
        if _revocations_total(live["audit"]) != _revocations_total(once["audit"]):
            differences.append(f"revoke rows: {live['audit']} vs {once['audit']}")
        refusals = ("refuse", "unknown_token")
        if live["audit"][refusals] != once["audit"][refusals]:
            differences.append(f"refusals: {live['audit'][refusals]} vs {once['audit'][refusals]}")

        figures.set(**verdict.figures)
        figures.set(
            copies_per_event=COPIES,
            api_posts=posts,
            raw_messages=raw,
            deliveries_taken=stack.received().get("process_events", 0),
            inbox=counts,
            reference_problems=len(in_order.problems),
            differences_from_in_order=len(differences),
            stale_rows_shuffled=_stale(live["order_rows"]),
            stale_rows_in_order=_stale(once["order_rows"]),
            reference_s=round(reference_s, 1),
        )
        figures.publish(evidence.root)
        in_order.assert_clean()
        verdict.assert_clean()
        assert not differences, differences


def _copy_seed(session: Session, universe: Universe, source: Engine) -> None:
    """Copy the seeded memberships and tokens (and their audit rows) from ``source``."""
    with source.connect() as connection:
        for model in (Membership, Token, AuditEntry):
            table = model.__table__
            rows = [dict(row._mapping) for row in connection.execute(select(table))]
            if model is AuditEntry:  # new ids, so that the sequence stays ahead of them
                for row in rows:
                    del row["id"]
            if rows:
                session.execute(table.insert(), rows)  # type: ignore[attr-defined]


# --- An ordering gap this suite found: user.deactivated cannot see a membership that does not
# exist yet, so an older membership.added applied after it made the user active again. The
# per-user deactivation record closes it.


@pytest.mark.chaos
def test_a_late_older_join_does_not_undo_a_deactivation(session: Session) -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    joined, deactivated = now - timedelta(hours=2), now - timedelta(hours=1)
    # Applied in the wrong order: the deactivation first, then the older join.
    deactivate_user(
        session, user_id="u-late", at=deactivated, now=now, source="test", event_id="e2"
    )
    add_member(
        session,
        org_id="o-late",
        user_id="u-late",
        role="user",
        email=None,
        at=joined,
        now=now,
        source="test",
        event_id="e1",
    )
    member = session.get(Membership, ("o-late", "u-late"))
    # In time order the join comes first and the deactivation ends it.
    assert member is None or not member.active
