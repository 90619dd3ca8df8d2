"""Publishing ids after commit: a broker that is down costs a producer no time and loses nothing."""

from __future__ import annotations

import os
import secrets
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select
from starlette.exceptions import StarletteDeprecationWarning

import tokenwarden.config.celery
from tests.clocks import SteppedTime
from tests.conftest import Store, service_url
from tokenwarden.config.settings import Settings
from tokenwarden.producer.api import create_app
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.inbox import due_for_redrive
from tokenwarden.worker.domain.models import EventStatus, InboxEvent
from tokenwarden.worker.runtime import publishing
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PASSWORD = "s3cretBrokerPw"
DEAD_BROKER = f"amqp://guest:{PASSWORD}@127.0.0.1:1//"  # nothing listens on port 1
AUTH = {"Authorization": "Bearer twp_test_producer_key"}
QUICK_S = 2.0


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


class SilentBroker:
    """A port that takes connections but never says a word (a hung broker)."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._taken = 0
        self.url = f"amqp://guest:{PASSWORD}@127.0.0.1:{listener.getsockname()[1]}//"

    def connections(self) -> int:
        """Connections made to it so far (the kernel completes them; nobody answers)."""
        while True:
            try:
                connection, _ = self._listener.accept()
            except BlockingIOError:
                return self._taken
            connection.close()
            self._taken += 1


@pytest.fixture
def silent_broker() -> Iterator[SilentBroker]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        yield SilentBroker(listener)


def _event() -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "evt-" + secrets.token_hex(4),
        "source": "hr://workday",
        "type": "membership.removed",
        "data": {"org_id": "acme", "user_id": "u-42"},
    }


def _timed_failure(app: Any) -> tuple[float, str]:
    started = time.monotonic()
    with pytest.raises(publishing.PublishError) as raised:
        publishing.publish_event_ids(app, ["evt-1"])
    return time.monotonic() - started, str(raised.value)


def test_a_post_while_the_broker_is_down_is_accepted_at_once_and_left_to_the_redrive(
    store: Store, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        database_url=store.url,
        broker_url=DEAD_BROKER,
        producer_keys=("twp_test_producer_key",),
    )
    celery_app = make_celery(settings)  # the app's own connection timeout and retries
    sent = [_event() for _ in range(3)]
    try:
        with (
            TestClient(create_app(settings, celery_app=celery_app)) as api,
            structlog.testing.capture_logs() as logs,
        ):
            seconds = []
            for body in sent:
                started = time.monotonic()
                answer = api.post("/v1/events", json=body, headers=AUTH)
                seconds.append(time.monotonic() - started)
                assert answer.status_code == 202, answer.text
        # Far below the app's own connect timeout and retries (seconds), which it must skip.
        assert max(seconds) < QUICK_S, seconds
        with transaction(store.engine) as session:
            statuses = {row.id: row.status for row in session.scalars(select(InboxEvent))}
            due = due_for_redrive(
                session,
                now=clock.now() + timedelta(seconds=settings.redrive_after_s),
                older_than=timedelta(seconds=settings.redrive_after_s),
            )
        ids = [body["id"] for body in sent]
        assert all(statuses[i] == EventStatus.PENDING for i in ids), statuses
        assert sorted(ids) == sorted(due), "the re-drive picks up what the API could not publish"
        accepted = [line for line in logs if line["event"] == "events.accepted"]
        assert [line["published"] for line in accepted] == [0, 0, 0]
        assert all("Connection refused" in line["publish_error"] for line in accepted)
        [failed] = [line for line in logs if line["event"] == "broker.publish_failed"]
        assert failed["log_level"] == "warning"
        assert failed["broker"] == "amqp://guest:***@127.0.0.1:1//"
        assert "re-drive" in failed["then"]
        assert PASSWORD not in repr(logs)
    finally:
        celery_app.close()
        store.truncate()


def test_a_hung_broker_is_given_up_on_quickly_then_left_alone_for_a_while(
    silent_broker: SilentBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_celery(Settings(home=tmp_path / "home", broker_url=silent_broker.url))
    # Short, so that the bound below stays far from the app's own connect timeout.
    monkeypatch.setattr(publishing, "QUICK_CONNECT_S", 0.2)
    monkeypatch.setattr(publishing, "time", stepped := SteppedTime())
    try:
        first_s, first = _timed_failure(app)
        after_first = silent_broker.connections()
        _, paused = _timed_failure(app)
        after_paused = silent_broker.connections()
        stepped.advance(publishing.PAUSE_AFTER_FAILURE_S)
        again_s, again = _timed_failure(app)
        after_again = silent_broker.connections()
    finally:
        app.close()

    assert (after_first, after_paused, after_again) == (1, 1, 2), "one attempt, none, one"
    assert "timed out" in first
    assert paused.startswith("not tried:")
    assert "timed out" in paused  # the reason of the failure that started the pause
    assert "timed out" in again
    for took in (first_s, again_s):
        # The short timeout was used: the app's own is 4 s (tokenwarden.config.celery).
        assert publishing.QUICK_CONNECT_S * 0.5 < took < 2.0, (first, again)
    for message in (first, paused, again):
        assert "127.0.0.1" in message
        assert PASSWORD not in message


def test_a_pause_is_kept_per_app(tmp_path: Path) -> None:
    down = make_celery(Settings(home=tmp_path / "home", broker_url=DEAD_BROKER))
    embedded = make_celery(Settings(home=tmp_path / "home"))
    try:
        _timed_failure(down)
        publishing.publish_event_ids(embedded, ["evt-1"])  # its own broker: not held back
    finally:
        down.close()
        embedded.close()

    assert list((tmp_path / "home" / "broker" / "queue").glob("*.msg"))


BROKERS = [
    "embedded",
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("redis", marks=pytest.mark.redis),
]
# What differs between any two messages, however they were sent.
_PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "message_count"}
_REPRS = {"argsrepr", "kwargsrepr"}


@pytest.fixture(params=BROKERS)
def queue_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An app on each broker, publishing to a queue of this test's own (deleted afterwards)."""
    broker = None if request.param == "embedded" else service_url(request.param)
    queue = f"test-publish-{secrets.token_hex(4)}"
    app = make_celery(Settings(home=tmp_path / "home", broker_url=broker, queue=queue))
    try:
        yield app
    finally:
        if broker is not None:
            with app.connection_for_write() as connection:
                bound = app.amqp.default_queue(connection.default_channel)
                # Declared on this channel first: Redis deletes only the bindings it knows.
                bound.declare()
                bound.delete()
                bound.exchange.delete()
        app.close()


def _take_all(app: Any) -> list[Any]:
    with app.connection_for_write() as connection:
        queue = app.amqp.default_queue(connection.default_channel)
        messages = []
        while (message := queue.get(no_ack=True)) is not None:
            messages.append(message)
        return messages


def _shape(message: Any) -> dict[str, Any]:
    """What a worker reads from a message, less its own ids and the argument reprs."""

    def scrub(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {
                key: scrub(item) for key, item in value.items() if key not in _PER_MESSAGE | _REPRS
            }
        return value

    return {
        "headers": scrub(message.headers),
        "properties": scrub(message.properties),
        "delivery_info": scrub(message.delivery_info),
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "body": message.decode(),
    }


def test_a_message_is_the_one_send_task_sends_with_a_short_repr_of_its_ids(
    queue_app: Any,
) -> None:
    app = queue_app
    ids = [f"evt-{number:03}-{secrets.token_hex(8)}" for number in range(publishing.CHUNK)]

    def both() -> None:
        publishing.publish_event_ids(app, ids)
        app.send_task(tokenwarden.config.celery.PROCESS_EVENTS, args=[ids], retry=False)

    # The re-drive publishes from inside a task: its messages name that task as parent.
    @app.task(name="test.redrive", shared=False)  # type: ignore[untyped-decorator]
    def redrive() -> None:
        both()

    both()
    redrive.apply(task_id="redrive-1")
    publishing.publish_notice_ids(app, ["ntc-1"])
    messages = _take_all(app)

    ours = [m for m in messages if m.headers["argsrepr"] == "[100 event ids]"]
    theirs = [m for m in messages if m.headers["argsrepr"].startswith("[['evt-000-")]
    [notice] = [
        m for m in messages if m.headers["task"] == tokenwarden.config.celery.DELIVER_NOTICES
    ]
    assert len(ours) == len(theirs) == 2, [m.headers["argsrepr"][:40] for m in messages]
    for message in ours:
        assert message.headers["kwargsrepr"] == "{}"
        assert message.decode()[0] == [ids]
    by_parent = {m.headers["parent_id"]: _shape(m) for m in ours}
    assert by_parent == {m.headers["parent_id"]: _shape(m) for m in theirs}
    assert set(by_parent) == {None, "redrive-1"}
    assert {m.headers["root_id"] for m in messages if m.headers["parent_id"]} == {"redrive-1"}
    assert by_parent[None]["delivery_info"]["routing_key"] == app.conf.task_default_queue
    # One id per notice message: Celery's own repr of it stays short and names it.
    assert notice.headers["argsrepr"] == "[['ntc-1']]"
