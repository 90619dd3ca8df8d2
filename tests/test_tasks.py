"""The tasks and their plumbing: options, one transaction per run, log context, dead letters.

Tasks run here in this process (``task.run`` / ``task.apply``) against the real store and
really commit; each test empties the store afterwards. Queue behaviour needs a real worker
and is covered end to end elsewhere.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import celery
import pytest
import structlog
from celery import Celery
from prometheus_client import REGISTRY
from sqlalchemy import insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import tokenwarden.config.celery
import tokenwarden.tasks.events
from tests.conftest import Store
from tokenwarden.config.celery import PROCESS_EVENTS
from tokenwarden.config.logging import configure_logging
from tokenwarden.worker.domain import clock, db, deactivation, inbox, removals
from tokenwarden.worker.domain.events import parse_event
from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import (
    AuditEntry,
    DeadLetter,
    EventStatus,
    InboxEvent,
    Notice,
    Token,
    TokenKind,
)
from tokenwarden.worker.domain.tokens import generate
from tokenwarden.worker.runtime import publishing, redrive, signals, tasking
from tokenwarden.worker.runtime.batching import RUN_LIMIT
from tokenwarden.worker.runtime.celery_app import app
from tokenwarden.worker.runtime.publishing import CHUNK, PublishError
from tokenwarden.worker.runtime.tasking import DatabaseTask, TransientDatabaseError

probe_app = Celery("tokenwarden-probe", set_as_current=False)


@probe_app.task(base=DatabaseTask, bind=True, name="probe.write")  # type: ignore[untyped-decorator]
def write(
    self: DatabaseTask,
    session: Session,
    reason: str,
    *,
    fail: list[Exception] | None = None,
    then: Callable[[], object] | None = None,
) -> str:
    """Write one dead-letter row, then raise the next error of ``fail``, if any is left."""
    inbox.dead_letter(session, reason=reason, now=clock.now())
    if then is not None:
        self.after_commit(session, then)
    if fail:
        raise fail.pop(0)
    return reason


@pytest.fixture
def committed(store: Store, monkeypatch: pytest.MonkeyPatch, now: datetime) -> Iterator[Store]:
    """Tasks run on the test store at a fixed time; what they commit is removed afterwards."""
    monkeypatch.setattr(tasking, "store_engine", lambda: store.engine)
    clock.set_clock(lambda: now)
    store.truncate()
    try:
        yield store
    finally:
        clock.set_clock(None)
        store.truncate()


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Log lines as JSON while the test runs; the previous configuration is restored."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    try:
        yield stream
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "tokenwarden"]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        structlog.configure(**config)
        structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def runs(task: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("tokenwarden_tasks_total", {"task": task, "outcome": outcome})
    return value or 0.0


def raw_event(type_: str, data: dict[str, Any], *, at: datetime, id_: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id_,
        "source": "hr://workday",
        "type": type_,
        "time": at.isoformat(),
        "data": data,
    }


def store_events(store: Store, *raws: dict[str, Any], now: datetime) -> list[str]:
    with db.transaction(store.engine) as session:
        stored = inbox.store_events(session, [parse_event(raw) for raw in raws], now=now)
    return stored.accepted


def member_with_pat(store: Store, org_id: str, user_id: str, *, at: datetime) -> str:
    with db.transaction(store.engine) as session:
        add_member(
            session,
            org_id=org_id,
            user_id=user_id,
            role="user",
            email=None,
            at=at,
            now=at,
            source="test",
        )
        return create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id=org_id,
            user_id=user_id,
            name="ci",
            expires_at=at + timedelta(days=365),
            now=at,
        ).id


def read(store: Store) -> Session:
    return Session(store.engine, expire_on_commit=False)


def events_by_id(store: Store) -> dict[str, InboxEvent]:
    with read(store) as session:
        return {e.id: e for e in session.scalars(select(InboxEvent))}


def dead_letters(store: Store) -> list[DeadLetter]:
    with read(store) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


# -- options -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [PROCESS_EVENTS, tokenwarden.config.celery.REDRIVE_EVENTS])
def test_each_task_is_registered_with_the_options_it_relies_on(name: str) -> None:
    task = app.tasks[name]

    assert isinstance(task, DatabaseTask)
    assert task.name == name
    assert (task.acks_late, task.reject_on_worker_lost, task.ignore_result) == (True, True, True)
    assert task.autoretry_for == (TransientDatabaseError,)
    assert (task.retry_backoff, task.retry_backoff_max, task.retry_jitter) == (True, 60, True)
    assert task.max_retries is None
    # Celery accepts any keyword as a task option and silently ignores a misspelt one
    # (ignore_results=True): every option set on the task must be one Celery knows.
    known = {key for klass in celery.Task.__mro__ for key in vars(klass)}
    known |= {attribute for attribute, _setting in celery.Task.from_config}
    options = {key for key in vars(type(task)) if not key.startswith("_")}
    assert options - known == set()


def test_senders_are_checked_against_the_arguments_without_the_session() -> None:
    # Celery checks a task's arguments when it is sent; the session is not one of them.
    tokenwarden.tasks.events.redrive_events.__header__()
    tokenwarden.tasks.events.process_events.__header__(["evt-1"])
    with pytest.raises(TypeError):
        tokenwarden.tasks.events.redrive_events.__header__(["evt-1"])


def test_the_beat_schedule_names_a_registered_task() -> None:
    app.loader.import_default_modules()  # what a worker does at start: import TASK_MODULES
    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks


# -- the base task -----------------------------------------------------------------------


def test_a_run_commits_then_calls_back_and_closes_its_session(committed: Store) -> None:
    seen_after_commit: list[list[str]] = []

    def after_commit() -> None:
        # Read through another connection: only committed rows are visible there.
        seen_after_commit.append([row.reason for row in dead_letters(committed)])

    before = runs("probe.write", "succeeded")

    assert write.run("kept", then=after_commit) == "kept"

    assert seen_after_commit == [["kept"]]
    assert [row.reason for row in dead_letters(committed)] == ["kept"]
    assert committed.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert runs("probe.write", "succeeded") == before + 1


def test_a_run_that_raises_rolls_back_and_skips_the_callbacks(committed: Store) -> None:
    called: list[bool] = []
    before = runs("probe.write", "failed")

    with pytest.raises(ValueError, match="boom"):
        write.run("lost", fail=[ValueError("boom")], then=lambda: called.append(True))

    assert dead_letters(committed) == []
    assert called == []
    assert committed.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert runs("probe.write", "failed") == before + 1


def test_a_transient_database_error_is_retried_and_each_retry_logged(
    committed: Store, log_lines: io.StringIO
) -> None:
    lost = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    before = runs("probe.write", "retried")

    # apply() runs the retry at once, in this process; a worker would wait retry_in_s.
    write.apply(args=["second try"], kwargs={"fail": [lost]})

    retry = next(line for line in lines(log_lines) if line["event"] == "task.retry")
    assert retry["task_name"] == "probe.write"
    assert "server closed the connection" in retry["waiting_for"]
    assert 0 <= retry["retry_in_s"] <= 1
    assert runs("probe.write", "retried") == before + 1
    # The failed attempt rolled back; the retry committed.
    assert [row.reason for row in dead_letters(committed)] == ["second try"]


def test_a_transient_error_called_directly_surfaces_as_transient(committed: Store) -> None:
    cause = OperationalError("UPDATE tokens", {}, Exception("database is locked"))

    with pytest.raises(TransientDatabaseError, match="database is locked") as raised:
        write.run("lost", fail=[cause])

    assert raised.value.__cause__ is cause
    assert dead_letters(committed) == []


# -- process_events ----------------------------------------------------------------------


def test_the_log_context_names_the_task_and_events_during_the_run_only(
    committed: Store, log_lines: io.StringIO, now: datetime
) -> None:
    (event_id,) = store_events(
        committed,
        raw_event(
            "membership.added",
            {"org_id": "acme", "user_id": "u-1", "role": "user"},
            at=now,
            id_="evt-ctx",
        ),
        now=now,
    )

    tokenwarden.tasks.events.process_events.apply(args=[[event_id]], task_id="task-ctx")
    structlog.get_logger("test").info("after the run")

    logged = lines(log_lines)
    applied = next(line for line in logged if line["event"] == "event.applied")
    assert (applied["task_id"], applied["task_name"]) == ("task-ctx", PROCESS_EVENTS)
    # A line about one event names that one, not the message's whole list.
    assert applied["event_id"] == event_id
    assert "event_ids" not in applied
    processed = next(line for line in logged if line["event"] == "events.processed")
    assert (processed["task_id"], processed["done"]) == ("task-ctx", 1)
    assert processed["event_ids"] == [event_id]
    assert "event_id" not in processed
    assert not {"task_id", "task_name", "event_ids"} & logged[-1].keys()
    assert events_by_id(committed)[event_id].status == EventStatus.DONE


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        (("evt-1",), {}, "event_ids must be a list, not str"),
        (({"ids": ["evt-1"]},), {}, "event_ids must be a list, not dict"),
        (([1, 2],), {}, "each event id must be a string"),
        ((["evt-1"], ["evt-2"]), {}, "expected exactly one argument"),
        ((), {"ids": ["evt-1"]}, "expected exactly one argument"),
        ((), {}, "expected exactly one argument"),
    ],
)
def test_a_message_with_bad_arguments_is_dead_lettered_not_retried(
    committed: Store, args: tuple[Any, ...], kwargs: dict[str, Any], reason: str
) -> None:
    tokenwarden.tasks.events.process_events.run(*args, **kwargs)

    (letter,) = dead_letters(committed)
    assert letter.reason.startswith("bad arguments: ")
    assert reason in letter.reason
    assert letter.task == PROCESS_EVENTS


def test_a_dead_letter_never_keeps_a_token(committed: Store) -> None:
    leaked = generate(TokenKind.PERSONAL)

    tokenwarden.tasks.events.process_events.run(f"please revoke {leaked}")

    (letter,) = dead_letters(committed)
    assert letter.body is not None
    assert leaked not in letter.body
    assert leaked[7:19] not in letter.body
    assert "sm_pat_***" in letter.body


def test_ids_not_in_the_inbox_are_dead_lettered_and_finished_ones_skipped(
    committed: Store, now: datetime
) -> None:
    (known,) = store_events(
        committed,
        raw_event("user.deactivated", {"user_id": "u-1"}, at=now, id_="evt-known"),
        now=now,
    )
    tokenwarden.tasks.events.process_events.run([known])

    tokenwarden.tasks.events.process_events.run([known, "evt-nowhere", "evt-nowhere"])

    (letter,) = dead_letters(committed)
    assert (letter.reason, letter.event_id, letter.task) == (
        "no such event in the inbox",
        "evt-nowhere",
        PROCESS_EVENTS,
    )
    event = events_by_id(committed)[known]
    assert (event.status, event.attempts) == (EventStatus.DONE, 1)


def fail_in_python(_session: Session) -> None:
    raise RuntimeError("handler bug")


def fail_in_the_database(session: Session) -> None:
    # A statement the database itself rejects: the transaction must stay usable afterwards.
    session.execute(insert(AuditEntry).values(at=clock.now(), action=None))


@pytest.mark.parametrize(
    ("failure", "reason"),
    [(fail_in_python, "RuntimeError: handler bug"), (fail_in_the_database, "IntegrityError: ")],
)
def test_a_poison_event_is_marked_dead_and_the_others_are_applied(
    committed: Store,
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
    failure: Callable[[Session], None],
    reason: str,
) -> None:
    t0 = now - timedelta(days=1)
    leaver = member_with_pat(committed, "acme", "u-1", at=t0)
    bystander = member_with_pat(committed, "acme", "u-2", at=t0)
    spared = member_with_pat(committed, "acme", "u-boom", at=t0)
    ids = store_events(
        committed,
        raw_event("membership.removed", {"org_id": "acme", "user_id": "u-1"}, at=now, id_="e1"),
        raw_event("membership.removed", {"org_id": "acme", "user_id": "u-2"}, at=now, id_="e2"),
        raw_event("user.deactivated", {"user_id": "u-boom"}, at=now, id_="e3"),
        raw_event(
            "membership.added",
            {"org_id": "acme", "user_id": "u-3", "role": "user"},
            at=now,
            id_="e4",
        ),
        now=now,
    )
    # e2 no longer validates as stored (it lost its user); e3 fails half way through.
    with db.transaction(committed.engine) as session:
        session.execute(
            update(InboxEvent).where(InboxEvent.id == "e2").values(data={"org_id": "x"})
        )
    real = deactivation.deactivate_user

    def explode(session: Session, **kwargs: Any) -> list[str]:
        real(session, **kwargs)  # its writes must be rolled back with the savepoint
        failure(session)
        return []

    monkeypatch.setattr(deactivation, "deactivate_user", explode)

    tokenwarden.tasks.events.process_events.run(ids)

    events = events_by_id(committed)
    assert {i: e.status for i, e in events.items()} == {
        "e1": EventStatus.DONE,
        "e2": EventStatus.DEAD,
        "e3": EventStatus.DEAD,
        "e4": EventStatus.DONE,
    }
    assert events["e1"].result == {"revoked": [leaver]}
    assert events["e2"].reason == "data.user_id: Field required"
    assert (events["e3"].reason or "").startswith(reason)
    with read(committed) as session:
        reasons = {t.id: t.revoke_reason for t in session.scalars(select(Token))}
    assert reasons == {leaver: "member_removed", bystander: None, spared: None}
    assert dead_letters(committed) == []


def test_each_removal_of_a_message_applied_together_is_logged(
    committed: Store, now: datetime, log_lines: io.StringIO
) -> None:
    pats = {
        user: member_with_pat(committed, "acme", user, at=now - timedelta(days=1))
        for user in ("u-1", "u-2")
    }
    ids = store_events(
        committed,
        *(
            raw_event("membership.removed", {"org_id": "acme", "user_id": u}, at=now, id_=f"e-{u}")
            for u in ("u-1", "u-2", "u-3")
        ),
        now=now,
    )
    join_first = raw_event(
        "membership.added", {"org_id": "acme", "user_id": "u-3", "role": "user"}, at=now, id_="j"
    )
    store_events(committed, join_first, now=now)
    tokenwarden.tasks.events.process_events.run(["j"])

    tokenwarden.tasks.events.process_events.run(ids)

    logged = lines(log_lines)
    assert not any(line["event"] == "events.batch_split" for line in logged)
    removed = {line["event_id"]: line for line in logged if line["event"] == "member.removed"}
    applied = {line["event_id"]: line for line in logged if line["event"] == "event.applied"}
    queued = [line["event_id"] for line in logged if line["event"] == "notice.queued"]
    assert {i: (line["revoked"], line["stale"]) for i, line in removed.items()} == {
        "e-u-1": (1, False),
        "e-u-2": (1, False),
        "e-u-3": (0, False),
    }
    # The tokens each removal revoked, by id: the log line explains each audit row.
    assert {i: line["token_ids"] for i, line in removed.items()} == {
        "e-u-1": [pats["u-1"]],
        "e-u-2": [pats["u-2"]],
        "e-u-3": [],
    }
    assert {i: line["revoked"] for i, line in applied.items() if i != "j"} == {
        "e-u-1": 1,
        "e-u-2": 1,
        "e-u-3": 0,
    }
    assert all(line["task_name"] == PROCESS_EVENTS for line in applied.values())
    assert sorted(queued) == ["e-u-1", "e-u-2"]


def test_a_poison_removal_in_a_message_of_removals_is_dead_and_the_others_applied(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch, log_lines: io.StringIO
) -> None:
    t0 = now - timedelta(days=1)
    users = ["u-1", "u-2", "u-boom", "u-3"]
    for user in users:
        member_with_pat(committed, "acme", user, at=t0)
    ids = store_events(
        committed,
        *(
            raw_event("membership.removed", {"org_id": "acme", "user_id": u}, at=now, id_=f"e-{u}")
            for u in users
        ),
        now=now,
    )
    real_batch, real_one = removals.remove_members, removals.remove_member

    def batch_then_fail(session: Session, *args: Any, **kwargs: Any) -> Any:
        real_batch(session, *args, **kwargs)  # its writes must be rolled back with the batch
        fail_in_the_database(session)

    def fail_for_boom(session: Session, **kwargs: Any) -> list[str]:
        revoked = real_one(session, **kwargs)
        if kwargs["user_id"] == "u-boom":
            fail_in_the_database(session)
        return revoked

    monkeypatch.setattr(removals, "remove_members", batch_then_fail)
    monkeypatch.setattr(removals, "remove_member", fail_for_boom)
    published: list[str] = []
    monkeypatch.setattr(
        publishing, "publish_new_notices", lambda _app, notice_ids: published.extend(notice_ids)
    )

    tokenwarden.tasks.events.process_events.run(ids)

    events = events_by_id(committed)
    assert {i: e.status for i, e in events.items()} == {
        "e-u-1": EventStatus.DONE,
        "e-u-2": EventStatus.DONE,
        "e-u-boom": EventStatus.DEAD,
        "e-u-3": EventStatus.DONE,
    }
    assert (events["e-u-boom"].reason or "").startswith("IntegrityError: ")
    with read(committed) as session:
        reasons = {t.user_id: t.revoke_reason for t in session.scalars(select(Token))}
        told = {n.id: n.event_id for n in session.scalars(select(Notice))}
        trail = [row.event_id for row in session.scalars(select(AuditEntry))]
    assert reasons == {
        "u-1": "member_removed",
        "u-2": "member_removed",
        "u-boom": None,
        "u-3": "member_removed",
    }
    assert sorted(str(event_id) for event_id in told.values()) == ["e-u-1", "e-u-2", "e-u-3"]
    assert sorted(published) == sorted(told), "only notices that were committed are published"
    assert "e-u-boom" not in trail
    logged = lines(log_lines)
    assert any(line["event"] == "events.batch_split" for line in logged)
    failed = [line for line in logged if line["event"] == "event.failed"]
    assert [line["event_id"] for line in failed] == ["e-u-boom"]


def test_a_transient_error_in_one_event_rolls_back_the_whole_run(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaver = member_with_pat(committed, "acme", "u-1", at=now - timedelta(days=1))
    ids = store_events(
        committed,
        raw_event("membership.removed", {"org_id": "acme", "user_id": "u-1"}, at=now, id_="e1"),
        raw_event("user.deactivated", {"user_id": "u-2"}, at=now, id_="e2"),
        now=now,
    )

    def lose_connection(_session: Session, **_: Any) -> list[str]:
        raise OperationalError("UPDATE tokens", {}, Exception("server closed the connection"))

    monkeypatch.setattr(deactivation, "deactivate_user", lose_connection)

    with pytest.raises(TransientDatabaseError):
        tokenwarden.tasks.events.process_events.run(ids)

    assert {e.status for e in events_by_id(committed).values()} == {EventStatus.PENDING}
    with read(committed) as session:
        assert session.get(Token, leaver).revoke_reason is None  # type: ignore[union-attr]


# -- redrive_events ----------------------------------------------------------------------


def test_redrive_publishes_pending_events_only_after_committing_the_marks(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_ago = now - timedelta(hours=1)
    ids = store_events(
        committed,
        raw_event("user.deactivated", {"user_id": "u-1"}, at=long_ago, id_="e-old"),
        now=long_ago,
    )
    store_events(
        committed,
        raw_event("user.deactivated", {"user_id": "u-2"}, at=now, id_="e-new"),
        now=now,
    )
    published: list[tuple[list[str], datetime | None]] = []

    def publish(_app: Any, event_ids: list[str]) -> None:
        published.append((list(event_ids), events_by_id(committed)["e-old"].published_at))

    monkeypatch.setattr(redrive, "publish_event_ids", publish)

    tokenwarden.tasks.events.redrive_events.run()

    assert published == [(ids, now)]  # the mark was visible to another connection


def test_redrive_that_cannot_publish_logs_and_leaves_the_rest_to_the_next_run(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch, log_lines: io.StringIO
) -> None:
    long_ago = now - timedelta(hours=1)
    store_events(
        committed,
        raw_event("user.deactivated", {"user_id": "u-1"}, at=long_ago, id_="e-old"),
        now=long_ago,
    )

    def broker_down(_app: Any, _ids: list[str]) -> None:
        raise PublishError("broker refused the message: connection refused")

    monkeypatch.setattr(redrive, "publish_event_ids", broker_down)

    tokenwarden.tasks.events.redrive_events.run()

    assert any(line["event"] == "events.redrive_failed" for line in lines(log_lines))
    assert events_by_id(committed)["e-old"].status == EventStatus.PENDING


# -- signals -----------------------------------------------------------------------------


class FakeMessage:
    def __init__(self, body: bytes, headers: dict[str, Any] | None = None) -> None:
        self.body = body
        self.headers = headers or {}
        self.content_type = "application/json"
        self.content_encoding = "utf-8"
        self.acked = False

    def ack(self) -> None:
        self.acked = True


def test_an_undecodable_message_is_dead_lettered_and_acknowledged(committed: Store) -> None:
    leaked = generate(TokenKind.APPLICATION)
    message = FakeMessage(f"not json {leaked}".encode(), {"task": PROCESS_EVENTS})
    consumer = object.__new__(signals.DeadLetteringConsumer)  # the hook needs no connection

    consumer.on_decode_error(message, ValueError("Expecting value: line 1 column 1"))

    assert message.acked
    (letter,) = dead_letters(committed)
    assert letter.reason.startswith("undecodable message (application/json): Expecting value")
    assert letter.task == PROCESS_EVENTS
    assert letter.body == "not json sm_aat_***"


def test_unknown_and_rejected_task_messages_are_dead_lettered(committed: Store) -> None:
    body = b'[["evt-1"], {}, {}]'

    signals.dead_letter_unknown_task(
        message=FakeMessage(body, {"task": "tokenwarden.nope"}), name="tokenwarden.nope", id="m-1"
    )
    signals.dead_letter_rejected(message=FakeMessage(body), exc=None)

    unknown, rejected = dead_letters(committed)
    assert (unknown.reason, unknown.task, unknown.body) == (
        "unknown task 'tokenwarden.nope' (message m-1)",
        "tokenwarden.nope",
        body.decode(),
    )
    assert rejected.reason == "not a task message"


def test_a_dead_letter_that_cannot_be_written_does_not_stop_the_consumer(
    monkeypatch: pytest.MonkeyPatch, log_lines: io.StringIO
) -> None:
    def no_database() -> Any:
        raise OperationalError("INSERT", {}, Exception("database is down"))

    monkeypatch.setattr(tasking, "store_engine", no_database)

    signals.keep_dead_letter(reason="not a task message", task=None, body=b"x")

    assert any(line["event"] == "dead_letter.failed" for line in lines(log_lines))


# -- a short message takes other pending events along --------------------------------------


def test_a_short_message_applies_other_pending_events_and_theirs_then_skip(
    committed: Store, now: datetime, log_lines: io.StringIO
) -> None:
    ids = store_events(
        committed,
        *(
            raw_event("user.deactivated", {"user_id": f"u-{n}"}, at=now, id_=f"evt-{n}")
            for n in range(5)
        ),
        now=now,
    )

    tokenwarden.tasks.events.process_events.run([ids[2]])

    assert {e.id: e.status for e in events_by_id(committed).values()} == dict.fromkeys(
        ids, EventStatus.DONE
    )
    (processed,) = [line for line in lines(log_lines) if line["event"] == "events.processed"]
    assert (processed["done"], processed["besides"]) == (5, 4)
    # The other events' own messages find them finished: no second application.
    tokenwarden.tasks.events.process_events.run([ids[0]])
    assert all(e.attempts == 1 for e in events_by_id(committed).values())
    assert dead_letters(committed) == []


def test_a_run_takes_along_no_more_than_its_limit(committed: Store, now: datetime) -> None:
    ids = store_events(
        committed,
        *(
            raw_event("user.deactivated", {"user_id": f"u-{n}"}, at=now, id_=f"evt-{n:03}")
            for n in range(RUN_LIMIT + 1)
        ),
        now=now,
    )

    tokenwarden.tasks.events.process_events.run(ids[:CHUNK])

    left = [e.id for e in events_by_id(committed).values() if e.status == EventStatus.PENDING]
    assert len(left) == 1
    assert left[0] not in ids[:CHUNK]


def run_while_another_run_holds(committed: Store, now: datetime, *, held: str) -> list[str]:
    """Store two pending events (``evt-mine``, ``evt-other``) and run the message of the
    first while another transaction holds ``held`` and then rolls back; their ids."""
    if committed.backend != "postgres":
        pytest.skip("SQLite runs one writer at a time: there is no row lock to skip")
    ids = store_events(
        committed,
        raw_event("user.deactivated", {"user_id": "u-mine"}, at=now, id_="evt-mine"),
        raw_event("user.deactivated", {"user_id": "u-other"}, at=now, id_="evt-other"),
        now=now,
    )
    with committed.engine.connect() as other:
        other.execute(select(InboxEvent.id).where(InboxEvent.id == held).with_for_update()).all()
        tokenwarden.tasks.events.process_events.run([ids[0]])  # would hang here if it waited
        other.rollback()  # the run that held it failed
    return ids


def test_events_another_worker_holds_are_skipped_not_waited_for(
    committed: Store, now: datetime
) -> None:
    mine, held = run_while_another_run_holds(committed, now, held="evt-other")

    status = {e.id: e.status for e in events_by_id(committed).values()}
    assert status == {mine: EventStatus.DONE, held: EventStatus.PENDING}


def test_a_message_whose_event_another_run_holds_leaves_it_to_that_run(
    committed: Store, now: datetime, log_lines: io.StringIO
) -> None:
    mine, waiting = run_while_another_run_holds(committed, now, held="evt-mine")

    status = {e.id: e.status for e in events_by_id(committed).values()}
    assert status == {mine: EventStatus.PENDING, waiting: EventStatus.DONE}
    (processed,) = [line for line in lines(log_lines) if line["event"] == "events.processed"]
    assert (processed["elsewhere"], processed["done"], processed["missing"]) == (1, 1, 0)
    assert dead_letters(committed) == []
    # Left pending, it goes with the next run that takes events along.
    tokenwarden.tasks.events.process_events.run([waiting])
    assert events_by_id(committed)[mine].status == EventStatus.DONE


def test_two_workers_taking_each_others_events_along_do_not_deadlock(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each short message takes pending events along; two at once must not lock in a cycle."""
    if committed.backend != "postgres":
        pytest.skip("SQLite runs one writer at a time: there is no row lock to wait for")
    first, second = store_events(
        committed,
        raw_event("user.deactivated", {"user_id": "u-first"}, at=now, id_="evt-first"),
        raw_event("user.deactivated", {"user_id": "u-second"}, at=now, id_="evt-second"),
        now=now,
    )
    # Each task, having looked for other events, waits (a while) for the other to look too
    # before applying anything: the moment at which each could take the other's own event
    # along. A task that is itself waiting for a row lock never looks; the other goes on.
    looked: list[str] = []
    both = threading.Condition()
    look = inbox.pending_besides

    def look_then_wait(session: Session, event_ids: list[str], *, limit: int) -> list[str]:
        found = look(session, event_ids, limit=limit)
        with both:
            looked.extend(event_ids)
            both.notify_all()
            both.wait_for(lambda: len(looked) == 2, timeout=1.5)
        return found

    monkeypatch.setattr(inbox, "pending_besides", look_then_wait)
    failures: list[BaseException] = []

    def run(event_id: str) -> None:
        try:
            tokenwarden.tasks.events.process_events.run([event_id])
        except BaseException as error:  # a deadlock surfaces as a retry
            failures.append(error)

    workers = [threading.Thread(target=run, args=(i,)) for i in (first, second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)

    assert failures == []
    status = {e.id: e.status for e in events_by_id(committed).values()}
    assert status == {first: EventStatus.DONE, second: EventStatus.DONE}


def test_a_bulk_revocation_publishes_itself_again_after_each_batch_until_it_is_done(
    committed: Store, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_handlers import join, pat, stored
    from tokenwarden.config.settings import get_settings

    monkeypatch.setenv("TOKENWARDEN_SWEEP_BATCH", "2")
    get_settings.cache_clear()
    with db.transaction(committed.engine) as session:
        join(session, "acme", "bob", at=now - timedelta(days=3))
        for _ in range(5):
            pat(session, "acme", "bob", created=now - timedelta(days=2))
        event_id = stored(session, "tokens.bulk_revoke_requested", {"org_id": "acme"}, time=now).id
    published: list[list[str]] = []
    monkeypatch.setattr(publishing, "publish_event_ids", lambda _app, ids: published.append(ids))
    try:
        message: list[str] | None = [event_id]
        while message is not None and len(published) < 10:
            before = len(published)
            tokenwarden.tasks.events.process_events.run(message)
            message = published[-1] if len(published) > before else None
    finally:
        get_settings.cache_clear()

    # Batches of two for five tokens: two runs leave it pending and publish it again, once
    # each after their commit; the third finishes it.
    assert published == [[event_id], [event_id]]
    assert events_by_id(committed)[event_id].status == EventStatus.DONE
    with read(committed) as session:
        assert {t.revoke_reason for t in session.scalars(select(Token))} == {"bulk"}
