"""Putting ids on the queue, after the rows that name them are committed.

Events and notices are rows first (the inbox and the outbox); a message carries only ids. A
message lost between commit and publish costs nothing but time: the scheduled re-drive
publishes whatever is still pending.

So publishing gives up quickly: one connection attempt of at most ``QUICK_CONNECT_S``, no
retries, and after a failure no attempt at all on that broker for ``PAUSE_AFTER_FAILURE_S``.
A request to the API that stored its events is then not held up by a broker that is down.

Work a transaction causes runs once it has committed: :func:`published_after_commit` wraps
a transaction, then runs the callbacks registered with :func:`after_commit` and publishes the
notices the transaction queued (``worker.domain.notices.take_new_notices``).

Imports ``config`` and ``worker.domain`` only: never the tasks, the API, the command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Final
from uuid import uuid4
from weakref import WeakKeyDictionary

import structlog
from sqlalchemy.orm import Session

from tokenwarden.config.celery import DELIVER_NOTICES, PROCESS_EVENTS
from tokenwarden.config.settings import get_settings, without_password
from tokenwarden.worker.domain.notices import take_new_notices

log = structlog.get_logger(__name__)

# Ids per message: enough to amortise a transaction, few enough to finish well inside the
# task time limit.
CHUNK: Final = 100
# A broker that answers connects in milliseconds; one that drops packets would otherwise
# hold each publish for the app's whole connection timeout and retries (about 6 s).
QUICK_CONNECT_S: Final = 1.0
# After a failed publish, later ones in this process skip the broker for this long instead of
# each paying the connection timeout again; the re-drive publishes what they leave pending.
PAUSE_AFTER_FAILURE_S: Final = 5.0
# Session.info key: what to do once this transaction has committed.
_AFTER_COMMIT: Final = "tokenwarden.after_commit"


@dataclass(frozen=True)
class _Failure:
    at: float  # time.monotonic()
    reason: str


# Each Celery app's last failed publish, if it failed and has not published since.
_failures: WeakKeyDictionary[Any, _Failure] = WeakKeyDictionary()


class PublishError(Exception):
    """The broker did not take the message."""


def broker_of(app: Any) -> str:
    """The app's broker URL without its password, fit for a log line or an error."""
    return without_password(str(app.conf.broker_url))


def _check_pause(app: Any) -> None:
    """Raise :class:`PublishError` at once while ``app`` is pausing after a failure."""
    failure = _failures.get(app)
    if failure is None:
        return
    ago = time.monotonic() - failure.at
    if ago < PAUSE_AFTER_FAILURE_S:
        raise PublishError(
            f"not tried: the broker at {broker_of(app)} failed {ago:.1f} s ago "
            f"({failure.reason}); the re-drive publishes the pending ids"
        )


def _connect_quickly(connection: Any) -> None:
    """Connect the pooled publishing connection with one short attempt per broker host."""
    if connection.connected:
        return
    connection.connect_timeout = min(connection.connect_timeout or QUICK_CONNECT_S, QUICK_CONNECT_S)
    connection.ensure_connection(
        max_retries=max(len(connection.alt) - 1, 0),  # each failover host once
        interval_start=0,
        interval_step=0,
        timeout=QUICK_CONNECT_S,
    )


def _send(app: Any, producer: Any, task: str, part: list[str], *, what: str | None) -> None:
    """Put one message on the queue: the message ``app.send_task`` sends, for less CPU.

    The producer API pays for this on every group commit. ``send_task`` also looks up the
    task's options, runs the router, notifies the result backend and builds a result object;
    none of that changes our message (no per-task options, no routes, no result backend, see
    config.celery), so the message is built and sent with the two steps it ends with.
    """
    amqp = app.amqp
    # Within a task (the re-drive), the message names it as parent, as send_task's would.
    root_id = parent_id = None
    parent = app.current_worker_task
    if parent:
        root_id = parent.request.root_id or parent.request.id
        parent_id = parent.request.id
    message = amqp.create_task_message(
        str(uuid4()),
        task,
        [part],
        None,
        reply_to=app.thread_oid,
        root_id=root_id,
        parent_id=parent_id,
        ignore_result=None,  # send_task's header: the task's own setting decides
        # What a worker log line and task events show for the arguments. Celery would
        # repr the whole list, which costs more than the rest of the publish for a long one;
        # a worker line names the ids anyway (worker.runtime.signals binds them).
        argsrepr=None if what is None else f"[{len(part)} {what}]",
        kwargsrepr=None if what is None else "{}",
    )
    queue = amqp.default_queue
    # kombu declares the queue once per connection but, to find out that it already did,
    # binds a copy of it to the channel on every publish; ask the same cache directly.
    declared = hash(queue) in producer.connection.declared_entities
    # A broker error surfaces as kombu's OperationalError with the same text, as from
    # send_task.
    with producer.connection._reraise_as_library_errors():
        amqp.send_task_message(
            producer, task, message, queue=queue, retry=False, declare=[] if declared else None
        )


def _publish(app: Any, task: str, ids: Sequence[str], chunk: int, *, what: str | None) -> None:
    if not ids:
        return
    _check_pause(app)
    try:
        with app.producer_or_acquire() as producer:
            try:
                _connect_quickly(producer.connection)
                for start in range(0, len(ids), chunk):
                    part = list(ids[start : start + chunk])
                    _send(app, producer, task, part, what=what)
                    log.debug("ids.published", task=task, count=len(part))
            except Exception:
                # Drop the connection so that the next publish connects afresh rather than
                # writing to a socket the broker already closed.
                producer.connection.collect()
                raise
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        _failures[app] = _Failure(time.monotonic(), reason)
        log.warning(
            "broker.publish_failed",
            broker=broker_of(app),
            task=task,
            count=len(ids),
            error=reason,
            paused_s=PAUSE_AFTER_FAILURE_S,
            then="the inbox re-drive publishes the pending ids once the broker answers",
        )
        raise PublishError(
            f"the broker at {broker_of(app)} did not take the message: {reason}"
        ) from error
    _failures.pop(app, None)


def publish_event_ids(app: Any, event_ids: Sequence[str], *, per_message: int = CHUNK) -> None:
    """Send ``event_ids`` to the worker in chunks; raise :class:`PublishError` on failure."""
    _publish(app, PROCESS_EVENTS, event_ids, min(per_message, CHUNK), what="event ids")


def publish_notice_ids(app: Any, notice_ids: Sequence[str]) -> None:
    """Send ``notice_ids`` for delivery, one per message so a slow receiver holds up no other."""
    # One id a message: Celery's own repr of it is short and names the notice in the
    # worker's lines.
    _publish(app, DELIVER_NOTICES, notice_ids, 1, what=None)


def broker_unreachable(app: Any) -> str | None:
    """Why the app's broker cannot be reached now (one quick attempt); None when it can."""
    try:
        with app.connection_for_write() as connection:
            _connect_quickly(connection)
    except Exception as error:
        return " ".join(str(error).split()) or type(error).__name__
    return None


def publish_new_notices(app: Any | None, notice_ids: Sequence[str]) -> None:
    """Publish after commit; on failure the re-drive delivers them later, so only warn.

    ``app`` None means the worker's app, imported only when there is something to publish
    (a command that queued nothing does not load Celery's app).
    Without a webhook URL or an SMTP server there is nowhere to deliver: the notices stay
    pending in the outbox (``tokenwarden notices``) and nothing is published, as the notice
    re-drive does.
    """
    if not notice_ids:
        return
    current = get_settings()
    if not (current.notice_webhook_url or current.smtp_url):
        return
    if app is None:
        from tokenwarden.worker.runtime import celery_app

        app = celery_app.app
    try:
        publish_notice_ids(app, notice_ids)
    except PublishError as error:
        log.warning("notices.publish_failed", count=len(notice_ids), error=str(error))


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Call ``callback`` once ``session``'s transaction has committed; never if it fails.

    Only for a transaction run through :func:`published_after_commit`.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@contextmanager
def published_after_commit(
    transaction: AbstractContextManager[Session], *, app: Any | None = None
) -> Iterator[Session]:
    """Run ``transaction``; once it has committed, run its :func:`after_commit` callbacks and
    publish the notices it queued (see :func:`publish_new_notices` for ``app``).

    Both are read inside the block and acted on after it closes, so a slow broker never holds
    a database connection; a transaction that raises publishes nothing.
    """
    with transaction as session:
        yield session
        callbacks: list[Callable[[], object]] = session.info.pop(_AFTER_COMMIT, [])
        notice_ids = take_new_notices(session)
    for callback in callbacks:
        callback()
    publish_new_notices(app, notice_ids)
