"""Prometheus metrics of the producer API: the store's state, read at scrape time, and the
API process's own counters.

Each app has its own :class:`CollectorRegistry`, so several apps in one process (tests, a
reload) never clash over metric names.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import read_transaction
from tokenwarden.worker.domain.endpoints import disabled_endpoints
from tokenwarden.worker.domain.inbox import counts, recent_apply_seconds
from tokenwarden.worker.domain.models import DeadLetter, Token
from tokenwarden.worker.domain.outbox_delivery import Backlog, backlog

CHANNELS: Final = ("webhook", "email")

log = structlog.get_logger(__name__)

# A path that matched no route is counted under one label, so a scanner probing random URLs
# cannot grow the number of time series without bound.
UNMATCHED: Final = "unmatched"
APPLY_WINDOW: Final = timedelta(minutes=15)
# A scrape shows the store as read at most this many seconds ago (see StoreCollector) ...
STORE_MAX_AGE_S: Final = 5.0
# ... or longer when reading it is slow: reads take at most this share of the time.
STORE_READ_SHARE: Final = 0.1
# The whole page (the API's own counters too) is rendered at most once in this long.
PAGE_MAX_AGE_S: Final = 1.0


@dataclass(frozen=True)
class StoreSnapshot:
    """What a scrape shows of the store, as read at one moment."""

    events: dict[tuple[str, str], int]  # (type, status) -> events
    revoked: list[tuple[str | None, int]]  # (reason, tokens)
    dead_letters: int
    applied: int  # events received in the last 15 minutes and applied since
    applied_seconds: float  # their acceptance-to-applied times, summed
    applied_slowest: float
    # Per channel (webhook, email): pending, failed, oldest pending age.
    notices: dict[str, Backlog] = field(default_factory=dict)
    webhook_endpoints_disabled: int = 0


def read_store(engine: Engine, *, channels: Collection[str] = CHANNELS) -> StoreSnapshot:
    """Read what the metrics show, in one read-only transaction (no write lock on SQLite);
    the notice backlog of the configured ``channels`` only (a notice's webhook delivery waits
    while no webhook is set, and would only ever grow)."""
    with read_transaction(engine) as session:
        by_type = counts(session)
        revoked = session.execute(
            select(Token.revoke_reason, func.count())
            .where(Token.revoked_at.is_not(None))
            .group_by(Token.revoke_reason)
        ).all()
        dead = session.scalar(select(func.count()).select_from(DeadLetter)) or 0
        applied = recent_apply_seconds(session, now=clock.now(), window=APPLY_WINDOW)
        notices = {
            channel: found
            for channel, found in backlog(session, now=clock.now()).items()
            if channel in channels
        }
        disabled = disabled_endpoints(session)
    return StoreSnapshot(
        events=by_type,
        revoked=[(reason, number) for reason, number in revoked],
        dead_letters=dead,
        applied=len(applied),
        applied_seconds=sum(applied),
        applied_slowest=max(applied, default=0.0),
        notices=notices,
        webhook_endpoints_disabled=disabled,
    )


class StoreCollector(Collector):
    """Events by type and status, revocations by reason and dead letters, from the database.

    The counts are whole-table aggregates, whose cost grows with the inbox. Anyone who can
    reach the API can scrape it (unless ``TOKENWARDEN_METRICS_KEY`` is set), as often as they
    like: so the store is read at most once every :data:`STORE_MAX_AGE_S` seconds whatever the
    number of scrapes, concurrent scrapes wait for the one read under way and share its
    result, and a read that takes long is kept for longer, so reads take at most
    :data:`STORE_READ_SHARE` of the time. The read itself never takes SQLite's write lock.
    """

    def __init__(self, engine: Callable[[], Engine], channels: Collection[str] = CHANNELS) -> None:
        self._engine = engine
        self._channels = channels
        self._lock = threading.Lock()
        self._snapshot: StoreSnapshot | None = None
        self._fresh_until = float("-inf")

    def snapshot(self) -> StoreSnapshot | None:
        """The store's figures at most a few seconds old; None when the store did not answer."""
        with self._lock:
            started = time.monotonic()
            if started < self._fresh_until:
                return self._snapshot
            try:
                self._snapshot = read_store(self._engine(), channels=self._channels)
            except Exception as error:
                # A scrape must still answer (and say the store is down) when it is not.
                log.warning("metrics.store_unavailable", error=type(error).__name__)
                self._snapshot = None
            ended = time.monotonic()
            self._fresh_until = ended + max(STORE_MAX_AGE_S, (ended - started) / STORE_READ_SHARE)
            return self._snapshot

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "tokenwarden_store_up",
            "1 when the token store answered its latest read (a few seconds ago), else 0.",
        )
        store = self.snapshot()
        if store is None:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        events = GaugeMetricFamily(
            "tokenwarden_events", "Inbox events by type and status.", labels=["type", "status"]
        )
        for (kind, status), number in sorted(store.events.items()):
            events.add_metric([kind, status], number)
        yield events
        revocations = GaugeMetricFamily(
            "tokenwarden_revoked_tokens", "Revoked or expired tokens by reason.", labels=["reason"]
        )
        for reason, number in sorted(store.revoked, key=lambda row: row[0] or ""):
            revocations.add_metric([reason or "unknown"], number)
        yield revocations
        yield GaugeMetricFamily(
            "tokenwarden_dead_letters",
            "Queue messages the worker could not use.",
            value=store.dead_letters,
        )
        # The worker's processes each keep their own counters; the inbox rows tell how long
        # events took from acceptance to done, whichever process applied them.
        yield SummaryMetricFamily(
            "tokenwarden_recent_event_apply_seconds",
            "Seconds from acceptance to applied, for events received in the last 15 minutes.",
            count_value=store.applied,
            sum_value=store.applied_seconds,
        )
        yield GaugeMetricFamily(
            "tokenwarden_recent_event_apply_seconds_max",
            "Slowest acceptance-to-applied time in the last 15 minutes.",
            value=store.applied_slowest,
        )
        yield from _notice_gauges(store)


def _notice_gauges(store: StoreSnapshot) -> Iterable[Metric]:
    """The notice outbox per channel, and the webhook endpoints disabled for failing."""
    pending = GaugeMetricFamily(
        "tokenwarden_notices_pending", "Notice deliveries pending, by channel.", labels=["channel"]
    )
    failed = GaugeMetricFamily(
        "tokenwarden_notices_failed",
        "Notice deliveries that failed, by channel.",
        labels=["channel"],
    )
    oldest = GaugeMetricFamily(
        "tokenwarden_notices_oldest_pending_age_seconds",
        "Age of the oldest pending notice delivery, by channel (0 when none is pending).",
        labels=["channel"],
    )
    for channel, figures in sorted(store.notices.items()):
        pending.add_metric([channel], figures.pending)
        failed.add_metric([channel], figures.failed)
        oldest.add_metric([channel], figures.oldest_pending_age_s)
    yield pending
    yield failed
    yield oldest
    yield GaugeMetricFamily(
        "tokenwarden_webhook_endpoints_disabled",
        "Webhook endpoints disabled after failing too long (tokenwarden notices resume).",
        value=store.webhook_endpoints_disabled,
    )


class _ProcessRegistry(Collector):
    """The process-wide registry: process and runtime metrics, and any a task class added."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class ApiMetrics:
    """The registry of one app and the counters its requests update."""

    def __init__(self, engine: Callable[[], Engine], channels: Collection[str] = CHANNELS) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(engine, channels))
        self.registry.register(_ProcessRegistry())
        self.events_accepted = Counter(
            "tokenwarden_events_accepted",
            "Events accepted by the producer API, by type.",
            ["type"],
            registry=self.registry,
        )
        self.requests = Counter(
            "tokenwarden_api_requests",
            "Requests answered by the producer API, by route and status.",
            ["path", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tokenwarden_api_request_duration_seconds",
            "Time to answer a request, by route.",
            ["path"],
            registry=self.registry,
        )

        # The children of each label set, looked up once: paths are route templates and
        # statuses few, and finding a child costs a request more than updating it.
        self._answered: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._accepted: dict[str, Any] = {}
        self._render_lock = threading.Lock()
        self._rendered = b""
        self._rendered_until = float("-inf")

    def render(self) -> bytes:
        """The metrics page, rendered at most :data:`PAGE_MAX_AGE_S` seconds ago.

        Rendering takes about a millisecond and a half of the API's CPU (and the GIL): a
        flood of scrapes would otherwise take it from the producers. Scrapes that arrive
        during a rendering wait for it and share it.
        """
        with self._render_lock:
            if time.monotonic() >= self._rendered_until:
                self._rendered = generate_latest(self.registry)
                self._rendered_until = time.monotonic() + PAGE_MAX_AGE_S
            return self._rendered

    def observe(self, path: str, status: int, seconds: float) -> None:
        children = self._answered.get((path, status))
        if children is None:
            children = (
                self.requests.labels(path=path, status=str(status)),
                self.duration.labels(path=path),
            )
            self._answered[(path, status)] = children
        count, duration = children
        count.inc()
        duration.observe(seconds)

    def accepted(self, kinds: Iterable[str]) -> None:
        """Count accepted events by type (``kinds``: one type per event)."""
        for kind, number in Tally(kinds).items():
            child = self._accepted.get(kind)
            if child is None:
                child = self._accepted[kind] = self.events_accepted.labels(type=kind)
            child.inc(number)


class RequestMetrics:
    """ASGI middleware counting each request by its route template and status."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router records the matched route in the scope it was handed: this one.
            route = scope.get("route")
            path = getattr(route, "path", None) or UNMATCHED
            self.metrics.observe(path, status, time.perf_counter() - started)
