"""Delivering notices to a real HTTP receiver on loopback that checks every signature.

The delivery task runs in this process (``task.run``) against the real store and really
commits; time is moved forward with the clock rather than waited for. Each test empties the
store afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import tokenwarden.config.celery
import tokenwarden.tasks.events
import tokenwarden.tasks.notices
from tests.conftest import Store
from tokenwarden.config.celery import DELIVER_NOTICES
from tokenwarden.config.logging import configure_logging
from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import clock, db, inbox, notices, outbox_delivery
from tokenwarden.worker.domain.events import parse_event
from tokenwarden.worker.domain.models import DeadLetter, Notice, NoticeStatus
from tokenwarden.worker.ops.supervisor import free_port
from tokenwarden.worker.runtime import publishing, tasking, webhook
from tokenwarden.worker.runtime import redrive as notice_redrive
from tokenwarden.worker.runtime.celery_app import app

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


# -- the receiver --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    # The sender's port: requests over one kept-alive connection share it.
    peer_port: int = 0


class Receiver:
    """A webhook receiver on loopback: verifies each signature, answers from a script.

    Replies are taken from ``script`` in order (200 once it is empty). :meth:`hold_next`
    makes the next request wait until released, as a receiver that hangs would.
    """

    def __init__(self, secret: str = SECRET) -> None:
        self.webhook = Webhook(secret)
        self.script: list[Reply] = []
        self.received: list[Received] = []
        self.forged: list[str] = []
        self._lock = threading.Lock()
        self._hold: tuple[threading.Event, threading.Event] | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keeps connections open between requests, as a real receiver does.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                # OSError: the sender went away (a killed worker), there is no one to answer.
                with contextlib.suppress(OSError):
                    receiver._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A short poll: shutdown() waits up to one interval, once per test.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/notices"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def hold_next(self) -> threading.Event:
        """Hold the next request until :meth:`release`; the event is set once it arrives."""
        arrived = threading.Event()
        with self._lock:
            self._hold = (arrived, threading.Event())
        return arrived

    def release(self) -> None:
        with self._lock:
            hold, self._hold = self._hold, None
        if hold is not None:
            hold[1].set()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("content-length") or 0))
        headers = {name.lower(): value for name, value in request.headers.items()}
        got = Received(
            headers.get("webhook-id", ""), headers, body, peer_port=request.client_address[1]
        )
        try:
            self.webhook.verify(body, headers)
        except WebhookVerificationError as error:
            with self._lock:
                self.forged.append(f"{got.webhook_id}: {error}")
            reply = Reply(401)
        else:
            with self._lock:
                self.received.append(got)
                hold = self._hold
                if hold is not None and not hold[0].is_set():
                    hold[0].set()
                else:
                    hold = None
                reply = self.script.pop(0) if self.script else Reply()
            if hold is not None:
                hold[1].wait(timeout=60)
        got.status = reply.status
        request.send_response(reply.status)
        for name, value in reply.headers.items():
            request.send_header(name, value)
        request.send_header("content-length", "0")
        request.end_headers()

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [r.webhook_id for r in self.received]

    @property
    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]


# -- fixtures ------------------------------------------------------------------------------


class MovingClock:
    """The wall clock, moved forward on demand (signatures stay within the receiver's window)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)

    def until(self, moment: datetime) -> None:
        gap = (moment - self()).total_seconds()
        if gap > 0:
            self.advance(gap + 0.001)


@dataclass
class Harness:
    store: Store
    receiver: Receiver
    clock: MovingClock
    settings: Settings
    scheduled: list[tuple[list[str], float]]
    published: list[list[str]]

    def queue(self, **changes: Any) -> str:
        with db.transaction(self.store.engine) as session:
            notice_id = notices.queue(
                session,
                kind=notices.LEAKED,
                org_id="acme",
                recipients=[{"user_id": "bob", "email": "bob@acme.example"}],
                data={"reason": "leaked", "tokens": [{"id": "tok_1", "last4": "Ab12"}]},
                now=clock.now(),
            )
            assert notice_id is not None
            if changes:
                session.execute(update(Notice).where(Notice.id == notice_id).values(**changes))
        return notice_id

    def row(self, notice_id: str) -> Notice:
        with Session(self.store.engine, expire_on_commit=False) as session:
            notice = session.get(Notice, notice_id)
            assert notice is not None
            return notice

    def deliver(self, *notice_ids: str) -> None:
        tokenwarden.tasks.notices.deliver_notices.run(list(notice_ids))

    def redrive(self) -> list[str]:
        before = len(self.published)
        tokenwarden.tasks.notices.redrive_notices.run()
        return [i for batch in self.published[before:] for i in batch]


def settings_for(url: str | None, **more: Any) -> Settings:
    return Settings(
        notice_webhook_url=url,
        notice_signing_secret=SECRET,
        redrive_after_s=more.pop("redrive_after_s", 2.0),
        **more,
    )


@pytest.fixture
def harness(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    moving = MovingClock()
    scheduled: list[tuple[list[str], float]] = []
    published: list[list[str]] = []
    monkeypatch.setattr(tasking, "store_engine", lambda: store.engine)
    monkeypatch.setattr(
        tokenwarden.tasks.notices.deliver_notices,
        "apply_async",
        lambda args, countdown: scheduled.append((args[0], countdown)),
    )
    monkeypatch.setattr(
        notice_redrive, "publish_notice_ids", lambda _app, ids: published.append(list(ids))
    )
    clock.set_clock(moving)
    store.truncate()
    with Receiver() as receiver:
        settings = settings_for(receiver.url)
        monkeypatch.setattr(tokenwarden.tasks.notices, "get_settings", lambda: settings)
        try:
            yield Harness(store, receiver, moving, settings, scheduled, published)
        finally:
            clock.set_clock(None)
            store.truncate()
    assert receiver.forged == []  # every request carried a valid signature


def use_settings(monkeypatch: pytest.MonkeyPatch, harness: Harness, settings: Settings) -> None:
    harness.settings = settings
    monkeypatch.setattr(tokenwarden.tasks.notices, "get_settings", lambda: settings)


# -- delivery ------------------------------------------------------------------------------


def test_a_notice_is_delivered_once_signed_with_its_own_id(harness: Harness) -> None:
    notice_id = harness.queue()

    harness.deliver(notice_id)
    harness.deliver(notice_id)  # a second message for the same notice

    (got,) = harness.receiver.received
    stored = harness.row(notice_id)
    assert got.webhook_id == notice_id
    assert got.body == stored.body.encode()
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"] == webhook.USER_AGENT
    assert json.loads(got.body)["data"]["notice_id"] == notice_id
    assert (stored.status, stored.attempts, stored.last_error) == (NoticeStatus.SENT, 1, None)
    assert stored.sent_at is not None
    assert harness.scheduled == []


def test_an_unavailable_receiver_gets_the_same_notice_until_it_accepts(harness: Harness) -> None:
    harness.receiver.script = [Reply(503), Reply(503)]
    notice_id = harness.queue()

    harness.deliver(notice_id)

    first = harness.row(notice_id)
    assert (first.status, first.attempts, first.last_error) == (
        NoticeStatus.PENDING,
        1,
        "HTTP 503 Service Unavailable",
    )
    wait = (first.next_attempt_at - clock.now()).total_seconds()
    assert 0 < wait <= outbox_delivery.BACKOFF_BASE_S
    ((again, countdown),) = harness.scheduled
    assert again == [notice_id]
    assert countdown == pytest.approx(wait, abs=0.5)

    harness.deliver(notice_id)  # too early: not due, nothing sent
    assert len(harness.receiver.received) == 1

    harness.clock.until(first.next_attempt_at)
    harness.deliver(notice_id)
    second = harness.row(notice_id)
    assert (second.status, second.attempts) == (NoticeStatus.PENDING, 2)
    assert harness.scheduled[-1][1] <= 2 * outbox_delivery.BACKOFF_BASE_S

    harness.clock.until(second.next_attempt_at)
    harness.deliver(notice_id)

    done = harness.row(notice_id)
    assert (done.status, done.attempts, done.last_error) == (NoticeStatus.SENT, 3, None)
    assert harness.receiver.ids == [notice_id] * 3
    assert [r.status for r in harness.receiver.received] == [503, 503, 200]
    assert len(harness.receiver.accepted) == 1
    assert len(harness.scheduled) == 2


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(harness: Harness, form: str) -> None:
    later = (clock.now() + timedelta(seconds=45)).replace(microsecond=0) + timedelta(seconds=1)
    value = "45" if form == "seconds" else format_datetime(later, usegmt=True)
    harness.receiver.script = [Reply(429, {"Retry-After": value})]
    notice_id = harness.queue()

    harness.deliver(notice_id)

    waiting = harness.row(notice_id)
    wait = (waiting.next_attempt_at - clock.now()).total_seconds()
    assert 44 <= wait <= 47
    assert waiting.last_error == "HTTP 429 Too Many Requests"
    assert harness.scheduled[0][1] >= 44
    harness.clock.advance(wait - 2)
    harness.deliver(notice_id)
    assert len(harness.receiver.received) == 1
    harness.clock.until(waiting.next_attempt_at)
    harness.deliver(notice_id)
    assert harness.row(notice_id).status == NoticeStatus.SENT
    assert harness.receiver.ids == [notice_id, notice_id]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(400), "HTTP 400 Bad Request: the receiver refused the notice"),
        (Reply(410), "HTTP 410 Gone: the receiver refused the notice"),
        (
            Reply(308, {"Location": "http://127.0.0.1:1/elsewhere"}),
            "HTTP 308 Permanent Redirect: redirects are not followed",
        ),
    ],
)
def test_a_refusal_fails_the_notice_with_the_reason_and_ends_its_attempts(
    harness: Harness, reply: Reply, reason: str
) -> None:
    harness.receiver.script = [reply]
    notice_id = harness.queue()

    harness.deliver(notice_id)
    harness.clock.advance(3600)
    harness.deliver(notice_id)

    failed = harness.row(notice_id)
    assert (failed.status, failed.attempts, failed.last_error) == (NoticeStatus.FAILED, 1, reason)
    assert failed.sent_at is None
    assert len(harness.receiver.received) == 1
    assert harness.scheduled == []
    assert harness.redrive() == []


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://127.0.0.1:{port}/hook", "ConnectError: "),  # connection refused
        ("http://[::1/hook", "InvalidURL: "),
    ],
)
def test_a_receiver_that_cannot_be_reached_leaves_the_notice_pending(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, url: str, error: str
) -> None:
    use_settings(monkeypatch, harness, settings_for(url.format(port=free_port())))
    notice_id = harness.queue()

    harness.deliver(notice_id)

    pending = harness.row(notice_id)
    assert (pending.status, pending.attempts) == (NoticeStatus.PENDING, 1)
    assert (pending.last_error or "").startswith(error)
    assert pending.next_attempt_at > clock.now()
    assert [ids for ids, _ in harness.scheduled] == [[notice_id]]


def test_after_the_last_attempt_the_notice_fails(harness: Harness) -> None:
    harness.receiver.script = [Reply(502)]
    notice_id = harness.queue(attempts=outbox_delivery.MAX_ATTEMPTS - 1)

    harness.deliver(notice_id)

    failed = harness.row(notice_id)
    assert failed.status == NoticeStatus.FAILED
    assert failed.last_error == (
        f"gave up after {outbox_delivery.MAX_ATTEMPTS} attempts: HTTP 502 Bad Gateway"
    )
    assert harness.scheduled == []


# -- leases and the re-drive ---------------------------------------------------------------


def test_a_lease_lets_one_worker_deliver_and_holds_no_transaction_meanwhile(
    harness: Harness,
) -> None:
    notice_id = harness.queue()
    arrived = harness.receiver.hold_next()
    target = webhook.target_from(harness.settings)
    assert target is not None
    outcome: list[outbox_delivery.Attempt] = []

    def first_worker() -> None:
        with httpx.Client() as client:
            outcome.append(
                webhook.deliver(harness.store.engine, notice_id, target=target, client=client)
            )

    worker = threading.Thread(target=first_worker)
    worker.start()
    try:
        assert arrived.wait(timeout=10)
        started = time.monotonic()
        # The second worker takes its own lease transaction: it would wait for the first
        # worker's lock (SQLite's write lock, Postgres' row lock) if one were still held.
        harness.deliver(notice_id)
        with db.transaction(harness.store.engine) as session:
            session.execute(update(Notice).values(last_error=None))
        # A lock still held would keep it until the first worker's post is released (60 s).
        assert time.monotonic() - started < 10
    finally:
        harness.receiver.release()
        worker.join(timeout=10)

    assert [a.status for a in outcome] == [NoticeStatus.SENT]
    assert harness.receiver.ids == [notice_id]
    assert harness.row(notice_id).attempts == 1


def test_a_notice_whose_worker_died_is_re_driven_once_its_lease_runs_out(
    harness: Harness,
) -> None:
    notice_id = harness.queue()
    lease = outbox_delivery.lease_for(harness.settings.redrive_after_s)
    # A worker took the notice and died before posting: the lease is committed, nothing else.
    with db.transaction(harness.store.engine) as session:
        assert (
            outbox_delivery.lease(session, notice_id, now=clock.now(), duration=lease) is not None
        )
    harness.clock.advance(harness.settings.redrive_after_s + 0.1)
    harness.deliver(notice_id)
    assert harness.redrive() == []  # still leased
    assert harness.receiver.received == []

    harness.clock.advance(lease.total_seconds())
    redriven = harness.redrive()
    assert redriven == [notice_id]
    harness.deliver(*redriven)

    assert harness.receiver.ids == [notice_id]
    sent = harness.row(notice_id)
    assert (sent.status, sent.attempts) == (NoticeStatus.SENT, 1)


def test_the_re_drive_publishes_only_notices_due_for_a_while(harness: Harness) -> None:
    now = clock.now()
    grace = timedelta(seconds=harness.settings.redrive_after_s)
    waited = harness.queue(next_attempt_at=now - grace - timedelta(seconds=1))
    fresh = harness.queue()
    backing_off = harness.queue(next_attempt_at=now + timedelta(minutes=5), attempts=3)
    harness.queue(status=NoticeStatus.SENT.value, next_attempt_at=now - timedelta(hours=1))
    harness.queue(status=NoticeStatus.FAILED.value, next_attempt_at=now - timedelta(hours=1))

    assert harness.redrive() == [waited]
    harness.clock.advance(grace.total_seconds() + 1)
    assert sorted(harness.redrive()) == sorted([waited, fresh])
    harness.clock.advance(600)
    assert sorted(harness.redrive()) == sorted([waited, fresh, backing_off])


def test_the_re_drive_publishes_each_notice_at_most_once_per_interval(harness: Harness) -> None:
    interval = harness.settings.redrive_after_s
    lost = [harness.queue() for _ in range(5)]  # their messages never reached a worker
    harness.clock.advance(interval + 0.1)

    # Beat runs the re-drive four times per interval, for three intervals, and no worker
    # takes anything meanwhile (the copies wait behind a long queue).
    messages: list[str] = []
    for _ in range(12):
        messages += harness.redrive()
        harness.clock.advance(interval / 4)

    assert len(messages) == 3 * len(lost)
    assert {notice_id: messages.count(notice_id) for notice_id in lost} == dict.fromkeys(lost, 3)

    # Once delivered (or leased by a worker), a notice is not re-driven again.
    harness.deliver(lost[0])
    with db.transaction(harness.store.engine) as session:
        lease = outbox_delivery.lease_for(interval)
        assert outbox_delivery.lease(session, lost[1], now=clock.now(), duration=lease) is not None
    harness.clock.advance(interval + 0.1)
    assert sorted(harness.redrive()) == sorted(lost[2:])
    assert harness.receiver.ids == [lost[0]]


def test_two_re_drives_at_once_mark_each_notice_once(harness: Harness) -> None:
    notice_id = harness.queue()
    harness.clock.advance(harness.settings.redrive_after_s + 1)
    cutoff = clock.now() - timedelta(seconds=harness.settings.redrive_after_s)
    with db.transaction(harness.store.engine) as session:
        first = outbox_delivery.mark_redriven(session, [notice_id], now=clock.now(), cutoff=cutoff)
    with db.transaction(harness.store.engine) as session:
        second = outbox_delivery.mark_redriven(session, [notice_id], now=clock.now(), cutoff=cutoff)

    assert (first, second) == ([notice_id], [])
    # The mark leaves the notice deliverable at once.
    harness.deliver(notice_id)
    assert harness.row(notice_id).status == NoticeStatus.SENT


def test_without_a_webhook_url_notices_stay_pending_and_are_not_re_driven(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(monkeypatch, harness, settings_for(None))
    notice_id = harness.queue()
    harness.clock.advance(3600)

    harness.deliver(notice_id)

    assert harness.redrive() == []
    kept = harness.row(notice_id)
    assert (kept.status, kept.attempts, kept.last_error) == (NoticeStatus.PENDING, 0, None)
    assert harness.receiver.received == []
    assert harness.scheduled == []


def test_an_unusable_signing_secret_sends_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The variable is checked when settings load; a secret file in TOKENWARDEN_HOME that was
    # damaged later is not, so delivery must cope with one too.
    broken = Settings.model_construct(
        notice_webhook_url=harness.receiver.url, notice_signing_secret="whsec_not base64!"
    )
    use_settings(monkeypatch, harness, broken)
    notice_id = harness.queue()

    harness.deliver(notice_id)

    assert harness.redrive() == []
    assert harness.row(notice_id).attempts == 0
    assert harness.receiver.received == []


def test_an_attempt_that_overran_its_lease_leaves_the_next_lease_alone(harness: Harness) -> None:
    notice_id = harness.queue()
    now = clock.now()
    with db.transaction(harness.store.engine) as session:
        mine = outbox_delivery.lease(session, notice_id, now=now, duration=timedelta(seconds=4))
    assert mine is not None
    later = now + timedelta(seconds=5)
    with db.transaction(harness.store.engine) as session:
        theirs = outbox_delivery.lease(session, notice_id, now=later, duration=timedelta(seconds=4))
    assert theirs is not None
    failed = outbox_delivery.Outcome(NoticeStatus.PENDING, "HTTP 503 Service Unavailable")

    with db.transaction(harness.store.engine) as session:
        attempt = outbox_delivery.record(
            session, notice_id, failed, now=later, leased_until=mine.until
        )

    assert attempt.retry_in_s is None
    assert harness.row(notice_id).next_attempt_at == theirs.until


# -- the task and its plumbing -------------------------------------------------------------


@pytest.mark.parametrize("name", [DELIVER_NOTICES, tokenwarden.config.celery.REDRIVE_NOTICES])
def test_each_notice_task_is_registered_with_the_options_it_relies_on(name: str) -> None:
    import celery

    task = app.tasks[name]

    assert isinstance(task, tasking.CountedTask)
    # No transaction per run: none may be held while a receiver answers.
    assert not isinstance(task, tasking.DatabaseTask)
    assert (task.acks_late, task.reject_on_worker_lost, task.ignore_result) == (True, True, True)
    assert task.autoretry_for == (tasking.TransientDatabaseError,)
    assert task.max_retries is None
    known = {key for klass in celery.Task.__mro__ for key in vars(klass)}
    known |= {attribute for attribute, _setting in celery.Task.from_config}
    options = {key for key in vars(type(task)) if not key.startswith("_")}
    assert options - known == set()
    tokenwarden.tasks.notices.deliver_notices.__header__(
        ["ntc_1"]
    )  # the argument senders must give


def test_the_notice_re_drive_runs_as_often_as_the_inbox_re_drive() -> None:
    schedule = app.conf.beat_schedule
    assert schedule["redrive-notices"]["task"] == tokenwarden.config.celery.REDRIVE_NOTICES
    assert schedule["redrive-notices"]["schedule"] == schedule["redrive-inbox"]["schedule"]


@pytest.mark.parametrize("value", ["ntc_1", [1], ["x" * 41], {"ids": []}])
def test_a_message_with_bad_arguments_is_dead_lettered(harness: Harness, value: Any) -> None:
    tokenwarden.tasks.notices.deliver_notices.run(value)

    with Session(harness.store.engine) as session:
        (letter,) = session.scalars(select(DeadLetter))
    assert letter.reason.startswith("bad arguments: notice_ids must be a list")
    assert letter.task == DELIVER_NOTICES
    assert harness.receiver.received == []


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ((), {}, "bad arguments: expected exactly one argument, notice_ids"),
        ((["ntc_1"],), {"evil": True}, "bad arguments: expected exactly one argument, notice_ids"),
        ((["ntc_1"], ["ntc_2"]), {}, "bad arguments: expected exactly one argument, notice_ids"),
        ((["ntc_1"] * 1001,), {}, "bad arguments: notice_ids must be a list of at most 1000 "),
    ],
)
def test_a_message_of_the_wrong_shape_is_dead_lettered_with_the_reason(
    harness: Harness, args: tuple[Any, ...], kwargs: dict[str, Any], reason: str
) -> None:
    tokenwarden.tasks.notices.deliver_notices.run(*args, **kwargs)

    with Session(harness.store.engine) as session:
        (letter,) = session.scalars(select(DeadLetter))
    assert letter.reason.startswith(reason)
    assert letter.task == DELIVER_NOTICES


@pytest.mark.parametrize("target", ["webhook", "none"])
def test_ids_naming_no_notice_are_dead_lettered_and_a_duplicate_message_is_not(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    sent = harness.queue()
    harness.deliver(sent)
    if target == "none":
        use_settings(monkeypatch, harness, settings_for(None))
    waiting = harness.queue()

    # Among them: a notice already delivered (a duplicate message), which is a normal skip.
    harness.deliver(sent, "ntc_nosuch", waiting, "ntc_bad\x00", "ntc_nosuch")

    with Session(harness.store.engine) as session:
        letters = list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))
    assert [letter.reason for letter in letters] == [
        "no such notice in the outbox: 'ntc_bad\\x00' (an id cannot hold a NUL character)",
        "no such notice in the outbox: 'ntc_nosuch'",
    ]
    assert {letter.task for letter in letters} == {DELIVER_NOTICES}
    assert all(waiting in (letter.body or "") for letter in letters)  # the message, kept
    assert harness.row(sent).attempts == 1
    if target == "webhook":
        assert harness.receiver.ids == [sent, waiting]
        assert harness.row(waiting).status == NoticeStatus.SENT
    else:
        assert harness.receiver.ids == [sent]
        assert (harness.row(waiting).status, harness.row(waiting).attempts) == ("pending", 0)


def test_a_worker_process_posts_every_notice_over_one_kept_connection(harness: Harness) -> None:
    notice_ids = [harness.queue() for _ in range(4)]

    for notice_id in notice_ids:  # one message each, as the publisher sends them
        harness.deliver(notice_id)

    assert harness.receiver.ids == notice_ids
    assert len({got.peer_port for got in harness.receiver.received}) == 1


def test_the_process_client_is_closed_at_shutdown_and_never_shared_with_a_fork() -> None:
    from celery import signals

    parent = webhook.shared_client()
    assert webhook.shared_client() is parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a prefork pool child
        code = 1
        try:
            child = webhook.shared_client()
            fresh = child is not parent and not child.is_closed
            os.write(write, b"own" if fresh and webhook.shared_client() is child else b"parent's")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        assert os.read(read, 16) == b"own"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert not parent.is_closed  # the child left the parent's connections alone

    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)

    assert parent.is_closed
    again = webhook.shared_client()
    assert again is not parent
    assert not again.is_closed
    signals.worker_shutdown.send(sender=None)
    assert again.is_closed


@pytest.mark.parametrize("webhook", [True, False], ids=["webhook", "no-webhook"])
def test_a_leak_applied_by_the_worker_publishes_its_notice_after_commit(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, webhook: bool
) -> None:
    """With a webhook the notice is published once committed; without one there is nowhere
    to post it, so nothing is published and it waits in the outbox."""
    from tokenwarden.worker.domain.issuing import create_token
    from tokenwarden.worker.domain.members import add_member
    from tokenwarden.worker.domain.models import TokenKind

    now = clock.now()
    with db.transaction(harness.store.engine) as session:
        add_member(
            session,
            org_id="acme",
            user_id="bob",
            role="user",
            email="bob@acme.example",
            at=now - timedelta(days=1),
            now=now - timedelta(days=1),
            source="test",
        )
        issued = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            user_id="bob",
            name="laptop",
            expires_at=now + timedelta(days=30),
            now=now - timedelta(days=1),
        )
        raw = {
            "specversion": "1.0",
            "id": "evt-leak",
            "source": "https://scanner.example",
            "type": "token.leak_suspected",
            "time": now.isoformat(),
            "data": {"token": issued.token},
        }
        inbox.store_events(session, [parse_event(raw)], now=now)
    seen: list[tuple[list[str], list[str]]] = []

    def publish_ids(_app: Any, ids: list[str]) -> None:
        with Session(harness.store.engine) as other:  # sees committed rows only
            seen.append((list(ids), list(other.scalars(select(Notice.id)))))

    monkeypatch.setattr(publishing, "publish_notice_ids", publish_ids)
    settings = harness.settings if webhook else settings_for(None)
    monkeypatch.setattr(publishing, "get_settings", lambda: settings)

    tokenwarden.tasks.events.process_events.run(["evt-leak"])

    if not webhook:
        assert seen == []
        with Session(harness.store.engine) as other:
            (pending,) = other.scalars(select(Notice))
        assert pending.status == NoticeStatus.PENDING.value
        return
    ((published, committed),) = seen
    assert published == committed
    assert len(published) == 1
    harness.deliver(*published)
    (got,) = harness.receiver.received
    assert issued.token.encode() not in got.body
    assert issued.token[7:39].encode() not in got.body


@contextlib.contextmanager
def logged_lines(level: str = "INFO") -> Iterator[io.StringIO]:
    """What is logged meanwhile, as JSON lines; the logging set-up is restored afterwards."""
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    config = structlog.get_config()
    stream = io.StringIO()
    configure_logging(json=True, level=level, stream=stream)
    try:
        yield stream
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(root_level)
        structlog.configure(**config)
        structlog.contextvars.clear_contextvars()


def test_each_attempt_is_logged_with_the_task_and_the_notice(harness: Harness) -> None:
    notice_id = harness.queue()
    with logged_lines() as stream:
        tokenwarden.tasks.notices.deliver_notices.apply(args=[[notice_id]], task_id="task-notice")
        structlog.get_logger("test").info("after the run")

    logged = [json.loads(line) for line in stream.getvalue().splitlines()]
    attempt = next(line for line in logged if line["event"] == "notice.attempt")
    assert (attempt["task_id"], attempt["task_name"]) == ("task-notice", DELIVER_NOTICES)
    assert (attempt["notice_id"], attempt["status"]) == (notice_id, "sent")
    summary = next(line for line in logged if line["event"] == "notices.attempted")
    assert summary["sent"] == 1
    assert "notice_id" not in summary
    assert not {"task_id", "task_name", "notice_id"} & logged[-1].keys()


@pytest.mark.parametrize(
    ("userinfo", "query", "secrets"),
    [
        ("hookuser:hookpa55word@", "secret=qu3rys3cret", ("hookpa55word", "qu3rys3cret")),
        ("k3yinus3r@", "b4res3cret", ("k3yinus3r", "b4res3cret")),
    ],
    ids=["password-and-named-value", "user-alone-and-bare-value"],
)
def test_a_secret_in_the_webhook_url_never_reaches_a_log(
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    userinfo: str,
    query: str,
    secrets: tuple[str, ...],
) -> None:
    port = harness.receiver.url.split(":")[2].split("/")[0]
    url = f"http://{userinfo}127.0.0.1:{port}/hooks/notices?{query}"
    use_settings(monkeypatch, harness, settings_for(url))
    notice_id = harness.queue()
    harness.receiver.script = [Reply(503)]  # a retry logs its reason as well
    with logged_lines(level="DEBUG") as stream:
        harness.deliver(notice_id)
        harness.clock.until(harness.row(notice_id).next_attempt_at)
        harness.deliver(notice_id)

    assert harness.row(notice_id).status == NoticeStatus.SENT
    assert len(harness.receiver.received) == 2
    output = stream.getvalue()
    attempts = [json.loads(line) for line in output.splitlines() if "notice.attempt" in line]
    assert [line["status"] for line in attempts] == ["pending", "sent"]
    assert {line["receiver"] for line in attempts} == {f"http://127.0.0.1:{port}"}
    for secret in secrets:
        assert secret not in output


# -- the arithmetic ------------------------------------------------------------------------


def test_backoff_grows_with_jitter_honours_retry_after_and_is_capped() -> None:
    for attempts, low, high in [(1, 0.5, 1), (2, 1, 2), (5, 8, 16), (40, 300, 600)]:
        for _ in range(50):
            assert low <= outbox_delivery.backoff_s(attempts) <= high
    assert outbox_delivery.backoff_s(1, retry_after_s=30) == 30
    assert outbox_delivery.backoff_s(1, retry_after_s=86_400) == outbox_delivery.BACKOFF_CAP_S


def test_the_lease_follows_the_re_drive_setting_and_outlasts_the_request() -> None:
    assert outbox_delivery.lease_for(30) == timedelta(seconds=60)
    assert outbox_delivery.lease_for(2) == timedelta(seconds=4)
    assert outbox_delivery.lease_for(0.1) == timedelta(seconds=outbox_delivery.MIN_LEASE_S)
    assert outbox_delivery.lease_for(600) == timedelta(seconds=outbox_delivery.LEASE_S)
    for redrive in (0.1, 2, 30, 600):
        lease = outbox_delivery.lease_for(redrive)
        assert outbox_delivery.timeout_for(lease) <= lease.total_seconds() / 2
    assert outbox_delivery.timeout_for(outbox_delivery.lease_for(30)) == outbox_delivery.TIMEOUT_S


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example/services/T0/B0/s3cr3t?token=abc", "https://hooks.example"),
        ("http://user:pw@127.0.0.1:9000/notices", "http://127.0.0.1:9000"),
    ],
)
def test_log_lines_name_the_receiver_but_never_its_path_or_credentials(
    url: str, shown: str
) -> None:
    assert outbox_delivery.Target(url=url, secret=SECRET).receiver == shown
