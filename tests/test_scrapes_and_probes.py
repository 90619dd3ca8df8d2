"""GET /metrics and GET /readyz as a scraper, a load balancer and a stranger see them.

Neither may slow down producers: a scrape reads the store without SQLite's write lock, and
reads it at most every few seconds however many scrapers there are; a readiness probe
opens at most one broker connection a second. ``TOKENWARDEN_METRICS_KEY`` closes /metrics
to whoever does not hold it.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update
from starlette.exceptions import StarletteDeprecationWarning

import tokenwarden.producer.app_state
from tests.clocks import SteppedTime
from tests.conftest import Store
from tokenwarden.config.settings import Settings, load_settings
from tokenwarden.producer import metrics
from tokenwarden.producer.api import create_app
from tokenwarden.producer.app_state import READY_MAX_AGE_S
from tokenwarden.producer.metrics import STORE_MAX_AGE_S
from tokenwarden.worker.domain import clock, inbox
from tokenwarden.worker.domain.db import engine_for, transaction
from tokenwarden.worker.domain.inbox import dead_letter
from tokenwarden.worker.domain.models import EventStatus, InboxEvent
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

AUTH = {"Authorization": "Bearer twp_scrapes_test_key"}
METRICS_KEY = "scrape-key-0123456789abcdef"
SCRAPERS = 16


def _event(number: int, kind: str = "membership.removed") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"evt-scrape-{number}",
        "source": "hr://workday",
        "type": kind,
        "time": "2026-11-27T19:00:00Z",
        "data": {"user_id": f"u-{number}"}
        if kind == "user.deactivated"
        else {"org_id": "acme", "user_id": f"u-{number}"},
    }


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


Serve = Callable[..., TestClient]


@pytest.fixture
def serve(store: Store, tmp_path: Path) -> Iterator[Serve]:
    """The API on the test store and a file broker of its own; ``wrap`` sees its Celery app."""
    opened: list[tuple[TestClient, Any]] = []

    def start(*, wrap: Callable[[Any], None] | None = None, **options: Any) -> TestClient:
        defaults: dict[str, Any] = {
            "home": tmp_path / "home",
            "producer_keys": ("twp_scrapes_test_key",),
        }
        settings = Settings(**(defaults | options | {"database_url": store.url}))
        celery_app = make_celery(settings)
        if wrap is not None:
            wrap(celery_app)
        client = TestClient(create_app(settings, celery_app=celery_app))
        client.__enter__()
        opened.append((client, celery_app))
        return client

    yield start
    for client, celery_app in opened:
        client.__exit__(None, None, None)
        celery_app.close()
    store.truncate()


@contextmanager
def _writer_holding_the_lock(store: Store) -> Iterator[None]:
    """Another connection in the middle of a write transaction (SQLite: the write lock held)."""
    with store.engine.connect() as connection, connection.begin() as writing:
        dead_letter_row = {"at": clock.now(), "reason": "held open"}
        connection.execute(
            text("INSERT INTO dead_letters (at, reason) VALUES (:at, :reason)"), dead_letter_row
        )
        yield
        writing.rollback()


def _events_shown(page: str) -> dict[tuple[str, str], int]:
    shown = {}
    for line in page.splitlines():
        if line.startswith("tokenwarden_events{"):
            labels, number = line.rsplit(" ", 1)
            fields = dict(
                part.split("=") for part in labels[len("tokenwarden_events{") : -1].split(",")
            )
            shown[(fields["type"].strip('"'), fields["status"].strip('"'))] = int(float(number))
    return shown


def _events_stored(store: Store) -> dict[tuple[str, str], int]:
    with transaction(store.engine) as session:
        rows = session.execute(
            select(InboxEvent.type, InboxEvent.status, func.count()).group_by(
                InboxEvent.type, InboxEvent.status
            )
        ).all()
    return {(kind, status): number for kind, status, number in rows}


def test_a_write_goes_through_while_a_scrape_is_reading(
    serve: Serve, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = serve()
    reading, written = threading.Event(), threading.Event()
    real_counts = inbox.counts

    def counts_then_linger(session: Any) -> dict[tuple[str, str], int]:
        found = real_counts(session)
        reading.set()
        written.wait(timeout=10)  # a scrape of a large store: still reading
        return found

    monkeypatch.setattr(metrics, "counts", counts_then_linger)
    with ThreadPoolExecutor(1) as pool:
        scrape = pool.submit(api.get, "/metrics")
        assert reading.wait(timeout=30)
        started = time.monotonic()
        with transaction(store.engine) as session:
            dead_letter(session, reason="written during a scrape", now=clock.now())
        took = time.monotonic() - started
        written.set()
        page = scrape.result(timeout=60).text
    # A write that waited for the scrape would wait out its 10 s linger.
    assert took < 5, f"the write waited {took:.1f}s for the scrape"
    assert "tokenwarden_store_up 1.0" in page


def test_metrics_and_readiness_answer_while_a_writer_holds_its_transaction(
    serve: Serve, store: Store
) -> None:
    api = serve()
    with ThreadPoolExecutor(2) as pool:
        with _writer_holding_the_lock(store):
            scrape, probe = pool.submit(api.get, "/metrics"), pool.submit(api.get, "/readyz")
            done, _ = wait([scrape, probe], timeout=10)  # the writer holds on until it is over
        page, readiness = scrape.result(timeout=60), probe.result(timeout=60)
    assert scrape in done, "the scrape waited for the writer"
    assert probe in done, "the readiness probe waited for the writer"
    assert "tokenwarden_store_up 1.0" in page.text
    assert (readiness.status_code, readiness.json()["database"]) == (200, "ok")


def test_the_inbox_counts_follow_the_store_and_concurrent_scrapes_read_it_once(
    serve: Serve, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = serve()
    monkeypatch.setattr(metrics, "time", stepped := SteppedTime())
    sent = [_event(n) for n in range(3)] + [_event(n, "user.deactivated") for n in range(3, 5)]
    assert api.post("/v1/events", json=sent, headers=AUTH).status_code == 202
    reads: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM events GROUP BY" in " ".join(statement.split()):
            reads.append(statement)

    engine = engine_for(store.url)
    event.listen(engine, "before_cursor_execute", note)
    try:
        with ThreadPoolExecutor(SCRAPERS) as pool:
            for _ in range(2):  # two renders of the page, a second or so apart
                pages = list(pool.map(lambda _: api.get("/metrics").text, range(SCRAPERS)))
                stepped.advance(1.5 * metrics.PAGE_MAX_AGE_S)
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert len(reads) == 1, f"{2 * SCRAPERS} scrapes read the inbox {len(reads)} times"
    assert _events_shown(pages[-1]) == {
        ("membership.removed", "pending"): 3,
        ("user.deactivated", "pending"): 2,
    }

    # The worker applies some and dead-letters one: the counts follow within seconds.
    with transaction(store.engine) as session:
        session.execute(
            update(InboxEvent)
            .where(InboxEvent.id.in_(["evt-scrape-0", "evt-scrape-1"]))
            .values(status=EventStatus.DONE.value, finished_at=clock.now())
        )
        session.execute(
            update(InboxEvent)
            .where(InboxEvent.id == "evt-scrape-3")
            .values(status=EventStatus.DEAD.value, finished_at=clock.now())
        )
    expected = {
        ("membership.removed", "done"): 2,
        ("membership.removed", "pending"): 1,
        ("user.deactivated", "dead"): 1,
        ("user.deactivated", "pending"): 1,
    }
    assert _events_stored(store) == expected
    assert _events_shown(api.get("/metrics").text) != expected, "read before its time"
    stepped.advance(STORE_MAX_AGE_S)
    assert _events_shown(api.get("/metrics").text) == expected


def test_metrics_key_refuses_a_scrape_without_it(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENWARDEN_METRICS_KEY", METRICS_KEY)
    settings = load_settings()
    assert settings.metrics_key == METRICS_KEY
    api = serve(metrics_key=settings.metrics_key)
    refusals = {
        "none": {},
        "wrong key": {"Authorization": "Bearer " + METRICS_KEY[:-1] + "x"},
        "key with a suffix": {"Authorization": f"Bearer {METRICS_KEY}x"},
        "key one character short": {"Authorization": f"Bearer {METRICS_KEY[:-1]}"},
        "not a bearer": {"Authorization": f"Basic {METRICS_KEY}"},
        "key alone": {"Authorization": METRICS_KEY},
        "producer key": AUTH,
    }
    for name, headers in refusals.items():
        refused = api.get("/metrics", headers=headers)
        assert refused.status_code == 401, name
        assert refused.headers["WWW-Authenticate"] == "Bearer", name
        assert "tokenwarden_" not in refused.text, name
        assert METRICS_KEY not in refused.text, name
    allowed = api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert allowed.status_code == 200
    assert "tokenwarden_store_up 1.0" in allowed.text
    operation = api.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"metricsKey": []}]
    assert "401" in operation["responses"]


def test_metrics_are_open_without_a_metrics_key(serve: Serve) -> None:
    api = serve()
    assert api.get("/metrics").status_code == 200
    operation = api.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert "security" not in operation
    assert "401" not in operation["responses"]


class _CountingBroker:
    """Counts the broker connections the API opens; can play a broker that went down."""

    def __init__(self) -> None:
        self.opened: list[float] = []
        self.down = False

    def wrap(self, celery_app: Any) -> None:
        original = celery_app.connection_for_write

        def connection_for_write(*args: Any, **kwargs: Any) -> Any:
            self.opened.append(time.monotonic())
            time.sleep(0.1)  # a broker a little slow to answer, so that probes overlap
            if self.down:
                raise ConnectionRefusedError("the broker is down")
            return original(*args, **kwargs)

        celery_app.connection_for_write = connection_for_write


def test_readiness_probes_open_at_most_one_broker_connection_a_second(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = _CountingBroker()
    api = serve(wrap=broker.wrap)
    monkeypatch.setattr(tokenwarden.producer.app_state, "time", stepped := SteppedTime())

    def flood() -> None:
        with ThreadPoolExecutor(SCRAPERS) as pool:
            answers = list(pool.map(lambda _: api.get("/readyz").status_code, range(SCRAPERS)))
        assert set(answers) == {200}

    flood()
    flood()
    stepped.advance(READY_MAX_AGE_S * 0.9)
    flood()
    assert len(broker.opened) == 1, "probes within a second share one answer"
    stepped.advance(READY_MAX_AGE_S * 0.1)
    flood()
    assert len(broker.opened) == 2, "a second later, one new probe"

    # The answer is at most a second old: a broker that goes down is reported that soon.
    broker.down = True
    assert api.get("/readyz").status_code == 200
    stepped.advance(READY_MAX_AGE_S)
    probe = api.get("/readyz")
    assert probe.status_code == 503
    assert probe.json()["broker"].startswith("unreachable")
