"""Notice tasks: deliver the notices a message names, and re-drive the ones left behind.

Delivery talks to a receiver that may be slow, so unlike the event tasks it gets no
transaction per run: each notice is leased, posted and recorded in short transactions of its
own (worker.delivery.deliver), and no database lock is held while the receiver answers.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Final

import httpx
import structlog
from celery.exceptions import Ignore, Reject, Retry

from config.settings import get_settings
from worker import clock, db, delivery, handlers
from worker.app import app
from worker.publish import DELIVER_NOTICES, PublishError, publish_notice_ids
from worker.tasking import CountedTask

log = structlog.get_logger(__name__)

REDRIVE_NOTICES: Final = "tokenwarden.redrive_notices"
MAX_IDS: Final = 1000
ID_MAX_LENGTH: Final = 40  # notices.id
_NOT_FAILURES: Final = (Retry, Ignore, Reject)


# Idempotent (a sent or leased notice is skipped), so a message is acknowledged only once the
# run is over, and given back when its worker dies.
@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=CountedTask,
    bind=True,
    name=DELIVER_NOTICES,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def deliver_notices(self: CountedTask, notice_ids: list[str]) -> None:
    """Post each pending, due notice named; schedule another try for those that must wait.

    Without a webhook URL nothing is posted: the notices stay pending in the outbox, where
    ``tokenwarden notices`` shows them.
    """
    if not _is_id_list(notice_ids):
        _dead_letter(self, notice_ids)
        return
    target = delivery.target_from(get_settings())
    if target is None:
        log.info("notices.kept", count=len(notice_ids), reason="no usable webhook target")
        return
    engine = self.engine()
    outcomes: Counter[str] = Counter()
    with httpx.Client(headers={"user-agent": delivery.USER_AGENT}) as client:
        for notice_id in dict.fromkeys(notice_ids):
            with structlog.contextvars.bound_contextvars(notice_id=notice_id):
                attempt = delivery.deliver(engine, notice_id, target=target, client=client)
                outcomes[attempt.status] += 1
                if attempt.retry_in_s is not None:
                    _schedule(self, notice_id, attempt.retry_in_s)
    log.info("notices.attempted", **outcomes)


def _schedule(task: CountedTask, notice_id: str, delay_s: float) -> None:
    """The next attempt, as a delayed message; if the broker refuses, the re-drive sends it."""
    try:
        task.apply_async(args=[[notice_id]], countdown=delay_s)
    except Exception as error:
        log.warning("notice.retry_not_scheduled", notice_id=notice_id, error=str(error))
        return
    log.info("notice.retry_scheduled", notice_id=notice_id, retry_in_s=round(delay_s, 3))


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=CountedTask,
    bind=True,
    name=REDRIVE_NOTICES,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # Beat sends one every few seconds; one run re-drives everything due, so a backlog built
    # while no worker ran is dropped rather than replayed.
    expires=60,
)
def redrive_notices(self: CountedTask) -> None:
    """Publish the notices that have been due for a while without a worker taking them.

    Due for ``redrive_after_s``: a new notice's own message and a retry's delayed message
    get that long to arrive first. A lease that ran out (its worker died) counts as due.
    Without a webhook target nothing is due, so notices kept in the outbox are not re-sent
    around in circles.
    """
    settings = get_settings()
    if delivery.target_from(settings) is None:
        return
    cutoff = clock.now() - timedelta(seconds=settings.redrive_after_s)
    reader = self.engine().execution_options(**{db.READ_ONLY: True})
    with db.transaction(reader) as session:
        notice_ids = delivery.due(session, now=cutoff)
    if not notice_ids:
        return
    try:
        publish_notice_ids(self.app, notice_ids)
    except PublishError as error:
        # Nothing was marked: the next run finds the same notices due and tries again.
        log.warning("notices.redrive_failed", count=len(notice_ids), error=str(error))
        return
    log.info("notices.redriven", count=len(notice_ids))


def _is_id_list(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_IDS
        and all(isinstance(item, str) and 0 < len(item) <= ID_MAX_LENGTH for item in value)
    )


def _dead_letter(task: CountedTask, value: object) -> None:
    reason = (
        f"bad arguments: notice_ids must be a list of at most {MAX_IDS} ids of 1 to "
        f"{ID_MAX_LENGTH} characters"
    )
    with db.transaction(task.engine()) as session:
        handlers.dead_letter_message(
            session, reason=reason, now=clock.now(), task=task.name, body={"args": [value]}
        )
