"""End to end: a real API, worker and scheduler on a real broker and database.

Runs on the embedded default (SQLite and the file-backed broker) everywhere, and on Postgres
with RabbitMQ and with Redis when those services are named (see conftest).
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from kombu.connection import Connection
from sqlalchemy import func, select, text

from tests.stack import KEY, LiveStack, event, run_live
from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain.models import (
    AuditEntry,
    DeadLetter,
    EventStatus,
    InboxEvent,
    TokenKind,
)

pytestmark = pytest.mark.slow

STACKS = [
    "embedded",
    pytest.param("rabbitmq", marks=[pytest.mark.postgres, pytest.mark.rabbitmq]),
    pytest.param("redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
]


@pytest.fixture(scope="module", params=STACKS)
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    yield from run_live(request.param, tmp_path_factory.mktemp(f"live-{request.param}"))


def ids() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"org-{suffix}", f"user-{suffix}"


def test_leaver_loses_personal_tokens_and_keeps_application_tokens(live: LiveStack) -> None:
    org, user = ids()
    other_org = org + "-other"
    live.member(org, user)
    live.member(other_org, user)
    pat = live.token(TokenKind.PERSONAL, org, user)
    aat = live.token(TokenKind.APPLICATION, org, "deployer", created_by=user)
    other_pat = live.token(TokenKind.PERSONAL, other_org, user)
    assert live.verify(pat.token).usable

    live.send(event("membership.removed", {"org_id": org, "user_id": user}))

    live.wait_for(
        lambda: live.verify(pat.token).reason == "revoked",
        timeout=10,
        message="the leaver's PAT to be revoked",
    )
    assert live.verify(aat.token).usable
    assert live.verify(other_pat.token).usable
    with live.session() as session:
        revoke = session.scalars(
            select(AuditEntry).where(AuditEntry.token_id == pat.id, AuditEntry.action == "revoke")
        ).one()
    assert (revoke.reason, revoke.source) == ("member_removed", "test://e2e")
    assert revoke.event_id is not None


def test_role_change_is_seen_by_verify(live: LiveStack) -> None:
    org, user = ids()
    live.member(org, user, role="user")
    pat = live.token(TokenKind.PERSONAL, org, user)
    live.send(event("membership.role_changed", {"org_id": org, "user_id": user, "role": "admin"}))
    live.wait_for(
        lambda: live.verify(pat.token).principal.get("role") == "admin",
        timeout=10,
        message="the new role",
    )


def test_late_removal_spares_the_token_issued_after_rejoining(live: LiveStack) -> None:
    org, user = ids()
    now = datetime.now(UTC)
    live.member(org, user, at=now - timedelta(hours=2))
    old_pat = live.token(TokenKind.PERSONAL, org, user, at=now - timedelta(minutes=90))
    left_at = now - timedelta(minutes=60)
    live.member(org, user, at=now - timedelta(minutes=30))  # the re-join, applied first
    new_pat = live.token(TokenKind.PERSONAL, org, user, at=now - timedelta(minutes=10))

    [late] = live.send(event("membership.removed", {"org_id": org, "user_id": user}, at=left_at))

    live.wait_for(lambda: _status(live, late) == EventStatus.DONE, message="the late event")
    assert live.verify(new_pat.token).usable
    assert live.verify(old_pat.token).reason == "revoked"
    with live.session() as session:
        stale = session.scalars(
            select(AuditEntry).where(AuditEntry.event_id == late, AuditEntry.action == "stale")
        ).all()
    assert len(stale) == 1


def test_the_same_event_three_times_revokes_once(live: LiveStack) -> None:
    org, user = ids()
    live.member(org, user)
    pat = live.token(TokenKind.PERSONAL, org, user)
    removal = event("membership.removed", {"org_id": org, "user_id": user})
    for _ in range(3):
        assert live.send(removal) == [removal["id"]]
    live.wait_for(lambda: _status(live, removal["id"]) == EventStatus.DONE, message="done")
    assert live.post([removal, removal]).status_code == 202
    with live.session() as session:
        audits = session.scalar(
            select(func.count())
            .select_from(AuditEntry)
            .where(AuditEntry.token_id == pat.id, AuditEntry.action == "revoke")
        )
        attempts = session.scalar(select(InboxEvent.attempts).where(InboxEvent.id == removal["id"]))
    assert audits == 1
    assert attempts == 1


def test_unusable_messages_are_dead_lettered_and_the_worker_carries_on(live: LiveStack) -> None:
    org, user = ids()
    live.member(org, user)
    pat = live.token(TokenKind.PERSONAL, org, user)
    # A raw message goes nowhere until a worker has declared the queue: wait for one to
    # apply an event first.
    other_org, other_user = ids()
    joining = {"org_id": other_org, "user_id": other_user, "role": "user"}
    [joined] = live.send(event("membership.added", joining))
    live.wait_for(lambda: _status(live, joined) == EventStatus.DONE, message="a worker")
    missing = f"evt-missing-{uuid.uuid4().hex[:8]}"
    _publish_raw(live, json.dumps([[[missing]], {}, {}]), task="tokenwarden.process_events")
    _publish_raw(live, "{not json", task="tokenwarden.process_events")
    live.send(event("membership.removed", {"org_id": org, "user_id": user}))
    live.wait_for(lambda: live.verify(pat.token).reason == "revoked", message="the good event")

    def both_dead_lettered() -> bool:
        with live.session() as session:
            reasons = list(session.scalars(select(DeadLetter.reason)))
            named = session.scalar(
                select(func.count()).select_from(DeadLetter).where(DeadLetter.event_id == missing)
            )
        undecodable = any("json" in r.lower() or "decode" in r.lower() for r in reasons)
        return bool(named) and undecodable

    # Two worker processes share the queue: the good event may be applied before the
    # unusable messages ahead of it are recorded.
    live.wait_for(both_dead_lettered, message="both unusable messages dead-lettered")


def test_a_worker_killed_mid_event_loses_nothing(live: LiveStack) -> None:
    org, user = ids()
    live.member(org, user)
    pat = live.token(TokenKind.PERSONAL, org, user)
    # No scheduler while the lock is held: its re-drive messages would pile up behind it.
    live.kill("worker", signal.SIGKILL)
    live.kill("beat", signal.SIGTERM)
    removal = event("membership.removed", {"org_id": org, "user_id": user})
    live.send(removal)
    # Hold a lock the event needs, so the next worker takes the message and then blocks
    # inside the task; that is when it dies.
    with live.engine.connect() as blocker:
        blocker.begin()  # on SQLite this takes the write lock (BEGIN IMMEDIATE)
        if live.engine.dialect.name == "postgresql":
            blocker.execute(
                text("SELECT 1 FROM events WHERE id = :id FOR UPDATE"), {"id": removal["id"]}
            )
        live.start("worker")
        live.wait_for(lambda: _queue_empty(live), timeout=20, message="the worker to take it")
        live.kill("worker", signal.SIGKILL)
        blocker.rollback()
    assert live.verify(pat.token).usable  # nothing applied: the worker died mid-task
    live.start("worker", "beat")
    live.wait_for(
        lambda: live.verify(pat.token).reason == "revoked",
        timeout=30,
        message="the event to be applied after the restart",
    )
    assert _status(live, removal["id"]) == EventStatus.DONE


def _status(live: LiveStack, event_id: str) -> str | None:
    with live.session() as session:
        return session.scalar(select(InboxEvent.status).where(InboxEvent.id == event_id))


def _broker_url(live: LiveStack) -> str:
    return live.env.get("TOKENWARDEN_BROKER_URL") or "filesystem://localhost/"


def _connection(live: LiveStack) -> Connection:
    from tokenwarden.config.celery import transport_options

    settings = Settings(home=live.home, broker_url=live.env.get("TOKENWARDEN_BROKER_URL"))
    return Connection(  # type: ignore[no-untyped-call]
        _broker_url(live), transport_options=transport_options(settings)
    )


def _publish_raw(live: LiveStack, body: str, *, task: str) -> None:
    """Put a message straight on the queue, as a misbehaving producer would."""
    with _connection(live) as connection:
        producer = connection.Producer()
        producer.publish(
            body,
            routing_key=live.queue,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
            headers={
                "id": str(uuid.uuid4()),
                "task": task,
                "lang": "py",
                "argsrepr": "",
                "kwargsrepr": "",
                "retries": 0,
                "eta": None,
                "expires": None,
            },
            declare=[],
        )


def _queue_empty(live: LiveStack) -> bool:
    broker = _broker_url(live)
    if broker.startswith("redis://"):
        import redis

        # kombu keeps a Redis queue as a list named after it; gone when empty.
        return int(redis.Redis.from_url(broker).llen(live.queue)) == 0
    with _connection(live) as connection:
        channel = connection.channel()
        try:
            _, count, _ = channel.queue_declare(live.queue, passive=True)
        finally:
            channel.close()
    return int(count) == 0


def test_the_live_api_refuses_what_it_cannot_take(live: LiveStack) -> None:
    org, user = ids()
    good = event("membership.added", {"org_id": org, "user_id": user, "role": "user"})
    assert live.post(good, key=None).status_code == 401
    assert live.post(good, key="not-the-key").status_code == 401
    assert live.post({**good, "type": "membership.joined"}).status_code == 422
    assert live.post([good, {**good, "id": "other", "data": {}}]).status_code == 422
    too_big = {**good, "data": {**good["data"], "email": "x" * (1024 * 1024)}}
    assert live.post(too_big).status_code == 413
    wrong_type = httpx.post(
        f"{live.api_url}/v1/events",
        content=json.dumps(good),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
    )
    assert wrong_type.status_code == 415
    assert live.send(good) == [good["id"]]
    assert live.post({**good, "source": "elsewhere"}).status_code == 409
    live.wait_for(lambda: _status(live, good["id"]) == EventStatus.DONE, message="applied")
    with live.session() as session:
        stored = session.scalar(
            select(func.count())
            .select_from(InboxEvent)
            .where(InboxEvent.data["org_id"].as_string() == org)
        )
    assert stored == 1  # the refused requests stored nothing


def test_metrics_show_what_the_worker_did(live: LiveStack) -> None:
    org, user = ids()
    live.member(org, user)
    live.token(TokenKind.PERSONAL, org, user)
    [done] = live.send(event("membership.removed", {"org_id": org, "user_id": user}))
    live.wait_for(lambda: _status(live, done) == EventStatus.DONE, message="applied")
    text = httpx.get(f"{live.api_url}/metrics", timeout=10).text
    assert 'tokenwarden_revoked_tokens{reason="member_removed"}' in text
    assert 'tokenwarden_events{status="done",type="membership.removed"}' in text
    count = next(
        line
        for line in text.splitlines()
        if line.startswith("tokenwarden_recent_event_apply_seconds_count")
    )
    assert float(count.split()[-1]) >= 1
