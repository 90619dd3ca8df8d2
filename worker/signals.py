"""Celery signals: our logging, the task log context, and dead letters for unusable messages.

The worker imports this module through the app's ``include``. A message the worker cannot use
(a body that is not JSON, an unknown task, a malformed task message) is kept as a dead-letter
row with the reason and a redacted excerpt of its body, then acknowledged or rejected as
Celery does anyway: it is never redelivered forever, and the worker keeps consuming.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
from celery import signals
from celery.worker.consumer import Consumer

from config.logging import bind_task_context, clear_task_context, configure_logging
from config.settings import get_settings
from worker import clock, db, handlers, tasking
from worker.publish import PROCESS_EVENTS

log = structlog.get_logger(__name__)


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]  # celery ships no type information
    """Celery's consumer, plus a dead-letter row for a message whose body cannot be decoded.

    Celery acknowledges such a message in ``on_decode_error`` and sends no signal, so this is
    the one place to keep it. Configure with ``worker_consumer``.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        keep_dead_letter(
            reason=f"undecodable message ({message.content_type}): {exc}",
            task=_task_name(message),
            body=message.body,
        )
        super().on_decode_error(message, exc)


def keep_dead_letter(*, reason: str, task: str | None, body: object) -> None:
    """Write one dead-letter row in its own transaction; never raise into the consumer."""
    try:
        with db.transaction(tasking.store_engine()) as session:
            handlers.dead_letter_message(
                session, reason=reason, now=clock.now(), task=task, body=body
            )
    except Exception:
        # The message is dropped either way; losing its copy must not stop the consumer.
        log.exception("dead_letter.failed", reason=handlers.redact(reason), task=task)


def setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our one logging setup; connecting to this signal stops Celery installing its own."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel
    configure_logging(level=level or "INFO")


def bind_context(
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    **_: Any,
) -> None:
    context: dict[str, Any] = {"task_id": task_id, "task_name": getattr(task, "name", None)}
    if getattr(task, "name", None) == PROCESS_EVENTS and args and _is_id_list(args[0]):
        context["event_ids"] = args[0]
    bind_task_context(**context)


def clear_context(**_: Any) -> None:
    clear_task_context()


def dead_letter_unknown_task(message: Any = None, name: str | None = None, **kwargs: Any) -> None:
    keep_dead_letter(
        reason=f"unknown task {name!r} (message {kwargs.get('id')})",
        task=name,
        body=_body(message),
    )


def dead_letter_rejected(message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    reason = f"invalid task message: {exc}" if exc is not None else "not a task message"
    keep_dead_letter(reason=reason, task=_task_name(message), body=_body(message))


def dispose_inherited_pool(**_: Any) -> None:
    """A forked pool child must not reuse the connections its parent opened."""
    db.engine_for(get_settings().resolved_database_url).dispose(close=False)


def _is_id_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _task_name(message: Any) -> str | None:
    headers = getattr(message, "headers", None)
    name = headers.get("task") if isinstance(headers, dict) else None
    return name if isinstance(name, str) else None


def _body(message: Any) -> object:
    return getattr(message, "body", None)


# Explicit connect calls rather than decorators: the signal objects are untyped.
# weak=False: the receivers live as long as the process, whatever holds this module.
signals.setup_logging.connect(setup_logging, weak=False)
signals.task_prerun.connect(bind_context, weak=False)
signals.task_postrun.connect(clear_context, weak=False)
signals.task_unknown.connect(dead_letter_unknown_task, weak=False)
signals.task_rejected.connect(dead_letter_rejected, weak=False)
signals.worker_process_init.connect(dispose_inherited_pool, weak=False)
