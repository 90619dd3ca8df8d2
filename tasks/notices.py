"""Notice tasks: deliver the notices a message names, and re-drive the ones left behind.

Delivery talks to a receiver that may be slow, so unlike the event tasks it gets no
transaction per run: each notice is leased, posted and recorded in short transactions of its
own (worker.runtime.webhook.deliver), and no database lock is held while the receiver answers.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any, Final

import structlog
from celery import signals

from config.celery import DELIVER_NOTICES, REDRIVE_NOTICES
from config.settings import get_settings
from worker.domain import clock, db, handlers, outbox_delivery
from worker.runtime import webhook
from worker.runtime.celery_app import app
from worker.runtime.publishing import PublishError, publish_notice_ids
from worker.runtime.tasking import CountedTask

log = structlog.get_logger(__name__)

# More ids than any publisher sends in one message (worker.runtime.publishing sends
# one per message).
MAX_IDS: Final = 1000
ID_MAX_LENGTH: Final = 40  # notices.id
NO_SUCH_NOTICE: Final = "no such notice in the outbox"
_SHAPE: Final = (
    f"notice_ids must be a list of at most {MAX_IDS} ids of 1 to {ID_MAX_LENGTH} characters"
)


class BadArguments(ValueError):
    """The message's arguments are not one list of notice ids."""


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
def deliver_notices(self: CountedTask, *args: Any, **kwargs: Any) -> None:
    """Post each pending, due notice named by the message's one argument, a list of ids;
    schedule another try for those that must wait.

    Any other arguments make the message unusable, and so does an id that names no notice:
    each gets a dead letter with the reason, and the message is acknowledged. A notice that
    is already sent, or taken by another worker, is skipped (a duplicate message is normal).
    Without a webhook URL nothing is posted: the notices stay pending in the outbox, where
    ``tokenwarden notices`` shows them.
    """
    try:
        notice_ids = _notice_ids(args, kwargs)
    except BadArguments as error:
        _dead_letter(self, f"bad arguments: {error}", body={"args": args, "kwargs": kwargs})
        return
    wanted = list(dict.fromkeys(notice_ids))
    # Postgres cannot even compare a text with a NUL in it; no stored id holds one.
    for notice_id in (i for i in wanted if "\x00" in i):
        _no_such_notice(self, notice_id, notice_ids, why="an id cannot hold a NUL character")
    wanted = [i for i in wanted if "\x00" not in i]
    target = webhook.target_from(get_settings())
    if target is None:
        _keep(self, wanted, notice_ids)
        return
    engine = self.engine()
    client = webhook.shared_client()
    outcomes: Counter[str] = Counter()
    for notice_id in wanted:
        with structlog.contextvars.bound_contextvars(notice_id=notice_id):
            attempt = webhook.deliver(engine, notice_id, target=target, client=client)
            outcomes[attempt.status] += 1
            if attempt.status == outbox_delivery.MISSING:
                _no_such_notice(self, notice_id, notice_ids)
            elif attempt.retry_in_s is not None:
                _schedule(self, notice_id, attempt.retry_in_s)
    log.info("notices.attempted", **outcomes)


def _keep(task: CountedTask, wanted: list[str], notice_ids: list[str]) -> None:
    """No target: leave the notices in the outbox, but still refuse ids that name none."""
    reader = task.engine().execution_options(**{db.READ_ONLY: True})
    with db.transaction(reader) as session:
        known = outbox_delivery.existing(session, wanted)
    for notice_id in wanted:
        if notice_id not in known:
            _no_such_notice(task, notice_id, notice_ids)
    log.info("notices.kept", count=len(known), reason="no usable webhook target")


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
    Each notice published is marked in the same transaction (its next attempt moves to now),
    so it is published again only if still pending ``redrive_after_s`` later: a message that
    waits behind a long queue is not joined by a copy on every run.
    Without a webhook target nothing is due, so notices kept in the outbox are not re-sent
    around in circles.
    """
    settings = get_settings()
    if webhook.target_from(settings) is None:
        return
    now = clock.now()
    cutoff = now - timedelta(seconds=settings.redrive_after_s)
    engine = self.engine()
    # Read first, outside any write lock: most runs find nothing due and stop here.
    with db.transaction(engine.execution_options(**{db.READ_ONLY: True})) as session:
        candidates = outbox_delivery.due(session, now=cutoff)
    if not candidates:
        return
    with db.transaction(engine) as session:
        notice_ids = outbox_delivery.mark_redriven(session, candidates, now=now, cutoff=cutoff)
    if not notice_ids:
        return
    try:
        publish_notice_ids(self.app, notice_ids)
    except PublishError as error:
        # They are marked as re-driven now, so the next run after redrive_after_s tries
        # again; failing this run would not bring that any closer.
        log.warning("notices.redrive_failed", count=len(notice_ids), error=str(error))
        return
    log.info("notices.redriven", count=len(notice_ids))


def _notice_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    if kwargs.keys() - {"notice_ids"} or len(args) + len(kwargs) != 1:
        raise BadArguments("expected exactly one argument, notice_ids")
    value = args[0] if args else kwargs["notice_ids"]
    if not isinstance(value, list):
        raise BadArguments(f"{_SHAPE}, not {type(value).__name__}")
    if len(value) > MAX_IDS:
        raise BadArguments(f"{_SHAPE}, not {len(value)} ids")
    if not all(isinstance(item, str) and 0 < len(item) <= ID_MAX_LENGTH for item in value):
        raise BadArguments(_SHAPE)
    return value


def _no_such_notice(
    task: CountedTask, notice_id: str, notice_ids: list[str], *, why: str | None = None
) -> None:
    reason = f"{NO_SUCH_NOTICE}: {notice_id!r}" + (f" ({why})" if why else "")
    _dead_letter(task, reason, body={"args": [notice_ids], "kwargs": {}})


def _dead_letter(task: CountedTask, reason: str, *, body: object) -> None:
    with db.transaction(task.engine()) as session:
        handlers.dead_letter_message(
            session, reason=reason, now=clock.now(), task=task.name, body=body
        )


def _close_client(**_: Any) -> None:
    """A worker process that stops closes its connections to the receiver."""
    webhook.close_shared_client()


# A prefork child sends worker_process_shutdown; a solo or threads worker, worker_shutdown.
# weak=False: the receivers live as long as the process.
signals.worker_process_shutdown.connect(_close_client, weak=False)
signals.worker_shutdown.connect(_close_client, weak=False)
