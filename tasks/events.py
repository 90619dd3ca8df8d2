"""Event tasks: apply the inbox events a message names, and re-drive the ones left behind.

Each task parses its arguments, calls one runtime function (``worker.runtime.batching``,
``worker.runtime.redrive``) and logs. Imports ``config``, ``worker.domain`` and
``worker.runtime``; never the API (``producer``).
"""

from __future__ import annotations

import contextlib
import functools
from datetime import timedelta
from typing import Any, Final

import structlog
from sqlalchemy.orm import Session

from tokenwarden.config.celery import PROCESS_EVENTS, REDRIVE_EVENTS
from tokenwarden.config.settings import get_settings
from tokenwarden.tasks.arguments import BadArguments, id_list
from tokenwarden.worker.domain import clock
from tokenwarden.worker.runtime import batching, publishing, redrive
from tokenwarden.worker.runtime.celery_app import app
from tokenwarden.worker.runtime.tasking import IDEMPOTENT, REDRIVE, DatabaseTask

log = structlog.get_logger(__name__)

# More ids than any producer sends in one message (worker.runtime.publishing.CHUNK is 100).
MAX_IDS: Final = 1000
ID_MAX_LENGTH: Final = 200


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=DatabaseTask,
    name=PROCESS_EVENTS,
    **IDEMPOTENT,
)
def process_events(self: DatabaseTask, session: Session, *args: Any, **kwargs: Any) -> None:
    """Apply the pending inbox events named by the message's one argument, a list of ids.

    Any other arguments make the message unusable: it is dead-lettered and acknowledged.
    """
    try:
        event_ids = id_list(
            args, kwargs, name="event_ids", max_count=MAX_IDS, max_length=ID_MAX_LENGTH
        )
    except BadArguments as error:
        self.dead_letter(error.reason, body=error.body, session=session)
        return
    with structlog.contextvars.bound_contextvars(event_ids=event_ids):
        applied = batching.apply_message(session, event_ids, now=clock.now(), task=self.name)
        unfinished = applied.outcome.unfinished
        if unfinished:
            self.after_commit(session, functools.partial(_publish_again, self.app, unfinished))
        log.info(
            "events.processed",
            done=len(applied.outcome.done),
            dead=len(applied.outcome.dead),
            missing=len(applied.outcome.missing),
            skipped=len(applied.outcome.skipped),
            unfinished=len(unfinished),
            besides=applied.besides,
            elsewhere=len(applied.elsewhere),
        )


def _publish_again(app: Any, event_ids: list[str]) -> None:
    """The next run of events applied in part; if the broker is away, the re-drive does it."""
    # A failure is logged by publishing; the events are pending, so the re-drive finds them.
    with contextlib.suppress(publishing.PublishError):
        publishing.publish_event_ids(app, event_ids)


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=DatabaseTask,
    name=REDRIVE_EVENTS,
    **REDRIVE,
)
def redrive_events(self: DatabaseTask, session: Session) -> None:
    """Re-publish pending events that no worker finished, once the marks are committed."""
    event_ids = redrive.redrive_events(
        session,
        app=self.app,
        now=clock.now(),
        older_than=timedelta(seconds=get_settings().redrive_after_s),
    )
    if event_ids:  # quiet when there is nothing to do, as it is nearly always
        log.info("events.redrive", count=len(event_ids))
