"""What the producer API's routes share, kept on ``app.state``: the settings, the token store,
the broker, the inbox writer, GitHub's keys, the metrics, and the readiness probe over them.

A route reaches it through the :data:`Shared` dependency, or :func:`state_of` when it takes the
bare request (producer/routes/events.py). This module holds no route: it must not import
``producer.api``, ``producer.routes`` or ``tasks``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Annotated, Any, Final, TypeVar, cast

import structlog
from fastapi import Depends, Request
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool

from tokenwarden.config.redaction import first_line
from tokenwarden.config.settings import Settings
from tokenwarden.producer import github
from tokenwarden.producer.github import GitHubKeys
from tokenwarden.producer.inbox_writer import InboxWriter, StoreUnavailable
from tokenwarden.producer.intake import Prepared, Refused, mask
from tokenwarden.producer.metrics import ApiMetrics
from tokenwarden.producer.rate_limit import CallerLimit
from tokenwarden.producer.schemas import Readiness
from tokenwarden.producer.ssf.receiver import SsfReceiver
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import engine_for, reader, transaction
from tokenwarden.worker.domain.events import CloudEvent
from tokenwarden.worker.domain.inbox import Conflict, Stored, store_events
from tokenwarden.worker.runtime.publishing import PublishError, publish_event_ids

# Every module of the API logs under the one name its lines have always carried.
log = structlog.get_logger("tokenwarden.producer.api")

T = TypeVar("T")

RETRY_AFTER_S: Final = 5
READY_TIMEOUT_S: Final = 3.0
# /readyz answers with a probe at most this old: each probe opens a broker connection.
READY_MAX_AGE_S: Final = 1.0
# Ids named in one log line; a batch of a thousand would make the line unreadable.
LOGGED_IDS: Final = 20


class AppState:
    """What the routes share: settings, the store, the broker and the metrics."""

    def __init__(
        self, settings: Settings, celery_app: Any, github_keys: GitHubKeys | None = None
    ) -> None:
        self.settings = settings
        self.celery_app = celery_app
        self.database_url = settings.resolved_database_url
        # The notice channels whose backlog /metrics shows: email rows exist only while an
        # SMTP server is set, webhook deliveries wait (and pile up) while no webhook is.
        webhook = ("webhook",) if settings.notice_webhook_url else ()
        self.metrics_channels = (*webhook, "email")
        self.metrics = ApiMetrics(self.engine, channels=self.metrics_channels)
        self.github_keys = github_keys or GitHubKeys(settings.github_keys_url)
        self.unverified = github.UnverifiedBytes()
        rate = (settings.leak_rate_per_minute, settings.leak_rate_burst)
        self.gitlab_limit = CallerLimit(*rate, what="revocation requests")
        self.github_failures = CallerLimit(*rate, what="reports failing the signature checks")
        self.ssf = SsfReceiver(settings, self.metrics.registry)
        self.writer = InboxWriter(self.database_url, partial(publish_event_ids, celery_app))
        self._readiness: tuple[float, Readiness] | None = None  # (fresh until, answer)
        self._probing: asyncio.Future[Readiness] | None = None

    def engine(self) -> Engine:
        # Created on first use, so an app on a store that is down still starts and says so.
        return engine_for(self.database_url)

    def store(self, events: Sequence[CloudEvent]) -> Stored:
        with transaction(self.engine()) as session:
            return store_events(session, events, now=clock.now())

    def store_github(
        self, events: Sequence[CloudEvent], token_hashes: Sequence[str]
    ) -> tuple[Stored, set[str]]:
        """Store the events and tell which hashes name tokens we issued, in one transaction."""
        now = clock.now()
        with transaction(self.engine()) as session:
            ours = github.issued_hashes(session, token_hashes)
            return store_events(session, events, now=now), ours

    async def guarded(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on the thread pool, its database failures turned into refusals."""
        try:
            return await run_in_threadpool(work, *args)
        except Conflict as conflict:
            raise conflicting(conflict) from None
        except Exception as error:
            # Whatever the database layer raised (down, locked, not migrated), nothing was
            # stored and a resend is safe: tell the producer to retry, never a 500.
            raise unavailable(type(error).__name__, str(error)) from None

    async def publish(self, events: Sequence[CloudEvent], stored: Stored) -> list[str]:
        """Put the stored ids on the queue; a broker that is down leaves them to the re-drive."""
        published, problem = True, None
        if stored.to_publish:
            try:
                await run_in_threadpool(publish_event_ids, self.celery_app, stored.to_publish)
            except PublishError as error:
                published, problem = False, mask(first_line(error))
        self.record_accepted(
            events,
            stored.accepted,
            published=len(stored.to_publish) if published else 0,
            problem=problem,
        )
        return stored.accepted

    async def store_prepared(self, events: Sequence[Prepared]) -> list[str]:
        """Store ``events`` through the inbox writer and count them; their ids, each once.

        :class:`Refused` with ``409`` for an id used for other content, ``503`` when the
        store cannot take them (nothing of them stored either way).
        """
        try:
            outcome = await self.writer.store(events)
        except Conflict as conflict:
            raise conflicting(conflict) from None
        except StoreUnavailable as error:
            raise unavailable(error.kind, str(error)) from None
        self.record_accepted(
            events,
            outcome.accepted,
            published=outcome.published,
            problem=mask(outcome.publish_error) if outcome.publish_error else None,
        )
        return outcome.accepted

    def record_accepted(
        self,
        events: Iterable[Prepared | CloudEvent],
        accepted: list[str],
        *,
        published: int,
        problem: str | None,
    ) -> None:
        """Count the accepted events by type and log them; a warning when publishing failed."""
        self.metrics.accepted({event.id: event.type for event in events}.values())
        (log.info if problem is None else log.warning)(
            "events.accepted",
            count=len(accepted),
            ids=accepted[:LOGGED_IDS],
            published=published,
            publish_error=problem,
        )

    def check_database(self) -> None:
        with reader(self.engine()).connect() as connection:
            connection.execute(text("SELECT 1"))

    def check_broker(self) -> None:
        with self.celery_app.connection_for_write(connect_timeout=READY_TIMEOUT_S) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=READY_TIMEOUT_S
            )

    async def readiness(self) -> Readiness:
        """The last probe's answer if under :data:`READY_MAX_AGE_S` old, else a new probe's.

        Anyone may call /readyz, as often as they like, and each probe opens a broker
        connection: requests that arrive while a probe is under way wait for its answer, and
        the answer serves every request for a second, so a flood opens about one a second.
        """
        if self._readiness is not None and time.monotonic() < self._readiness[0]:
            return self._readiness[1]
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._check_both())
        # Shielded: a caller that goes away must not cancel the probe the others wait for.
        return await asyncio.shield(self._probing)

    async def _check_both(self) -> Readiness:
        try:
            database, broker = await asyncio.gather(
                _probe("database", self.check_database), _probe("broker", self.check_broker)
            )
            ready = database == broker == "ok"
            readiness = Readiness(
                status="ready" if ready else "unavailable", database=database, broker=broker
            )
            self._readiness = (time.monotonic() + READY_MAX_AGE_S, readiness)
            return readiness
        finally:
            self._probing = None


def state_of(request: Request) -> AppState:
    """The app's shared state (``create_app`` puts it on ``app.state``)."""
    return cast(AppState, request.app.state.shared)


# A route's parameter of this type gets the shared state; it adds nothing to the OpenAPI.
Shared = Annotated[AppState, Depends(state_of)]


def conflicting(conflict: Conflict) -> Refused:
    """The 409 for an event id already used for other content."""
    return Refused(409, mask(str(conflict)), ids=[mask(i) for i in conflict.ids])


def unavailable(kind: str, message: str) -> Refused:
    """The 503 for a token store that failed with ``kind``: nothing was stored, send again."""
    lines = message.strip().splitlines()
    return Refused(
        503,
        f"the token store is unavailable ({kind}); nothing was stored",
        headers={"Retry-After": str(RETRY_AFTER_S)},
        cause=f"{kind}: {mask(lines[0]) if lines else kind}",
    )


async def _probe(name: str, check: Callable[[], None]) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(check), timeout=READY_TIMEOUT_S + 1)
    except TimeoutError:
        log.warning("readiness.failed", dependency=name, error="timed out")
        return "timed out"
    except Exception as error:
        log.warning("readiness.failed", dependency=name, error=mask(first_line(error)))
        return f"unreachable ({type(error).__name__})"
    return "ok"
