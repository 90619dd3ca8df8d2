"""Prometheus metrics of the producer API: the store's state, read at scrape time, and the
API process's own counters.

Each app has its own :class:`CollectorRegistry`, so several apps in one process (tests, a
reload) never clash over metric names.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Final

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import clock
from worker.db import transaction
from worker.inbox import counts, recent_apply_seconds
from worker.models import DeadLetter, Token

log = structlog.get_logger(__name__)

# A path that matched no route is counted under one label, so a scanner probing random URLs
# cannot grow the number of time series without bound.
UNMATCHED: Final = "unmatched"
APPLY_WINDOW: Final = timedelta(minutes=15)


class StoreCollector(Collector):
    """Events by type and status, revocations by reason and dead letters, from the database."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "tokenwarden_store_up", "1 when the token store answered this scrape, else 0."
        )
        try:
            with transaction(self._engine()) as session:
                by_type = counts(session)
                revoked = session.execute(
                    select(Token.revoke_reason, func.count())
                    .where(Token.revoked_at.is_not(None))
                    .group_by(Token.revoke_reason)
                ).all()
                dead = session.scalar(select(func.count()).select_from(DeadLetter)) or 0
                applied = recent_apply_seconds(session, now=clock.now(), window=APPLY_WINDOW)
        except Exception as error:
            # A scrape must still answer (and say the store is down) when the database is not.
            log.warning("metrics.store_unavailable", error=type(error).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        events = GaugeMetricFamily(
            "tokenwarden_events", "Inbox events by type and status.", labels=["type", "status"]
        )
        for (kind, status), number in sorted(by_type.items()):
            events.add_metric([kind, status], number)
        yield events
        revocations = GaugeMetricFamily(
            "tokenwarden_revoked_tokens", "Revoked or expired tokens by reason.", labels=["reason"]
        )
        for reason, number in sorted(revoked, key=lambda row: row[0] or ""):
            revocations.add_metric([reason or "unknown"], number)
        yield revocations
        yield GaugeMetricFamily(
            "tokenwarden_dead_letters", "Queue messages the worker could not use.", value=dead
        )
        # The worker's processes each keep their own counters; the inbox rows tell how long
        # events took from acceptance to done, whichever process applied them.
        timing = SummaryMetricFamily(
            "tokenwarden_recent_event_apply_seconds",
            "Seconds from acceptance to applied, for events received in the last 15 minutes.",
            count_value=len(applied),
            sum_value=sum(applied),
        )
        yield timing
        yield GaugeMetricFamily(
            "tokenwarden_recent_event_apply_seconds_max",
            "Slowest acceptance-to-applied time in the last 15 minutes.",
            value=max(applied, default=0.0),
        )


class _ProcessRegistry(Collector):
    """The process-wide registry: process and runtime metrics, and any a task class added."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class ApiMetrics:
    """The registry of one app and the counters its requests update."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(engine))
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
