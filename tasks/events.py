"""Event tasks: apply the inbox events a message names, and re-drive the ones left behind."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

import structlog
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from config.celery import PROCESS_EVENTS, REDRIVE_EVENTS
from config.settings import get_settings
from worker.domain import clock, handlers, inbox
from worker.runtime.celery_app import app
from worker.runtime.publishing import CHUNK, PublishError, publish_event_ids
from worker.runtime.tasking import DatabaseTask, is_transient

log = structlog.get_logger(__name__)

# More ids than any producer sends in one message (worker.runtime.publishing.CHUNK is 100).
MAX_IDS: Final = 1000
ID_MAX_LENGTH: Final = 200


class BadArguments(ValueError):
    """The message's arguments are not one list of event ids."""


def _retryable(error: Exception) -> bool:
    # A time limit is not the event's fault either: roll back the run, the re-drive brings
    # the events back.
    return is_transient(error) or isinstance(error, SoftTimeLimitExceeded)


# Idempotent (a finished event is skipped), so a message is acknowledged only once the run
# has committed, and given back when its worker dies.
@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=DatabaseTask,
    bind=True,
    name=PROCESS_EVENTS,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def process_events(self: DatabaseTask, session: Session, *args: Any, **kwargs: Any) -> None:
    """Apply the pending inbox events named by the message's one argument, a list of ids.

    Any other arguments make the message unusable: it is dead-lettered and acknowledged.
    """
    now = clock.now()
    try:
        event_ids = _event_ids(args, kwargs)
    except BadArguments as error:
        handlers.dead_letter_message(
            session,
            reason=f"bad arguments: {error}",
            now=now,
            task=self.name,
            body={"args": args, "kwargs": kwargs},
        )
        return
    with structlog.contextvars.bound_contextvars(event_ids=event_ids):
        # A message carries at most CHUNK ids; a shorter one takes other pending events along
        # (see inbox.pending_besides), so a backlog drains in batches. Its own events are
        # locked first (inbox.hold), so that taking others along cannot deadlock.
        besides: list[str] = []
        if len(event_ids) < CHUNK:
            inbox.hold(session, event_ids)
            besides = inbox.pending_besides(session, event_ids, limit=CHUNK - len(event_ids))
        outcome = handlers.apply_pending(
            session, [*event_ids, *besides], now=now, retryable=_retryable, task=self.name
        )
        log.info(
            "events.processed",
            done=len(outcome.done),
            dead=len(outcome.dead),
            missing=len(outcome.missing),
            skipped=len(outcome.skipped),
            besides=len(besides),
        )


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=DatabaseTask,
    bind=True,
    name=REDRIVE_EVENTS,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # Beat sends one every few seconds; a backlog built while no worker ran is dropped
    # rather than replayed, since any one run re-drives everything that is due.
    expires=60,
)
def redrive_events(self: DatabaseTask, session: Session) -> None:
    """Re-publish pending events that no worker finished, once the marks are committed."""
    settings = get_settings()
    event_ids = inbox.due_for_redrive(
        session, now=clock.now(), older_than=timedelta(seconds=settings.redrive_after_s)
    )
    if event_ids:
        self.after_commit(session, lambda: _publish(self, event_ids))
    log.info("events.redrive", count=len(event_ids))


def _publish(task: DatabaseTask, event_ids: list[str]) -> None:
    try:
        publish_event_ids(task.app, event_ids)
    except PublishError as error:
        # The rows are marked as published now, so the next re-drive after redrive_after_s
        # tries again; failing this run would not bring that any closer.
        log.warning("events.redrive_failed", count=len(event_ids), error=str(error))
        return
    log.info("events.redriven", count=len(event_ids))


def _event_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    if kwargs.keys() - {"event_ids"} or len(args) + len(kwargs) != 1:
        raise BadArguments("expected exactly one argument, event_ids")
    value = args[0] if args else kwargs["event_ids"]
    if not isinstance(value, list):
        raise BadArguments(f"event_ids must be a list, not {type(value).__name__}")
    if len(value) > MAX_IDS:
        raise BadArguments(f"at most {MAX_IDS} event ids per message, not {len(value)}")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= ID_MAX_LENGTH:
            raise BadArguments(f"each event id must be a string of 1 to {ID_MAX_LENGTH} characters")
        if "\x00" in item:
            # No stored id has one (the API refuses them), and Postgres cannot even compare
            # with one: the query would fail the run instead of dead-lettering the message.
            raise BadArguments("an event id cannot contain a NUL character")
    return value
