"""Re-driving: publishing again the events and notices that no worker finished in time.

A message lost between commit and publish, or with a worker that died, costs only time: these
run on beat's schedule and publish whatever is still pending after ``redrive_after_s``. Each
id published is marked in the same transaction, so it is published again only if still pending
``redrive_after_s`` later.

Imports ``config``, ``worker.domain`` and the rest of the runtime only: never the tasks, the
API, the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import db, endpoints, inbox, mail_outbox, outbox_delivery
from tokenwarden.worker.runtime import mail, webhook
from tokenwarden.worker.runtime.publishing import (
    PublishError,
    after_commit,
    publish_event_ids,
    publish_notice_ids,
)

log = structlog.get_logger(__name__)


def redrive_events(
    session: Session, *, app: Any, now: datetime, older_than: timedelta
) -> list[str]:
    """Mark the pending events due for a re-drive; publish them once the marks are committed.

    ``session`` must be run through ``publishing.published_after_commit`` (a
    ``DatabaseTask`` run is).
    """
    event_ids = inbox.due_for_redrive(session, now=now, older_than=older_than)
    if event_ids:
        after_commit(session, lambda: _publish(publish_event_ids, app, event_ids, "events"))
    return event_ids


def redrive_notices(engine: Engine, *, app: Any, settings: Settings, now: datetime) -> list[str]:
    """Publish the notices that have been due for a while without a worker taking them.

    Due for ``redrive_after_s``: a new notice's own message and a retry's delayed message
    get that long to arrive first. A lease that ran out (its worker died) counts as due.
    A message that waits behind a long queue is not joined by a copy on every run.
    Without a webhook target nothing is due, so notices kept in the outbox are not re-sent
    around in circles; the same holds for emails without a mail target, and for the webhook
    while its endpoint is disabled.
    """
    target = webhook.target_from(settings)
    mail_target = mail.target_from(settings)
    if target is None and mail_target is None:
        return []
    cutoff = now - timedelta(seconds=settings.redrive_after_s)
    # Read first, outside any write lock: most runs find nothing due and stop here.
    with db.transaction(engine.execution_options(**{db.READ_ONLY: True})) as session:
        posting = target is not None and not endpoints.is_disabled(session, target.url)
        candidates = outbox_delivery.due(session, now=cutoff) if posting else []
        mailing = mail_outbox.due_notice_ids(session, now=cutoff) if mail_target else []
    if not candidates and not mailing:
        return []
    with db.transaction(engine) as session:
        marked = outbox_delivery.mark_redriven(session, candidates, now=now, cutoff=cutoff)
        marked += mail_outbox.mark_redriven(session, mailing, now=now, cutoff=cutoff)
    notice_ids = list(dict.fromkeys(marked))
    if notice_ids:
        _publish(publish_notice_ids, app, notice_ids, "notices")
    return notice_ids


def _publish(
    publish: Callable[[Any, Sequence[str]], None],
    app: Any,
    ids: Sequence[str],
    what: Literal["events", "notices"],
) -> None:
    """Logs ``events.redriven`` or ``notices.redriven``; on failure ``….redrive_failed``."""
    try:
        publish(app, ids)
    except PublishError as error:
        # The rows are marked as re-driven now, so the next re-drive after redrive_after_s
        # tries again; failing this run would not bring that any closer.
        log.warning(f"{what}.redrive_failed", count=len(ids), error=str(error))
        return
    log.info(f"{what}.redriven", count=len(ids))
